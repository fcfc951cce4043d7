"""Non-amortized mean-field VI: a separate diagonal Gaussian q*(z) for every datapoint.

With the model's parameters frozen, q*_i(z) = N(loc_i, diag(scale_i^2)) maximizes the ELBO
of datapoint i alone. Its ELBO L[q*] is the best a diagonal-Gaussian guide can do, so the
amortized guide's shortfall L[q*] - L[q] is the *amortization gap* and log p(x) - L[q*] the
*approximation gap* (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in VAEs").

All datapoints of a batch are optimized together: ``loc`` and ``log_scale`` are ``(B, d)``
tensors and one Adam step updates every q*_i (the loss is a sum of independent terms, and
Adam's steps are per element, so each datapoint follows its own trajectory). Stochastic
Adam alone stalls at the level of its own Monte Carlo noise, so a deterministic polish follows:
the ELBO with fixed common random numbers (moment-matched, antithetic standard normals) and the
Gaussian entropy in closed form is maximized by L-BFGS until every datapoint's gradient is
below ``gtol`` (sample-average approximation; Kingma & Welling 2013 use the same
reparameterization). A datapoint whose gradient is still larger is reported as not
converged. Only the contract is used: sites ``"z"`` and ``"x"`` in the ``"data"`` plate, so any model/guide pair
that follows it works, not only :class:`ppl_vae.models.vae.VAE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, cast

import numpy as np
import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from torch import Tensor

from ppl_vae.estimator_options import (
    ADAM_STEPS_BEFORE_POLISH,
    ADAM_STEPS_WITHOUT_POLISH,
    MEAN_FIELD_GTOL,
    MEAN_FIELD_INIT,
    MEAN_FIELD_LR,
    MEAN_FIELD_POLISH_STEPS,
    MEAN_FIELD_TOL,
)
from ppl_vae.inference.importance import ImportanceEstimate, concat_estimates, importance_estimate
from ppl_vae.inference.latents import Layout, Site, guide_layout, log_joint, model_layout, scored_values_per_draw
from ppl_vae.inference.local_fit import LocalBlock, fit_local
from ppl_vae.inference.modes import check_call_convention, in_eval_mode, rows
from ppl_vae.registry import Registry

if TYPE_CHECKING:  # imported by to_dataset, after the fit
    import xarray as xr

Moments = Tuple[Tensor, Tensor]

LATENT_SITE = "z"

# name -> whether the Gaussian entropy of q* is taken in closed form (else estimated as -log q*(z)).
MEAN_FIELD_ELBOS: Registry[bool] = Registry("mean-field elbo")
MEAN_FIELD_ELBOS.register(
    "mean_field", doc="E_q[log p(x, z)] by Monte Carlo, the Gaussian entropy of q* in closed form (lower variance)"
)(True)
MEAN_FIELD_ELBOS.register("trace", doc="Trace_ELBO's estimator: Monte Carlo log p(x, z) - log q*(z)")(False)


MOMENT_SAMPLES = 1024
"""Draws used to estimate the moments of a distribution without closed-form ones (e.g. a flow)."""

HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2 * math.pi))  # a diagonal Gaussian's entropy: d of these + sum log scale

POLISH_HISTORY = 20
"""Curvature pairs each datapoint's L-BFGS keeps in the polish."""
POLISH_BACKTRACKS = 20
"""Halvings of the step the polish's line search tries before a datapoint stops where it is."""
POLISH_CHUNK_DRAWS = 2048
"""Most draws (particles x datapoints) in one forward and backward pass of the polish
(:func:`polish_chunk_rows`)."""
POLISH_CHUNK_VALUES = 2048 * 784
"""Most values of x scored in one forward and backward pass of the polish: particles x
datapoints x values per datapoint (:func:`polish_chunk_rows`); 2,048 draws of an MNIST image."""
ARMIJO = 1e-4
"""The sufficient-decrease constant c1 of the polish's line search (Nocedal & Wright's usual value)."""
POLISH_STALL = 10
"""Iterations a datapoint's L-BFGS may go without lowering its objective by more than the
rounding slack (:data:`ROUNDING`) before it stops, short of ``gtol``: there float32 rounding,
not the optimum, limits the gradient."""
ROUNDING = 1e-6
"""Relative rise of the float32 objective that the line search counts as rounding, not ascent."""


def _site_moments(fn: dist.TorchDistribution, num_data: int) -> Moments:
    """(mean, standard deviation) of a site's distribution, each ``(num_data, *event_shape)``.

    In closed form where the distribution has them; otherwise (normalizing flows) estimated
    from :data:`MOMENT_SAMPLES` draws.
    """
    shape = (num_data,) + tuple(fn.event_shape)
    try:
        mean, var = fn.mean, fn.variance
    except NotImplementedError:
        if not fn.has_rsample and not hasattr(fn, "sample"):
            raise ValueError(f"cannot take moments of a {type(fn).__name__}: no mean/variance and no sampler") from None
        draws = fn.sample((MOMENT_SAMPLES,))
        mean, var = draws.mean(0), draws.var(0)
    return mean.expand(shape).clone(), var.expand(shape).sqrt().clone()


def _trace_moments(fn: Callable, x: Tensor, layout: Optional[Layout], what: str, kwargs: Dict[str, Any]) -> Moments:
    with torch.random.fork_rng(devices=[]):  # moments are read off the trace: no draw of the caller's is used
        trace = poutine.trace(poutine.block(fn, hide_types=["param"])).get_trace(x, **kwargs)
    if layout is None:
        if LATENT_SITE in trace.nodes:
            latent_fn = cast(dist.TorchDistribution, trace.nodes[LATENT_SITE]["fn"])
            layout = Layout((Site(LATENT_SITE, tuple(latent_fn.event_shape)),))
        else:
            layout = Layout(())
    if not layout.sites:
        raise ValueError(f"the {what} has no sample site {LATENT_SITE!r}")
    locs, scales = {}, {}
    for site in layout.sites:
        if site.name not in trace.nodes:
            raise ValueError(f"the {what} has no sample site {site.name!r}")
        fn = cast(dist.TorchDistribution, trace.nodes[site.name]["fn"])
        locs[site.name], scales[site.name] = _site_moments(fn, x.shape[0])
    if len(layout.sites) == 1:  # one site: keep its own shape (N, *event_shape)
        name = layout.sites[0].name
        return locs[name], scales[name]
    return layout.join(locs, 1), layout.join(scales, 1)


@torch.no_grad()
@in_eval_mode("guide")
def guide_moments(guide: Callable, x: Tensor, layout: Optional[Layout] = None, **kwargs: Any) -> Moments:
    """(loc, scale) of each datapoint's q(latents|x) from a guide.

    With one latent site each is ``(N, *event_shape)``; with several (``layout``, from
    :func:`~ppl_vae.inference.latents.model_layout`) each is the flat ``(N, layout.size)``.
    Works for any guide whose latent sites have a mean and variance (for a full-covariance
    guide ``scale`` is the marginal standard deviation; for a flow, sampled moments).
    """
    return _trace_moments(guide, x, layout, "guide", kwargs)


@torch.no_grad()
@in_eval_mode("model")
def prior_moments(model: Callable, x: Tensor, layout: Optional[Layout] = None, **kwargs: Any) -> Moments:
    """(mean, standard deviation) of the model's prior over its latent sites (as :func:`guide_moments`).

    For a hierarchical prior (z1 | z2), a site's moments are those of its conditional at one
    draw of its parents: a starting point for q*, not the marginal moments.
    """
    return _trace_moments(model, x, layout, "model", kwargs)


# name -> (model, guide, x, **kwargs) -> (loc, scale) of the starting q*.
MEAN_FIELD_INITS: Registry[Callable[..., Moments]] = Registry("mean-field init")
MEAN_FIELD_INITS.register("encoder", doc="start each q* at the amortized guide's q(z|x)")(
    lambda model, guide, x, layout=None, **kw: guide_moments(guide, x, layout, **kw)
)
MEAN_FIELD_INITS.register("prior", doc="start each q* at the prior p(z)")(
    lambda model, guide, x, layout=None, **kw: prior_moments(model, x, layout, **kw)
)


class MeanFieldGuide:
    """A guide q(latents) = prod over sites of N(loc_i, diag(scale_i^2)), one per datapoint.

    ``loc``, ``log_scale``: ``(N, *event_shape)`` for one latent site (``latent_site``, default
    ``"z"``), or the flat ``(N, layout.size)`` of every continuous latent site when ``layout``
    is given (:mod:`ppl_vae.inference.latents`). Call it with the datapoints those rows belong
    to (same order); extra arguments are ignored, so it stands in for any guide with the same
    model.
    """

    def __init__(self, loc: Tensor, log_scale: Tensor, latent_site: str = LATENT_SITE, layout: Optional[Layout] = None):
        self.loc = loc
        self.log_scale = log_scale
        self.latent_site = latent_site
        self.layout = layout
        self._single = layout is None or len(layout.sites) == 1
        if layout is not None and self._single:
            self.latent_site = layout.sites[0].name

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Optional[Tensor]:
        if x.shape[0] != self.loc.shape[0]:
            raise ValueError(f"this mean-field guide holds {self.loc.shape[0]} datapoints, got {x.shape[0]}")
        with pyro.plate("data", x.shape[0]):
            if self._single:
                event_dims = self.loc.dim() - 1
                return pyro.sample(self.latent_site, dist.Normal(self.loc, self.log_scale.exp()).to_event(event_dims))
            assert self.layout is not None  # several sites: a layout was given
            locs, log_scales = self.layout.split(self.loc), self.layout.split(self.log_scale)
            for site in self.layout.sites:
                pyro.sample(
                    site.name, dist.Normal(locs[site.name], log_scales[site.name].exp()).to_event(len(site.event_shape))
                )
        return None

    def latent_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{site: event_shape}`` of the sites this guide draws, in its order."""
        if self._single:
            return {self.latent_site: tuple(self.loc.shape[1:])}
        assert self.layout is not None
        return {site.name: tuple(site.event_shape) for site in self.layout.sites}

    def draw_latents(self, num_particles: int) -> Tuple[Dict[str, Tensor], Tensor]:
        """``num_particles`` draws without tracing: ``({site: (K, N, *event)}, log q (K, N))``,
        the same numbers as the traced guide under a particle plate for the same random stream
        (each site's standard-normal call in the order the guide makes them, as Pyro's
        ``Normal.rsample``). Every site's event must be a vector (:meth:`latent_shapes`)."""
        from ppl_vae.models.densities import normal_draw

        if any(len(shape) != 1 for shape in self.latent_shapes().values()):
            raise ValueError("draw_latents needs vector-valued sites; trace the guide instead")
        if self._single:
            z, log_q = normal_draw(self.loc, self.log_scale.exp(), num_particles)
            return {self.latent_site: z}, log_q
        assert self.layout is not None
        locs, log_scales = self.layout.split(self.loc), self.layout.split(self.log_scale)
        latents: Dict[str, Tensor] = {}
        total = self.loc.new_zeros((num_particles, self.loc.shape[0]))
        for site in self.layout.sites:
            latents[site.name], log_q = normal_draw(locs[site.name], log_scales[site.name].exp(), num_particles)
            total = total + log_q
        return latents, total

    def take(self, index: Any) -> "MeanFieldGuide":
        """The guide of the datapoints ``index`` (a slice or index tensor)."""
        return MeanFieldGuide(self.loc[index], self.log_scale[index], self.latent_site, self.layout)


@dataclass
class MeanFieldResult:
    """Per-datapoint mean-field posteriors q*_i and their ELBOs.

    ``loc``, ``scale``: ``(N, d)`` for a one-site model; ``(N, layout.size)``, the flat vector of
    every continuous latent site, when ``layout`` is set (several sites). ``estimate``: L[q*] (``estimate.elbo``) with its standard
    error, and the importance-weighted log p(x) with q* as proposal, from
    ``num_eval_samples`` fresh samples. ``num_steps``: ``(N,)`` Adam steps plus L-BFGS
    iterations taken by each datapoint (Adam's per batch). ``converged``: ``(N,)`` bool, whether each
    datapoint met the stopping rule: with the polish, its largest gradient component of the
    fixed-sample ELBO is <= ``gtol``, or that ELBO stopped rising beyond float32 rounding
    (:data:`POLISH_STALL` iterations; ``grad_norm`` then shows how far from ``gtol``); without it, its batch met the Adam plateau rule before
    ``max_steps``. ``grad_norm``: ``(N,)`` that largest gradient component at the end (NaN
    without the polish). ``trace``: ``(batch, step)`` mean ELBO per datapoint at every Adam
    step (NaN after a batch stopped).
    """

    loc: Tensor
    scale: Tensor
    estimate: ImportanceEstimate
    num_steps: Tensor
    converged: Tensor
    trace: Tensor
    grad_norm: Optional[Tensor] = None
    layout: Optional[Layout] = None

    @property
    def elbo(self) -> Tensor:
        """L[q*] per datapoint, ``(N,)``."""
        return self.estimate.elbo

    def guide(self) -> MeanFieldGuide:
        """The fitted q* as a guide over all N datapoints (no gradients)."""
        return MeanFieldGuide(self.loc, self.scale.log(), layout=self.layout)

    def to_dataset(self) -> xr.Dataset:
        """loc/scale over (datapoint, latent) and the estimates over datapoint."""
        ds = self.estimate.to_dataset()
        flat = lambda t: t.detach().reshape(t.shape[0], -1).cpu().double().numpy()  # noqa: E731
        ds["loc"] = (("datapoint", "latent"), flat(self.loc))
        ds["scale"] = (("datapoint", "latent"), flat(self.scale))
        if self.layout is not None and len(self.layout.sites) > 1:  # which site each latent number belongs to
            ds = ds.assign_coords(
                latent_site=("latent", self.layout.column_sites().astype(str)),
                latent_index=("latent", self.layout.column_index()),
            )
        ds["converged"] = ("datapoint", self.converged.cpu().numpy().astype(bool))
        ds["converged"].attrs["long_name"] = "mean-field VI met its stopping rule for this datapoint"
        if self.grad_norm is not None:
            ds["grad_norm"] = ("datapoint", self.grad_norm.cpu().double().numpy())
            ds["grad_norm"].attrs["long_name"] = "largest |gradient| of the fixed-sample ELBO at the end"
        ds.attrs["num_converged"] = int(self.converged.sum())
        return ds


def matched_normals(
    num_samples: int, num_data: int, dim: int, *, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normals ``(num_samples, num_data, dim)`` with exact first and second moments.

    Half the draws are whitened per datapoint so that their second moment is exactly I
    (when ``num_samples // 2 > dim``; otherwise each coordinate is rescaled to unit mean
    square), and the other half are their negatives (antithetic), so every sample mean and odd
    moment is exactly 0. As fixed common random numbers they make the sample-average ELBO
    exact for any integrand that is quadratic in z (e.g. a Gaussian prior or a linear-Gaussian
    likelihood) and much less noisy otherwise.
    """
    half = max(1, num_samples // 2)
    e = torch.randn(half, num_data, dim, dtype=torch.float64, device=device)
    if half > dim:
        second = torch.einsum("sbi,sbj->bij", e, e) / half  # (B, d, d)
        chol = torch.linalg.cholesky(second)
        e = torch.linalg.solve_triangular(chol, e.permute(1, 2, 0), upper=False).permute(2, 0, 1)
    else:
        e = e / e.pow(2).mean(0, keepdim=True).sqrt()
    return torch.cat([e, -e]).to(dtype)


def _flat_log_joint(model: Callable, xb: Tensor, z: Tensor, layout: Layout, kw: dict) -> Tensor:
    """log p(x, latents) ``(S, B)`` at ``z``: the one site's value ``(S, B, *event)``, or the flat
    ``(S, B, layout.size)`` of several sites."""
    latents = {layout.sites[0].name: z} if len(layout.sites) == 1 else layout.split(z)
    return log_joint(model, xb, latents, layout=layout, **kw)


def _polish(
    model: Callable,
    layout: Layout,
    xb: Tensor,
    kw: dict,
    loc: Tensor,
    log_scale: Tensor,
    *,
    num_particles: int,
    max_iter: int,
    gtol: float,
    history_size: int = POLISH_HISTORY,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Maximize each datapoint's fixed-sample ELBO over its own (loc, log_scale) by L-BFGS.

    The objective for datapoint i is mean_s log p(x_i, loc_i + scale_i * eps_s) + H[q_i] with
    ``eps`` from :func:`matched_normals` (fixed for the whole run) and the Gaussian entropy H in
    closed form; being deterministic, its gradient can be driven to ``gtol``. The terms are
    independent, so every datapoint runs its own L-BFGS (Nocedal & Wright 2006, algorithm 7.4:
    its own curvature pairs, at most ``history_size``, and its own backtracking Armijo line
    search), all of them vectorized over the batch; a datapoint leaves the batch when its
    largest gradient component is <= ``gtol``, so later iterations score only the datapoints
    still moving. (One L-BFGS over the whole batch, as this polish was before, shares a line
    search and a curvature memory among all datapoints: no datapoint reached ``gtol`` before
    the batch as a whole did, about 60 iterations on the digits run against 10-20 here.)
    A datapoint also leaves when its objective has not fallen by more than float32 rounding
    (:data:`ROUNDING` relative) for :data:`POLISH_STALL` iterations: there rounding, not the
    distance to the optimum, holds its gradient above ``gtol`` (the rule of scipy's L-BFGS-B
    ``factr``, a relative reduction of f at machine precision). On the GMVAE's 100 MNIST test
    images (2 epochs) 42 datapoints ran all 300 iterations with largest gradients of 0.001-0.03
    and gained 0.001 nats in their last 200; with the rule the fit took 5 s instead of 30.
    Returns (loc, log_scale, largest |gradient| per datapoint, iterations per datapoint,
    whether each met a stopping rule); a datapoint whose objective is not finite at the start
    keeps its start and a NaN gradient, and meets none.
    """
    shape = loc.shape
    n = shape[0]
    d = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    eps = matched_normals(num_particles, n, d, device=loc.device, dtype=loc.dtype)  # (S, N, d)
    theta = torch.cat([loc.detach().reshape(n, d), log_scale.detach().reshape(n, d)], 1)  # (N, 2d)

    chunk = polish_chunk_rows(num_particles, scored_values_per_draw(model, xb, layout, **kw))

    def evaluate_chunk(rows_: Tensor, point: Tensor) -> Tuple[Tensor, Tensor]:
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            m, s = point[:, :d], point[:, d:]
            z = (m + s.exp() * eps[:, rows_]).reshape((num_particles, -1) + tuple(shape[1:]))
            sub_kw = {k: rows(v, n, rows_) for k, v in kw.items()}
            log_p = _flat_log_joint(model, xb[rows_], z, layout, sub_kw).mean(0)
            value = -(log_p + s.sum(-1) + d * HALF_LOG_2PI_E).double()
            (grad,) = torch.autograd.grad(value.sum(), [point])
        return value.detach(), grad.detach()

    def evaluate(rows_: Tensor, point: Tensor) -> Tuple[Tensor, Tensor]:
        """Minus the fixed-sample ELBO of datapoints ``rows_`` at ``point`` ``(R, 2d)``, in
        float64, and its gradient ``(R, 2d)``: ``chunk`` datapoints per forward and backward
        pass (each datapoint's term is its own, so chunks change nothing but rounding)."""
        if rows_.numel() <= chunk:
            return evaluate_chunk(rows_, point)
        parts = [evaluate_chunk(rows_[i : i + chunk], point[i : i + chunk]) for i in range(0, rows_.numel(), chunk)]
        return torch.cat([v for v, _ in parts]), torch.cat([g for _, g in parts])

    dim = 2 * d
    f, g = evaluate(torch.arange(n, device=loc.device), theta)
    grad_max = g.abs().amax(-1)
    finite = torch.isfinite(f) & torch.isfinite(grad_max)
    grad_max = torch.where(finite, grad_max, torch.full_like(grad_max, math.nan))
    iterations = torch.zeros(n, dtype=torch.long, device=loc.device)
    s_hist = torch.zeros(n, history_size, dim, dtype=theta.dtype, device=theta.device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(n, history_size, dtype=theta.dtype, device=theta.device)  # 0: an empty slot
    active = torch.nonzero(finite & (grad_max > gtol)).flatten()
    best = f.clone()  # the objective at each datapoint's last real improvement
    stalled = torch.zeros(n, dtype=torch.long, device=loc.device)  # iterations since then
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        ga, sa, ya, ra = g[active], s_hist[active], y_hist[active], rho[active]
        # two-loop recursion, newest pair last; empty slots have rho = 0 and leave q unchanged
        q = ga.clone()
        alpha = torch.zeros_like(ra)
        for j in range(history_size - 1, -1, -1):
            alpha[:, j] = ra[:, j] * (sa[:, j] * q).sum(-1)
            q -= alpha[:, j, None] * ya[:, j]
        yy = (ya[:, -1] * ya[:, -1]).sum(-1)
        gamma = torch.where(ra[:, -1] > 0, 1.0 / (ra[:, -1] * yy).clamp_min(1e-30), torch.zeros_like(yy))
        first = ra[:, -1] == 0  # no curvature pair yet: a gradient step of length at most 1 (as torch's LBFGS)
        gamma = torch.where(first, (1.0 / ga.abs().sum(-1).clamp_min(1e-30)).clamp_max(1.0), gamma)
        q *= gamma[:, None]
        for j in range(history_size):
            beta = ra[:, j] * (ya[:, j] * q).sum(-1)
            q += (alpha[:, j] - beta)[:, None] * sa[:, j]
        direction = -q
        slope = (ga * direction).sum(-1).double()
        uphill = ~(slope < 0)  # rounding made the direction useless: restart from the gradient
        if bool(uphill.any()):
            direction[uphill] = -ga[uphill] * (1.0 / ga[uphill].abs().sum(-1).clamp_min(1e-30)).clamp_max(1.0)[:, None]
            slope = (ga * direction).sum(-1).double()
            rho[active[uphill]] = 0
        # backtracking Armijo line search per datapoint, rounding of the float32 objective allowed for
        step = torch.ones(active.numel(), dtype=theta.dtype, device=theta.device)
        f_new = torch.empty_like(f[active])
        g_new = torch.empty_like(ga)
        todo = torch.arange(active.numel(), device=theta.device)
        for _trial in range(POLISH_BACKTRACKS):
            rows_ = active[todo]
            fv, gv = evaluate(rows_, theta[rows_] + step[todo, None] * direction[todo])
            slack = ROUNDING * f[rows_].abs()
            ok = torch.isfinite(fv) & torch.isfinite(gv).all(-1)
            ok &= fv <= f[rows_] + ARMIJO * step[todo].double() * slope[todo] + slack
            f_new[todo[ok]], g_new[todo[ok]] = fv[ok], gv[ok]
            todo = todo[~ok]
            if todo.numel() == 0:
                break
            step[todo] *= 0.5
        moved = torch.ones(active.numel(), dtype=torch.bool, device=theta.device)
        moved[todo] = False  # no acceptable step: this datapoint stops where it is
        idx = active[moved]
        s_new = step[moved, None] * direction[moved]
        y_new = g_new[moved] - g[idx]
        sy = (s_new * y_new).sum(-1)
        theta[idx] += s_new
        f[idx], g[idx] = f_new[moved], g_new[moved]
        iterations[active] += 1
        curved = sy > 1e-10 * (y_new * y_new).sum(-1)  # keep only pairs with positive curvature
        keep = idx[curved]
        s_hist[keep] = torch.cat([s_hist[keep, 1:], s_new[curved, None]], 1)
        y_hist[keep] = torch.cat([y_hist[keep, 1:], y_new[curved, None]], 1)
        rho[keep] = torch.cat([rho[keep, 1:], (1.0 / sy[curved])[:, None]], 1)
        grad_max[idx] = g[idx].abs().amax(-1)
        improved = f[idx] < best[idx] - ROUNDING * best[idx].abs()
        best[idx[improved]] = f[idx[improved]]
        stalled[idx] = torch.where(improved, torch.zeros_like(stalled[idx]), stalled[idx] + 1)
        active = idx[(grad_max[idx] > gtol) & (stalled[idx] < POLISH_STALL)]
    new_loc = theta[:, :d].reshape(shape)
    new_log_scale = theta[:, d:].reshape(shape)
    met = finite & ((grad_max <= gtol) | (stalled >= POLISH_STALL))
    return new_loc, new_log_scale, grad_max, iterations, met


def polish_chunk_rows(num_particles: int, values_per_datapoint: int) -> int:
    """Datapoints per forward and backward pass of the polish: at most :data:`POLISH_CHUNK_DRAWS`
    draws and :data:`POLISH_CHUNK_VALUES` values scored over the particles (``values_per_datapoint``:
    what one draw of one datapoint scores, :func:`~ppl_vae.inference.latents.scored_values_per_draw`:
    x's size, times the values of a discrete site the model sums out where x's density depends on it).

    A whole 500-datapoint MNIST batch at 64 particles holds about 100 MB per decoder-sized
    tensor, which glibc's malloc maps fresh from the kernel and unmaps at every evaluation: on
    the MNIST run of benchmarks/README.md, 2.4 million page faults and 4.8 s of kernel time in
    an 11.6 s fit. At 2,048 draws (6.4 MB per such tensor) the freed blocks are reused: 0.16
    million faults, 0.3 s, the fit in 6.9 s; chunks of 4,096 and 8,192 draws fault again (one
    thread; at two threads too, so the chunk is not scaled by threads). The draws bound the
    hidden layers and outputs, which can be wider than x (the 8x8 digits' ``gaussian_mlp``: 64
    values, 200 hidden units, 128 outputs; its 359 test points in one pass: 0.71-0.74 s, 64-70k
    faults; in passes of 2,048 draws: 0.57-0.60 s, under 10k faults); the values bound larger
    images, and M2's p(x | z, y), which scores 10 x 784 values a draw: its fit on 100 MNIST test
    images (64 particles, 1 thread) took 37.0 s with 4.9 million faults in chunks of 32 rows
    (x's size alone), 27.4 s with 0.43 million in the 3 rows the enumerated values give."""
    by_draws = POLISH_CHUNK_DRAWS // max(1, num_particles)
    by_values = POLISH_CHUNK_VALUES // max(1, num_particles * values_per_datapoint)
    return max(1, min(by_draws, by_values))


_BlockResult = Tuple[Tensor, Tensor, ImportanceEstimate, Optional[Tensor], Tensor, Optional[Tensor]]
"""What a block of :func:`fit_mean_field` leaves: loc, scale, estimate, polish gradient, polish
iterations, whether the polish met a stopping rule."""


def default_max_steps(polish: bool) -> int:
    """Adam's most steps when ``max_steps`` is not given: :data:`~ppl_vae.estimator_options.ADAM_STEPS_BEFORE_POLISH`
    with the L-BFGS polish, :data:`~ppl_vae.estimator_options.ADAM_STEPS_WITHOUT_POLISH` without it."""
    return ADAM_STEPS_BEFORE_POLISH if polish else ADAM_STEPS_WITHOUT_POLISH


MEAN_FIELD_OPTIONS: Dict[str, str] = {
    "init": "choice",
    "elbo": "choice",
    "lr": "positive",
    "max_steps": "count",
    "num_particles": "count",
    "tol": "nonnegative",
    "window": "count",
    "num_lr_decays": "count",
    "polish": "bool",
    "polish_particles": "count",
    "polish_steps": "count",
    "gtol": "positive",
    "batch_size": "count",
    "num_eval_samples": "count",
    "seed": "count",
}
"""The settings of :func:`fit_mean_field` (its keyword-only arguments but ``progress``; a test
holds them equal) and what each takes: a name of its registry, true/false, an integer, a
positive number or a number >= 0."""


def check_mean_field_options(
    options: Dict[str, Any], what: Optional[str] = "mean_field_options", without: Tuple[str, ...] = ()
) -> None:
    """Refuse (ValueError, one line naming the key) a setting of :func:`fit_mean_field` that it
    does not take (or one of ``without``, which the caller sets itself) or a value of the wrong
    type or range: the one check of its settings, made by the fit itself (``what`` None) and up
    front, before any work, by every caller that passes a dict of them on (``mean_field_options``,
    ``--mf-option KEY=VALUE``: an unknown key would otherwise reach the model as a keyword)."""
    prefix = f"{what}: " if what else ""
    allowed = [k for k in MEAN_FIELD_OPTIONS if k not in without]
    unknown = sorted(set(options) - set(allowed))
    if unknown:  # keys quoted: the CLI names its own flags, never these (ppl_vae.cli.main.with_flags)
        raise ValueError(f"{prefix}unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(map(repr, allowed))}")
    for item, value in options.items():
        key = repr(item) if what else item
        kind = MEAN_FIELD_OPTIONS[item]
        if kind == "choice":
            (MEAN_FIELD_INITS if item == "init" else MEAN_FIELD_ELBOS).get(value)
            continue
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{prefix}{key} must be true or false, got {value!r}")
            continue
        if value is None and item in ("max_steps", "seed"):  # the fit's default / the caller's stream
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if kind == "count":
            if item in ("num_lr_decays", "seed"):
                if not number or int(value) != value or value < 0:
                    raise ValueError(f"{prefix}{key} must be an integer >= 0, got {value!r}")
            elif not number or int(value) != value or value < 1:
                raise ValueError(f"{prefix}{key} must be a positive integer, got {value!r}")
        elif kind == "positive" and not (number and value > 0):
            raise ValueError(f"{prefix}{key} must be a positive number, got {value!r}")
        elif kind == "nonnegative" and not (number and value >= 0):
            raise ValueError(f"{prefix}{key} must be >= 0, got {value!r}")


@in_eval_mode("model", "guide")
def fit_mean_field(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    init: str = MEAN_FIELD_INIT,
    elbo: str = "mean_field",
    lr: float = MEAN_FIELD_LR,
    max_steps: Optional[int] = None,
    num_particles: int = 1,
    tol: float = MEAN_FIELD_TOL,
    window: int = 50,
    num_lr_decays: int = 3,
    polish: bool = True,
    polish_particles: int = 64,
    polish_steps: int = MEAN_FIELD_POLISH_STEPS,
    gtol: float = MEAN_FIELD_GTOL,
    batch_size: int = 500,
    num_eval_samples: int = 100,
    progress: bool = False,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> MeanFieldResult:
    """Fit q*_i(z) = N(loc_i, diag(scale_i^2)) to each datapoint by SVI with the model frozen.

    ``model(x, **kwargs)`` follows the contract (``"z"`` and ``"x"`` in the ``"data"``
    plate); only ``loc`` and ``log_scale`` are optimized (gradients never reach the model's
    parameters). ``init``: "encoder" (start at ``guide``'s q(z|x), which is then required)
    or "prior". ``elbo``: "mean_field" (analytic KL when the model's prior allows it) or
    "trace".

    Two phases. (1) Adam on the stochastic ELBO with ``num_particles``: every ``window``
    steps the mean ELBO over the last window is compared with the previous window's; when the
    relative change is below ``tol`` the learning rate is halved, and after ``num_lr_decays``
    halvings the next plateau (or ``max_steps``) ends the phase; the mean iterate of the last
    full window is kept (Polyak averaging). ``max_steps`` None: :func:`default_max_steps`
    (50 with the polish, which finishes the fit, 500 without it). (2) With ``polish`` (default), L-BFGS on the
    fixed-sample ELBO with ``polish_particles`` moment-matched common random numbers, for at
    most ``polish_steps`` iterations, until the largest gradient component is <= ``gtol`` or
    the objective stops falling beyond float32 rounding (:data:`POLISH_STALL` iterations);
    ``converged`` then says, per datapoint, whether it got there. L-BFGS finds the optimum of
    that fixed-sample objective, which is the ELBO's own optimum exactly when log p(x, z) is
    quadratic in z and close to it otherwise (more ``polish_particles`` bring it closer).

    L[q*] is then estimated with ``num_eval_samples`` fresh samples. Datapoints are processed
    ``batch_size`` at a time. The model and guide are put in eval mode for the fit (and their
    modes restored), so the result does not depend on how the caller left them. Pairs that
    offer the fast-path protocol (:mod:`ppl_vae.inference.latents`) are scored without tracing.
    Models with several latent sites get one q* over all of them: a diagonal Gaussian over the
    flat vector of every continuous site, i.e. a product of diagonal Gaussians, one per site.
    ``seed``: the fit's own random stream (the caller's RNG state is left as it was).
    """
    check_call_convention("fit_mean_field", guide, x)
    settings = dict(locals())
    check_mean_field_options({k: settings[k] for k in MEAN_FIELD_OPTIONS}, what=None)
    max_steps = default_max_steps(polish) if max_steps is None else max_steps
    elbo_cls = MEAN_FIELD_ELBOS.get(elbo)
    if init == "encoder" and guide is None:
        raise ValueError("init='encoder' needs the amortized guide; pass guide=... or use init='prior'")

    layout = model_layout(model, x, **kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site for mean-field VI")
    if guide is not None and init == "encoder":
        guide_layout(guide, x, layout, **kwargs)
    single = len(layout.sites) == 1

    def start(xb: Tensor, kw: dict, index: slice) -> LocalBlock[_BlockResult]:
        loc0, scale0 = MEAN_FIELD_INITS.get(init)(model, guide, xb, layout=None if single else layout, **kw)
        loc = loc0.detach().clone().requires_grad_(True)
        log_scale = scale0.detach().clamp_min(1e-6).log().clone().requires_grad_(True)

        def loss() -> Tensor:
            """Minus the batch's summed ELBO estimate with ``num_particles`` reparameterized draws."""
            scale = log_scale.exp()
            z = loc + scale * torch.randn((num_particles,) + tuple(loc.shape), dtype=loc.dtype, device=loc.device)
            log_p = _flat_log_joint(model, xb, z, layout, kw)  # (S, B)
            if elbo_cls:  # the Gaussian entropy in closed form
                entropy = log_scale.reshape(loc.shape[0], -1).sum(-1) + loc[0].numel() * HALF_LOG_2PI_E
            else:
                entropy = -dist.Normal(loc, scale).log_prob(z).reshape(num_particles, loc.shape[0], -1).sum(-1)
            return -(log_p + entropy).mean(0).sum()

        def finish(fitted: List[Tensor], history: List[float], done: bool) -> _BlockResult:
            avg_loc, avg_log_scale = fitted  # the last window's mean iterate
            grad, iters, met = None, torch.zeros(xb.shape[0], dtype=torch.long), None
            if polish:
                avg_loc, avg_log_scale, grad, iters, met = _polish(
                    model,
                    layout,
                    xb,
                    kw,
                    avg_loc,
                    avg_log_scale,
                    num_particles=polish_particles,
                    max_iter=polish_steps,
                    gtol=gtol,
                )
            with torch.no_grad():
                q = MeanFieldGuide(avg_loc, avg_log_scale, layout=layout)
                estimate = importance_estimate(model, q, xb, num_samples=num_eval_samples, batch_size=xb.shape[0], **kw)
            return (
                avg_loc.clone(),
                avg_log_scale.exp(),
                estimate,
                grad,
                iters.cpu(),
                met,
            )

        return LocalBlock([loc, log_scale], loss, finish)

    fit = fit_local(
        x,
        kwargs,
        start,
        what="mean-field VI",
        modules=(model, guide),
        lr=lr,
        max_steps=max_steps,
        window=window,
        tol=tol,
        num_lr_decays=num_lr_decays,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
        average=True,
    )
    locs, scales, estimates, grads, polish_iters, polish_met = zip(*fit.blocks)
    grad_norm = torch.cat(grads).cpu() if polish else None
    return MeanFieldResult(
        torch.cat(locs),
        torch.cat(scales),
        concat_estimates(list(estimates)),
        fit.num_steps + torch.cat(polish_iters),
        fit.converged if grad_norm is None else torch.cat(polish_met).cpu(),
        fit.trace,
        grad_norm,
        layout,
    )
