"""Plugins: modules that register custom parts (priors, likelihoods, models, datasets, methods).

A plugin is an ordinary Python module whose import registers its parts, e.g.
``PRIORS.register("my_prior")(MyPrior)``. It is found in one of two ways:

- named explicitly: ``ppl-vae --plugin mypkg.parts fit --prior my_prior`` or
  :func:`load_plugins` ``(["mypkg.parts"])``;
- installed with an entry point in the group ``ppl_vae.plugins`` (``setup.cfg``:
  ``[options.entry_points] ppl_vae.plugins = mine = mypkg.parts``), which the CLI loads on
  every start, so no flag is needed. Only distributions installed on ``sys.path`` count, never
  a ``.dist-info`` in the current folder (:func:`installed_paths`).

A spec is ``"module"`` or ``"module:function"``; the function, when given, is called once
with no arguments after the import (a registration hook). A run records the specs it used in
``RunConfig.plugins`` so that evaluate, compare and resume load the same parts.

A run directory is data a user may receive from someone else, so the plugins its config names
are imported by :func:`load_run_plugins` only when they are trusted: already loaded in this
process (``--plugin``, :func:`load_plugins`, an installed entry point), installed as a
``ppl_vae.plugins`` entry point, or when the caller trusts the run (``--trust-plugins``,
``trust=True``). A name a run records must be a dotted module name (``mypkg.parts``): no
``module:function`` hook, so ``"sys:exit"`` or ``"code:interact"`` never run from a config.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ppl_vae.errors import PplVaeError

ENTRY_POINT_GROUP = "ppl_vae.plugins"

# spec -> True once imported (and its hook called): loading is idempotent, so a hook that
# registers names is never called twice (the registries refuse a second registration).
_LOADED: Dict[str, bool] = {}


class PluginError(PplVaeError, ImportError):
    """A plugin module cannot be imported (or its registration hook failed)."""


@dataclass(frozen=True)
class PluginEntryPoint:
    """An installed plugin: the entry point's ``name``, its ``spec`` (module[:function]) and
    the distribution that declares it (``None`` when unknown)."""

    name: str
    spec: str
    distribution: str | None = None


def _check_spec(spec: object) -> str:
    if not isinstance(spec, str) or not spec.strip() or spec.count(":") > 1:
        raise PluginError(f"plugin must be a module name such as 'mypkg.parts' (or 'module:function'), got {spec!r}")
    module, _, attr = spec.strip().partition(":")
    if not all(part.isidentifier() for part in module.split(".")) or (attr and not attr.isidentifier()):
        raise PluginError(f"plugin must be a module name such as 'mypkg.parts' (or 'module:function'), got {spec!r}")
    return spec.strip()


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def check_module_name(name: object, what: str = "plugin") -> str:
    """``name`` when it is a dotted module name such as ``mypkg.parts``; else a PluginError."""
    if not isinstance(name, str) or not _MODULE_NAME.match(name):
        raise PluginError(f"{what} must be a dotted module name such as 'mypkg.parts', got {name!r}")
    if name.endswith(".py"):  # a file name: importing it would run 'mypkg' and then fail on '.py'
        raise PluginError(
            f"{what} must be a dotted module name such as 'mypkg.parts', got the file name {name!r}: use {name[:-3]!r}"
        )
    return name


def load_plugin(spec: str) -> str:
    """Import one plugin (``"module"`` or ``"module:function"``) and return its spec.

    Raises :class:`PluginError` with a one-line message naming the module when the import
    (or the hook) fails; a spec already loaded is not loaded again.
    """
    spec = _check_spec(spec)
    if _LOADED.get(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error raised while importing the user's module
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PluginError(f"plugin module {module_name!r} cannot be imported: {type(exc).__name__}: {detail}") from None
    if attr:
        hook = getattr(module, attr, None)
        if not callable(hook):
            raise PluginError(f"plugin {spec!r}: module {module_name!r} has no function {attr!r}")
        try:
            hook()
        except Exception as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise PluginError(f"plugin {spec!r} failed while registering: {type(exc).__name__}: {detail}") from None
    _LOADED[spec] = True
    return spec


def load_plugins(names: Iterable[str]) -> List[str]:
    """Import each plugin in ``names`` in order (see :func:`load_plugin`); return their specs
    without duplicates. The first one that fails raises :class:`PluginError` naming it."""
    loaded: List[str] = []
    for name in names:
        spec = load_plugin(name)
        if spec not in loaded:
            loaded.append(spec)
    return loaded


def installed_paths() -> List[str]:
    """The ``sys.path`` entries that hold installed distributions: every absolute entry except
    the current folder. ``python -m`` puts the current folder first (as its absolute path, or
    ``''``), and a relative ``PYTHONPATH`` entry follows it too; a run folder received from
    someone else may be that folder, with a ``.dist-info`` of its own."""
    try:
        cwd: Optional[Path] = Path.cwd().resolve()
    except OSError:  # the current folder was removed: no entry can stand for it
        cwd = None
    keep = []
    for entry in sys.path:
        if not isinstance(entry, str) or not entry or not os.path.isabs(entry):
            continue
        try:
            if cwd is not None and Path(entry).resolve() == cwd:
                continue
        except (OSError, RuntimeError):
            continue
        keep.append(entry)
    return keep


def discover() -> List[PluginEntryPoint]:
    """The plugins installed with an entry point in the group ``ppl_vae.plugins``, by name.

    Only distributions on :func:`installed_paths` count: a ``.dist-info`` in the current folder
    (``python -m ppl_vae.cli evaluate .`` run inside a received run folder) declares nothing.
    Where one distribution is found twice, the first on the path wins, as for ``import``."""
    from importlib.metadata import distributions

    found, seen = [], set()
    for dist in distributions(path=installed_paths()):
        name = dist.metadata["Name"] or ""
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.append(PluginEntryPoint(ep.name, ep.value, name or None))
    unique = {(p.name, p.spec): p for p in found}
    return sorted(unique.values(), key=lambda p: (p.name, p.spec))


def load_installed_plugins() -> tuple[List[str], List[str]]:
    """Load every plugin from :func:`discover`; return (loaded specs, one-line failure messages).

    A broken installed plugin must not make every command unusable, so failures are returned
    for the caller to show as warnings rather than raised.
    """
    loaded: List[str] = []
    failures: List[str] = []
    for ep in discover():
        try:
            spec = load_plugin(ep.spec)
        except PluginError as exc:
            failures.append(f"installed plugin {ep.name!r} ({ENTRY_POINT_GROUP} entry point) was skipped: {exc}")
        else:
            if spec not in loaded:
                loaded.append(spec)
    return loaded, failures


def merge(*groups: Sequence[str]) -> List[str]:
    """The specs of several lists in order, each once."""
    out: List[str] = []
    for group in groups:
        out.extend(s for s in group if s not in out)
    return out


def _installed_specs() -> set:
    specs = set()
    for ep in discover():
        specs.add(ep.spec)
        specs.add(ep.spec.partition(":")[0])
    return specs


def check_recordable(names: Sequence[str]) -> None:
    """Refuse a plugin a run could not load again by itself: a ``module:function`` hook that is
    not an installed entry point. A run records its plugins so that evaluate, compare and resume
    import them; a hook runs a function, which a received run never does (only an explicit
    ``--plugin`` may), so the run would be refused by every later command."""
    hooks = [n for n in names if isinstance(n, str) and ":" in n]
    if not hooks:
        return
    installed = _installed_specs()
    unrecordable = [n for n in hooks if n not in installed]
    if unrecordable:
        raise PluginError(
            f"plugin {unrecordable[0]!r} is a module:function hook, which a run cannot record (later commands "
            f"would refuse to run it): make module {unrecordable[0].partition(':')[0]!r} register its parts "
            f"when imported and load it as --plugin {unrecordable[0].partition(':')[0]}, or install it as a "
            f"{ENTRY_POINT_GROUP} entry point"
        )


def load_run_plugins(names: Sequence[str], *, trust: bool = False, source: str = "the run") -> List[str]:
    """Import the plugins a run's config names, when they are trusted (see the module docstring).

    Each name must be a dotted module name, or exactly the spec of an installed entry point. A
    name that is neither loaded, installed, nor covered by ``trust`` raises a one-line
    :class:`PluginError` saying which flag loads it; nothing is imported then.
    """
    names = list(names or [])
    if not names:
        return []
    installed = None
    untrusted = []
    for name in names:
        if isinstance(name, str) and _LOADED.get(name.strip()):
            continue
        if installed is None:
            installed = _installed_specs()
        if isinstance(name, str) and name in installed:
            continue
        if isinstance(name, str) and name.count(":") == 1 and all(_MODULE_NAME.match(part) for part in name.split(":")):
            untrusted.append(name)  # a hook runs a function: only an explicit --plugin allows it
            continue
        check_module_name(name, f"plugin named by {source}")
        if trust or name in sys.modules:  # an imported module runs no code when imported again
            continue
        untrusted.append(name)
    if untrusted:
        flags = " ".join(f"--plugin {n}" for n in untrusted)
        trust_too = (
            ""
            if any(":" in n for n in untrusted)  # --trust-plugins imports modules; it never runs a hook
            else " (or `ppl-vae --trust-plugins ...` to import every plugin the run names)"
        )
        raise PluginError(
            f"{source} names plugin{'s' if len(untrusted) > 1 else ''} {', '.join(map(repr, untrusted))}, "
            f"not installed as a {ENTRY_POINT_GROUP} entry point; a received run never imports code by itself: "
            f"load it with `ppl-vae {flags} ...`{trust_too} if you trust it"
        )
    return load_plugins(names)


_TRUST_ALL = False


def set_trust_all(value: bool) -> bool:
    """Whether runs' plugins are imported without being loaded first (the CLI's
    ``--trust-plugins``); returns the previous value."""
    global _TRUST_ALL
    previous, _TRUST_ALL = _TRUST_ALL, bool(value)
    return previous


def trust_all() -> bool:
    return _TRUST_ALL
