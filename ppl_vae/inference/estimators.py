"""Estimators of log p(x): one calling convention, one result type, one registry.

Every registered estimator is a function called as

    estimator(model, guide, x, *, seed=None, num_samples=..., batch_size=..., progress=False,
              <its own options>, **model_kwargs) -> Estimate

with ``x`` ``(N, ...)`` on any device, tensor ``model_kwargs`` with one row per datapoint (labels
``y``) sliced with it, ``seed`` its own random stream (the caller's RNG state is left as it was;
None draws from the caller's stream), and the model and guide scored in eval mode. The result
is an :class:`Estimate`: log p(x) per datapoint (``log_px``), its Monte Carlo standard error
(``log_px_stderr``), what it is with respect to log p(x) (``bound``: "lower bound", "upper
bound" or "neither"), and further per-datapoint variables and diagnostics (ELBO, ESS, PSIS
k̂, HMC acceptance, ...), each saying what it is; :meth:`Estimate.to_dataset` gives the same
variable names and dims (``datapoint``) for every estimator.

:data:`ESTIMATORS` holds them by name. ``ppl-vae evaluate --estimator``, multi-run ``ppl-vae
compare --estimator`` and the docs' table read it; an estimator is added by one module that
calls :func:`register_estimator` (see :mod:`ppl_vae.inference.jackknife`), with no change
anywhere else. The options an estimator takes are its function's keyword-only parameters,
declared once in :data:`OPTIONS` (flag, help, range), their defaults read from the function.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ppl_vae.inference.stats import THRESHOLDS
from ppl_vae.registry import Registry

if TYPE_CHECKING:  # xarray is imported where used
    import xarray as xr

__all__ = [
    "BOUNDS",
    "ESTIMATORS",
    "Estimate",
    "Estimator",
    "OPTIONS",
    "Variable",
    "check_options",
    "estimate",
    "register_estimator",
]

#: what a number is with respect to log p(x) (or to the quantity it estimates)
BOUNDS = ("lower bound", "upper bound", "neither")

#: the modules whose import registers the built-in estimators (imported on first lookup)
BUILTIN_MODULES = (
    "ppl_vae.inference.importance",
    "ppl_vae.inference.jackknife",
    "ppl_vae.inference.ais",
    "ppl_vae.inference.marginal",
    "ppl_vae.analysis.gaps",
)


@dataclass(frozen=True)
class Variable:
    """One saved variable of an :class:`Estimate`: ``data`` over ``dims`` (the last is always
    ``datapoint``), what it is with respect to its target (``bound``, one of :data:`BOUNDS`),
    a ``long_name`` in words, and whether it is a ``diagnostic`` of the estimate rather than an
    estimate itself."""

    data: Tensor
    bound: str
    long_name: str
    dims: Tuple[str, ...] = ("datapoint",)
    diagnostic: bool = False


def variable(data: Tensor, bound: str, long_name: str, *, dims: Tuple[str, ...] = ("datapoint",)) -> Variable:
    """An estimate's further per-datapoint quantity (an ELBO, another bound, ...)."""
    return Variable(data, bound, long_name, dims)


def diagnostic(data: Tensor, long_name: str, *, dims: Tuple[str, ...] = ("datapoint",)) -> Variable:
    """A diagnostic of the estimate (ESS, k̂, acceptance rate): neither bound."""
    return Variable(data, "neither", long_name, dims, diagnostic=True)


@dataclass
class Estimate:
    """What every estimator returns: log p̂(x) per datapoint with its standard error and bound.

    ``log_px`` ``(N,)``: the estimate of log p(x) (nats); ``log_px_stderr`` ``(N,)``: its Monte
    Carlo standard error; ``bound``: "lower bound" (in expectation, as the log of an unbiased
    estimate of p(x) is), "upper bound" or "neither"; ``long_name``: the estimate in words.
    ``variables``: further quantities and diagnostics by name (:class:`Variable`);
    ``coords``: coordinates of their extra dims (``chain``, ``num_steps``); ``settings``: the
    estimator's settings, saved as dataset attributes.
    """

    estimator: str
    log_px: Tensor
    log_px_stderr: Tensor
    bound: str
    long_name: str
    variables: Dict[str, Variable] = field(default_factory=dict)
    coords: Dict[str, Any] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    reference: str = ""

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS:
            raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {self.bound!r}")
        for name, v in self.variables.items():
            if v.bound not in BOUNDS:
                raise ValueError(f"variable {name!r}: bound must be one of {', '.join(BOUNDS)}, got {v.bound!r}")

    @property
    def num_datapoints(self) -> int:
        return int(self.log_px.shape[0])

    @property
    def diagnostics(self) -> Dict[str, Tensor]:
        """The diagnostics (ESS, k̂, acceptance, ...) by name."""
        return {k: v.data for k, v in self.variables.items() if v.diagnostic}

    def __getitem__(self, name: str) -> Tensor:
        """``estimate["log_px"]``, ``estimate["elbo"]``, ``estimate["ess"]``: any variable's data."""
        if name == "log_px":
            return self.log_px
        if name == "log_px_stderr":
            return self.log_px_stderr
        try:
            return self.variables[name].data
        except KeyError:
            raise KeyError(
                f"estimate {self.estimator!r} has no variable {name!r}; it has "
                f"{', '.join(['log_px', 'log_px_stderr', *self.variables])}"
            ) from None

    def to_dataset(self, datapoint: Optional[Sequence[int] | np.ndarray] = None) -> xr.Dataset:
        """The estimate as an xarray Dataset over dim ``datapoint`` (``log_px``, ``log_px_stderr``
        and every variable; each with attributes ``bound`` and ``long_name``; the estimator and
        its settings in the dataset's attributes)."""
        import xarray as xr

        n = self.num_datapoints
        coords: Dict[str, Any] = {"datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint)}
        coords.update({k: np.asarray(v) for k, v in self.coords.items()})
        every = {
            "log_px": Variable(self.log_px, self.bound, self.long_name),
            "log_px_stderr": Variable(self.log_px_stderr, "neither", "Monte Carlo standard error of log_px (nats)"),
            **self.variables,
        }
        ds = xr.Dataset(
            {name: (v.dims, _numpy(v.data)) for name, v in every.items()},
            coords=coords,
        )
        for name, v in every.items():
            ds[name].attrs.update({"bound": v.bound, "long_name": v.long_name})
            if v.diagnostic:
                ds[name].attrs["diagnostic"] = 1
        ds.attrs.update({"estimator": self.estimator, **_attrs(self.settings)})
        if self.reference:
            ds.attrs["reference"] = self.reference
        return ds


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.bool else t.double().numpy()


def _attrs(settings: Dict[str, Any]) -> Dict[str, Any]:
    """netCDF attributes: numbers, strings and lists of numbers; None as the string "none"."""
    out: Dict[str, Any] = {}
    for k, v in settings.items():
        if v is None:
            out[k] = "none"
        elif isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) for e in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


# --------------------------------------------------------------------------------------------
# options: declared once


from ppl_vae.estimator_options import COMMON, OPTIONS, Option  # noqa: E402  (declared torch-free for the CLI)


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: its function and what the consumers need to know about it.

    ``bound``: what its ``log_px`` is; ``title``: one line for tables and ``--help``;
    ``files``: the netCDF and CSV names ``evaluate`` writes; ``needs_guide``: whether it uses
    the guide (AIS from the prior and appendix-D HMC do not); ``simulated``: whether it scores
    data simulated from the model instead of ``x`` (BDMC); ``summary`` and ``warnings``: lines
    for a dataset from :meth:`Estimate.to_dataset` (joined over blocks), where the defaults
    print the headline and every further quantity; ``block_size``: datapoints per independently
    seeded block, given the options (an estimator whose stopping rule looks at a whole batch
    needs its batch).
    """

    name: str
    fn: Callable[..., Estimate]
    title: str
    bound: str
    reference: str = ""
    files: Tuple[str, str] = ("", "")
    needs_guide: bool = True
    simulated: bool = False
    summary: Optional[Callable[["xr.Dataset"], List[str]]] = None
    warnings: Optional[Callable[["xr.Dataset", Dict[str, str]], List[str]]] = None
    block_size: Optional[Callable[[Dict[str, Any]], int]] = None

    @property
    def options(self) -> Dict[str, Any]:
        """Its own options (keyword-only parameters beyond :data:`COMMON`) with their defaults."""
        return {
            name: p.default
            for name, p in inspect.signature(self.fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in COMMON
        }

    @property
    def defaults(self) -> Dict[str, Any]:
        """Every keyword-only parameter's default, :data:`COMMON` ones included."""
        return {
            name: p.default
            for name, p in inspect.signature(self.fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def __call__(self, model: Callable, guide: Optional[Callable], x: Tensor, **kwargs: Any) -> Estimate:
        self._check_names(model, kwargs)
        return self.fn(model, guide, x, **kwargs)

    def _check_names(self, model: Callable, kwargs: Dict[str, Any]) -> None:
        """A keyword that is neither one of its options nor an argument the model takes (its
        labels ``y``, ...) is a typo or another estimator's option: refused naming both sides,
        instead of a TypeError from inside the model (or nothing, for a model taking **kwargs)."""
        extra = set(kwargs) - set(self.defaults)
        if not extra:
            return
        try:
            params = inspect.signature(model).parameters
        except (TypeError, ValueError):  # a callable without a signature: the model decides
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = sorted(
                k for k in extra if k not in params and not (torch.is_tensor(kwargs[k]) or kwargs[k] is None)
            )
        else:
            unknown = sorted(k for k in extra if k not in params)
        if unknown:
            raise ValueError(
                f"estimator {self.name!r} has no option {unknown[0]!r}, and it is no argument of the model "
                f"(a tensor with one row per datapoint, such as the labels y); its options: "
                f"{', '.join(sorted(self.options)) or 'none'}"
            )

    def lines(self, ds: "xr.Dataset") -> List[str]:
        """What was estimated, each number with the kind of bound it is."""
        return (self.summary or default_summary)(ds)

    def weak(self, ds: "xr.Dataset", names: Optional[Dict[str, str]] = None) -> List[str]:
        """One line per weak estimate, naming what to raise (``names``: option -> how the
        calling command spells it; by default the flag of :data:`OPTIONS`)."""
        spelled = {k: f"{o.flag} ({k})" for k, o in OPTIONS.items()}
        spelled["estimator"] = "another --estimator (estimator=...)"
        return (self.warnings or (lambda d, n: []))(ds, {**spelled, **(names or {})})

    def blocks(self, options: Dict[str, Any]) -> Optional[int]:
        return None if self.block_size is None else int(self.block_size(options))


ESTIMATORS: Registry[Estimator] = Registry("estimator")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get(name: str) -> Estimator:
    """The registered estimator ``name`` (an unknown name lists the valid ones)."""
    _load_builtins()
    return ESTIMATORS.get(name)


def names() -> List[str]:
    """The registered estimators' names."""
    _load_builtins()
    return ESTIMATORS.names()


def register_estimator(
    name: str,
    *,
    title: str,
    bound: str,
    reference: str = "",
    files: Optional[Tuple[str, str]] = None,
    needs_guide: bool = True,
    simulated: bool = False,
    summary: Optional[Callable[["xr.Dataset"], List[str]]] = None,
    warnings: Optional[Callable[["xr.Dataset", Dict[str, str]], List[str]]] = None,
    block_size: Optional[Callable[[Dict[str, Any]], int]] = None,
) -> Callable[[Callable[..., Estimate]], Callable[..., Estimate]]:
    """Decorator registering an estimator function under ``name`` (see the module docstring).

    The function must take ``(model, guide, x, *, seed, batch_size, progress, <options>,
    **model_kwargs)``, every option a name of :data:`OPTIONS`; anything else is refused here, at
    import, so the CLI and docs can rely on it.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")

    def decorator(fn: Callable[..., Estimate]) -> Callable[..., Estimate]:
        params = inspect.signature(fn).parameters
        positional = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if positional != ["model", "guide", "x"]:
            raise TypeError(f"estimator {name!r} must take (model, guide, x, *, ...), takes ({', '.join(positional)})")
        keyword = {p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        missing = set(COMMON) - keyword
        if missing:
            raise TypeError(f"estimator {name!r} must take the keyword arguments {', '.join(sorted(missing))}")
        unknown = keyword - set(COMMON) - set(OPTIONS)
        if unknown:
            raise TypeError(
                f"estimator {name!r} takes options {', '.join(sorted(unknown))} not declared in "
                "ppl_vae.inference.estimators.OPTIONS: declare them there (flag, help, range)"
            )
        if params["progress"].default is not False:
            raise TypeError(f"estimator {name!r}: progress must default to False")
        ESTIMATORS.register(name, doc=title)(
            Estimator(
                name,
                fn,
                title,
                bound,
                reference,
                files or (f"evaluation_{name}.nc", f"evaluation_{name}.csv"),
                needs_guide,
                simulated,
                summary,
                warnings,
                block_size,
            )
        )
        return fn

    return decorator


def check_options(name: str, options: Dict[str, Any], *, given: Sequence[str] = ()) -> Dict[str, Any]:
    """The options for estimator ``name``: ``options`` checked against what it takes.

    ``given``: the option names the user set (the CLI's flags that were given); one the
    estimator does not take is refused in one line naming both, never ignored. Values are
    checked against :data:`OPTIONS`. Returns the options the estimator takes (unset ones absent,
    so its own defaults apply).
    """
    est = get(name)
    takes = set(est.options)
    for key in given:
        if key not in takes and key not in COMMON:
            users = [n for n in names() if key in get(n).options]
            flag = OPTIONS[key].flag if key in OPTIONS else key
            raise ValueError(
                f"{flag} does not apply to estimator {name!r} (it applies to {', '.join(users) or 'none'})"
            )
    out = {k: v for k, v in options.items() if k in takes or k in COMMON}
    for key, value in out.items():
        if key in OPTIONS and value is not None:
            _check_value(key, OPTIONS[key], value)
    return out


def _check_value(key: str, opt: Option, value: Any) -> None:
    if not opt.checked:
        if opt.check is not None:
            module, function = opt.check.split(":")
            getattr(importlib.import_module(module), function)(value)
        return
    values = list(value) if opt.multiple and isinstance(value, (list, tuple)) else [value]
    if opt.multiple and not values:
        raise ValueError(f"{opt.flag} needs at least one value")
    for v in values:
        if opt.choices:
            if v not in opt.choices:
                raise ValueError(f"{opt.flag} must be one of {', '.join(opt.choices)}, got {v!r}")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{opt.flag} must be a finite number, got {v!r}")
        if opt.integer and int(v) != v:
            raise ValueError(f"{opt.flag} must be an integer, got {v!r}")
        if opt.low is not None and v < opt.low:
            raise ValueError(f"{opt.flag} must be >= {opt.low:g}, got {v}")
        if opt.positive and not v > 0:
            raise ValueError(f"{opt.flag} must be > 0, got {v}")
        if opt.high is not None and v > opt.high:
            raise ValueError(
                f"{opt.flag} {v} is far beyond what this machine can do ({opt.what}); choose at most {opt.high:,}"
            )


def estimate(
    name: str, model: Callable, guide: Optional[Callable], x: Tensor, *, seed: Optional[int] = None, **kwargs: Any
) -> Estimate:
    """Run the registered estimator ``name`` (the same call as the function itself)."""
    return get(name)(model, guide, x, seed=seed, **kwargs)


# --------------------------------------------------------------------------------------------
# printing: the defaults an estimator may replace


GAP_TARGETS = {
    "approximation_gap": "log p(x) − L[q*] for the fitted q*",
    "inference_gap": "log p(x) − L[q]",
}
"""What a bounded gap bounds: its target, with the q* that was fitted (not the best one in q*'s family,
which would make the approximation gap smaller)."""


def mean_se(v: "xr.DataArray") -> str:
    """``mean ± se`` over datapoints."""
    n = v.sizes["datapoint"]
    if n < 2:  # one datapoint: no se to give
        return f"{float(v.mean()):12.3f} ± n/a"
    return f"{float(v.mean()):12.3f} ± {float(v.std(ddof=1)) / np.sqrt(n):.3f}"


def mc_se_of_mean(se: "xr.DataArray") -> float:
    """The Monte Carlo standard error of the mean over datapoints (independent estimates); NaN
    when a datapoint's estimate has none (one draw, K = 1), never a sum that skips it."""
    values = np.asarray(se.values, dtype=float)
    if not np.isfinite(values).all():
        return float("nan")
    return float(np.sqrt((values**2).sum())) / se.sizes["datapoint"]


def default_summary(ds: "xr.Dataset") -> List[str]:
    """The headline log p̂(x) with its bound, every further quantity over datapoints with its
    bound, and the mean of every diagnostic."""
    est = get(str(ds.attrs["estimator"]))
    n = ds.sizes["datapoint"]
    split = ds.attrs.get("split", "")
    split = f" {split}" if split else ""
    bound = ds["log_px"].attrs["bound"]
    shown = [k for k in est.options if k in ds.attrs and not isinstance(ds.attrs[k], dict)]
    settings = "".join(f", {k}={ds.attrs[k]}" for k in shown)
    evidence = str(ds.attrs.get("evidence", "log p(x)"))  # log p(x | y) for a model given labels
    kind = (
        f"a stochastic lower bound, below {evidence} in expectation"
        if bound == "lower bound"
        else f"a stochastic upper bound, above {evidence} in expectation"
        if bound == "upper bound"
        else "an estimate, neither a lower nor an upper bound"
    )
    hat = evidence.replace("log p", "log p̂", 1)
    lines = [
        f"{evidence} estimate {mean_se(ds['log_px']).strip()} ({est.name}{settings}: {kind}; "
        f"mean ± se over {n}{split} datapoints)",
        f"{'quantity':<30} {'mean ± se over datapoints':>26}  what it is (nats per datapoint)",
        f"{hat + ' (' + est.name + ')':<30} {mean_se(ds['log_px'])}  {_bound_words(bound)}",
    ]
    for key in ds.data_vars:
        name, v = str(key), ds[key]
        if name in ("log_px", "log_px_stderr") or name.endswith("_stderr") or v.dims != ("datapoint",):
            continue
        if v.attrs.get("diagnostic"):
            continue
        words = _bound_words(v.attrs.get("bound", "neither"))
        if name.endswith("_gap") and v.attrs.get("bound") in ("lower bound", "upper bound"):
            words += f" on {GAP_TARGETS.get(name, 'the gap').replace('log p(x)', evidence)}"
        lines.append(f"{name:<30} {mean_se(v)}  {words}")
    mc_se = mc_se_of_mean(ds["log_px_stderr"])
    lines.append(
        f"{'Monte Carlo se of mean log p̂':<30} {mc_se:12.3f}"
        if math.isfinite(mc_se)
        else f"{'Monte Carlo se of mean log p̂':<30} {'n/a':>12}  (a datapoint's estimate has no standard error: one draw)"
    )
    for key in ds.data_vars:
        name, v = str(key), ds[key]
        if v.attrs.get("diagnostic") and v.dims == ("datapoint",):
            finite = v.values[np.isfinite(v.values)]
            mean = f"{finite.mean():12.3f}" if finite.size else f"{'n/a':>12}"
            lines.append(f"{name + ' (mean)':<30} {mean}  diagnostic: {v.attrs.get('long_name', '')}")
            if name == "khat":
                worst = f"{finite.max():.2f}" if finite.size else "n/a"
                share = int((v.values > THRESHOLDS.khat).sum())
                lines.append(f"{f'khat (max; > {THRESHOLDS.khat})':<30} {worst:>12}  ({share} of {n} datapoints)")
    return lines


def _bound_words(bound: str) -> str:
    return {"lower bound": "lower bound", "upper bound": "upper bound"}.get(bound, "estimate, neither bound")


def weight_warnings(ds: "xr.Dataset", names: Dict[str, str], *, num_draws: int, what: str) -> List[str]:
    """The warnings of an estimate from ``num_draws`` importance weights per datapoint: PSIS k̂
    above :data:`~ppl_vae.inference.stats.THRESHOLDS` ``.khat`` and an ESS below its minimum."""
    n = ds.sizes["datapoint"]
    out = []
    if "khat" in ds:
        khat = ds["khat"].values
        bad = khat > THRESHOLDS.khat
        if bad.any():
            out.append(
                f"PSIS k̂ > {THRESHOLDS.khat} for {int(bad.sum())} of {n} datapoints (max {np.nanmax(khat):.2f}): "
                f"their {what} estimates and standard errors are unreliable; raise {names['num_samples']} or use "
                f"{names['estimator']}"
            )
        elif num_draws < 21:
            out.append(f"K={num_draws} is too few for a PSIS k̂ tail check; raise {names['num_samples']} to 21 or more")
    if "ess" in ds:
        low = THRESHOLDS.low_ess(ds["ess"].values, num_draws)
        if low.any():
            out.append(
                f"importance-weight ESS < {min(THRESHOLDS.min_ess, num_draws / 2):g} for {int(low.sum())} of {n} "
                f"datapoints: a few samples carry the estimate; raise {names['num_samples']} or use {names['estimator']}"
            )
    return out


def declarations_table() -> List[Dict[str, str]]:
    """One row per registered estimator: name, what its log p̂ is, its options, reference."""
    rows = []
    for name in names():
        est = get(name)
        opts = ", ".join(f"`{OPTIONS[k].flag}` (`{k}`, default {est.options[k]!r})" for k in est.options)
        rows.append(
            {
                "estimator": name,
                "log p̂(x) is": est.bound if est.bound != "neither" else "an estimate (neither bound)",
                "what": est.title + (" (on data simulated from the model)" if est.simulated else ""),
                "uses the guide": "yes" if est.needs_guide else "no",
                "options": opts or "none",
                "reference": est.reference,
            }
        )
    return rows


TABLE_BEGIN = "<!-- estimators table: generated from the registrations, do not edit -->"
TABLE_END = "<!-- end of estimators table -->"


def estimators_table() -> str:
    """The Markdown table of :func:`declarations_table`."""
    rows = declarations_table()
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h].replace("|", "\\|") for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_estimators_doc(text: str) -> str:
    """``text`` (docs/estimators.md) with the part between the table's markers replaced by
    :func:`estimators_table`."""
    from ppl_vae.config import replace_between

    return replace_between(text, TABLE_BEGIN, TABLE_END, estimators_table(), "estimators table")
