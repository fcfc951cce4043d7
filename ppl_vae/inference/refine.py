"""Semi-amortized inference: refine the encoder's q(z|x) by a few gradient steps per datapoint.

Kim, Wiseman, Miller, Sontag & Rush (2018), "Semi-Amortized Variational Autoencoders", and
Marino, Yue & Mandt (2018), "Iterative Amortized Inference": the encoder's Gaussian
(loc, scale) is a *starting point*; K steps of stochastic gradient ascent on each datapoint's
own ELBO, with the model frozen, move it towards the best Gaussian for that datapoint. The rise
in the ELBO is the part of the amortization gap (Cremer et al. 2018) that K steps close.

:func:`refine` is the estimator (the model stays fixed; for training through the unrolled steps
see the ``sa`` method, :mod:`ppl_vae.inference.semi_amortized`). It reuses the per-datapoint
loop :func:`~ppl_vae.inference.local_fit.fit_local` with Adam; unlike
:func:`~ppl_vae.inference.meanfield.fit_mean_field` it takes a fixed number of steps (SA-VAE's
K; ``tol`` adds the plateau rule) and has no L-BFGS polish, so it answers "what do K steps buy",
not "what is the best diagonal Gaussian".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ppl_vae.inference.latents import Layout, guide_layout, log_joint, model_layout, richer_than_mean_field
from ppl_vae.inference.local_fit import LocalBlock, fit_local
from ppl_vae.inference.meanfield import HALF_LOG_2PI_E, MeanFieldGuide, guide_moments
from ppl_vae.inference.modes import check_positive, in_eval_mode

if TYPE_CHECKING:  # xarray is imported where used
    import xarray as xr

__all__ = ["RefineResult", "refine"]

NEVER = -1.0
"""A plateau tolerance no window can meet: ``|change| <= -1 * |previous|`` never holds, so every
block takes exactly ``num_steps`` steps (SA-VAE's fixed K)."""


GUIDE_ITSELF = "the guide itself (a diagonal Gaussian per datapoint)"


def start_words(richer: Optional[str]) -> str:
    """:attr:`RefineResult.start` for a guide that is richer than a diagonal Gaussian in the way
    ``richer`` says (:func:`~ppl_vae.inference.latents.richer_than_mean_field`), or is not (None)."""
    if richer is None:
        return GUIDE_ITSELF
    return f"the diagonal Gaussian with the guide's per-datapoint moments, not the guide ({richer})"


@dataclass
class RefineResult:
    """What :func:`refine` returns; every per-datapoint tensor has ``N`` rows.

    ``loc``, ``scale``: the refined q_K(z|x) (``(N, *event_shape)`` for one latent site, the flat
    ``(N, layout.size)`` of every continuous site otherwise); ``init_loc``, ``init_scale``: the
    encoder's q_0 it started from. ``elbo_before``/``elbo_after``: the ELBO of q_0 and of q_K,
    each from the same ``num_eval_samples`` standard normals (common random numbers: z = loc +
    scale * eps with one eps for both), with the Gaussian entropy in closed form, and their Monte
    Carlo standard errors; ``gap``: ``elbo_after - elbo_before`` (the amortization gap that the
    steps close) with the standard error of the paired differences, far smaller than either
    ELBO's. ``num_steps``: ``(N,)`` optimizer steps taken. ``trace``: ``(block, step)`` the mean
    ELBO per datapoint at each step (the optimizer's own noisy estimates; NaN after a block stopped).
    """

    loc: Tensor
    scale: Tensor
    init_loc: Tensor
    init_scale: Tensor
    elbo_before: Tensor
    elbo_before_stderr: Tensor
    elbo_after: Tensor
    elbo_after_stderr: Tensor
    gap: Tensor
    gap_stderr: Tensor
    num_steps: Tensor
    trace: Tensor
    num_eval_samples: int
    layout: Optional[Layout] = None
    start: str = GUIDE_ITSELF
    """What q_0 is: the guide itself (a diagonal Gaussian per datapoint), or, for a richer guide
    (a flow, a hierarchy's conditional chain, a mixture), the diagonal Gaussian with its moments,
    whose ELBO is not the guide's."""

    def guide(self) -> MeanFieldGuide:
        """The refined q_K as a guide over the N datapoints (one row per datapoint, in the order of
        ``x``): ``importance_estimate(model, result.guide(), x, ...)`` gives each batch its rows."""
        return MeanFieldGuide(self.loc, self.scale.log(), layout=self.layout)

    def initial_guide(self) -> MeanFieldGuide:
        """q_0, the encoder's Gaussian the refinement started from, as a guide over the N datapoints."""
        return MeanFieldGuide(self.init_loc, self.init_scale.log(), layout=self.layout)

    def to_dataset(self) -> "xr.Dataset":
        """The ELBOs and the gap over ``datapoint``, loc/scale over (datapoint, latent)."""
        import xarray as xr

        def vec(t: Tensor) -> Any:
            return t.detach().cpu().double().numpy()

        def flat(t: Tensor) -> Any:
            return t.detach().reshape(t.shape[0], -1).cpu().double().numpy()

        q0 = "the encoder's q(z|x)" if self.start == GUIDE_ITSELF else f"q_0, {self.start}"
        described = {
            "elbo_before": ("lower bound", f"Monte Carlo ELBO of {q0}, nats (lower bound)"),
            "elbo_before_stderr": ("neither", "Monte Carlo standard error of elbo_before (nats)"),
            "elbo_after": ("lower bound", "Monte Carlo ELBO of the refined q(z|x), nats (lower bound)"),
            "elbo_after_stderr": ("neither", "Monte Carlo standard error of elbo_after (nats)"),
            "gap": ("neither", "elbo_after - elbo_before: the amortization gap the steps closed (nats)"),
            "gap_stderr": ("neither", "Monte Carlo standard error of gap (paired draws; nats)"),
        }
        ds = xr.Dataset(
            {name: ("datapoint", vec(getattr(self, name))) for name in described},
            coords={"datapoint": range(self.loc.shape[0])},
        )
        for name, (bound, long_name) in described.items():
            ds[name].attrs.update({"bound": bound, "long_name": long_name})
        for name in ("loc", "scale", "init_loc", "init_scale"):
            ds[name] = (("datapoint", "latent"), flat(getattr(self, name)))
        ds["num_steps"] = ("datapoint", self.num_steps.cpu().numpy())
        ds.attrs.update(
            method="refine",
            start=self.start,
            num_eval_samples=int(self.num_eval_samples),
            reference="Kim et al. (2018) SA-VAE; Marino et al. (2018) iterative amortized inference",
        )
        return ds


def _elbo_draws(
    model: Callable, xb: Tensor, kw: Dict[str, Any], layout: Layout, loc: Tensor, log_scale: Tensor, eps: Tensor
) -> Tensor:
    """log p(x, z_s) + H[q] at z_s = loc + scale * eps_s, ``(S, B)``: each draw's term of the ELBO
    of q = N(loc, diag(scale^2)) with its Gaussian entropy in closed form."""
    z = loc + log_scale.exp() * eps
    latents = {layout.sites[0].name: z} if len(layout.sites) == 1 else layout.split(z)
    entropy = log_scale.reshape(loc.shape[0], -1).sum(-1) + loc[0].numel() * HALF_LOG_2PI_E
    return log_joint(model, xb, latents, layout=layout, **kw) + entropy


def _mean_se(draws: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean over draws (dim 0) and its standard error, each ``(B,)`` (NaN se from one draw)."""
    k = draws.shape[0]
    se = draws.std(0) / math.sqrt(k) if k > 1 else torch.full_like(draws[0], math.nan)
    return draws.mean(0), se


_Block = Tuple[Tensor, ...]


@in_eval_mode("model", "guide")
def refine(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_steps: int = 100,
    lr: float = 1e-2,
    num_samples: int = 1,
    batch_size: int = 500,
    progress: bool = False,
    num_eval_samples: int = 100,
    tol: Optional[float] = None,
    window: int = 20,
    average: bool = False,
    **model_kwargs: Any,
) -> RefineResult:
    """Refine each datapoint's q(z|x) from the encoder's output by ``num_steps`` Adam steps on its own ELBO.

    ``model(x, **model_kwargs)`` and ``guide`` follow the contract (latent sites in the
    ``"data"`` plate, observed ``"x"``); only the per-datapoint (loc, log scale) are optimized,
    the model and guide are frozen and in eval mode. The start q_0 is the diagonal Gaussian with
    the guide's per-datapoint means and standard deviations
    (:func:`~ppl_vae.inference.meanfield.guide_moments`): the guide itself for a diagonal
    Gaussian encoder. With several continuous latent sites, q is one diagonal Gaussian over the
    flat vector of all of them.

    Each step estimates the ELBO with ``num_samples`` reparameterized draws per datapoint (SA-VAE
    uses one) and the Gaussian entropy in closed form; the optimizer is Adam with learning rate
    ``lr`` (SA-VAE uses SGD with momentum; Adam's per-coordinate step sizes make one ``lr`` serve
    posteriors of very different widths). ``tol=None`` (default) takes exactly ``num_steps``
    steps; a number stops a block of ``batch_size`` datapoints earlier when its mean ELBO over a
    ``window`` of steps changes relatively by at most ``tol``. ``average`` keeps the mean iterate
    of the last full window (Polyak averaging) instead of the last one. The ELBOs before and
    after are then estimated with ``num_eval_samples`` common draws (see :class:`RefineResult`).
    ``seed``: the refinement's own random stream (the caller's RNG state is left as it was).
    """
    for name, value in (
        ("num_steps", num_steps),
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("num_eval_samples", num_eval_samples),
        ("window", window),
    ):
        check_positive(name, value)
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if tol is not None and not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be None (a fixed number of steps) or a number >= 0, got {tol}")
    if x.shape[0] == 0:
        raise ValueError("x holds no datapoints")

    layout = model_layout(model, x, **model_kwargs)
    if not layout.sites:
        raise ValueError("the model has no continuous latent site to refine")
    guide_layout(guide, x, layout, **model_kwargs)
    single = len(layout.sites) == 1

    def start(xb: Tensor, kw: Dict[str, Any], index: slice) -> LocalBlock[_Block]:
        loc0, scale0 = guide_moments(guide, xb, None if single else layout, **kw)
        log_scale0 = scale0.clamp_min(1e-6).log()
        loc = loc0.detach().clone().requires_grad_(True)
        log_scale = log_scale0.detach().clone().requires_grad_(True)

        def loss() -> Tensor:
            eps = torch.randn((num_samples,) + tuple(loc.shape), dtype=loc.dtype, device=loc.device)
            return -_elbo_draws(model, xb, kw, layout, loc, log_scale, eps).mean(0).sum()

        def finish(fitted: List[Tensor], history: List[float], done: bool) -> _Block:
            loc_k, log_scale_k = fitted
            with torch.no_grad():
                eps = torch.randn((num_eval_samples,) + tuple(loc0.shape), dtype=loc0.dtype, device=loc0.device)
                before = _elbo_draws(model, xb, kw, layout, loc0, log_scale0, eps)
                after = _elbo_draws(model, xb, kw, layout, loc_k, log_scale_k, eps)
            return (
                loc_k.clone(),
                log_scale_k.exp(),
                loc0.detach().clone(),
                scale0.detach().clone(),
                *_mean_se(before),
                *_mean_se(after),
                *_mean_se(after - before),
            )

        return LocalBlock([loc, log_scale], loss, finish)

    fit = fit_local(
        x,
        model_kwargs,
        start,
        what="refine",
        modules=(model, guide),
        lr=lr,
        max_steps=num_steps,
        window=window,
        tol=NEVER if tol is None else tol,
        num_lr_decays=0,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
        average=average,
    )
    (loc, scale, init_loc, init_scale, before, before_se, after, after_se, gap, gap_se) = (
        torch.cat(p) for p in zip(*fit.blocks)
    )
    return RefineResult(
        loc,
        scale,
        init_loc,
        init_scale,
        before,
        before_se,
        after,
        after_se,
        gap,
        gap_se,
        num_steps=fit.num_steps,
        trace=fit.trace,
        num_eval_samples=num_eval_samples,
        layout=layout,
        start=start_words(richer_than_mean_field(guide, x, **model_kwargs)),
    )
