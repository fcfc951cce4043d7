"""The ``ppl-vae`` command group. Commands live one per module and load lazily.

Exit codes: 0 success; 1 an error in what was asked (bad value, missing or corrupt file, data
outside a likelihood's support, not enough memory), printed as one ``Error: ...`` line;
2 a command line click cannot parse (unknown option, wrong type, missing argument), printed by
click with the usage; 130 interrupted with Ctrl-C (files already written stay complete). A command
that fails or is interrupted removes the output folders it made and left empty.

Importing this module imports neither torch nor Pyro, so ``ppl-vae --help`` is fast.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import click

from ppl_vae.errors import one_line

# name -> "module:attribute"; a command's module is imported only when it runs.
COMMANDS: Dict[str, str] = {
    "fit": "ppl_vae.cli.fit:fit",
    "evaluate": "ppl_vae.cli.evaluate:evaluate",
    "compare": "ppl_vae.cli.compare:compare",
    "disentanglement": "ppl_vae.cli.disentanglement:disentanglement",
    "anomaly": "ppl_vae.cli.anomaly:anomaly",
    "models": "ppl_vae.cli.models:models",
    "text": "ppl_vae.cli.text:text",
    "experiment": "ppl_vae.cli.experiment:experiment",
    "generate": "ppl_vae.cli.generate:generate",
    "inpaint": "ppl_vae.cli.generate:inpaint",
    "animate": "ppl_vae.cli.generate:animate",
    "calibrate": "ppl_vae.cli.calibrate:calibrate",
    "data": "ppl_vae.cli.data:data",
}

# the commands whose work needs neither torch nor Pyro (rendering data with numpy)
WITHOUT_TORCH = ("data",)

# the commands that write a report, a set of files read together (netCDF, figures, an HTML page):
# the set replaces an earlier one in the same folder as a whole, or not at all (io.file_set)
WRITES_A_REPORT = ("evaluate", "compare", "calibrate", "disentanglement")

# ctx.meta key of the plugin specs loaded for this invocation (explicit first, then installed)
PLUGINS_META_KEY = "ppl_vae.plugins"

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def with_flags(message: str, flags: Dict[str, str]) -> str:
    """``message`` with every name in ``flags`` (a config field like ``train.lr`` or an argument
    like ``data_dir``) replaced by the flag that sets it: library errors name what Python
    callers pass, the CLI shows what its users type. Values stay as they are: a quoted name
    ('batch_size', a key typed as ``--mf-option batch_size=0``) and the names in a list of
    choices ("must be one of ..., free_bits, got ...", "valid objectives: ...")."""
    parts = _CHOICES.split(message)  # odd parts are lists of choices
    for i in range(0, len(parts), 2):
        for name in sorted(flags, key=len, reverse=True):
            parts[i] = re.sub(rf"(?<![\w.'-]){re.escape(name)}(?![\w'])", flags[name], parts[i])
    return "".join(parts)


_CHOICES = re.compile(r"((?:one of|valid [\w -]+?:) [^;]*?(?=, got |; |$))")


def option_flags(command: Optional[click.Command]) -> Dict[str, str]:
    """Argument name -> flag for the options of ``command`` and its subcommands whose names
    contain an underscore (plain words such as ``seed`` stay as they are), plus the command's
    own ``field_flags`` (config field -> flag, e.g. ``train.lr`` -> ``--lr``) where it has them."""
    flags: Dict[str, str] = dict(getattr(command, "field_flags", {}))
    for cmd in [command, *getattr(command, "commands", {}).values()] if command is not None else []:
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name and "_" in param.name:
                long = [o for o in param.opts if o.startswith("--")]
                flags.setdefault(param.name, long[0] if long else param.opts[0])
            if isinstance(param, click.Option) and param.name == "device":  # the device check names the field
                flags.setdefault("train.device", "--device")
    return flags


def active_plugins(ctx: Optional[click.Context] = None) -> List[str]:
    """The plugin specs loaded for the running ``ppl-vae`` command: every ``--plugin`` given to
    the group, then each installed ``ppl_vae.plugins`` entry point that loaded. ``[]`` outside a
    ``ppl-vae`` invocation. A new run records this list in ``RunConfig.plugins``."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return []
    return list(ctx.find_root().meta.get(PLUGINS_META_KEY, []))


_ALLOC_BYTES = re.compile(r"allocate (?:memory: you tried to allocate )?(\d+) bytes")
_ALLOC_SIZE = re.compile(r"Tried to allocate ([\d.]+ [KMGT]i?B)")


# the options that size work, in the order a memory hint names them (those the command has)
SIZE_FLAGS = (
    "--grid-size",
    "--latent-dims",
    "--latent-dim",
    "--hidden-dim",
    "--batch-size",
    "--num-samples",
    "--num-particles",
    "--num-draws",
    "--num-images",
    "--num-chains",
    "--particle-batch-size",
)
_DEFAULT_SIZE_FLAGS = ("--latent-dim", "--hidden-dim", "--batch-size", "--num-samples")


def memory_message(exc: BaseException, flags: Optional[List[str]] = None) -> Optional[str]:
    """A one-line message for an allocation failure (CPU or CUDA), or None if ``exc`` is not one;
    ``flags``: the size options of the command that failed (the hint names those)."""
    text = str(exc)
    if isinstance(exc, MemoryError):
        size = ""
    elif type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        size = ""
    else:
        return None
    found = _ALLOC_BYTES.search(text)
    if found:
        size = f" of {int(found.group(1)) / 1e9:.3g} GB"
    else:
        found = _ALLOC_SIZE.search(text)
        if found:
            size = f" of {found.group(1)}"
    device = "the GPU" if "CUDA" in text or type(exc).__name__ == "OutOfMemoryError" else "this machine"
    return (
        f"not enough memory: an allocation{size} failed on {device}; choose smaller sizes "
        f"({', '.join(flags or _DEFAULT_SIZE_FLAGS)})"
    )


class PplVaeGroup(click.Group):
    """Loads commands lazily and turns library errors into one-line messages (exit 1)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        command = getattr(importlib.import_module(module), attr)
        if command.callback is not None and not getattr(command.callback, "collects_from_here", False):
            command.callback = _collect_from_here(
                command.callback, imports=name not in WITHOUT_TORCH, as_a_set=name in WRITES_A_REPORT
            )
        return command

    def invoke(self, ctx: click.Context) -> Any:
        from ppl_vae.io import remove_empty_made_folders

        done = False
        try:
            with _terminate_as_interrupt():
                result = self._invoke(ctx)
            done = True
            return result
        except click.exceptions.Exit as exc:
            done = not exc.exit_code
            raise
        finally:  # a failed command leaves no empty output folder it made (files written stay)
            remove_empty_made_folders(keep=done)

    def _invoke(self, ctx: click.Context) -> Any:
        from ppl_vae.errors import PplVaeError

        try:
            with _library_warnings_as_one_line():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            # click would print "Aborted!" and exit 1; say what state the files are in instead
            from ppl_vae.io import last_set_in_place

            if ctx.invoked_subcommand in WRITES_A_REPORT and last_set_in_place():
                state = "the report's files had all been written (the interrupt was held until they were)"
            elif ctx.invoked_subcommand in WRITES_A_REPORT:
                state = "none of the report's files was written (an earlier report there is as it was)"
            else:
                state = "files already written are complete (each is written to a temporary name and renamed when done)"
            click.echo(f"Error: interrupted; {state}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (PplVaeError, ValueError, OSError) as exc:  # OSError: a read-only or full disk, a missing file...
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            line = one_line(exc)
            if getattr(exc, "names_flags", True):  # a setting read from a file keeps the file's name for it
                line = with_flags(line, option_flags(command))
            click.echo(f"Error: {line}", err=True)
            sys.exit(EXIT_ERROR)
        except (MemoryError, RuntimeError) as exc:
            message = memory_message(exc, _size_flags(self, ctx))
            if message is None:
                raise
            click.echo(f"Error: {message}", err=True)
            sys.exit(EXIT_ERROR)


SUBCOMMAND_META_KEY = "ppl_vae.subcommand"


def _size_flags(group: click.Group, ctx: click.Context) -> List[str]:
    """The :data:`SIZE_FLAGS` of the command that ran (a group's subcommand when it recorded one)."""
    name = ctx.invoked_subcommand
    command = group.get_command(ctx, name) if name else None
    sub = ctx.meta.get(SUBCOMMAND_META_KEY)
    if isinstance(command, click.Group) and isinstance(sub, str) and sub in command.commands:
        command = command.commands[sub]
    if command is None:
        return []
    have = {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts}
    return [f for f in SIZE_FLAGS if f in have]


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def _library_warnings_as_one_line() -> Iterator[None]:
    """Warnings the library raises print as one ``Warning: ...`` line, not file:line and source;
    warnings from other packages keep Python's format."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(_PACKAGE_DIR) and issubclass(category, UserWarning):
            from ppl_vae.cli.options import warn

            warn(str(message))
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _load_plugins(ctx: click.Context, explicit: Tuple[str, ...]) -> None:
    from ppl_vae import plugins
    from ppl_vae.cli.options import warn

    loaded = plugins.load_plugins(explicit)
    installed, failures = plugins.load_installed_plugins()
    for failure in failures:
        warn(failure)
    ctx.meta[PLUGINS_META_KEY] = plugins.merge(loaded, installed)


@click.group(cls=PplVaeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ppl_vae")
@click.option(
    "--plugin",
    "plugin_modules",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE first (repeatable): it registers custom priors, likelihoods, models... "
    "Installed packages with a 'ppl_vae.plugins' entry point load without this flag.",
)
@click.option(
    "--trust-plugins",
    is_flag=True,
    default=False,
    help="Import the plugin modules a run's config.json names even when they are neither installed "
    "entry points nor given with --plugin. A received run is code only with this flag: use it "
    "for runs you trust.",
)
@click.pass_context
def cli(ctx: click.Context, plugin_modules: Tuple[str, ...], trust_plugins: bool) -> None:
    """Variational autoencoders as Pyro probabilistic programs (Kingma & Welling 2013)."""
    from ppl_vae import plugins

    _load_plugins(ctx, plugin_modules)
    previous = plugins.set_trust_all(trust_plugins)
    ctx.call_on_close(lambda: plugins.set_trust_all(previous))


# main() defers Python's cyclic garbage collector to the start of the command's own work
_GC_DEFERRED = False


def _collect_from_here(callback: Any, imports: bool = True, as_a_set: bool = False) -> Any:
    """``callback`` (a command's body) run with the garbage collector enabled again, after torch
    and Pyro are imported (with ``imports``: every command but :data:`WITHOUT_TORCH` imports them
    first thing) and the objects that exist by then are frozen out of its collections
    (``gc.freeze``); a no-op unless :func:`main` deferred the collector. ``as_a_set``: the files
    the command writes replace earlier ones together or not at all (:func:`ppl_vae.io.file_set`)."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        global _GC_DEFERRED
        if _GC_DEFERRED:
            _GC_DEFERRED = False
            if imports:
                import pyro  # noqa: F401
                import torch  # noqa: F401
            gc.freeze()
            gc.enable()
        _deliver_held_signals()  # a Ctrl-C during the imports: now, as KeyboardInterrupt
        if not as_a_set:
            return callback(*args, **kwargs)
        from ppl_vae.io import file_set

        with file_set():
            return callback(*args, **kwargs)

    run.collects_from_here = True  # type: ignore[attr-defined]
    return run


# While the console entry point starts (the command line parsed, torch, NumPy and Pyro imported),
# SIGINT and SIGTERM are recorded here and delivered as KeyboardInterrupt once the command's body
# begins: raised inside those imports, a Ctrl-C was swallowed (torch's import clears a pending
# exception: the command trained to the end and exited 0) or left NumPy half-imported (a
# traceback later). None: not holding (signals interrupt at once).
_HELD_SIGNALS: Optional[List[int]] = None


def _on_signal(signum: int, frame: Any) -> None:
    if _HELD_SIGNALS is not None:
        _HELD_SIGNALS.append(signum)
        return
    raise KeyboardInterrupt


def _deliver_held_signals() -> None:
    """Stop holding; raise KeyboardInterrupt if a signal arrived while the command started."""
    global _HELD_SIGNALS
    held, _HELD_SIGNALS = _HELD_SIGNALS, None
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a job scheduler's stop) raises KeyboardInterrupt, so that the
    clean-up a Ctrl-C gets runs for every command too: Python's default for SIGTERM ends the
    process without it (a 940 MB partial dSprites render, zero-byte temporary files and an empty
    output folder of calibrate stayed behind). The previous handler is restored afterwards;
    outside the main thread (a caller's worker) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = signal.signal(signal.SIGTERM, _on_signal)  # KeyboardInterrupt (held while starting)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:  # console entry point
    # Importing torch and Pyro made the collector walk every object they had created so far, three
    # times over (0.2 s of a digits compare on the benchmark machine), and each later full
    # collection walked them again: the collector is off while the command line is parsed
    # (which imports them) and those objects are frozen before the command's work begins.
    global _GC_DEFERRED
    # The interpreter's last garbage collections at exit walk every object that torch, Pyro and
    # matplotlib made: about 0.5 s of every command on the benchmark machine, after the command
    # has finished. Nothing depends on them (the library closes each file as it writes it, and
    # atexit handlers registered later run before this one), so the objects are frozen first.
    atexit.register(gc.freeze)
    _GC_DEFERRED, enabled = True, gc.isenabled()
    gc.disable()
    global _HELD_SIGNALS
    _HELD_SIGNALS = []
    previous = _hold_start_up_signals()
    try:
        cli()
    finally:  # no command ran (--help, a usage error): the collector as it was
        if _GC_DEFERRED:
            _GC_DEFERRED = False
            if enabled:
                gc.enable()
        held, _HELD_SIGNALS = _HELD_SIGNALS, None
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:  # arrived while a command that never reached its body (--help, an error) started
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


def _hold_start_up_signals() -> Dict[int, Any]:
    """Route SIGINT and SIGTERM through :func:`_on_signal` (which holds them until the command's
    body begins); returns the handlers to put back. A SIGINT the shell ignores (a background job)
    stays ignored."""
    previous: Dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if number == signal.SIGINT and handler is signal.SIG_IGN:
            continue
        previous[number] = signal.signal(number, _on_signal)
    return previous
