"""HMC on the latent z of a model, and AEVB's marginal-likelihood estimator (appendix D).

Kingma & Welling (2013), appendix D: for a latent space of low dimension (< 5), draw
posterior samples z ~ p(z|x) with HMC, fit a density q(z) to them, draw fresh posterior
samples and estimate

    p(x) ~= ( (1/L) sum_l q(z_l) / (p(z_l) p(x|z_l)) )^-1

(a harmonic-mean-style estimator that, unlike the raw harmonic mean, has finite variance when
q has lighter tails than the posterior). Here q is a full-covariance Gaussian fitted per
datapoint. The model must follow the library's contract (``pyro.plate("data")``, latent sites
in it; z below is the flat vector of all continuous latent sites), so the estimator needs no
guide and also serves models trained by MCEM.

All datapoints of a batch run in one HMC chain over their joint latent: the potential is a sum
over datapoints, so the joint posterior is the product of the per-datapoint posteriors and
each datapoint's samples follow its own posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from pyro import distributions as dist
from pyro import poutine
from pyro.infer.mcmc import HMC, MCMC
from torch import Tensor

from ppl_vae.inference.estimators import Estimate, diagnostic, register_estimator, weight_warnings
from ppl_vae.inference.latents import Layout, _probe_rows, flat_log_joint, model_layout
from ppl_vae.inference.modes import batches, seeded
from ppl_vae.inference.stats import log_mean_exp_stats

if TYPE_CHECKING:  # xarray is imported where used
    import xarray as xr

MAX_LATENT_DIM = 4  # appendix D: "valid for latent dimension < 5"

#: an HMC chain accepting fewer proposals than this after warm-up barely moved: its draws, the
#: Gaussian fitted to them and the estimate rest on a few distinct points
MIN_ACCEPT_RATE = 0.5


def _layout(model: Callable, x: Tensor, latent_dim: Optional[int], kwargs: Dict[str, Any]) -> Layout:
    layout = model_layout(model, x, **kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site")
    if latent_dim is not None and latent_dim != layout.size:
        raise ValueError(
            f"latent_dim {latent_dim} does not match the model's {layout.size} latent numbers "
            f"(sites {', '.join(layout.names)})"
        )
    return layout


def log_joint(model: Callable, x: Tensor, z: Tensor, *, layout: Optional[Layout] = None, **kwargs: Any) -> Tensor:
    """log p(x, z) of each datapoint, ``(*draws, N)``, at the flat latent point ``z``
    ``(*draws, N, layout.size)`` (every continuous latent site, :mod:`ppl_vae.inference.latents`).

    Pairs that offer the fast-path protocol are scored without tracing (tracing would dominate
    HMC's leapfrog steps); any other model is traced.
    """
    layout = layout if layout is not None else model_layout(model, x, **kwargs)
    return flat_log_joint(model, x, z, layout, **kwargs)


class _FixedStepsHMC(HMC):
    """Pyro's HMC with a fixed number of leapfrog steps per proposal.

    Pyro's HMC keeps the trajectory length fixed, so adapting the step size changes the
    number of steps; the paper (appendix E) fixes the number of steps at 10 instead.
    """

    def __init__(self, num_leapfrog_steps: int, **kwargs: Any):
        super().__init__(num_steps=num_leapfrog_steps, **kwargs)
        self._num_leapfrog_steps = num_leapfrog_steps

    @property
    def num_steps(self) -> int:
        return self._num_leapfrog_steps


@dataclass
class HMCResult:
    """Posterior draws of z for each datapoint and how the sampler behaved.

    ``samples``: ``(num_samples, N, latent_dim)``. ``step_size``: the adapted leapfrog step.
    ``accept_rate``: share of accepted proposals after warm-up (one chain for the batch).
    """

    samples: Tensor
    step_size: float
    accept_rate: float


def hmc_posterior(
    model: Callable,
    x: Tensor,
    latent_dim: Optional[int] = None,
    *,
    num_samples: int = 100,
    warmup_steps: int = 100,
    num_leapfrog_steps: int = 10,
    target_accept_prob: float = 0.9,
    step_size: Optional[float] = None,
    initial_z: Optional[Tensor] = None,
    step_size_jitter: float = 0.2,
    seed: Optional[int] = None,
    layout: Optional[Layout] = None,
    **kwargs: Any,
) -> HMCResult:
    """Samples of z ~ p(z|x) for each row of ``x`` by Pyro's HMC (AEVB appendix E settings).

    ``num_leapfrog_steps`` leapfrog steps per proposal; during the ``warmup_steps`` the step size is
    adapted (dual averaging) toward ``target_accept_prob``; after warm-up each proposal's step
    size is jittered uniformly by +-``step_size_jitter`` of the adapted one (Neal 2011, sec.
    5.4.2.2), since a fixed trajectory that is close to a period of the posterior's
    oscillation (Gaussian posteriors) barely moves the chain. The model's parameters are held
    fixed: gradients are taken with respect to z only. z is the flat vector of every continuous
    latent site (``latent_dim`` = its size, checked when given; discrete sites the model marks
    for enumeration are summed out). ``initial_z`` ``(N, d)`` starts the chain (default: zeros,
    the prior mode of a standard normal prior). ``seed``: the chain's own random stream (the
    caller's RNG state is left as it was); None draws from the caller's stream. ``layout``: the
    model's :func:`~ppl_vae.inference.latents.model_layout`, when the caller has it already.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if num_leapfrog_steps < 1:
        raise ValueError(f"num_leapfrog_steps must be >= 1, got {num_leapfrog_steps}")
    if not 0.0 < target_accept_prob < 1.0:
        raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob}")
    n = x.shape[0]
    layout = layout if layout is not None else _layout(model, x, latent_dim, kwargs)
    latent_dim = layout.size
    z0 = x.new_zeros(n, latent_dim) if initial_z is None else initial_z.detach().clone()

    def potential_fn(params):
        return -flat_log_joint(model, x, params["z"], layout, **kwargs).sum()

    kernel = _FixedStepsHMC(
        num_leapfrog_steps,
        potential_fn=potential_fn,
        step_size=1.0 if step_size is None else float(step_size),
        adapt_step_size=warmup_steps > 0,
        adapt_mass_matrix=False,
        target_accept_prob=target_accept_prob,
    )
    if not 0.0 <= step_size_jitter < 1.0:
        raise ValueError(f"step_size_jitter must lie in [0, 1), got {step_size_jitter}")
    adapted: List[float] = []

    def jitter(kernel_, params, stage, i):
        if stage == "Sample":
            if not adapted:
                adapted.append(kernel_.step_size)
            u = 2.0 * float(torch.rand(())) - 1.0
            kernel_._adapter.step_size = adapted[0] * (1.0 + step_size_jitter * u)

    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        initial_params={"z": z0},
        disable_progbar=True,
        hook_fn=jitter,
    )
    with torch.enable_grad(), seeded(seed, x.device):
        mcmc.run()
    samples = mcmc.get_samples()["z"].reshape(num_samples, n, latent_dim)
    if num_samples > 1:
        moved = (samples[1:] != samples[:-1]).any(-1).any(-1).float().mean()
        accept_rate = float(moved)
    else:
        accept_rate = float("nan")
    return HMCResult(samples.detach(), float(adapted[0] if adapted else kernel.step_size), accept_rate)


def fit_gaussian(samples: Tensor, jitter: float = 1e-6) -> dist.MultivariateNormal:
    """A full-covariance Gaussian per datapoint fitted to ``samples`` ``(L, N, d)``; batch ``(N,)``."""
    loc = samples.mean(0)
    centred = samples - loc
    cov = torch.einsum("lni,lnj->nij", centred, centred) / max(samples.shape[0] - 1, 1)
    d = samples.shape[-1]
    cov = cov + jitter * torch.eye(d, dtype=samples.dtype, device=samples.device)
    return dist.MultivariateNormal(loc, covariance_matrix=cov)


def hmc_log_marginal(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    latent_dim: Optional[int] = None,
    num_samples: int = 500,
    warmup_steps: int = 200,
    num_leapfrog_steps: int = 10,
    target_accept_prob: float = 0.9,
    batch_size: int = 100,
    progress: bool = False,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> Tensor:
    """AEVB appendix-D estimate of log p(x) for each row of ``x``, shape ``(N,)``.

    ``num_samples`` posterior samples fit the density and as many fresh ones enter the
    estimate, all from one HMC run per batch of ``batch_size`` datapoints. Valid only for
    ``latent_dim`` < 5, as the paper says (the fitted density must cover the posterior).
    ``guide`` is not used (the estimator needs none; the argument keeps the estimators' one
    calling convention). The registered estimator ``"appendix_d"`` (:func:`appendix_d`) gives
    the same numbers with their standard errors as an
    :class:`~ppl_vae.inference.estimators.Estimate`.
    """
    return _appendix_d(
        model,
        x,
        latent_dim,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_leapfrog_steps=num_leapfrog_steps,
        target_accept_prob=target_accept_prob,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
        kwargs=kwargs,
    )[0]


def _appendix_d(
    model: Callable,
    x: Tensor,
    latent_dim: Optional[int],
    *,
    num_samples: int,
    warmup_steps: int,
    num_leapfrog_steps: int,
    target_accept_prob: float,
    batch_size: int,
    progress: bool,
    seed: Optional[int],
    kwargs: Dict[str, Any],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log p̂(x), its delta-method standard error, HMC acceptance rate, ESS of the L ratios
    q(z_l) / p(x, z_l)), each ``(N,)``."""
    from tqdm.auto import tqdm

    layout = _layout(model, x, latent_dim, kwargs)
    latent_dim = layout.size
    if not 1 <= latent_dim <= MAX_LATENT_DIM:
        raise ValueError(
            f"latent_dim must be between 1 and {MAX_LATENT_DIM} for the appendix-D estimator, got {latent_dim}"
        )
    if num_samples < latent_dim + 2:
        raise ValueError(f"num_samples must be >= latent_dim + 2 to fit a covariance, got {num_samples}")
    parts, errors, accepts, sizes = [], [], [], []
    bar = tqdm(
        batches(x, kwargs, batch_size),
        disable=not progress,
        desc="appendix-D log p(x)",
        unit="batch",
        leave=False,
        total=math.ceil(x.shape[0] / batch_size),
    )
    for b, (xb, kw) in enumerate(bar):
        result = hmc_posterior(
            model,
            xb,
            latent_dim,
            num_samples=2 * num_samples,
            warmup_steps=warmup_steps,
            num_leapfrog_steps=num_leapfrog_steps,
            target_accept_prob=target_accept_prob,
            seed=None if seed is None else seed + b,
            layout=layout,
            **kw,
        )
        fit_part, eval_part = result.samples[:num_samples], result.samples[num_samples:]
        q = fit_gaussian(fit_part)
        with torch.no_grad():
            log_p = flat_log_joint(model, xb, eval_part, layout, **kw)  # (L, N)
            log_ratio = q.log_prob(eval_part) - log_p
            parts.append(-(torch.logsumexp(log_ratio, 0) - math.log(num_samples)))
            _, se, ess = log_mean_exp_stats(log_ratio)
            errors.append(se)  # se of log mean(q/p) = se of its negative
            sizes.append(ess)
            accepts.append(torch.full((xb.shape[0],), float(result.accept_rate), dtype=x.dtype, device=x.device))
    return torch.cat(parts), torch.cat(errors).to(x.dtype), torch.cat(accepts), torch.cat(sizes).to(x.dtype)


def observed_is_discrete(model: Callable, x: Tensor, **kwargs: Any) -> bool:
    """Whether every observed site of ``model`` has discrete support, from one trace on (a few
    rows of) ``x``: then p(x) is a probability, at most 1, and log p(x) <= 0."""
    xb, kw = _probe_rows(x, kwargs)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # a structural probe: the caller's stream is kept
        trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(xb, **kw)
    observed = [site for site in trace.nodes.values() if site["type"] == "sample" and site["is_observed"]]
    return bool(observed) and all(
        getattr(getattr(site["fn"], "support", None), "is_discrete", False) for site in observed
    )


def _appendix_d_warnings(ds: "xr.Dataset", names: Dict[str, str]) -> List[str]:
    """The estimates appendix D itself can tell are wrong: log p̂(x) > 0 where p(x) is a
    probability (discrete data), and chains that barely moved."""
    n = ds.sizes["datapoint"]
    out = weight_warnings(ds, names, num_draws=int(ds.attrs["num_samples"]), what="appendix-D")
    limit = ds.attrs.get("log_px_max", "none")
    if limit != "none":
        bad = ds["log_px"].values > float(limit)
        if bad.any():
            out.append(
                f"appendix D: log p̂(x) > {float(limit):g} for {int(bad.sum())} of {n} datapoints (max "
                f"{float(ds['log_px'].values.max()):.2f}): impossible, p(x) of discrete data is a probability; the "
                f"Gaussian fitted to the HMC draws does not cover them; raise {names['num_samples']} and "
                f"{names['warmup_steps']}"
            )
    if "accept_rate" in ds:
        accept = ds["accept_rate"].values
        low = accept < MIN_ACCEPT_RATE
        if low.any():
            out.append(
                f"appendix D: HMC acceptance rate below {MIN_ACCEPT_RATE:g} for {int(low.sum())} of {n} datapoints "
                f"(min {float(np.nanmin(accept)):.2f}): the chain barely moved, so the estimate and its standard "
                f"error rest on a few distinct draws; raise {names['warmup_steps']}"
            )
    return out


@register_estimator(
    "appendix_d",
    title="AEVB appendix D: HMC posterior draws and a fitted Gaussian (latent dimension < 5; no guide)",
    bound="neither",
    reference="Kingma & Welling (2013), Auto-Encoding Variational Bayes, appendix D",
    needs_guide=False,
    warnings=_appendix_d_warnings,
)
def appendix_d(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_samples: int = 500,
    warmup_steps: int = 200,
    num_leapfrog_steps: int = 10,
    batch_size: int = 100,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    """:func:`hmc_log_marginal` as an :class:`~ppl_vae.inference.estimators.Estimate`: log p̂(x)
    = -log (1/L) sum_l q(z_l) / p(x, z_l) over L = ``num_samples`` HMC draws of p(z|x), q a
    Gaussian fitted to as many other draws. 1/p̂ would be unbiased for 1/p(x) with exact
    posterior draws, which would make log p̂ a stochastic upper bound; HMC's draws are only
    approximately exact, so it is reported as an estimate, neither bound."""
    log_px, se, accept, ess = _appendix_d(
        model,
        x,
        None,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_leapfrog_steps=num_leapfrog_steps,
        target_accept_prob=0.9,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
        kwargs=kwargs,
    )
    return Estimate(
        "appendix_d",
        log_px,
        se,
        "neither",
        f"AEVB appendix-D estimate of log p(x) from L={num_samples} HMC draws (nats; an upper bound in expectation "
        "only if the draws were exact posterior samples: neither bound)",
        {
            "accept_rate": diagnostic(accept, "HMC acceptance rate of the batch's chain after warm-up"),
            "ess": diagnostic(ess, "effective sample size of the L ratios q(z_l) / p(x, z_l)"),
        },
        settings={
            "num_samples": int(num_samples),
            "warmup_steps": int(warmup_steps),
            "num_leapfrog_steps": int(num_leapfrog_steps),
            # what log p(x) cannot exceed, where the estimator can tell (a probability is at most 1)
            "log_px_max": 0.0 if observed_is_discrete(model, x, **kwargs) else None,
        },
        reference="Kingma & Welling (2013), appendix D",
    )
