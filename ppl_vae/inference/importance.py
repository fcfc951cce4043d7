"""Per-datapoint log importance weights for any model/guide pair that follows the contract.

For K particles z_k ~ q(z|x), log w_k = log p(x, z_k) - log q(z_k|x), vectorized over
particles with an outer plate. The ELBO is E_q[log w] and the importance-weighted bound of
Burda et al. (2015) is log (1/K) sum_k w_k. :func:`importance_estimate` computes both per
datapoint with standard errors and the effective sample size, drawing particles in chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
from pyro.distributions import TorchDistribution
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vae.inference.estimators import Estimate, diagnostic, register_estimator, variable, weight_warnings
from ppl_vae.inference.latents import (  # noqa: F401  (re-exported)
    log_importance_weights,
    scored_by_traces,
    traced_log_probs,
)
from ppl_vae.inference.modes import batches, block_seed, check_positive, in_eval_mode, seeded
from ppl_vae.inference.stats import log_mean_exp_se_from_ess, psis_khat
from ppl_vae.inference.traces import PARTICLE_PLATE, log_probs, trace_pair  # noqa: F401 (PARTICLE_PLATE re-exported)

if TYPE_CHECKING:  # xarray is imported where used: fit needs none of it before its first step
    import xarray as xr


@torch.no_grad()
@in_eval_mode("model", "guide")
def elbo_per_datapoint(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_particles: int = 1,
    batch_size: int = 1000,
    max_plate_nesting: int = 1,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> Tensor:
    """Monte Carlo ELBO of each datapoint, E_q[log p(x,z) - log q(z|x)], shape ``(N,)``, with the
    model and guide in eval mode (their modes restored). ``seed``: each block of ``batch_size``
    datapoints draws from a stream seeded from (seed, its first index), and the caller's random
    state is left as it was; None draws from the caller's stream."""
    parts = []
    for i, (xb, kw) in enumerate(batches(x, kwargs, batch_size)):
        with seeded(None if seed is None else block_seed(seed, i * batch_size), xb.device):
            lw = log_importance_weights(
                model, guide, xb, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kw
            )
        parts.append(lw.mean(0))
    return torch.cat(parts)


def iw_log_px(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 100,
    batch_size: int = 1000,
    particle_batch_size: Optional[int] = None,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    """Importance-weighted estimate log (1/K) sum_k w_k of log p(x) (Burda et al. 2015), ``(N,)``.

    See :func:`importance_estimate` for its standard error and the ESS of the weights.
    """
    return importance_estimate(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    ).log_px


@dataclass
class ImportanceEstimate:
    """Per-datapoint estimates from K importance samples z_k ~ q(z|x); every tensor is ``(N,)``.

    ``log_px``: log p̂_K(x) = log (1/K) sum_k w_k (Burda et al. 2015), a stochastic lower bound
    on log p(x) whose bias shrinks as K grows. ``log_px_stderr``: its Monte Carlo standard
    error by the delta method, sqrt(Var(w) / K) / mean(w), which equals sqrt((1/ESS - 1/K)
    K/(K-1)) in terms of the weights' ESS. ``elbo``: E_q[log w], the evidence lower bound
    (AEVB eq. 3), with ``elbo_stderr`` = sd(log w) / sqrt(K). ``ess``: (sum w)^2 / sum w^2
    (Kong 1992), between 1 and K; near K when q is close to p(z|x), near 1 when a single sample
    dominates (the estimate is then unreliable). ``khat``: the PSIS Pareto k̂ of the weights'
    upper tail (Vehtari et al. 2024; see :func:`ppl_vae.inference.stats.psis_khat`); above 0.7
    the estimate and its standard error are not reliable. None when not computed.

    The estimator interface's result is :class:`~ppl_vae.inference.estimators.Estimate`
    (:meth:`to_estimate`); this record keeps the IW numbers typed for code that builds on them.
    """

    log_px: Tensor
    log_px_stderr: Tensor
    elbo: Tensor
    elbo_stderr: Tensor
    ess: Tensor
    num_samples: int
    khat: Optional[Tensor] = None

    def to_estimate(self, estimator: str = "iw") -> Estimate:
        """The estimate in the estimators' one result type (log_px, its stderr, the ELBO, ESS, k̂)."""
        k = int(self.num_samples)
        variables = {
            "elbo": variable(self.elbo, "lower bound", "Monte Carlo ELBO of q, E_q[log p(x,z) - log q(z|x)] (nats)"),
            "elbo_stderr": variable(self.elbo_stderr, "neither", "Monte Carlo standard error of elbo (nats)"),
            "ess": diagnostic(self.ess, f"effective sample size of the {k} importance weights"),
        }
        if self.khat is not None:
            variables["khat"] = diagnostic(self.khat, "PSIS Pareto k-hat of the importance weights (> 0.7: unreliable)")
        return Estimate(
            estimator,
            self.log_px,
            self.log_px_stderr,
            "lower bound",
            f"importance-weighted estimate of log p(x), K={k} (nats; stochastic lower bound: log of an "
            "unbiased estimate)",
            variables,
            settings={"num_samples": k},
            reference=IW_REFERENCE,
        )

    def to_dataset(self, datapoint: Optional[Sequence[int] | np.ndarray] = None) -> xr.Dataset:
        """The estimates as an xarray Dataset over dim ``datapoint`` (:meth:`Estimate.to_dataset`)."""
        return self.to_estimate().to_dataset(datapoint)


IW_REFERENCE = "Burda, Grosse & Salakhutdinov (2015); PSIS k-hat: Vehtari et al. (2024)"


def concat_estimates(estimates: Sequence[ImportanceEstimate]) -> ImportanceEstimate:
    """Join estimates for consecutive batches of datapoints (same ``num_samples``)."""
    if not estimates or len({e.num_samples for e in estimates}) != 1:
        raise ValueError("concat_estimates needs one or more estimates with the same num_samples")
    fields = ("log_px", "log_px_stderr", "elbo", "elbo_stderr", "ess")
    joined = {f: torch.cat([getattr(e, f) for e in estimates]) for f in fields}
    parts = [e.khat for e in estimates if e.khat is not None]
    khat = None if len(parts) < len(estimates) else torch.cat(parts)
    return ImportanceEstimate(**joined, num_samples=estimates[0].num_samples, khat=khat)


class _WeightAccumulator:
    """Streaming sums over particle chunks, kept stable by a running maximum (float64)."""

    def __init__(self, num_data: int, device: torch.device):
        kw: Dict[str, Any] = dict(dtype=torch.float64, device=device)
        self.max = torch.full((num_data,), -math.inf, **kw)
        self.sum_w = torch.zeros(num_data, **kw)  # sum exp(log_w - max)
        self.sum_w2 = torch.zeros(num_data, **kw)  # sum exp(2 (log_w - max))
        self.sum_log_w = torch.zeros(num_data, **kw)
        self.sum_log_w2 = torch.zeros(num_data, **kw)
        self.count = 0

    def add(self, log_w: Tensor) -> None:
        log_w = log_w.detach().double()
        if torch.isnan(log_w).any():
            raise ValueError("an importance weight is NaN: the model or guide produced an invalid log-density")
        new_max = torch.maximum(self.max, log_w.max(0).values)
        # exp(-inf - -inf) would be NaN on the first chunk; rescale only finite running sums.
        shift = torch.where(torch.isfinite(self.max), self.max - new_max, torch.zeros_like(new_max))
        rel = log_w - new_max
        self.sum_w = self.sum_w * shift.exp() + rel.exp().sum(0)
        self.sum_w2 = self.sum_w2 * (2 * shift).exp() + (2 * rel).exp().sum(0)
        self.max = new_max
        self.sum_log_w = self.sum_log_w + log_w.sum(0)
        self.sum_log_w2 = self.sum_log_w2 + (log_w**2).sum(0)
        self.count += log_w.shape[0]

    def result(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        k = self.count
        log_p = self.max + self.sum_w.log() - math.log(k)
        ess = self.sum_w**2 / self.sum_w2
        elbo = self.sum_log_w / k
        if k > 1:
            var_log_w = ((self.sum_log_w2 - k * elbo**2) / (k - 1)).clamp_min(0.0)
            elbo_se = (var_log_w / k).sqrt()
        else:
            elbo_se = torch.full_like(elbo, math.nan)
        log_p_se = log_mean_exp_se_from_ess(ess, k)
        return log_p, log_p_se, elbo, elbo_se, ess


#: samples of z per chunk where the pair is scored through Pyro's traces
#: (:func:`~ppl_vae.inference.latents.scored_by_traces`), which hold every intermediate tensor of
#: a chunk at once. Measured on 100 MNIST test images, K = 1000 of q and of q* (``mixture_estimates``,
#: 1 thread): a traced ``bernoulli_mlp`` (784-200-10) took 3.33 s with 684k page faults at the
#: 65,536 samples of the fast path's default, 1.72-1.75 s at 3,200-6,400; M2, whose traces expand
#: p(x | z, y) over its 10 classes, 6.0 s at 65,500 samples, 3.66-4.0 s at 3,200-6,400, 5.4-7.3 s
#: at 500-800 (per-chunk overhead).
TRACED_CHUNK_SAMPLES = 4096


def default_particle_batch_size(batch_size: int, max_samples_per_chunk: int = 2**16, *, traced: bool = False) -> int:
    """Particles per chunk so that one chunk holds about ``max_samples_per_chunk`` samples of z,
    or :data:`TRACED_CHUNK_SAMPLES` where ``traced`` (the pair is scored through Pyro's traces).
    The fast path's scorer blocks its own work (``VAE.score_block_samples``), so its chunks stay
    large: on the same images they ran 8-10% faster at 65,500 samples than at 4,100."""
    budget = TRACED_CHUNK_SAMPLES if traced else max_samples_per_chunk
    return max(1, budget // max(1, batch_size))


def weight_chunks(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int,
    batch_size: int,
    particle_batch_size: Optional[int],
    max_plate_nesting: int = 1,
    progress: bool = False,
    seed: Optional[int] = None,
    desc: str = "IW",
    **kwargs: Any,
) -> Iterator[Tuple[Tensor, Iterator[Tensor]]]:
    """The log importance weights of ``x``, batch by batch: yields ``(xb, chunks)`` where
    ``chunks`` yields ``(k, n_b)`` log-weights, K = ``num_samples`` in all per batch.

    The one place IW draws its particles, so every estimator built on the weights (IW, the
    jackknife, ...) draws the same ones for the same seed: batch b draws from a stream seeded by
    (``seed``, its first datapoint's index) (None: the caller's stream). Consume each batch's
    chunks before the next batch. Call it under ``torch.no_grad()`` with the model and guide in
    eval mode (as :func:`importance_estimate` does). A guide with one row per datapoint of ``x``
    (:class:`~ppl_vae.inference.meanfield.MeanFieldGuide`, a refined q) offers ``take(rows)``
    and is given each batch's rows.
    """
    from tqdm.auto import tqdm

    check_positive("num_samples", num_samples)
    check_positive("batch_size", batch_size)
    if particle_batch_size is None:
        traced = scored_by_traces(model, guide, kwargs)
        particle_batch_size = default_particle_batch_size(batch_size, traced=traced)
    check_positive("particle_batch_size", particle_batch_size)
    n = x.shape[0]
    if n == 0:
        raise ValueError("x holds no datapoints")
    chunks = math.ceil(num_samples / particle_batch_size)
    with tqdm(
        total=math.ceil(n / batch_size) * chunks,
        disable=not progress,
        desc=f"{desc} K={num_samples}",
        unit="chunk",
        dynamic_ncols=True,
    ) as bar:
        for b, (xb, kw) in enumerate(batches(x, kwargs, batch_size)):
            # a guide with one row per datapoint (mean-field q*, a refined q) offers take(rows)
            rows = slice(b * batch_size, b * batch_size + xb.shape[0])
            g = cast(Any, guide).take(rows) if callable(getattr(guide, "take", None)) else guide

            def draw(xb: Tensor = xb, kw: Dict[str, Any] = kw, b: int = b, g: Callable = g) -> Iterator[Tensor]:
                with seeded(None if seed is None else block_seed(seed, b * batch_size), xb.device):
                    for start in range(0, num_samples, particle_batch_size):
                        k = min(particle_batch_size, num_samples - start)
                        yield log_importance_weights(
                            model, g, xb, num_particles=k, max_plate_nesting=max_plate_nesting, **kw
                        )
                        bar.update(1)

            yield xb, draw()


@torch.no_grad()
@in_eval_mode("model", "guide")
def importance_estimate(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    max_plate_nesting: int = 1,
    progress: bool = False,
    tail_diagnostic: bool = True,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> ImportanceEstimate:
    """Importance-weighted log p(x), ELBO, standard errors and ESS per datapoint (Burda et al. 2015).

    ``x``: ``(N, ...)`` datapoints on any device (the work follows ``x``). The K =
    ``num_samples`` particles are drawn ``particle_batch_size`` at a time (default: about
    65,536 samples of z per chunk, 4,096 where the pair is scored through Pyro's traces:
    :func:`default_particle_batch_size`) for ``batch_size`` datapoints at a time, so memory stays
    bounded for the IWAE protocol's K = 5000. Tensor kwargs with one row per datapoint (e.g.
    labels ``y``) are sliced with ``x``. ``progress`` shows a tqdm bar over chunks.
    ``tail_diagnostic`` also computes PSIS k̂ per datapoint, which keeps one batch's K
    log-weights in memory (``batch_size * num_samples`` float64 values). ``seed``: each batch
    draws from its own stream seeded by (seed, its first datapoint's index), so the result does
    not depend on how datapoints are split across calls or processes, and the caller's RNG
    state is left as it was; None draws from the caller's stream (:func:`weight_chunks`).
    The registered estimator ``"iw"`` (:func:`iw`) returns the same numbers as an
    :class:`~ppl_vae.inference.estimators.Estimate`.
    """
    results, khats = [], []
    for xb, chunks in weight_chunks(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        max_plate_nesting=max_plate_nesting,
        progress=progress,
        seed=seed,
        **kwargs,
    ):
        acc = _WeightAccumulator(xb.shape[0], xb.device)
        kept = []
        for log_w in chunks:
            acc.add(log_w)
            if tail_diagnostic:
                kept.append(log_w.detach().double().cpu())
        if tail_diagnostic:
            khats.append(torch.from_numpy(psis_khat(torch.cat(kept))).to(xb.device))
        results.append(acc.result())
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    log_p, log_p_se, elbo, elbo_se, ess = (torch.cat(p).to(dtype) for p in zip(*results))  # acc.result()'s order
    return ImportanceEstimate(
        log_p,
        log_p_se,
        elbo,
        elbo_se,
        ess,
        num_samples=num_samples,
        khat=torch.cat(khats).to(dtype) if khats else None,
    )


def _iw_warnings(ds: xr.Dataset, names: Dict[str, str]) -> List[str]:
    return weight_warnings(ds, names, num_draws=int(ds.attrs["num_samples"]), what="IW")


@register_estimator(
    "iw",
    title="importance sampling with the guide q(z|x) as proposal",
    bound="lower bound",
    reference=IW_REFERENCE,
    files=("evaluation.nc", "evaluation.csv"),
    warnings=_iw_warnings,
)
def iw(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    """log p̂_K(x) = log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), per datapoint, with the
    ELBO, ESS and PSIS k̂ of the same weights (:func:`importance_estimate`)."""
    return importance_estimate(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        progress=progress,
        seed=seed,
        **kwargs,
    ).to_estimate("iw")


@torch.no_grad()
@in_eval_mode("model", "guide")
def importance_samples(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Draws of every latent site from q with their log-weights and log-likelihoods, for ArviZ.

    Returns ``latents`` ``{site: (K, N, *event_shape)}`` (each site the guide samples),
    ``log_weight`` ``(K, N)`` = log p(x, latents) - log q(latents | x) and ``log_likelihood``
    ``(K, N)`` = log p(x | latents), the sum over the model's observed sites.
    """
    check_positive("num_samples", num_samples)
    shape = (num_samples, x.shape[0])
    lp, guide_trace = traced_log_probs(
        model, guide, x, num_particles=num_samples, max_plate_nesting=max_plate_nesting, **kwargs
    )
    latents = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            value = cast(Tensor, site["value"])
            fn = cast(TorchDistribution, site["fn"])
            latents[name] = value.expand(shape + value.shape[value.dim() - len(fn.event_shape) :])
    if not latents:
        raise ValueError("the guide has no latent sample site")
    return {"latents": latents, "log_weight": lp.log_weight, "log_likelihood": lp.log_likelihood}
