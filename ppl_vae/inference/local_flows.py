"""Per-datapoint normalizing-flow posteriors q*_i: the flexible family of the gap analysis.

Cremer et al. (2018) split the gap log p(x) - L[q(z|x)] into an approximation gap (the best q in
the family, fitted to each datapoint alone) and an amortization gap (the encoder versus that
best q). With mean-field Gaussians as the family the approximation gap also counts what a
diagonal Gaussian cannot represent; with a flow family it shrinks toward the true one.

:func:`fit_local_flow` fits, with the model frozen, one set of flow parameters per datapoint
(all datapoints of a batch at once, by batched parameters): q*_i(z) is a diagonal Gaussian
N(loc_i, diag(scale_i^2)) pushed through ``num_flows`` affine autoregressive steps (the IAF
family of the amortized ``iaf`` guide, Kingma et al. 2016), each
y_j = x_j exp(s_j(x_<j)) + m_j(x_<j) with a one-hidden-layer MADE (Germain et al. 2015) plus a
masked linear skip for m, so a single step already holds every full-covariance Gaussian. Each
step starts at the identity, so q*_i starts at its Gaussian (the encoder's q(z|x), the prior,
or a given mean-field q*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, cast

import pyro
import torch
import xarray as xr
from pyro import distributions as dist
from torch import Tensor, nn
from torch.distributions import constraints

from ppl_vae.inference.importance import ImportanceEstimate, concat_estimates, importance_estimate
from ppl_vae.inference.latents import Layout, log_joint, model_layout
from ppl_vae.inference.local_fit import LocalBlock, fit_local
from ppl_vae.inference.meanfield import LATENT_SITE, MEAN_FIELD_INITS
from ppl_vae.inference.modes import check_call_convention
from ppl_vae.models.networks import tanh

__all__ = ["LocalFlowGuide", "LocalFlowResult", "LocalFlows", "fit_local_flow"]

LOG_SCALE_CLIP = (-5.0, 3.0)


class _BatchedMADE(nn.Module):
    """One autoregressive step's networks, one copy per datapoint: weights ``(N, ...)``."""

    mask_in: Tensor  # buffers
    mask_out: Tensor
    mask_skip: Tensor

    def __init__(self, num_data: int, dim: int, hidden: int, reverse: bool, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        degrees = torch.arange(dim, device=device)
        if reverse:
            degrees = degrees.flip(0)
        hidden_deg = torch.arange(hidden, device=device) % max(dim - 1, 1)
        self.register_buffer("mask_in", (hidden_deg[:, None] >= degrees[None, :]).to(dtype or torch.float32))
        self.register_buffer("mask_out", (degrees[:, None] > hidden_deg[None, :]).to(dtype or torch.float32))
        self.register_buffer("mask_skip", (degrees[:, None] > degrees[None, :]).to(dtype or torch.float32))
        if dim == 1:  # nothing to condition on: a learned affine map
            self.mask_in.zero_()
        self.w_in = nn.Parameter(torch.randn(num_data, hidden, dim, **kw) / math.sqrt(dim))
        self.b_in = nn.Parameter(torch.zeros(num_data, hidden, **kw))
        # Zero output weights: the step starts at the identity.
        self.w_out = nn.Parameter(torch.zeros(num_data, 2 * dim, hidden, **kw))
        self.b_out = nn.Parameter(torch.zeros(num_data, 2 * dim, **kw))
        self.w_skip = nn.Parameter(torch.zeros(num_data, dim, dim, **kw))

    def forward(self, x: Tensor, detach: bool = False):
        """(shift, log_scale) of ``x`` ``(..., N, d)``, each ``(..., N, d)``; entry j sees x_<j only.

        ``detach``: use the weights' values without a gradient path to them (for STL).
        """
        w_in, b_in, w_out, b_out, w_skip = (
            (p.detach() if detach else p) for p in (self.w_in, self.b_in, self.w_out, self.b_out, self.w_skip)
        )
        h = tanh(torch.einsum("...nd,nhd->...nh", x, w_in * self.mask_in) + b_in)
        d = x.shape[-1]
        mask = torch.cat([self.mask_out, self.mask_out])
        out = torch.einsum("...nh,nkh->...nk", h, w_out * mask) + b_out
        shift = out[..., :d] + torch.einsum("...nd,ned->...ne", x, w_skip * self.mask_skip)
        log_scale = out[..., d:].clamp(*LOG_SCALE_CLIP)
        return shift, log_scale


class _AffineStep(torch.distributions.Transform):
    """y = x exp(log_scale(x)) + shift(x), autoregressive: one network pass forward, d back."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    sign = +1

    def __init__(self, made: _BatchedMADE, detach: bool = False):
        super().__init__(cache_size=1)
        self.made = lambda x: made(x, detach)
        self._last: tuple = (None, None)

    def _call(self, x: Tensor) -> Tensor:
        shift, log_scale = self.made(x)
        self._last = (x, log_scale)
        return x * log_scale.exp() + shift

    def _inverse(self, y: Tensor) -> Tensor:
        x = torch.zeros_like(y)
        for _ in range(y.shape[-1]):  # each pass fixes one more coordinate in the autoregressive order
            shift, log_scale = self.made(x)
            x = (y - shift) * (-log_scale).exp()
        self._last = (x, self.made(x)[1])
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last_x, log_scale = self._last
        if last_x is not x:
            log_scale = self.made(x)[1]
        return log_scale.sum(-1)


class LocalFlows(nn.Module):
    """The parameters of N per-datapoint flows: base ``loc``/``log_scale`` ``(N, d)`` and the steps."""

    def __init__(self, loc: Tensor, scale: Tensor, num_flows: int = 2, hidden_dim: Optional[int] = None):
        super().__init__()
        if loc.dim() != 2 or loc.shape != scale.shape:
            raise ValueError(
                f"loc and scale must both be (num_data, latent_dim), got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
        n, d = loc.shape
        hidden = 2 * d + 2 if hidden_dim is None else int(hidden_dim)
        if hidden < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(scale.detach().clamp_min(1e-6).log().clone())
        self.steps = nn.ModuleList(
            _BatchedMADE(n, d, hidden, reverse=bool(t % 2), device=loc.device, dtype=loc.dtype)
            for t in range(num_flows)
        )

    def distribution(self, detach: bool = False) -> dist.TransformedDistribution:
        """q*_i for every datapoint: batch shape ``(N,)``, event shape ``(d,)``; ``detach``: the same
        density with no gradient path to the parameters (its log_prob of other points inverts the flows)."""
        loc, log_scale = (self.loc.detach(), self.log_scale.detach()) if detach else (self.loc, self.log_scale)
        base = dist.Normal(loc, log_scale.exp()).to_event(1)
        steps = cast(Sequence[_BatchedMADE], self.steps)
        return dist.TransformedDistribution(base, [_AffineStep(m, detach) for m in steps])


class LocalFlowGuide(nn.Module):
    """A guide q(z) = q*_i per datapoint from :class:`LocalFlows`; call it with the same datapoints.

    Extra arguments are ignored, so it stands in for any guide of the same model.
    """

    def __init__(self, flows: LocalFlows, latent_site: str = LATENT_SITE, layout: Optional[Layout] = None):
        super().__init__()
        self.flows = flows
        self.latent_site = latent_site
        self.layout = layout if layout is not None and len(layout.sites) > 1 else None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Optional[Tensor]:
        if x.shape[0] != self.flows.loc.shape[0]:
            raise ValueError(f"these local flows hold {self.flows.loc.shape[0]} datapoints, got {x.shape[0]}")
        with pyro.plate("data", x.shape[0]):
            if self.layout is None:
                return pyro.sample(self.latent_site, self.flows.distribution())
            # one flow over the flat vector of every site (as Pyro's AutoGuides do): an auxiliary site
            # carries log q*, and each latent site is its slice (a Delta, log-density 0)
            flat = pyro.sample("_local_flow_latents", self.flows.distribution(), infer={"is_auxiliary": True})
            for site, value in self.layout.split(flat).items():
                pyro.sample(site, dist.Delta(value, event_dim=value.dim() - flat.dim() + 1))
        return None


@dataclass
class LocalFlowResult:
    """Per-datapoint flow posteriors q*_i and their bounds.

    ``estimate``: from ``num_eval_samples`` fresh draws of each q*_i, ``estimate.elbo`` is
    L[q*_flow] (a Monte Carlo estimate of a lower bound on log p(x)) with ``elbo_stderr``, and
    ``estimate.log_px`` the importance-weighted log p(x) with q*_i as proposal.
    ``converged``: ``(N,)`` bool, whether the datapoint's batch met the plateau rule before
    ``max_steps``. ``num_steps``: ``(N,)`` Adam steps taken. ``trace``: ``(batch, step)`` mean
    ELBO per datapoint at every step (NaN after a batch stopped). ``flows``: the fitted
    parameters, one :class:`LocalFlows` per batch.
    """

    estimate: ImportanceEstimate
    converged: Tensor
    num_steps: Tensor
    trace: Tensor
    flows: List[LocalFlows]

    @property
    def elbo(self) -> Tensor:
        """L[q*_flow] per datapoint, ``(N,)`` (a lower bound on log p(x), estimated)."""
        return self.estimate.elbo

    def to_dataset(self) -> xr.Dataset:
        """The estimates over ``datapoint`` plus ``converged`` and ``num_steps``."""
        ds = self.estimate.to_dataset()
        ds["converged"] = ("datapoint", self.converged.cpu().numpy().astype(bool))
        ds["converged"].attrs["long_name"] = "local flow VI met its plateau rule for this datapoint's batch"
        ds["num_steps"] = ("datapoint", self.num_steps.cpu().numpy())
        ds.attrs["family"] = "per-datapoint affine autoregressive flow (IAF family)"
        ds.attrs["num_converged"] = int(self.converged.sum())
        return ds


def _elbo_loss(
    model: Callable, layout: Layout, guide: LocalFlowGuide, xb: Tensor, kw: dict, k: int, stl: bool
) -> Tensor:
    """-sum_i mean_k [log p(x_i, z_k) - log q*_i(z_k)] for K draws from the local flows (the K-sample
    ELBO, not the IWAE bound); with ``stl`` log q* is scored with detached parameters (sticking the
    landing, Roeder et al. 2017)."""
    q = guide.flows.distribution()
    z = q.rsample((k,))
    log_q = (guide.flows.distribution(detach=True) if stl else q).log_prob(z)
    latents = {layout.sites[0].name: z} if len(layout.sites) == 1 else layout.split(z)
    log_w = log_joint(model, xb, latents, layout=layout, **kw) - log_q
    return -log_w.mean(0).sum()


def fit_local_flow(
    model: Callable,
    guide: Optional[Callable],
    x: Tensor,
    *,
    init: str = "encoder",
    init_loc: Optional[Tensor] = None,
    init_scale: Optional[Tensor] = None,
    num_flows: int = 2,
    hidden_dim: Optional[int] = None,
    max_steps: int = 2000,
    lr: float = 1e-2,
    num_particles: int = 16,
    tol: float = 1e-4,
    window: int = 50,
    num_lr_decays: int = 3,
    batch_size: int = 500,
    num_eval_samples: int = 1000,
    stl: bool = True,
    progress: bool = False,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> LocalFlowResult:
    """Fit a flow q*_i(z) to each datapoint by maximizing its ELBO with the model frozen.

    ``model(x, **kwargs)`` follows the contract; only the flows' parameters are optimized
    (gradients never reach the model's). The base Gaussian starts at ``init_loc``/``init_scale``
    ``(N, d)`` when given (e.g. a mean-field q* from :func:`ppl_vae.inference.meanfield.fit_mean_field`,
    so the flow starts at its optimum), else at ``init`` ("encoder": the guide's q(z|x), which
    needs ``guide`` with a Gaussian latent site; "prior": p(z)). ``num_flows`` affine
    autoregressive steps with ``hidden_dim`` hidden units each (default 2 d + 2).

    Adam with ``num_particles`` reparameterized draws per datapoint per step, with sticking-the-
    landing gradients when ``stl`` (their variance vanishes as q*_i reaches the posterior; each
    step then inverts the flows, latent_dim network passes per flow); every ``window``
    steps the mean ELBO over the window is compared with the previous one, a relative change
    below ``tol`` halves the learning rate, and after ``num_lr_decays`` halvings the next
    plateau stops the batch (``converged``); ``max_steps`` stops it otherwise. L[q*] is then
    estimated from ``num_eval_samples`` fresh draws. Datapoints go ``batch_size`` at a time.
    A model with several latent sites gets one flow per datapoint over the flat vector of all
    of them (:mod:`ppl_vae.inference.latents`), so q* can capture their dependence. ``seed``:
    the fit's own random stream (the caller's RNG state is left as it was).
    """
    check_call_convention("fit_local_flow", guide, x)
    for name, value in (
        ("num_flows", num_flows),
        ("max_steps", max_steps),
        ("num_particles", num_particles),
        ("window", window),
        ("batch_size", batch_size),
        ("num_eval_samples", num_eval_samples),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if isinstance(num_lr_decays, bool) or not isinstance(num_lr_decays, int) or num_lr_decays < 0:
        raise ValueError(f"num_lr_decays must be an integer >= 0, got {num_lr_decays!r}")
    if (init_loc is None) != (init_scale is None):
        raise ValueError("init_loc and init_scale go together: pass both or neither")
    if init_loc is not None:
        assert init_scale is not None  # they go together (checked above)
        if init_loc.shape[0] != x.shape[0] or init_loc.shape != init_scale.shape or init_loc.dim() != 2:
            raise ValueError(
                f"init_loc and init_scale must be (num_data={x.shape[0]}, latent_dim), got "
                f"{tuple(init_loc.shape)} and {tuple(init_scale.shape)}"
            )
    else:
        MEAN_FIELD_INITS.get(init)
        if init == "encoder" and guide is None:
            raise ValueError(
                "init='encoder' needs the amortized guide; pass guide=..., init_loc/init_scale, or use init='prior'"
            )

    layout = model_layout(model, x, **kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site for local flows")

    def start(xb: Tensor, kw: dict, index: slice) -> LocalBlock[Tuple[ImportanceEstimate, LocalFlows]]:
        if init_loc is not None:
            assert init_scale is not None
            loc0, scale0 = init_loc[index], init_scale[index]
        else:
            loc0, scale0 = MEAN_FIELD_INITS.get(init)(
                model, guide, xb, layout=None if len(layout.sites) == 1 else layout, **kw
            )
            if loc0.dim() != 2:
                raise ValueError(f"local flows need a vector latent z, got latent shape {tuple(loc0.shape[1:])}")
        flows = LocalFlows(loc0.to(xb), scale0.to(xb), num_flows, hidden_dim)
        q = LocalFlowGuide(flows, layout.sites[0].name, layout)

        @torch.no_grad()
        def finish(fitted: List[Tensor], history: List[float], done: bool) -> Tuple[ImportanceEstimate, LocalFlows]:
            return importance_estimate(model, q, xb, num_samples=num_eval_samples, batch_size=xb.shape[0], **kw), flows

        loss = lambda: _elbo_loss(model, layout, q, xb, kw, num_particles, stl)  # noqa: E731
        return LocalBlock(list(flows.parameters()), loss, finish)

    fit = fit_local(
        x,
        kwargs,
        start,
        what="local flow VI",
        modules=(model, guide),
        lr=lr,
        max_steps=max_steps,
        window=window,
        tol=tol,
        num_lr_decays=num_lr_decays,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
    )
    estimates, fitted = zip(*fit.blocks)
    return LocalFlowResult(concat_estimates(list(estimates)), fit.converged, fit.num_steps, fit.trace, list(fitted))
