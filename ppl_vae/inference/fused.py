"""A fused ELBO for pairs that offer the fast-path protocol: the same estimator as Pyro's
Trace_ELBO or TraceMeanField_ELBO, computed from per-datapoint log densities without tracing.

Pyro's tracing costs a fixed time per step (building traces, site bookkeeping, NaN hooks); a
pair that declares the protocol of :mod:`ppl_vae.inference.latents` (``has_fast_path``,
``sample_guide``, ``log_prior``, ``log_likelihood``; :class:`ppl_vae.models.VAE` does) gives the
terms directly. The parts-based VAE draws z with the same call Pyro makes (``rsample`` of the
guide's Normal), so with the same RNG state the loss and gradients equal Pyro's estimator; the
tests check that. Any other pair trains through Pyro.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Tuple, cast

from pyro import distributions as dist
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from ppl_vae.inference.capabilities import offers
from ppl_vae.inference.latents import FastPair, guide_and_prior


class _EncoderGuide(FastPair, Protocol):
    """A pair whose guide is its encoder's Gaussian (``encoder_is_guide``), with a prior to take a KL to."""

    encoder: Callable[[Tensor], Tuple[Tensor, Tensor]]
    prior: Callable[[], Distribution]

    def sample_gaussian_guide(self, loc: Tensor, scale: Tensor, num_particles: Optional[int] = None) -> Any: ...


def supports_fused_elbo(vae: object) -> bool:
    """True when ``vae`` declares the fast-path protocol (``has_fast_path``) and scales every
    latent site's KL term by the one loop weight (a model declaring ``kl_weight_per_site``,
    e.g. a per-layer warm-up, trains through Pyro's traces), or sums its discrete sites out in
    one batched computation (``has_enumerated_fast_path``: M2, the GMVAE)."""
    return offers(vae, "fast_path", "one_kl_weight") or offers(vae, "enumerated_fast_path")


def fused_enumerated_loss(
    vae: Any,
    x: Tensor,
    *,
    y: Optional[Tensor] = None,
    num_data: int | None = None,
    kl_weight: float = 1.0,
    num_particles: int = 1,
) -> Tensor:
    """-ELBO of the minibatch ``x`` with the discrete site summed out (TraceEnum_ELBO's
    estimator), scaled by ``num_data / len(x)`` and averaged over particles, from the model's
    ``enumerated_elbo`` (one batched computation over the site's values)."""
    scale = 1.0 if num_data is None else num_data / x.shape[0]
    elbo = vae.enumerated_elbo(x, y, kl_weight=kl_weight, num_particles=num_particles if num_particles > 1 else None)
    return -elbo.sum() * (scale / num_particles)


def fused_elbo_loss(
    vae: FastPair,
    x: Tensor,
    *,
    num_data: int | None = None,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    analytic_kl: bool = False,
) -> Tensor:
    """-ELBO of the minibatch ``x`` scaled by ``num_data / len(x)``, averaged over particles.

    ``analytic_kl=False`` is AEVB's estimator A (Trace_ELBO): log p(x|z) + log p(z) - log q(z|x)
    at z ~ q. ``analytic_kl=True`` is estimator B (TraceMeanField_ELBO): log p(x|z) - KL(q || p)
    with the KL in closed form where torch knows it (a Gaussian encoder guide,
    ``encoder_is_guide``, and a prior with a known KL), else estimated as in A.
    """
    batch_size = x.shape[0]
    scale = 1.0 if num_data is None else num_data / batch_size
    particles = num_particles if num_particles > 1 else None
    latent = None
    if analytic_kl and offers(vae, "encoder_guide"):
        gaussian = cast(_EncoderGuide, vae)
        loc, z_scale = gaussian.encoder(x)  # once: for the draws and for the KL
        latents, log_q = gaussian.sample_gaussian_guide(loc, z_scale, particles)
        try:
            latent = -kl_divergence(dist.Normal(loc, z_scale).to_event(1), gaussian.prior())
        except NotImplementedError:
            latent = None
        if latent is None:
            latent = vae.log_prior(x, latents) - log_q
    else:
        latents, log_q, log_prior = guide_and_prior(vae, x, particles)
        latent = log_prior - log_q
    log_lik = vae.log_likelihood(x, latents)
    elbo = log_lik.sum() + kl_weight * latent.expand(log_lik.shape).sum()
    return -elbo * (scale / num_particles)
