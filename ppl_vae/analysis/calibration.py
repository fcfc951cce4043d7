"""Simulation-based calibration (SBC) of an amortized guide against the model it was trained with.

If q(z|x) is the exact posterior, then for (z*, x) drawn from the model's prior predictive
(z* ~ p(z), x ~ p(x|z*)) and z_1..z_L ~ q(z|x), the rank of z* among the draws (the number of
draws below it, 0..L) is uniform on {0, ..., L}, for every scalar quantity f(z, x) computed
alike from z* and from the draws (Talts et al. 2018, "Validating Bayesian inference
algorithms with simulation-based calibration"; Modrák et al. 2023 for quantities that depend
on the data, such as the log-likelihood). A guide that is too narrow gives U-shaped ranks, one
that is too wide gives a hump, a biased one skewed ranks.

- :func:`sbc_ranks` simulates and ranks: each dimension of each continuous latent site, the
  norm ``|z|`` of each site, and ``log p(x|z)`` (the model's observed-site log-density).
- :func:`sbc_uniformity` tests the ranks: a chi-square statistic over bins of ranks, and the
  ECDF of the ranks against a *simultaneous* band (Säilynoja, Bürkner & Vehtari 2022,
  "Graphical test for discrete uniformity and its applications in goodness-of-fit evaluation
  and multiple sample comparison"), with the band's own p-value.
- :func:`coverage` gives the empirical coverage of central intervals of the L draws, and
  :func:`dispersion` pools it over the latent dimensions and says whether the posterior is too
  narrow (under-dispersed) or too wide (over-dispersed).
- :func:`plot_sbc_ecdf` draws the ECDF differences and their bands, one panel per quantity.

The library never reads a run directory here: the caller passes a model and a guide.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import xarray as xr
from scipy import stats
from torch import Tensor

from ppl_vae.inference.ais import simulate_data
from ppl_vae.inference.latents import (
    Layout,
    Site,
    guide_layout,
    log_joint,
    log_prior_and_likelihood,
    model_layout,
    sample_guide,
)
from ppl_vae.inference.meanfield import MEAN_FIELD_OPTIONS as MEAN_FIELD_FIT_OPTIONS
from ppl_vae.inference.modes import batches, block_seed, check_positive, in_eval_mode, rows, seeded

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SBC_REFERENCE = (
    "Talts, Betancourt, Simpson, Vehtari & Gelman (2018), Validating Bayesian inference algorithms "
    "with simulation-based calibration"
)
ECDF_REFERENCE = (
    "Säilynoja, Bürkner & Vehtari (2022), Graphical test for discrete uniformity and its applications "
    "in goodness-of-fit evaluation and multiple sample comparison"
)
LOG_LIKELIHOOD = "log p(x|z)"
"""The name of the log-likelihood quantity in :func:`sbc_ranks`' ``quantity`` coordinate."""


SIR_REFERENCE = "Rubin (1988), Using the SIR algorithm to simulate posterior distributions; Smith & Gelfand (1992)"
REFINE_REFERENCE = (
    "Kim, Wiseman, Miller, Sontag & Rush (2018), Semi-amortized variational autoencoders; "
    "Marino, Yue & Mandt (2018), Iterative amortized inference"
)
MAX_SAMPLES_PER_CHUNK = 2**16
"""SIR scores its K proposals in chunks of about this many latent draws (datapoints x proposals)."""


@dataclass
class SIRDraws:
    """Sampling-importance-resampling draws (:func:`sir_draws`): ``latents`` ``{site: (L, N,
    *event_shape)}`` for every site the guide samples, and ``ess`` ``(N,)``, the effective sample
    size (sum w)^2 / sum w^2 of the K proposals' weights (near 1: the draws repeat one proposal)."""

    latents: Dict[str, Tensor]
    ess: Tensor
    num_samples: int
    num_draws: int


def _check_sir(num_samples: Any, num_draws: Any) -> None:
    check_positive("num_samples", num_samples)
    check_positive("num_draws", num_draws)
    if int(num_samples) < 2:
        raise ValueError(
            f"num_samples (SIR's K proposals) must be >= 2: with one proposal every draw is the guide's, got {num_samples}"
        )


def _sir_batch(
    model: Callable, guide: Callable, x: Tensor, num_samples: int, num_draws: int, kw: Dict[str, Any]
) -> Tuple[Dict[str, Tensor], Tensor]:
    """SIR draws ``{site: (L, B, ...)}`` and the ESS ``(B,)`` for one block of datapoints, drawn
    from the current random stream: K proposals z_k ~ q(z|x) (in chunks), weights
    w_k = p(x, z_k) / q(z_k|x), then L indices drawn with replacement with probabilities w_k / sum w."""
    b = x.shape[0]
    chunk = max(1, MAX_SAMPLES_PER_CHUNK // max(1, b))
    parts: List[Dict[str, Tensor]] = []
    log_ws: List[Tensor] = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        latents, log_q = sample_guide(model, guide, x, k, **kw)
        layout = Layout(tuple(Site(n, tuple(v.shape[2:])) for n, v in latents.items()))
        log_ws.append((log_joint(model, x, latents, layout=layout, **kw) - log_q).double())
        parts.append(latents)
    log_w = torch.cat(log_ws, 0)  # (K, B)
    if torch.isnan(log_w).any() or not bool(torch.isfinite(log_w).any(0).all()):
        raise ValueError("SIR: an importance weight is NaN, or every weight of a datapoint is zero")
    probs = torch.softmax(log_w, 0)
    ess = 1.0 / probs.square().sum(0)
    index = torch.multinomial(probs.T.float(), num_draws, replacement=True).T  # (L, B)
    cols = torch.arange(b, device=x.device)
    draws = {}
    for name in parts[0]:
        value = torch.cat([p[name] for p in parts], 0)  # (K, B, ...)
        draws[name] = value[index, cols]
    return draws, ess


@torch.no_grad()
@in_eval_mode("model", "guide")
def sir_draws(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    seed: int,
    num_samples: int = 1000,
    num_draws: int = 100,
    batch_size: int = 100,
    progress: bool = False,
    **kwargs: Any,
) -> SIRDraws:
    """Sampling-importance-resampling from the guide (Rubin 1988): per datapoint, K =
    ``num_samples`` proposals z_k ~ q(z|x) weighted by w_k = p(x, z_k) / q(z_k|x), and
    L = ``num_draws`` draws made by resampling the proposals with replacement in proportion to
    their weights. As K grows the draws' distribution tends to p(z|x) whatever the guide (as
    long as q covers the posterior); with few proposals, or an ESS far below L, they repeat a
    few proposals and inherit the guide's errors.

    Returns :class:`SIRDraws`. ``x`` ``(N, ...)``; tensor ``kwargs`` with one row per datapoint
    are sliced with it. Each block of ``batch_size`` datapoints draws from its own stream seeded
    by (``seed``, its first index); the caller's RNG state is left as found.
    """
    from tqdm.auto import tqdm

    _check_sir(num_samples, num_draws)
    check_positive("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x holds no datapoints")
    parts, esses = [], []
    with tqdm(total=math.ceil(n / batch_size), disable=not progress, desc=f"SIR K={num_samples}") as bar:
        for b, (xb, kw) in enumerate(batches(x, kwargs, batch_size)):
            with seeded(block_seed(int(seed), b * batch_size, 2), xb.device):
                draws, ess = _sir_batch(model, guide, xb, int(num_samples), int(num_draws), kw)
            parts.append(draws)
            esses.append(ess)
            bar.update(1)
    latents = {name: torch.cat([p[name] for p in parts], 1) for name in parts[0]}
    return SIRDraws(latents, torch.cat(esses), int(num_samples), int(num_draws))


def _x_template(model: Callable, x_like: Optional[Tensor]) -> Tensor:
    """One datapoint's worth of ``x`` (``(1, *event_shape)``) to shape the simulated data."""
    if x_like is not None:
        if not torch.is_tensor(x_like) or x_like.dim() < 1 or x_like.shape[0] < 1:
            raise ValueError("x_like must be a tensor with at least one datapoint (row)")
        return x_like[:1]
    owner = getattr(model, "__self__", None)
    event_shape = getattr(owner, "event_shape", None)  # ppl_vae.models.VAE declares its datapoint shape
    if event_shape is None or not isinstance(owner, torch.nn.Module):
        raise ValueError("x_like is needed: a tensor whose rows have the shape of one datapoint of the model")
    param = next(owner.parameters(), None)
    device = param.device if param is not None else None
    return torch.zeros((1, *event_shape), device=device)


def _quantities(layout_sites: Sequence[Any]) -> Tuple[List[str], List[str], List[str]]:
    """(name, site, kind) of every ranked quantity, in the order of the rank columns."""
    names, sites, kinds = [], [], []
    for site in layout_sites:
        if site.event_shape:
            names += [f"{site.name}[{i}]" for i in range(site.size)]
        else:
            names.append(site.name)
        sites += [site.name] * site.size
        kinds += ["dimension"] * site.size
    for site in layout_sites:
        names.append(f"|{site.name}|")
        sites.append(site.name)
        kinds.append("norm")
    names.append(LOG_LIKELIHOOD)
    sites.append("x")
    kinds.append("log_likelihood")
    return names, sites, kinds


@torch.no_grad()
@in_eval_mode("model", "guide")
def sbc_ranks(
    model: Callable,
    guide: Callable,
    *,
    num_simulations: int,
    num_posterior_samples: int = 99,
    seed: int,
    latent_sites: Optional[Sequence[str]] = None,
    x_like: Optional[Tensor] = None,
    batch_size: int = 256,
    sir_num_samples: Optional[int] = None,
    refine_steps: Optional[int] = None,
    refine_options: Optional[Mapping[str, Any]] = None,
    mean_field: bool = False,
    mean_field_options: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> xr.Dataset:
    """SBC ranks of the guide q(z|x) against the model's prior predictive (Talts et al. 2018).

    ``num_simulations`` pairs (z*, x) are drawn from the model with its observed site ``"x"``
    unconditioned (:func:`ppl_vae.inference.ais.simulate_data`); for each x, the guide draws
    ``L = num_posterior_samples`` latents, and the rank of z* among them (the number of draws
    below it, in 0..L) is recorded for each dimension of each continuous latent site (or of
    ``latent_sites``), for each site's Euclidean norm ``|z|``, and for ``log p(x|z)``
    (at z* vs at each draw; discrete sites the model enumerates are summed out). With an exact
    guide every rank is uniform on {0, ..., L}; ``L + 1`` dividing evenly into bins (the
    default 99 gives 100 rank values) keeps histograms simple.

    ``x_like``: a tensor whose rows have the shape of one datapoint (only its shape, dtype
    and device are used); optional for a :class:`ppl_vae.models.VAE`'s own ``model``, which
    declares its ``event_shape``. ``kwargs`` go to model and guide; a tensor with
    ``num_simulations`` rows (labels ``y``) is sliced with the simulations. The draws come
    from ``seed`` alone (the caller's random state is left as found); the same ``seed`` and
    ``batch_size`` give identical ranks. The simulations (z*, x) and the posterior draws use
    separate streams, so the same ``seed`` gives the same simulations whatever ranks them.

    ``sir_num_samples`` K: rank among L draws of sampling-importance-resampling from the guide
    with K proposals (:func:`sir_draws`) instead of the guide's own draws, so that the guide's
    miscalibration can be set beside SIR's on the same simulations.

    ``refine_steps`` K: rank among L draws of each simulation's *refined* q_K(z|x) instead: the
    encoder's Gaussian refined by K Adam steps on that x's own ELBO with the model frozen
    (:func:`ppl_vae.inference.refine.refine`, semi-amortized inference; ``refine_options`` go to
    it: ``lr``, ``num_samples``, ``average``, ...). The simulations are the same as the guide's.
    Adds ``refine_gap`` and ``refine_gap_se`` ``(simulation)``: the ELBO the K steps gained on each
    simulated x (the part of the amortization gap they close) and its paired Monte Carlo se.

    ``mean_field``: rank among L draws of each simulation's *mean-field* q*(z) instead: a diagonal
    Gaussian fitted to that x alone with the model frozen (Adam, then an L-BFGS polish,
    :func:`ppl_vae.inference.meanfield.fit_mean_field`; ``mean_field_options`` go to it:
    ``max_steps``, ``lr``, ``init``, ``polish_steps``, ``gtol``, ...). It is the best a diagonal
    Gaussian can do per datapoint, so its miscalibration is the family's, not the encoder's. Adds
    ``meanfield_gap`` and ``meanfield_gap_se`` ``(simulation)``: ELBO of q* minus the encoder's on
    each simulated x (each from ``num_eval_samples`` independent draws, default 100) and its Monte
    Carlo se, and ``meanfield_converged`` ``(simulation)``: whether the polish met its gradient
    tolerance. One of ``sir_num_samples``, ``refine_steps`` and ``mean_field`` at most.

    Returns a Dataset with ``rank`` ``(simulation, quantity)`` (int), coordinates ``quantity``
    (``"z[0]"``, ..., ``"|z|"``, ``"log p(x|z)"``), ``site`` and ``kind`` (``"dimension"``,
    ``"norm"``, ``"log_likelihood"``) per quantity; attrs ``num_posterior_samples``, ``seed``,
    ``posterior`` (``"guide"``, ``"sir"`` with ``sir_num_samples``, ``"refined"`` with
    ``refine_steps`` and the refinement's options, or ``"meanfield"`` with the fit's options as
    ``meanfield_*``), ``reference``.
    """
    check_positive("num_simulations", num_simulations)
    if not isinstance(mean_field, (bool, np.bool_)):
        raise ValueError(f"mean_field must be True or False, got {mean_field!r}")
    chosen = [
        name
        for name, on in (
            ("sir_num_samples", sir_num_samples is not None),
            ("refine_steps", refine_steps is not None),
            ("mean_field", bool(mean_field)),
        )
        if on
    ]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} choose different posteriors: give one of them")
    if sir_num_samples is not None:
        _check_sir(sir_num_samples, num_posterior_samples)
    if refine_steps is not None:
        check_positive("refine_steps", refine_steps)
    options = _refine_options(refine_options)
    if mean_field_options is not None and not mean_field:
        raise ValueError("mean_field_options apply to the mean-field q* only: give mean_field=True too")
    mf_options = _mean_field_options(mean_field_options)
    check_positive("num_posterior_samples", num_posterior_samples)
    check_positive("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    template = _x_template(model, x_like)
    n, L = int(num_simulations), int(num_posterior_samples)

    def shaped(count: int) -> Tensor:
        return template.expand((count,) + tuple(template.shape[1:]))

    probe_kwargs = {k: rows(v, n, slice(0, 1)) for k, v in kwargs.items()}
    layout = model_layout(model, shaped(1), **probe_kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site in the 'data' plate to rank")
    guide_layout(guide, shaped(1), layout, **probe_kwargs)
    if latent_sites is None:
        ranked = list(layout.sites)
    else:
        unknown = [s for s in latent_sites if s not in layout.names]
        if unknown or not latent_sites:
            raise ValueError(
                f"latent_sites must name latent sites of the model ({', '.join(layout.names)}); got {list(latent_sites)}"
            )
        ranked = [s for s in layout.sites if s.name in latent_sites]
    columns = np.concatenate(
        [np.arange(start, start + s.size) for s, start in zip(layout.sites, layout.offsets) if s in ranked]
    )
    names, sites, kinds = _quantities(ranked)

    blocks, esses, gaps, converged_parts = [], [], [], []
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        count = sl.stop - sl.start
        kw = {k: rows(v, n, sl) for k, v in kwargs.items()}
        with seeded(block_seed(int(seed), start, 0), template.device):
            x, z_star = simulate_data(model, shaped(count), seed=None, **kw)  # (B, ...), (B, size)
        with seeded(block_seed(int(seed), start, 1), template.device):
            if sir_num_samples is not None:
                draws, ess = _sir_batch(model, guide, x, int(sir_num_samples), L, kw)
                esses.append(ess.cpu().numpy())
            elif refine_steps is None:
                draws, _ = sample_guide(model, guide, x, L, **kw)
        if refine_steps is not None:
            z, gap = _refined_draws(
                model, guide, x, L, kw, layout, int(refine_steps), options, block_seed(int(seed), start, 3)
            )
            gaps.append(gap)
        elif mean_field:
            z, gap, converged = _mean_field_draws(
                model,
                guide,
                x,
                L,
                kw,
                layout,
                mf_options,
                block_seed(int(seed), start, 4),
                block_seed(int(seed), start, 5),
            )
            gaps.append(gap)
            converged_parts.append(converged)
        else:
            z = layout.join({s: draws[s] for s in layout.names}, 2)  # (L, B, size)
        # per-quantity values at z* (B, Q) and at the draws (L, B, Q)
        true_parts = [z_star[:, columns]]
        draw_parts = [z[..., columns]]
        for site in ranked:
            i = layout.names.index(site.name)
            cols = slice(layout.offsets[i], layout.offsets[i] + site.size)
            true_parts.append(z_star[:, cols].norm(dim=-1, keepdim=True))
            draw_parts.append(z[..., cols].norm(dim=-1, keepdim=True))
        _, lik_star = log_prior_and_likelihood(model, x, layout.split(z_star), layout=layout, **kw)
        _, lik_draws = log_prior_and_likelihood(model, x, layout.split(z), layout=layout, **kw)
        true_parts.append(lik_star.reshape(count, 1))
        draw_parts.append(lik_draws.reshape(L, count, 1))
        truth, sampled = torch.cat(true_parts, -1), torch.cat(draw_parts, -1)
        blocks.append((sampled < truth).sum(0).cpu().numpy().astype(np.int64))
    rank = np.concatenate(blocks, 0)
    data: Dict[str, Any] = {"rank": (("simulation", "quantity"), rank)}
    posterior: Dict[str, Any] = {"posterior": "guide"}
    if sir_num_samples is not None:
        data["sir_ess"] = ("simulation", np.concatenate(esses))
        posterior = {
            "posterior": "sir",
            "sir_num_samples": int(sir_num_samples),
            "sir_reference": SIR_REFERENCE,
        }
    if refine_steps is not None:
        gap_values = np.concatenate([g[0] for g in gaps])
        data["refine_gap"] = ("simulation", gap_values)
        data["refine_gap_se"] = ("simulation", np.concatenate([g[1] for g in gaps]))
        posterior = {
            "posterior": "refined",
            "refine_steps": int(refine_steps),
            **{f"refine_{k}": (int(v) if isinstance(v, bool) else v) for k, v in options.items() if v is not None},
            "refine_reference": REFINE_REFERENCE,
        }
    if mean_field:
        data["meanfield_gap"] = ("simulation", np.concatenate([g[0] for g in gaps]))
        data["meanfield_gap_se"] = ("simulation", np.concatenate([g[1] for g in gaps]))
        data["meanfield_converged"] = ("simulation", np.concatenate(converged_parts))
        posterior = {
            "posterior": "meanfield",
            **{f"meanfield_{k}": (int(v) if isinstance(v, bool) else v) for k, v in mf_options.items()},
            "meanfield_reference": MEAN_FIELD_REFERENCE,
        }
    dataset = xr.Dataset(
        data,
        coords={
            "simulation": np.arange(n),
            "quantity": np.asarray(names, dtype=object),
            "site": ("quantity", np.asarray(sites, dtype=object)),
            "kind": ("quantity", np.asarray(kinds, dtype=object)),
        },
        attrs={
            "num_posterior_samples": L,
            "num_simulations": n,
            "seed": int(seed),
            "batch_size": int(batch_size),
            **posterior,
            "reference": SBC_REFERENCE,
        },
    )
    if refine_steps is not None:
        dataset["refine_gap"].attrs["long_name"] = (
            "ELBO of the refined q minus ELBO of the encoder's q on each simulated x, nats (common draws)"
        )
        dataset["refine_gap_se"].attrs["long_name"] = "Monte Carlo standard error of refine_gap (paired draws)"
    if mean_field:
        dataset["meanfield_gap"].attrs["long_name"] = (
            "ELBO of the mean-field q* minus ELBO of the encoder's q on each simulated x, nats "
            "(the amortization gap; independent draws)"
        )
        dataset["meanfield_gap_se"].attrs["long_name"] = "Monte Carlo standard error of meanfield_gap"
        dataset["meanfield_converged"].attrs["long_name"] = "the fit of q* met its gradient tolerance (gtol)"
    return dataset


REFINE_DEFAULTS: Dict[str, Any] = {"lr": 0.02, "num_samples": 4, "average": True, "num_eval_samples": 100}
"""The refinement :func:`sbc_ranks` uses unless ``refine_options`` says otherwise: Adam at 0.02,
4 draws per step, the mean iterate of the last window (Polyak averaging, far less noise in the
refined (loc, scale) than the last iterate), the ELBOs before and after from 100 common draws."""
REFINE_OPTIONS = ("lr", "num_samples", "average", "num_eval_samples", "tol", "window", "batch_size")


def _refine_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    unknown = sorted(set(options or {}) - set(REFINE_OPTIONS))
    if unknown:
        raise ValueError(f"refine_options: unknown {', '.join(unknown)}; allowed: {', '.join(REFINE_OPTIONS)}")
    return {**REFINE_DEFAULTS, **dict(options or {})}


def _refined_draws(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_draws: int,
    kw: Dict[str, Any],
    layout: Layout,
    num_steps: int,
    options: Dict[str, Any],
    seed: int,
) -> Tuple[Tensor, Tuple[np.ndarray, np.ndarray]]:
    """``(L, B, layout.size)`` draws of each datapoint's refined q_K(z|x) (a diagonal Gaussian over
    the flat latents, :func:`ppl_vae.inference.refine.refine` from the encoder's q, ``seed`` its
    stream), and (gap, gap se) ``(B,)``: the ELBO the steps gained. The draws come from their own
    generator seeded from ``seed``, so the same call repeats exactly."""
    from ppl_vae.inference.refine import refine

    with torch.enable_grad():
        result = refine(model, guide, x, seed=seed, num_steps=num_steps, **options, **kw)
    b = x.shape[0]
    loc, scale = result.loc.reshape(b, -1), result.scale.reshape(b, -1)
    assert loc.shape[1] == layout.size, (loc.shape, layout.size)
    # the draws' own generator (a stream of ``seed`` other than the refinement's): the global
    # stream's state after the refinement did not repeat between identical runs
    generator = torch.Generator(device=loc.device).manual_seed(block_seed(seed, 0, 1))
    eps = torch.randn((num_draws,) + tuple(loc.shape), dtype=loc.dtype, device=loc.device, generator=generator)
    gap = (result.gap.double().cpu().numpy(), result.gap_stderr.double().cpu().numpy())
    return loc + scale * eps, gap


MEAN_FIELD_REFERENCE = "Cremer, Li & Duvenaud (2018), Inference suboptimality in variational autoencoders"
MEAN_FIELD_OPTIONS = tuple(k for k in MEAN_FIELD_FIT_OPTIONS if k != "seed")
"""The options of :func:`ppl_vae.inference.meanfield.fit_mean_field` that ``mean_field_options`` may
set (all but ``seed``: each simulation's fit is seeded from the calibration's own)."""


def _mean_field_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The fit's options: ``options`` over fit_mean_field's own defaults (all recorded in attrs)."""
    import inspect

    from ppl_vae.inference.meanfield import check_mean_field_options, default_max_steps, fit_mean_field

    check_mean_field_options(dict(options or {}), without=("seed",))
    params = inspect.signature(fit_mean_field).parameters
    out = {**{k: params[k].default for k in MEAN_FIELD_OPTIONS}, **dict(options or {})}
    if out["max_steps"] is None:  # the fit's own default, which depends on the polish
        out["max_steps"] = default_max_steps(bool(out["polish"]))
    return out


def _mean_field_draws(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_draws: int,
    kw: Dict[str, Any],
    layout: Layout,
    options: Dict[str, Any],
    seed: int,
    encoder_seed: int,
) -> Tuple[Tensor, Tuple[np.ndarray, np.ndarray], np.ndarray]:
    """``(L, B, layout.size)`` draws of each datapoint's mean-field q*(z) (a diagonal Gaussian over
    the flat latents, :func:`ppl_vae.inference.meanfield.fit_mean_field`, ``seed`` its stream),
    (gap, gap se) ``(B,)``: L[q*] minus the encoder's ELBO, each from ``num_eval_samples``
    independent draws (the encoder's from ``encoder_seed``), and whether each fit converged.
    The draws of z come from their own generator seeded with ``encoder_seed``."""
    from ppl_vae.inference.importance import importance_estimate
    from ppl_vae.inference.meanfield import fit_mean_field

    with torch.enable_grad():
        result = fit_mean_field(model, guide, x, seed=seed, **options, **kw)
    b = x.shape[0]
    loc, scale = result.loc.detach().reshape(b, -1), result.scale.detach().reshape(b, -1)
    if loc.shape[1] != layout.size:
        raise ValueError(f"the mean-field q* has {loc.shape[1]} latent numbers, the model's sites {layout.size}")
    encoder = importance_estimate(
        model,
        guide,
        x,
        num_samples=int(options["num_eval_samples"]),
        batch_size=b,
        tail_diagnostic=False,
        seed=encoder_seed,
        **kw,
    )
    as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    gap = as_np(result.elbo) - as_np(encoder.elbo)
    gap_se = np.sqrt(as_np(result.estimate.elbo_stderr) ** 2 + as_np(encoder.elbo_stderr) ** 2)
    # the draws' own generator: the global stream's state after the fit is not reproducible here
    generator = torch.Generator(device=loc.device).manual_seed(encoder_seed)
    eps = torch.randn((num_draws,) + tuple(loc.shape), dtype=loc.dtype, device=loc.device, generator=generator)
    converged = result.converged.cpu().numpy().astype(bool)
    return loc + scale * eps, (gap, gap_se), converged


# ---------------------------------------------------------------------------------------------
# Uniformity: chi-square over bins, and the ECDF with simultaneous bands


def _num_ranks(ranks: xr.Dataset) -> int:
    """L + 1, the number of possible rank values."""
    if "rank" not in ranks or "num_posterior_samples" not in ranks.attrs:
        raise ValueError("ranks must be the Dataset sbc_ranks returns (a 'rank' variable, num_posterior_samples)")
    return int(ranks.attrs["num_posterior_samples"]) + 1


def _pointwise_p_values(num_simulations: int, probs: np.ndarray) -> np.ndarray:
    """Two-sided binomial tail probabilities ``(K, N + 1)``: for evaluation point k and count c
    of ranks below it, min(1, 2 min(P(C <= c), P(C >= c))) with C ~ Binomial(N, probs[k])."""
    c = np.arange(num_simulations + 1)[None, :]
    p = probs[:, None]
    return np.minimum(
        1.0, 2.0 * np.minimum(stats.binom.cdf(c, num_simulations, p), stats.binom.sf(c - 1, num_simulations, p))
    )


@functools.lru_cache(maxsize=16)
def _band(
    num_simulations: int, num_ranks: int, level: float, num_band_simulations: int, band_seed: int
) -> Tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, probs, gamma, lower, upper, sorted simulated minima) of the simultaneous band.

    Evaluation points are rank thresholds t_k (the ECDF counts ranks < t_k), at most
    min(L + 1, N) of them, evenly spread; under uniformity the count is Binomial(N, t_k / (L + 1)).
    Säilynoja et al. (2022, sec. 2.2): simulate ``num_band_simulations`` samples of N uniform
    ranks, take for each the smallest pointwise two-sided tail probability over the points, and
    set the pointwise level gamma to the (1 - level) quantile of these minima (the lower order
    statistic, so at most 1 - level of uniform samples leave the band). The band at point k is
    every count whose tail probability is at least gamma.
    """
    num_points = min(num_ranks, num_simulations)
    thresholds = np.unique(np.round(np.arange(1, num_points) * num_ranks / num_points).astype(np.int64))
    thresholds = thresholds[(thresholds > 0) & (thresholds < num_ranks)]
    probs = thresholds / num_ranks
    table = _pointwise_p_values(num_simulations, probs)  # (K, N + 1)
    rng = np.random.default_rng(band_seed)  # its own generator: the caller's NumPy state is untouched
    chunk = max(1, int(2e7 // max(num_simulations, num_ranks)))
    minima = []
    for start in range(0, num_band_simulations, chunk):
        m = min(chunk, num_band_simulations - start)
        r = rng.integers(0, num_ranks, size=(m, num_simulations))
        counts = _counts_below(r, num_ranks, thresholds)  # (m, K)
        minima.append(table[np.arange(len(thresholds))[None, :], counts].min(1))
    mins = np.sort(np.concatenate(minima))
    gamma = float(mins[int(math.floor((1.0 - level) * num_band_simulations))])
    inside = table >= gamma
    lower = inside.argmax(1)
    upper = num_simulations - inside[:, ::-1].argmax(1)
    return thresholds, probs, gamma, lower, upper, mins


def _counts_below(r: np.ndarray, num_ranks: int, thresholds: np.ndarray) -> np.ndarray:
    """For ranks ``r`` ``(M, N)`` (rows are samples): the number below each threshold, ``(M, K)``."""
    m = r.shape[0]
    hist = np.bincount((r + num_ranks * np.arange(m)[:, None]).ravel(), minlength=m * num_ranks)
    cum = np.cumsum(hist.reshape(m, num_ranks), 1)
    return cum[:, thresholds - 1]


def sbc_uniformity(
    ranks: xr.Dataset,
    *,
    num_bins: Optional[int] = None,
    level: float = 0.95,
    num_band_simulations: int = 10000,
    band_seed: int = 0,
) -> xr.Dataset:
    """Tests of the uniformity of SBC ranks (from :func:`sbc_ranks`), per quantity.

    - ``chi2``, ``chi2_p_value``: Pearson's chi-square over ``num_bins`` bins of ranks (default
      min(20, L + 1, N // 10), at least 2), each bin's expected count exact for the discrete
      uniform on {0, ..., L} (Talts et al. 2018, sec. 4.1).
    - ``ecdf_diff`` ``(quantity, fractional_rank)``: the ECDF of the ranks minus the uniform CDF at
      rank thresholds t/(L + 1), with ``band_lower``/``band_upper`` ``(fractional_rank)``: a band
      that a uniform ECDF stays inside at every point at once with probability ``level``
      (Säilynoja et al. 2022; the pointwise level is adjusted by simulating
      ``num_band_simulations`` uniform rank samples with ``band_seed``, see :func:`_band`).
    - ``outside_band``: whether the ECDF leaves the band somewhere; ``ecdf_p_value``: the Monte
      Carlo p-value of the smallest pointwise tail probability against the same simulations,
      (1 + #{simulated <= observed}) / (1 + num_band_simulations), a valid p-value whose
      rejection at 1 - level matches leaving the band.

    The result depends only on the ranks and the arguments (no global random state).
    """
    num_ranks = _num_ranks(ranks)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    check_positive("num_band_simulations", num_band_simulations)
    r = np.asarray(ranks["rank"].transpose("simulation", "quantity").values, dtype=np.int64)
    n, q = r.shape
    if n < 2:
        raise ValueError("sbc_uniformity needs at least 2 simulations")
    if r.min() < 0 or r.max() >= num_ranks:
        raise ValueError(f"ranks must lie in 0..{num_ranks - 1} (num_posterior_samples)")
    if num_bins is None:
        num_bins = max(2, min(20, num_ranks, n // 10))
    check_positive("num_bins", num_bins)
    if num_bins < 2 or num_bins > num_ranks:
        raise ValueError(f"num_bins must be in 2..{num_ranks} (L + 1), got {num_bins}")

    # chi-square: bin b holds ranks r with floor(r * B / (L + 1)) == b
    bin_of_rank = np.arange(num_ranks) * num_bins // num_ranks
    expected = n * np.bincount(bin_of_rank, minlength=num_bins) / num_ranks
    observed = np.stack([np.bincount(bin_of_rank[r[:, j]], minlength=num_bins) for j in range(q)])
    chi2 = ((observed - expected) ** 2 / expected).sum(1)
    chi2_p = stats.chi2.sf(chi2, num_bins - 1)

    thresholds, probs, gamma, lower, upper, mins = _band(
        n, num_ranks, float(level), int(num_band_simulations), int(band_seed)
    )
    counts = _counts_below(r.T, num_ranks, thresholds)  # (Q, K)
    table = _pointwise_p_values(n, probs)
    pointwise = table[np.arange(len(thresholds))[None, :], counts]  # (Q, K)
    observed_min = pointwise.min(1)
    outside = observed_min < gamma
    ecdf_p = (1 + np.searchsorted(mins, observed_min, side="right")) / (1 + len(mins))

    coords = {k: v for k, v in ranks.coords.items() if v.dims == ("quantity",)}
    coords["fractional_rank"] = probs
    coords["rank_threshold"] = ("fractional_rank", thresholds)
    return xr.Dataset(
        {
            "chi2": ("quantity", chi2),
            "chi2_p_value": ("quantity", chi2_p),
            "ecdf_diff": (("quantity", "fractional_rank"), counts / n - probs[None, :]),
            "band_lower": ("fractional_rank", lower / n - probs),
            "band_upper": ("fractional_rank", upper / n - probs),
            "outside_band": ("quantity", outside),
            "ecdf_p_value": ("quantity", ecdf_p),
        },
        coords=coords,
        attrs={
            "num_posterior_samples": num_ranks - 1,
            "num_simulations": n,
            "num_bins": int(num_bins),
            "chi2_df": int(num_bins - 1),
            "level": float(level),
            "pointwise_level": gamma,
            "num_band_simulations": int(num_band_simulations),
            "band_seed": int(band_seed),
            "reference": f"{SBC_REFERENCE}; {ECDF_REFERENCE}",
        },
    )


def format_p_value(p: float) -> str:
    """A p-value as printed: three decimals, or one significant digit and exponent below 0.001."""
    if p < 1e-300:  # underflows to 0 in double precision
        return "< 1e-300"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_ecdf_p_value(p: float, num_band_simulations: int) -> str:
    """An ECDF p-value of :func:`sbc_uniformity` as printed: at its Monte Carlo floor
    1 / (1 + num_band_simulations) (no simulated uniform sample was as extreme) it is an upper
    bound, written "≤ 1.0e-04", not an estimate."""
    floor = 1.0 / (1 + int(num_band_simulations))
    return f"≤ {format_p_value(floor)}" if p <= floor * (1 + 1e-9) else format_p_value(p)


def coverage(ranks: xr.Dataset, levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95)) -> xr.Dataset:
    """Empirical coverage of central intervals of the L draws, per level and quantity.

    The central interval at level a excludes k = floor((1 - a)(L + 1) / 2) draws on each side:
    it is (z_(k), z_(L+1-k)) in order statistics, and contains z* exactly when its rank is in
    k..L-k, with probability ``nominal`` = (L + 1 - 2k) / (L + 1) >= a under calibration
    (equal to a when (1 - a)(L + 1) is an even integer, e.g. L = 99 and a = 0.5, 0.8, 0.9). Returns ``coverage``, its binomial standard error ``coverage_se`` =
    sqrt(c (1 - c) / N), and ``nominal`` ``(level)``, over dims ``(level, quantity)``.
    """
    num_ranks = _num_ranks(ranks)
    levels_arr = np.asarray(list(levels), dtype=np.float64)
    if levels_arr.ndim != 1 or not len(levels_arr) or np.any((levels_arr <= 0) | (levels_arr >= 1)):
        raise ValueError(f"levels must be numbers in (0, 1), got {list(levels)}")
    r = np.asarray(ranks["rank"].transpose("simulation", "quantity").values)
    n = r.shape[0]
    # the widest exclusion with nominal >= level (rounded first: 0.1 * 100 / 2 must give 5, not 4)
    k = np.floor(np.round((1.0 - levels_arr) * num_ranks / 2.0, 9)).astype(np.int64)
    if np.any(num_ranks - 2 * k <= 0):
        raise ValueError("a level is too low for num_posterior_samples: its central interval holds no rank")
    inside = (r[None] >= k[:, None, None]) & (r[None] <= (num_ranks - 1 - k)[:, None, None])  # (level, N, Q)
    cov = inside.mean(1)
    coords = {k_: v for k_, v in ranks.coords.items() if v.dims == ("quantity",)}
    coords["level"] = levels_arr
    return xr.Dataset(
        {
            "coverage": (("level", "quantity"), cov),
            "coverage_se": (("level", "quantity"), np.sqrt(cov * (1 - cov) / n)),
            "nominal": ("level", (num_ranks - 2 * k) / num_ranks),
        },
        coords=coords,
        attrs={"num_posterior_samples": num_ranks - 1, "num_simulations": n, "reference": SBC_REFERENCE},
    )


def dispersion(ranks: xr.Dataset, levels: Sequence[float] = (0.5, 0.9), *, kind: str = "dimension") -> xr.Dataset:
    """Coverage of central intervals pooled over the quantities of one ``kind`` (default: every
    latent dimension), with a standard error that is valid although the quantities share their
    simulations, and a verdict on the posterior's width.

    Per simulation, the share of the quantities whose z* falls inside its central interval at
    level a (as :func:`coverage`) is one number; ``coverage`` is their mean over the N
    simulations and ``coverage_se`` their standard deviation over sqrt(N) (the simulations are
    independent, the quantities are not). ``excess`` = coverage - nominal: below 0 the intervals
    are too narrow for where z* falls (the posterior is under-dispersed, over-confident, or
    biased), above 0 too wide (over-dispersed). ``verdict`` ``(level)``: ``"too narrow"`` or
    ``"too wide"`` when ``excess`` is beyond :data:`SIGNIFICANCE` se, else ``"consistent"``.
    ``mean_fractional_rank``, ``rank_sd_ratio``: the mean of rank / L over the quantities and
    simulations (1/2 without bias) and the standard deviation of rank / L over that of a uniform
    (1 when calibrated, above 1 for U-shaped ranks of a too narrow posterior, below 1 for the hump
    of a too wide one).
    """
    num_ranks = _num_ranks(ranks)
    if "kind" not in ranks.coords:
        raise ValueError("ranks must carry the 'kind' coordinate sbc_ranks gives")
    chosen = np.asarray(ranks["kind"].values).astype(str) == kind
    if not chosen.any():
        raise ValueError(f"no quantity of kind {kind!r} among {sorted(set(ranks['kind'].values.astype(str)))}")
    subset = ranks.isel(quantity=np.flatnonzero(chosen))
    levels_arr = np.asarray(list(levels), dtype=np.float64)
    r = np.asarray(subset["rank"].transpose("simulation", "quantity").values)
    n = r.shape[0]
    k = np.floor(np.round((1.0 - levels_arr) * num_ranks / 2.0, 9)).astype(np.int64)
    if np.any(num_ranks - 2 * k <= 0):
        raise ValueError("a level is too low for num_posterior_samples: its central interval holds no rank")
    inside = (r[None] >= k[:, None, None]) & (r[None] <= (num_ranks - 1 - k)[:, None, None])
    per_simulation = inside.mean(2)  # (level, N)
    cov = per_simulation.mean(1)
    se = per_simulation.std(1, ddof=1) / math.sqrt(n) if n > 1 else np.full_like(cov, np.nan)
    nominal = (num_ranks - 2 * k) / num_ranks
    excess = cov - nominal
    verdict = np.where(
        excess < -SIGNIFICANCE * se, "too narrow", np.where(excess > SIGNIFICANCE * se, "too wide", "consistent")
    )
    frac = r / (num_ranks - 1)
    uniform_sd = math.sqrt((num_ranks**2 - 1) / 12.0) / (num_ranks - 1)
    return xr.Dataset(
        {
            "coverage": ("level", cov),
            "coverage_se": ("level", se),
            "nominal": ("level", nominal),
            "excess": ("level", excess),
            "verdict": ("level", verdict.astype(object)),
            "mean_fractional_rank": float(frac.mean()),
            "rank_sd_ratio": float(frac.std() / uniform_sd),
        },
        coords={"level": levels_arr},
        attrs={
            "kind": kind,
            "num_quantities": int(chosen.sum()),
            "num_simulations": n,
            "num_posterior_samples": num_ranks - 1,
            "significance_se": SIGNIFICANCE,
        },
    )


def plot_sbc_ecdf(
    uniformity: xr.Dataset,
    *,
    max_dimensions: int = 4,
    ncols: int = 3,
    compare: Optional[Mapping[str, xr.Dataset]] = None,
    label: str = "guide q(z|x)",
) -> Figure:
    """ECDF differences of the ranks with their simultaneous band (:func:`sbc_uniformity`), one
    panel per quantity: the first ``max_dimensions`` latent dimensions and every summary (norms,
    log-likelihood); the title says how many dimensions are left out. A curve leaving the grey band rejects uniformity at the band's level.

    Alone, the curve is blue inside the band and red where the quantity leaves it. ``compare``:
    other posteriors' uniformity on the same simulations and L (SIR's, from
    ``sbc_ranks(..., sir_num_samples=K)``; the refined q's, ``refine_steps=K``), ``{label:
    dataset}``, ``label`` naming the first: then each posterior keeps one colour and line style
    (solid blue, dashed green, dotted purple, ...), dots mark where a curve leaves the band, and
    each panel's title gives every posterior's ECDF p-value."""
    from ppl_vae.analysis.plots import plt  # selects the Agg backend

    others = dict(compare or {})
    frac = uniformity["fractional_rank"].values
    for name, other in others.items():
        if other.sizes.get("fractional_rank") != len(frac) or list(other["quantity"].values) != list(
            uniformity["quantity"].values
        ):
            raise ValueError(f"compare[{name!r}] must rank the same quantities with the same N and L")
    if "kind" in uniformity.coords:
        kinds = np.asarray(uniformity["kind"].values)
        all_dims = np.flatnonzero(kinds == "dimension")
        dims = all_dims[:max_dimensions]
        chosen = np.sort(np.concatenate([dims, np.flatnonzero(kinds != "dimension")]))
        left_out = [str(q) for q in uniformity["quantity"].values[all_dims[max_dimensions:]]]
    else:
        chosen = np.arange(uniformity.sizes["quantity"])[:max_dimensions]
        left_out = [str(q) for q in uniformity["quantity"].values[max_dimensions:]]
    num = len(chosen)
    ncols = max(1, min(ncols, num))
    nrows = math.ceil(num / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows + (0.4 if others else 0)), squeeze=False, sharex=True,
        layout="constrained",
    )  # fmt: skip
    lower, upper = uniformity["band_lower"].values, uniformity["band_upper"].values
    bands = int(uniformity.attrs["num_band_simulations"])
    curves = [(label, uniformity, "-", ("#1f4e79", "#c0392b" if not others else "#1f4e79"))]
    styles = [("--", "#2e8b57"), (":", "#7b3fa0"), ("-.", "#d35400")]
    curves += [
        (name, other, styles[i % len(styles)][0], (styles[i % len(styles)][1],) * 2)
        for i, (name, other) in enumerate(others.items())
    ]
    for ax, j in zip(axes.flat, chosen):
        ax.fill_between(frac, lower, upper, step="mid", color="0.85", label=f"{uniformity.attrs['level']:.0%} band")
        low, high = float(lower.min()), float(upper.max())
        p_values = []
        for name, u, style, (inside_colour, outside_colour) in curves:
            diff = u["ecdf_diff"].isel(quantity=int(j)).values
            colour = outside_colour if bool(u["outside_band"].values[j]) else inside_colour
            ax.step(frac, diff, where="mid", color=colour, lw=1.2, ls=style, label=name)
            out = (diff < lower) | (diff > upper)  # where it leaves the band: a step can be too short to see
            ax.plot(frac[out], diff[out], "o", ms=2.5, color=colour)
            low, high = min(low, float(diff.min())), max(high, float(diff.max()))
            p_values.append(float(u["ecdf_p_value"].values[j]))
        ax.axhline(0.0, color="0.4", lw=0.6)
        quantity = uniformity["quantity"].values[j]
        if others:
            entries = [
                f"{name.split(' ')[0]} {format_ecdf_p_value(p, bands)}" for (name, *_), p in zip(curves, p_values)
            ]
            per_line = 2  # three posteriors' p-values ("guide <= 1.0e-04, mean-field ...") overran a panel (QA)
            shown = ",\n".join(", ".join(entries[i : i + per_line]) for i in range(0, len(entries), per_line))
            ax.set_title(f"{quantity}\nECDF p: {shown}", fontsize=7.5)
        else:
            ax.set_title(f"{quantity}  (ECDF p {_as_relation(format_ecdf_p_value(p_values[0], bands))})")
        ax.set_xlim(0, 1)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
    for ax in axes.flat[num:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("fractional rank")
    for row in axes:
        row[0].set_ylabel("ECDF difference")
    if others:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles: List[Any] = [Patch(color="0.85", label=f"{uniformity.attrs['level']:.0%} simultaneous band")]
        handles += [Line2D([], [], color=colour, ls=style, label=name) for name, _, style, (colour, _) in curves]
        handles.append(Line2D([], [], color="0.3", ls="", marker="o", ms=3, label="outside the band"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8)
    title = f"SBC: {uniformity.attrs['num_simulations']} simulations, L = {uniformity.attrs['num_posterior_samples']}"
    if left_out:  # say what is not drawn: the tables and the results hold every quantity
        shown = "1 more latent dimension" if len(left_out) == 1 else f"{len(left_out)} more latent dimensions"
        span = left_out[0] if len(left_out) == 1 else f"{left_out[0]} to {left_out[-1]}"
        title += f"\n{shown} ({span}) left out of this figure; their tests are in the results"
    fig.suptitle(title)
    return fig


def _as_relation(text: str) -> str:
    """ "≤ 1.0e-04" as it is, "0.012" as "= 0.012"."""
    return text if text[0] in "≤<" else f"= {text}"


# ---------------------------------------------------------------------------------------------
# Discrete sites: q(y|x) against the model's own posterior p(y|x)

ECE_REFERENCE = (
    "Naeini, Cooper & Hauskrecht (2015); Guo, Pleiss, Sun & Weinberger (2017), On calibration of modern "
    "neural networks; debiased squared error: Kumar, Liang & Ma (2019), Verified uncertainty calibration"
)
BINNINGS = ("equal_width", "equal_mass")
SIGNIFICANCE = 3.0
"""A calibration error is flagged when its debiased square exceeds this many bootstrap se."""


@torch.no_grad()
@in_eval_mode("model", "guide")
def check_discrete_calibratable(model: Callable, guide: Callable, x: Tensor, site: str, **kwargs: Any) -> None:
    """A one-line ValueError unless :func:`discrete_posterior` can run on the pair: the guide has a
    categorical q(``site`` | x) to calibrate, and model and guide take ``component=`` that clamps
    the site (as :class:`ppl_vae.models.discrete.EnumeratedCategoricalVAE` does). Two rows of
    ``x`` are traced; the RNG is left as it was."""
    import inspect

    from ppl_vae.inference.enumerated import guide_value_log_probs

    n = x.shape[0]
    probe = {k: rows(v, n, slice(0, 2)) for k, v in kwargs.items()}
    owner = type(getattr(guide, "__self__", guide)).__name__
    try:
        guide_value_log_probs(guide, x[:2], site, **probe)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}, so there is no q({site} | x) to calibrate") from None
    for what, fn in (("model", model), ("guide", guide)):
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        if not any(p.name == "component" or p.kind is p.VAR_KEYWORD for p in params):
            raise ValueError(
                f"the calibration of site {site!r} clamps it with component= (a LongTensor of values, one per "
                f"datapoint), which {owner}'s {what} does not take: add component=None to its model and guide and "
                "sample the site at that value where it is given"
            )


def discrete_posterior(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    site: str,
    num_values: Optional[int] = None,
    seed: int,
    num_samples: int = 100,
    batch_size: int = 100,
    progress: bool = False,
    **kwargs: Any,
) -> xr.Dataset:
    """The guide's q(c|x) and the model's own posterior p(c|x) over a discrete ``site`` it
    enumerates, per datapoint.

    p(c|x) = p(x, c) / sum_c' p(x, c'), each p(x, c) estimated by importance weighting with
    K = ``num_samples`` draws of the guide's continuous part conditioned on the value,
    z ~ q(z|x, c) (:func:`ppl_vae.inference.enumerated.enumerated_estimate`; Burda et al. 2015):
    a ratio of estimates, consistent as K grows, with a bias of order 1/K. Its Monte Carlo se
    (delta method over the C independent estimates) is ``posterior_se``. The pair must accept
    ``component=`` that clamps the site (as :class:`ppl_vae.models.discrete.EnumeratedCategoricalVAE`).

    ``num_values``: the number of values of the site (None: read from the model's trace).
    Returns a Dataset over ``(datapoint, value)``: ``q``, ``posterior``, ``posterior_se``, and
    ``log_px`` (log p̂(x), ``(datapoint,)``).
    """
    from ppl_vae.inference.enumerated import check_enumerable, guide_value_log_probs
    from ppl_vae.inference.importance import importance_estimate

    check_positive("num_samples", num_samples)
    check_positive("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if "component" in kwargs:
        raise ValueError("discrete_posterior clamps the site itself: do not pass component")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x holds no datapoints")
    probe = {k: rows(v, n, slice(0, 2)) for k, v in kwargs.items()}
    if num_values is None:
        num_values = enumerated_num_values(model, x[:2], site, **probe)
    check_positive("num_values", num_values)
    check_enumerable(model, x[:2], site, num_values, **probe)
    check_discrete_calibratable(model, guide, x, site, **kwargs)
    log_joint_c, log_joint_se = [], []
    for c in range(int(num_values)):  # the seeds of enumerated_estimate: the same p̂(x, c)
        est = importance_estimate(
            model,
            guide,
            x,
            num_samples=num_samples,
            batch_size=batch_size,
            tail_diagnostic=False,
            progress=progress,
            seed=int(seed) + 7919 * (c + 1),
            component=torch.full((n,), c, dtype=torch.long, device=x.device),
            **kwargs,
        )
        log_joint_c.append(est.log_px.double())
        log_joint_se.append(est.log_px_stderr.double())
    lj, lj_se = torch.stack(log_joint_c, -1), torch.stack(log_joint_se, -1)  # (N, C)
    with seeded(int(seed), x.device):
        log_q = torch.cat([guide_value_log_probs(guide, xb, site, **kw) for xb, kw in batches(x, kwargs, batch_size)])
    post = torch.softmax(lj, -1)
    # d p_c / d l_j = p_c (delta_cj - p_j), the l_j = log p̂(x, j) independent across values:
    # Var p̂_c = sum_j p_c^2 (delta_cj - p_j)^2 Var l_j
    eye = torch.eye(post.shape[-1], dtype=post.dtype, device=post.device)
    jac = post.unsqueeze(-1) * (eye - post.unsqueeze(-2))  # (N, C, C)
    post_se = (jac.square() * lj_se.square().unsqueeze(-2)).sum(-1).sqrt()
    arr = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    return xr.Dataset(
        {
            "q": (("datapoint", "value"), arr(log_q.exp())),
            "posterior": (("datapoint", "value"), arr(post)),
            "posterior_se": (("datapoint", "value"), arr(post_se)),
            "log_px": ("datapoint", arr(lj.logsumexp(-1))),
        },
        coords={"datapoint": np.arange(x.shape[0]), "value": np.arange(num_values)},
        attrs={
            "site": site,
            "num_samples": int(num_samples),
            "seed": int(seed),
            "method": "enumeration over the site, importance-weighted p(x, c) with z ~ q(z|x, c)",
            "reference": "Burda et al. (2015) per value; Kingma et al. (2014) eq. 7",
        },
    )


@torch.no_grad()
def enumerated_num_values(model: Callable, x: Tensor, site: str, **kwargs: Any) -> int:
    """The number of values of the model's discrete ``site`` (its enumeration support), from one
    trace on ``x``; a one-line ValueError when the model has no such site."""
    from pyro import poutine

    with torch.random.fork_rng(devices=[]):  # a structural probe: the caller's stream is untouched
        trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(x, **kwargs)
    node = trace.nodes.get(site)
    fn: Any = None if node is None or node["type"] != "sample" else node["fn"]
    if fn is None or not getattr(fn, "has_enumerate_support", False):
        raise ValueError(f"the model has no discrete sample site {site!r} with a finite support")
    return int(fn.enumerate_support(expand=False).shape[0])


def _as_array(value: Any, name: str) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().double().numpy()
    try:
        return np.asarray(value)
    except Exception:  # noqa: BLE001 - any unconvertible input is the caller's error
        raise ValueError(f"{name} must be an array") from None


def _bin_index(conf: np.ndarray, num_values: int, num_bins: int, binning: str) -> Tuple[np.ndarray, np.ndarray]:
    """(bin of each datapoint ``(N,)``, edges ``(B + 1,)``). Top-label confidences lie in
    [1/C, 1]: equal-width bins split that interval, equal-mass bins its empirical quantiles."""
    if binning == "equal_width":
        edges = np.linspace(1.0 / num_values, 1.0, num_bins + 1)
    else:
        edges = np.quantile(conf, np.linspace(0.0, 1.0, num_bins + 1))
        edges[0], edges[-1] = min(edges[0], 1.0 / num_values), 1.0
    index = np.clip(np.searchsorted(edges[1:-1], conf, side="right"), 0, num_bins - 1)
    return index, edges


def _binned(index: np.ndarray, gap: np.ndarray, num_bins: int, weights: Optional[np.ndarray] = None):
    """(count, sum of gaps, sum of squared gaps) per bin; ``weights`` the bootstrap multiplicities."""
    w = np.ones_like(gap) if weights is None else weights
    count = np.bincount(index, weights=w, minlength=num_bins)
    return (
        count,
        np.bincount(index, weights=w * gap, minlength=num_bins),
        np.bincount(index, weights=w * gap**2, minlength=num_bins),
    )


def _errors(count: np.ndarray, total: np.ndarray, total2: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """ECE = sum_b (n_b / N) |mean gap_b| and the debiased squared error sum_b (n_b / N)
    (mean gap_b^2 - s_b^2 / n_b) (unbiased for bins of 2 or more), over the last axis."""
    n = count.sum(-1, keepdims=True)
    safe = np.maximum(count, 1)
    mean = total / safe
    var = np.where(count > 1, (total2 - count * mean**2) / np.maximum(count - 1, 1), 0.0)
    ece = (count / n * np.abs(mean)).sum(-1)
    ce2 = (count / n * (mean**2 - np.maximum(var, 0.0) / safe)).sum(-1)
    return ece, ce2


def expected_calibration_error(
    probs: Any,
    target: Any,
    *,
    num_bins: int = 10,
    binning: str = "equal_width",
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> xr.Dataset:
    """Top-label calibration of predicted probabilities ``probs`` ``(N, C)`` against ``target``:
    integer labels ``(N,)`` or reference probabilities ``(N, C)`` (e.g. the model's posterior).

    For each datapoint the confidence is max_c probs and the "accuracy" is 1[label = argmax] or
    the reference probability of the argmax. Datapoints are binned by confidence (``binning``:
    ``"equal_width"`` splits [1/C, 1] into ``num_bins`` intervals, ``"equal_mass"`` puts about
    N / ``num_bins`` in each); ECE = sum_b (n_b / N) |confidence_b - accuracy_b| (Naeini et al.
    2015; Guo et al. 2017). ECE is biased upward by sampling noise, by about sqrt(2 / pi) times
    the bins' gap se, so it is not 0 for a calibrated q; ``ce2`` = sum_b (n_b / N)
    (gap_b^2 - s_b^2 / n_b), the debiased squared calibration error (Kumar et al. 2019), is
    unbiased (0 in expectation for a calibrated q, and may be negative), and
    ``miscalibrated`` is 1 when it exceeds :data:`SIGNIFICANCE` bootstrap se.

    Standard errors (``ece_se``, ``ce2_se``): bootstrap over datapoints (``num_bootstrap``
    resamples from ``seed``'s own generator; bins fixed). Returns scalars ``ece``, ``ece_se``,
    ``ce2``, ``ce2_se``, ``rms_calibration_error`` = sqrt(max(ce2, 0)), ``accuracy``,
    ``confidence``, ``miscalibrated``, and per ``bin``: ``bin_lower``, ``bin_upper``,
    ``count``, ``bin_confidence``, ``bin_accuracy``, ``bin_gap_se``.
    """
    p = _as_array(probs, "probs").astype(np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] < 2:
        raise ValueError(f"probs must have shape (N, C) with N >= 2 datapoints and C >= 2 values, got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(np.abs(p.sum(1) - 1) > 1e-4):
        raise ValueError("probs must be finite probabilities whose rows sum to 1")
    n, c = p.shape
    t = _as_array(target, "target")
    check_positive("num_bins", num_bins)
    check_positive("num_bootstrap", num_bootstrap)
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    pred = p.argmax(1)
    conf = p[np.arange(n), pred]
    if t.shape == (n,):
        if t.dtype.kind not in "iu" or t.min() < 0 or t.max() >= c:
            raise ValueError(f"target labels must be integers in 0..{c - 1}")
        acc = (t == pred).astype(np.float64)
        kind = "labels"
    elif t.shape == (n, c):
        acc = t.astype(np.float64)[np.arange(n), pred]
        kind = "probabilities"
    else:
        raise ValueError(f"target must be labels ({n},) or probabilities ({n}, {c}), got shape {t.shape}")
    index, edges = _bin_index(conf, c, int(num_bins), binning)
    gap = conf - acc
    count, total, total2 = _binned(index, gap, num_bins)
    ece, ce2 = _errors(count, total, total2)
    rng = np.random.default_rng(seed)
    multiplicity = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(int(num_bootstrap))])
    boot = [_binned(index, gap, num_bins, m.astype(np.float64)) for m in multiplicity]
    b_ece, b_ce2 = _errors(*(np.stack(parts) for parts in zip(*boot)))
    ece_se, ce2_se = (
        float(b_ece.std(ddof=1)) if num_bootstrap > 1 else math.nan,
        (float(b_ce2.std(ddof=1)) if num_bootstrap > 1 else math.nan),
    )
    safe = np.maximum(count, 1)
    bin_conf = np.bincount(index, weights=conf, minlength=num_bins) / safe
    bin_acc = np.bincount(index, weights=acc, minlength=num_bins) / safe
    mean_gap = total / safe
    var = np.where(count > 1, (total2 - count * mean_gap**2) / np.maximum(count - 1, 1), np.nan)
    empty = count == 0
    return xr.Dataset(
        {
            "ece": ((), float(ece)),
            "ece_se": ((), ece_se),
            "ce2": ((), float(ce2)),
            "ce2_se": ((), ce2_se),
            "rms_calibration_error": ((), math.sqrt(max(float(ce2), 0.0))),
            "accuracy": ((), float(acc.mean())),
            "confidence": ((), float(conf.mean())),
            "miscalibrated": ((), int(ce2 > SIGNIFICANCE * ce2_se)),
            "bin_lower": ("bin", edges[:-1]),
            "bin_upper": ("bin", edges[1:]),
            "count": ("bin", count.astype(np.int64)),
            "bin_confidence": ("bin", np.where(empty, np.nan, bin_conf)),
            "bin_accuracy": ("bin", np.where(empty, np.nan, bin_acc)),
            "bin_gap_se": ("bin", np.sqrt(np.maximum(var, 0.0) / safe)),
        },
        coords={"bin": np.arange(num_bins)},
        attrs={
            "binning": binning,
            "num_bins": int(num_bins),
            "num_bootstrap": int(num_bootstrap),
            "bootstrap_seed": int(seed),
            "target": kind,
            "num_datapoints": int(n),
            "significance_se": SIGNIFICANCE,
            "reference": ECE_REFERENCE,
        },
    )


def posterior_distance(q: Any, posterior: Any) -> xr.Dataset:
    """How far q(c|x) ``(N, C)`` is from a reference posterior ``(N, C)``, averaged over
    datapoints: ``mean_tv`` (total variation, (1/2) sum_c |p - q|, in [0, 1]) and ``mean_kl``
    (KL(p || q), nats), each with its se over datapoints (sd / sqrt(N)). An estimated
    posterior's own noise adds to both (they are not 0 for q = p unless p is exact)."""
    qa, pa = _as_array(q, "q").astype(np.float64), _as_array(posterior, "posterior").astype(np.float64)
    if qa.shape != pa.shape or qa.ndim != 2 or qa.shape[0] < 2:
        raise ValueError(f"q and posterior must have the same shape (N, C), N >= 2; got {qa.shape} and {pa.shape}")
    tv = 0.5 * np.abs(pa - qa).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pa > 0, pa * (np.log(pa) - np.log(qa)), 0.0)
    kl = terms.sum(1)
    n = qa.shape[0]
    return xr.Dataset(
        {
            "mean_tv": ((), float(tv.mean())),
            "mean_tv_se": ((), float(tv.std(ddof=1) / math.sqrt(n))),
            "mean_kl": ((), float(kl.mean())),
            "mean_kl_se": ((), float(kl.std(ddof=1) / math.sqrt(n))),
            "tv": ("datapoint", tv),
            "kl": ("datapoint", kl),
        },
        coords={"datapoint": np.arange(n)},
    )


def discrete_calibration(
    posterior: xr.Dataset,
    labels: Any = None,
    *,
    num_bins: int = 10,
    binning: str = "equal_width",
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> xr.Dataset:
    """Calibration of q(c|x) against the model's posterior p(c|x) (``posterior`` from
    :func:`discrete_posterior`), and, with true ``labels`` ``(N,)``, of q(c|x) and of p(c|x)
    against them (:func:`expected_calibration_error`); plus the distance of q to p(c|x)
    (:func:`posterior_distance`).

    Returns ``posterior`` with, over dim ``comparison`` (``"q vs p(c|x)"``, then ``"q vs labels"``
    and ``"p(c|x) vs labels"`` with labels), the variables of :func:`expected_calibration_error`,
    and ``mean_tv``, ``mean_kl`` with their se, ``tv`` and ``kl`` per datapoint.
    """
    site = str(posterior.attrs.get("site", "c"))
    q, post = posterior["q"].values, posterior["posterior"].values
    options: Dict[str, Any] = dict(num_bins=num_bins, binning=binning, num_bootstrap=num_bootstrap, seed=seed)
    parts = {f"q({site}|x) vs p({site}|x)": expected_calibration_error(q, post, **options)}
    if labels is not None:
        lab = _as_array(labels, "labels")
        if lab.shape != (q.shape[0],):
            raise ValueError(f"labels must have one value per datapoint ({q.shape[0]}), got shape {lab.shape}")
        parts[f"q({site}|x) vs labels"] = expected_calibration_error(q, lab, **options)
        parts[f"p({site}|x) vs labels"] = expected_calibration_error(post, lab, **options)
    first = next(iter(parts.values()))
    joined = xr.concat(
        [ds.drop_vars(["bin_lower", "bin_upper"], errors="ignore") for ds in parts.values()], "comparison"
    )
    joined = joined.assign_coords(comparison=np.asarray(list(parts), dtype=object))
    joined["target"] = ("comparison", np.asarray([ds.attrs["target"] for ds in parts.values()], dtype=object))
    # equal-mass edges differ per comparison; equal-width ones are shared
    joined["bin_lower"] = xr.concat([ds["bin_lower"] for ds in parts.values()], "comparison")
    joined["bin_upper"] = xr.concat([ds["bin_upper"] for ds in parts.values()], "comparison")
    joined.attrs = {k: v for k, v in first.attrs.items() if k != "target"}
    distance = posterior_distance(q, post)
    out = xr.merge([posterior, joined, distance.assign_coords(datapoint=posterior["datapoint"])])
    out.attrs = {**posterior.attrs, **joined.attrs, "site": site}
    if labels is not None:
        out["label"] = ("datapoint", _as_array(labels, "labels").astype(np.int64))
    return out


def plot_reliability(calibration: xr.Dataset) -> Figure:
    """Reliability diagrams of :func:`discrete_calibration`, one column per comparison: the mean
    accuracy (reference probability of the top value, or the share of correct labels) against
    the mean confidence per bin, with ± 2 se bars; on the diagonal the predictions are
    calibrated, below it overconfident. Under each, the number of datapoints per bin."""
    from ppl_vae.analysis.plots import plt  # selects the Agg backend

    comparisons = [str(c) for c in calibration["comparison"].values]
    ncols = len(comparisons)
    fig, axes = plt.subplots(
        2,
        ncols,
        figsize=(max(3.6 * ncols, 5.4), 4.8),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        layout="constrained",
    )
    low = 1.0 / calibration.sizes["value"]
    for j, name in enumerate(comparisons):
        ds = calibration.sel(comparison=name)
        ax, hist = axes[0, j], axes[1, j]
        lower, upper = ds["bin_lower"].values, ds["bin_upper"].values
        counts = ds["count"].values
        keep = counts > 0
        conf, acc, se = ds["bin_confidence"].values, ds["bin_accuracy"].values, ds["bin_gap_se"].values
        ax.plot([low, 1], [low, 1], color="0.5", lw=0.8, ls="--", label="calibrated")
        ax.bar(
            (lower + upper)[keep] / 2,
            acc[keep],
            width=(upper - lower)[keep] * 0.9,
            color="#9fb8d0",
            edgecolor="#1f4e79",
            lw=0.6,
            label="accuracy per bin",
        )
        ax.errorbar(
            conf[keep],
            acc[keep],
            yerr=2 * se[keep],
            fmt="o",
            ms=3,
            color="#c0392b",
            lw=1,
            label="(mean confidence, accuracy) ± 2 se",
        )
        ax.set_xlim(low - 0.02, 1.02)
        ax.set_ylim(0, 1.02)
        target = "P(label = top)" if str(ds["target"].values) == "labels" else "reference prob. of top value"
        ax.set_ylabel(target)
        flag = "  miscalibrated" if int(ds["miscalibrated"]) else ""
        ax.set_title(f"{name}\nECE {float(ds['ece']):.3f} ± {float(ds['ece_se']):.3f}{flag}", fontsize=9)
        hist.bar((lower + upper) / 2, counts, width=(upper - lower) * 0.9, color="0.6")
        hist.set_xlim(low - 0.02, 1.02)
        hist.set_xlabel(f"confidence (max of {name.split(' vs ')[0]})")
        hist.set_ylabel("datapoints")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Reliability of the discrete site {calibration.attrs.get('site', '')!r}:"
        + (" " if ncols > 1 else "\n")
        + f"{calibration.attrs.get('num_bins')} {str(calibration.attrs.get('binning', '')).replace('_', '-')} bins, "
        f"{calibration.sizes['datapoint']} datapoints",
        fontsize=10,
    )
    return fig


__all__ = [
    "LOG_LIKELIHOOD",
    "MEAN_FIELD_OPTIONS",
    "REFINE_DEFAULTS",
    "SIRDraws",
    "coverage",
    "discrete_calibration",
    "dispersion",
    "discrete_posterior",
    "enumerated_num_values",
    "expected_calibration_error",
    "format_ecdf_p_value",
    "format_p_value",
    "plot_reliability",
    "plot_sbc_ecdf",
    "posterior_distance",
    "sbc_ranks",
    "sbc_uniformity",
    "sir_draws",
]
