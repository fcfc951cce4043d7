"""Posterior predictive checks: does data replicated from the fitted model look like the data?

For each datapoint x_i, draw z ~ q(z | x_i) (``source="posterior"``; the guide stands in for
p(z | x_i)) or z ~ p(z) (``source="prior"``), then x_rep ~ p(x | z), ``num_replicates`` times.
A test statistic T compares them through the posterior predictive p-value
P(T(x_rep) >= T(x_i) | x_i) (Gelman, Meng & Stern 1996; Gelman et al. 2020, "Bayesian
workflow", sec. 6.1). A p-value near 0 or 1 says the model rarely produces data like x_i in the
respect T measures. Ties (a discrete T, such as a count of pixels) are split with the mid-p
convention, p = P(T_rep > T_obs) + 0.5 P(T_rep = T_obs), so that a statistic that is always tied
reads 0.5 rather than 1.

Under data drawn from the model itself, prior predictive p-values are uniform; posterior
predictive ones are not in general: the data are used twice (to fit z and to check), so they
gather toward 0.5 (Meng 1994; Bayarri & Berger 2000). Extreme values are still evidence of misfit.

Draws come from the pair's own Pyro programs: the guide is traced, then the model is replayed on
the guide's latent draws with its observed site ``"x"`` unconditioned, so Pyro samples x_rep from
the likelihood (as :func:`ppl_vae.inference.ais.simulate_data` does with the prior). Any pair
keeping the contract of :mod:`ppl_vae.models.vae` (datapoints in ``pyro.plate("data")``, observed
site ``"x"``, latent sites in the data plate) can be checked. The replicates ride in the data plate
(each datapoint repeated ``num_replicates`` times), which vectorizes them for any such pair,
including decoders that take only flat batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import xarray as xr
from pyro import poutine
from torch import Tensor

from ppl_vae.inference.modes import batches, eval_mode, seeded
from ppl_vae.registry import Registry

Statistic = Callable[[Tensor], Tensor]

REFERENCE = (
    "Gelman, Meng & Stern (1996), Posterior predictive assessment of model fitness, Statistica Sinica 6; "
    "Gelman et al. (2020), Bayesian workflow, arXiv:2011.01808, sec. 6.1"
)
SOURCES = ("posterior", "prior")
DEFAULT_STATISTICS = ("mean_intensity", "active_pixels")
#: rows (replicates x datapoints) per program run when ``batch_size`` is not given
ROWS_PER_BATCH = 65536

# ---------------------------------------------------------------------------------------------
# Test statistics: name -> fn(x, event_dims) -> one value per datapoint, each declaring the data
# it means something for (:attr:`BuiltinStatistic.applies_to`).


@dataclass(frozen=True)
class DataDomain:
    """The data a statistic means something for: ``description`` (as printed) and
    ``outside(x, images)``, the reason the datapoints ``x`` are not such data, or None;
    ``images`` is what the model declares about its x (``VAE.generates_images``: False for
    text's character indices)."""

    description: str
    outside: Callable[[Tensor, bool], Optional[str]]


def _outside_unit_interval_images(x: Tensor, images: bool) -> Optional[str]:
    if not images:
        return "the model declares that its x are not images (generates_images is False: e.g. character indices)"
    if x.numel() and (bool((x < 0).any()) or bool((x > 1).any())):
        return f"their values lie in [{float(x.min()):.3g}, {float(x.max()):.3g}], not in [0, 1]"
    return None


IMAGES_IN_UNIT_INTERVAL = DataDomain(
    "images with values in [0, 1] (grey levels or binary pixels)", _outside_unit_interval_images
)
"""The data of the built-in statistics: an 'intensity' and a pixel 'above 0.5' mean nothing for
character indices or standardized sensor readings."""


@dataclass(frozen=True)
class BuiltinStatistic:
    """A registered statistic: ``fn(x, event_dims)`` -> one value per datapoint, and the data it
    ``applies_to``."""

    fn: Callable[[Tensor, int], Tensor]
    applies_to: DataDomain

    def __call__(self, x: Tensor, event_dims: int) -> Tensor:
        return self.fn(x, event_dims)


STATISTICS: Registry[BuiltinStatistic] = Registry("statistic")


def _statistic(name: str, doc: str, applies_to: DataDomain) -> Callable:
    def register(fn: Callable[[Tensor, int], Tensor]) -> Callable[[Tensor, int], Tensor]:
        STATISTICS.register(name, doc=f"{doc}; for {applies_to.description}")(BuiltinStatistic(fn, applies_to))
        return fn

    return register


@_statistic("mean_intensity", "mean over the elements of a datapoint", IMAGES_IN_UNIT_INTERVAL)
def mean_intensity(x: Tensor, event_dims: int) -> Tensor:
    return x.flatten(x.dim() - event_dims).mean(-1) if event_dims else x


@_statistic("active_pixels", "number of elements of a datapoint above 0.5", IMAGES_IN_UNIT_INTERVAL)
def active_pixels(x: Tensor, event_dims: int) -> Tensor:
    active = (x > 0.5).to(x.dtype)
    return active.flatten(x.dim() - event_dims).sum(-1) if event_dims else active


def inapplicable_statistics(names: Sequence[str], x: Tensor, *, images: bool = True) -> Dict[str, str]:
    """Built-in statistic name -> why it does not apply to the datapoints ``x`` (the data its
    :class:`DataDomain` declares, and the reason ``x`` lies outside it: "images with values in
    [0, 1] (...), and these data are not: ..."), for those of ``names`` that do not apply;
    ``images``: the model's ``generates_images``. Unknown names: ValueError."""
    out = {}
    for name in names:
        domain = STATISTICS.get(name).applies_to
        reason = domain.outside(x, images)
        if reason is not None:
            out[name] = f"{domain.description}, and these data are not: {reason}"
    return out


def _resolve(
    statistics: Union[None, Sequence[str], Mapping[str, Statistic]], x: Tensor, event_dims: int, images: bool
) -> Dict[str, Statistic]:
    if statistics is None:
        statistics = DEFAULT_STATISTICS
    if isinstance(statistics, str):
        statistics = [statistics]
    if isinstance(statistics, Mapping):
        resolved = {}
        for name, fn in statistics.items():
            if not callable(fn):
                raise ValueError(f"statistics: {name!r} must map to a callable fn(x) -> one value per datapoint")
            resolved[str(name)] = fn
    else:
        resolved = {}
        for name in statistics:
            resolved[name] = _builtin(STATISTICS.get(name), event_dims)  # unknown names: ValueError
        refused = inapplicable_statistics(list(resolved), x, images=images)
        if refused:
            raise ValueError(
                "statistics: "
                + "; ".join(f"{name} applies to {why}" for name, why in refused.items())
                + " (give statistics that apply as a mapping name -> fn)"
            )
    if not resolved:
        raise ValueError("statistics: give at least one statistic")
    return resolved


def _builtin(fn: Callable[[Tensor, int], Tensor], event_dims: int) -> Statistic:
    return lambda x: fn(x, event_dims)


def _apply(name: str, fn: Statistic, x: Tensor, batch_shape: Tuple[int, ...]) -> Tensor:
    value = torch.as_tensor(fn(x))
    if tuple(value.shape) != batch_shape:
        raise ValueError(
            f"statistic {name!r} must return one value per datapoint, shape {batch_shape} for x of shape "
            f"{tuple(x.shape)}; got {tuple(value.shape)}"
        )
    return value.to(torch.float64)


# ---------------------------------------------------------------------------------------------
# p-values


def mid_p_value(replicated: Tensor, observed: Tensor, dim: int = -1) -> Tensor:
    """P(T_rep > T_obs) + 0.5 P(T_rep = T_obs), the probabilities estimated over ``dim`` of
    ``replicated``; ``observed`` has ``replicated``'s shape without ``dim``."""
    obs = observed.unsqueeze(dim)
    return (replicated > obs).to(torch.float64).mean(dim) + 0.5 * (replicated == obs).to(torch.float64).mean(dim)


def _event_dim_names(event_shape: Tuple[int, ...]) -> Tuple[str, ...]:
    known = {1: ("element",), 2: ("row", "col"), 3: ("channel", "row", "col")}
    return known.get(len(event_shape), tuple(f"event_{k}" for k in range(len(event_shape))))


# ---------------------------------------------------------------------------------------------
# Draws


def _replicates(
    model: Callable, guide: Optional[Callable], x: Tensor, num_replicates: int, kwargs: Dict[str, Any]
) -> Tensor:
    """x_rep ``(R, B, *event_shape)``: each datapoint repeated R times in the data plate."""
    n = x.shape[0]

    def repeat(v: Any) -> Any:
        if torch.is_tensor(v) and v.dim() and v.shape[0] == n:
            return v.expand(num_replicates, *v.shape).reshape(num_replicates * n, *v.shape[1:])
        return v

    x_big = repeat(x)
    kw = {k: repeat(v) for k, v in kwargs.items()}
    program = poutine.block(model, hide_types=["param"])
    if guide is not None:
        guide_trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x_big, **kw)
        program = poutine.replay(program, trace=guide_trace)
    trace = poutine.trace(poutine.uncondition(program)).get_trace(x_big, **kw)
    if "x" not in trace.nodes:
        raise ValueError("model: the model's program has no sample site 'x' (the observed site of the contract)")
    x_rep = cast(Tensor, trace.nodes["x"]["value"]).detach()
    if tuple(x_rep.shape) != tuple(x_big.shape):
        raise ValueError(
            f"model: site 'x' drew shape {tuple(x_rep.shape)} for datapoints of shape {tuple(x_big.shape)}; "
            "replicates need the datapoints' shape"
        )
    return x_rep.reshape(num_replicates, n, *x.shape[1:])


@torch.no_grad()
def posterior_predictive_check(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    statistics: Union[None, Sequence[str], Mapping[str, Statistic]] = None,
    num_replicates: int = 100,
    seed: int,
    source: str = "posterior",
    batch_size: Optional[int] = None,
    elementwise: bool = True,
    images: bool = True,
    **kwargs: Any,
) -> xr.Dataset:
    """Posterior (or prior) predictive checks of ``x`` ``(N, *event_shape)`` under a model/guide pair.

    ``statistics``: names of built-ins (:data:`STATISTICS`: ``"mean_intensity"``,
    ``"active_pixels"``; default both) or a mapping name -> fn(x ``(..., *event_shape)``) ->
    ``(...)``. A built-in applies to the data it declares (``applies_to``: images with values in
    [0, 1]); named for other ``x``, or for a model whose ``images`` is False (its
    ``generates_images``: text's character indices), it is refused with a ValueError. ``source``: ``"posterior"`` draws z ~ guide(x_i), ``"prior"`` z ~ p(z) (``guide``
    is then unused). ``batch_size``: datapoints per program run (default: about
    ``65536 / num_replicates``); the draws are the same for the same ``seed`` and ``batch_size``.
    ``kwargs`` go to model and guide; tensors with one row per
    datapoint (labels ``y``) follow their datapoint. The caller's RNG state is left as it was.

    Returns a Dataset with dims ``datapoint``, ``statistic``, ``replicate``: ``observed``
    T(x_i), ``replicated`` T(x_rep), ``p_value`` (mid-p, see the module docstring), and with
    ``elementwise`` the per-element check over the event dims (``channel, row, col`` for
    images, ``element`` for vectors): ``predictive_mean`` E[x_rep | x_i], ``element_p_value``
    (mid-p per element) and ``replicate_example`` (the first replicate, for figures).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if num_replicates < 1:
        raise ValueError(f"num_replicates must be >= 1, got {num_replicates}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, *event_shape) with N >= 1, got {tuple(x.shape)}")
    if source == "posterior" and guide is None:
        raise ValueError("guide: source='posterior' draws z from the guide; give one, or use source='prior'")
    event_shape = tuple(x.shape[1:])
    stats = _resolve(statistics, x, len(event_shape), images)
    batch_size = batch_size or max(1, ROWS_PER_BATCH // num_replicates)

    observed, replicated, p_values = [], [], []
    means, element_p, examples = [], [], []
    with eval_mode(model, guide), seeded(seed, x.device):
        for xb, kb in batches(x, kwargs, batch_size):
            x_rep = _replicates(model, guide if source == "posterior" else None, xb, num_replicates, kb)
            b = xb.shape[0]
            t_obs = torch.stack([_apply(s, fn, xb, (b,)) for s, fn in stats.items()], -1)  # (B, S)
            t_rep = torch.stack([_apply(s, fn, x_rep, (num_replicates, b)) for s, fn in stats.items()], -1)
            t_rep = t_rep.permute(1, 2, 0)  # (B, S, R)
            observed.append(t_obs)
            replicated.append(t_rep)
            p_values.append(mid_p_value(t_rep, t_obs))
            if elementwise:
                means.append(x_rep.mean(0))
                element_p.append(mid_p_value(x_rep.movedim(0, -1), xb.to(x_rep.dtype)))
                examples.append(x_rep[0])

    as_np = lambda parts: torch.cat(parts).cpu().numpy()  # noqa: E731
    names = list(stats)
    data_vars: Dict[str, tuple] = {
        "observed": (("datapoint", "statistic"), as_np(observed), {"description": "T(x_i), the statistic of the data"}),
        "replicated": (
            ("datapoint", "statistic", "replicate"),
            as_np(replicated),
            {"description": f"T(x_rep) for x_rep ~ p(x | z), z ~ {_source_text(source)}"},
        ),
        "p_value": (
            ("datapoint", "statistic"),
            as_np(p_values),
            {"description": "P(T(x_rep) > T(x_i)) + 0.5 P(T(x_rep) = T(x_i)) (mid-p), over the replicates"},
        ),
    }
    if elementwise:
        event_dims = ("datapoint", *_event_dim_names(event_shape))
        data_vars["predictive_mean"] = (
            event_dims,
            as_np(means),
            {"description": "E[x_rep | x_i] per element, the replicates' mean, to compare with x"},
        )
        data_vars["element_p_value"] = (
            event_dims,
            as_np(element_p),
            {"description": "P(x_rep > x_i) + 0.5 P(x_rep = x_i) per element (mid-p)"},
        )
        data_vars["replicate_example"] = (event_dims, as_np(examples), {"description": "the first replicate x_rep"})
    return xr.Dataset(
        data_vars,
        coords={"datapoint": np.arange(x.shape[0]), "statistic": names, "replicate": np.arange(num_replicates)},
        attrs={
            "source": source,
            "num_replicates": num_replicates,
            "seed": seed,
            "reference": REFERENCE,
            "p_value_convention": "mid-p: P(>) + 0.5 P(=)",
        },
    )


def _source_text(source: str) -> str:
    return "q(z | x_i), the guide" if source == "posterior" else "p(z), the prior"


def worst_fitting(ds: xr.Dataset, statistic: str, k: int = 8) -> xr.DataArray:
    """The ``k`` datapoints whose p-values for ``statistic`` are most extreme on either side:
    ``min(p, 1 - p)`` in increasing order (ties by datapoint), dim ``datapoint`` holding their
    indices in ``ds``."""
    names = [str(s) for s in ds["statistic"].values]
    if statistic not in names:
        raise ValueError(f"statistic must be one of {', '.join(names)}, got {statistic!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = ds["p_value"].sel(statistic=statistic)
    tail = np.minimum(p.values, 1.0 - p.values)
    order = np.lexsort((np.arange(len(tail)), tail))[:k]
    out = xr.DataArray(
        tail[order],
        dims="datapoint",
        coords={"datapoint": ds["datapoint"].values[order], "p_value": ("datapoint", p.values[order])},
        name="tail_probability",
        attrs={"description": f"min(p, 1 - p) of the predictive p-value of {statistic}", "statistic": statistic},
    )
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def plot_p_values(ds: xr.Dataset, bins: int = 20):
    """One histogram of p-values per statistic, with the uniform density for reference (what
    prior predictive p-values follow under the model). Returns a Figure."""
    from matplotlib.figure import Figure

    names = [str(s) for s in ds["statistic"].values]
    fig = Figure(figsize=(3.0 * len(names) + 0.4, 2.8), constrained_layout=True)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        p = ds["p_value"].sel(statistic=name).values
        ax.hist(p, bins=bins, range=(0.0, 1.0), density=True, color="C0", alpha=0.8)
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="uniform")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("p-value")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(
        f"{ds.attrs.get('source', '')} predictive p-values, R={ds.attrs.get('num_replicates')}, "
        f"N={ds.sizes['datapoint']}",
        fontsize=9,
    )
    return fig


def plot_worst_fitting(x: Union[Tensor, np.ndarray], ds: xr.Dataset, statistic: str, k: int = 8):
    """The ``k`` worst-fitting datapoints for ``statistic`` (:func:`worst_fitting`), each shown
    above one replicate x_rep, titled with its ``datapoint`` coordinate in ``ds``, T(x) and the
    p-value. ``x`` is the data checked in ``ds`` (row i of ``x`` is position i of ``ds``), images ``(N, C, H, W)`` or ``(N, H, W)``; ``ds`` needs ``replicate_example``
    (``elementwise=True``). Returns a Figure."""
    from matplotlib.figure import Figure

    from ppl_vae.analysis.plots import show_images

    if "replicate_example" not in ds:
        raise ValueError("ds has no replicate_example; run posterior_predictive_check with elementwise=True")
    data = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if data.shape[0] != ds.sizes["datapoint"]:
        raise ValueError(f"x must hold the {ds.sizes['datapoint']} datapoints checked in ds, got {data.shape[0]}")
    if not (data.ndim == 3 or (data.ndim == 4 and data.shape[1] in (1, 3))):
        raise ValueError(f"x must be images (N, C, H, W) or (N, H, W), got shape {data.shape}")
    # ranked by position in x and ds; labelled with ds's own datapoint ids (a subset's indices in its split)
    worst = worst_fitting(ds.assign_coords(datapoint=np.arange(ds.sizes["datapoint"])), statistic, k)
    idx = worst["datapoint"].values
    ids = ds["datapoint"].values[idx]
    rep = ds["replicate_example"].values

    def image(a: np.ndarray) -> np.ndarray:
        if a.ndim == 3:
            return a[0] if a.shape[0] == 1 else np.clip(a.transpose(1, 2, 0), 0.0, 1.0)
        return a

    n = len(idx)
    fig = Figure(figsize=(1.0 + 0.95 * n, 2.6), constrained_layout=True)
    axes = fig.subplots(2, n, squeeze=False)
    t_obs = ds["observed"].sel(statistic=statistic).values
    for c, (i, label) in enumerate(zip(idx, ids)):
        for r, img in enumerate((image(data[i]), image(rep[i]))):
            ax = axes[r, c]
            if img.ndim == 2:
                show_images(ax, img)
            else:
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, c].set_title(f"#{label}\nT={float(t_obs[i]):.3f}\np={float(worst['p_value'][c]):.3f}", fontsize=6)
    axes[0, 0].set_ylabel("data", fontsize=7, rotation=0, ha="right", va="center")
    axes[1, 0].set_ylabel("replicate", fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"worst-fitting datapoints for {statistic} (#: the datapoint coordinate of the results)", fontsize=8)
    return fig


__all__ = [
    "BuiltinStatistic",
    "DataDomain",
    "IMAGES_IN_UNIT_INTERVAL",
    "STATISTICS",
    "inapplicable_statistics",
    "mean_intensity",
    "active_pixels",
    "mid_p_value",
    "posterior_predictive_check",
    "worst_fitting",
    "plot_p_values",
    "plot_worst_fitting",
]
