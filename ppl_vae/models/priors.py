"""Priors p(z): modules whose ``forward()`` returns a Distribution with event shape (latent_dim,).

Learnable priors keep their parameters as ordinary module parameters, so they train with
the decoder. Add a prior by subclassing :class:`Prior` and registering it in :data:`PRIORS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from torch import nn

from ppl_vae.registry import Registry

PRIORS: Registry = Registry("prior")


class Prior(nn.Module):
    """Base class: ``latent_dim`` is the size of z."""

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim

    def forward(self) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


@PRIORS.register("standard_normal")
class StandardNormalPrior(Prior):
    """N(0, I), the prior of AEVB."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers, so the prior follows the module to the chosen device.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register("mixture_of_gaussians")
class MixtureOfGaussiansPrior(Prior):
    """A learnable mixture of ``num_components`` diagonal Gaussians (weights, means, scales)."""

    def __init__(self, latent_dim: int, num_components: int = 10, init_scale: float = 1.0):
        super().__init__(latent_dim)
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.num_components = num_components
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim) * init_scale)
        # softplus(0.5413) = 1: components start with unit scale.
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, F.softplus(self.raw_scales) + 1e-4).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


def make_prior(name: str, latent_dim: int, **options) -> Prior:
    """Build a registered prior by name; options go to its constructor."""
    return PRIORS.get(name)(latent_dim, **options)
