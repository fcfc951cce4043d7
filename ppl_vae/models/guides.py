"""Guide families q(z|x) for a VAE: the registry behind ``ModelConfig.guide``.

A guide builder takes an assembled :class:`~ppl_vae.models.vae.VAE` and options and returns
the VAE whose ``guide`` draws z from that family; the site stays ``"z"`` inside
``pyro.plate("data")``, so training and analysis work unchanged.

- ``diagonal_normal``: AEVB's q(z|x) = N(loc(x), diag(scale(x)^2)), the VAE as built.
- ``iaf``: that Gaussian pushed through ``num_flows`` inverse autoregressive flows conditioned
  on the encoder's output (Kingma et al. 2016), built from Pyro's
  :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`.

A VAE with a flow guide overrides ``guide`` and the protocol's ``sample_guide`` with it, so it
keeps the fast path (:mod:`ppl_vae.inference.latents`); it declares ``encoder_is_guide = False``,
so methods that call the encoder directly (wake-sleep, MCEM) refuse it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, cast

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from pyro.distributions import transforms as T
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from ppl_vae.models.priors import _hidden_dims, check_options
from ppl_vae.models.vae import VAE, data_plate
from ppl_vae.registry import Registry

GUIDES: Registry[Callable[..., VAE]] = Registry("guide")


@GUIDES.register("diagonal_normal", doc="AEVB's q(z|x) = N(loc(x), diag(scale(x)^2)) from the encoder; no options")
def diagonal_normal(vae: VAE) -> VAE:
    """The VAE as built: its base-class guide is the diagonal Gaussian."""
    return vae


class IAFGuideVAE(VAE):
    """A VAE whose guide is the encoder's diagonal Gaussian followed by inverse autoregressive flows.

    z_0 ~ N(loc(x), diag(scale(x)^2)); z_t = f_t(z_{t-1}; c) for t = 1..num_flows, each f_t an
    affine autoregressive transform (IAF, Kingma et al. 2016; the numerically stable form of
    their eq. 14) whose networks take z and the context c = [loc(x), log scale(x)]. Sampling and
    log q of the guide's own draws take one network pass per flow; log q of other points (e.g.
    DReG's re-scoring with detached parameters) inverts the flows, latent_dim passes each.
    The parameters live in ``flows``. ``encode``/``reconstruct`` use the base Gaussian's loc.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        prior,
        likelihood,
        event_shape: Sequence[int],
        *,
        num_flows: int = 2,
        hidden_dims: Optional[Sequence[int]] = None,
    ):
        super().__init__(encoder, decoder, prior, likelihood, event_shape)
        d = self.latent_dim
        if d < 2:
            raise ValueError(f"guide 'iaf' needs latent_dim >= 2 (autoregressive transforms), got {d}")
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be >= 1, got {num_flows!r}")
        hidden = _hidden_dims(hidden_dims, 3 * d + 1)
        self.flows = nn.ModuleList(
            T.conditional_affine_autoregressive(d, 2 * d, hidden, stable=True) for _ in range(num_flows)
        )

    def guide_distribution(self, x: Tensor) -> dist.TransformedDistribution:
        """q(z|x) for a batch ``x``: batch shape ``(N,)``, event shape ``(latent_dim,)``."""
        loc, scale = self.encoder(x)
        context = torch.cat([loc, scale.log()], dim=-1)
        base = dist.Normal(loc, scale).to_event(1)
        flows = cast(Sequence[ConditionalTransformModule], self.flows)
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in flows])

    encoder_is_guide = False
    has_fast_path = True  # its guide and sample_guide draw through the same flows (tests compare them)

    def sample_guide(self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None):
        """(``{"z": z}``, log q(z|x)) for z drawn through the flows (the fast-path protocol)."""
        q = self.guide_distribution(x)
        z = q.rsample(() if num_particles is None else (num_particles,))
        return {"z": z}, q.log_prob(z)

    def guide(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """q(z|x): the encoder's Gaussian through the IAF steps; ``y`` is ignored."""
        with data_plate(x, num_data):
            q = self.guide_distribution(x)
            with poutine.scale(scale=kl_weight):
                return pyro.sample("z", q)


@GUIDES.register(
    "iaf",
    doc="inverse autoregressive flows on the encoder's Gaussian (Kingma et al. 2016); "
    "options num_flows (2), hidden_dims",
)
def iaf(vae: VAE, num_flows: int = 2, hidden_dims: Optional[Sequence[int]] = None) -> IAFGuideVAE:
    """The same parts with an IAF guide; needs a VAE that uses the base class's model and guide.

    ``num_flows``: IAF steps; ``hidden_dims``: hidden sizes of each step's autoregressive
    network (default ``[3 * latent_dim + 1]``).
    """
    if not vae.has_fast_path or not vae.encoder_is_guide:
        raise ValueError(
            f"guide 'iaf' needs a VAE whose guide is its encoder's Gaussian and whose model is "
            f"built from its parts; {type(vae).__name__} is not"
        )
    return IAFGuideVAE(
        vae.encoder,
        vae.decoder,
        vae.prior,
        vae.likelihood,
        vae.event_shape,
        num_flows=num_flows,
        hidden_dims=hidden_dims,
    )


def make_guide(name: str, vae: VAE, **options) -> VAE:
    """``vae`` with the registered guide family ``name``; unknown options raise ValueError."""
    builder = GUIDES.get(name)
    check_options("guide", name, builder, options, skip=1)
    return builder(vae, **options)
