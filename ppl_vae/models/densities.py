"""Closed-form log densities used on every training step, computed without building a
distribution object (the fused ELBO's hot path). Each repeats torch's own arithmetic, so the
values equal ``torch.distributions.Normal(loc, scale).log_prob`` to rounding."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.distributions.utils import _standard_normal

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def normal_log_prob(value: Tensor, loc: Union[Tensor, float] = 0.0, scale: Union[Tensor, float] = 1.0) -> Tensor:
    """log N(value; loc, scale) element-wise (broadcast), as Normal.log_prob computes it."""
    log_scale = scale.log() if torch.is_tensor(scale) else math.log(scale)
    return -((value - loc) ** 2) / (2 * scale**2) - log_scale - HALF_LOG_2PI


def normal_draw(loc: Tensor, scale: Tensor, num_particles: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(z, log q(z)) for z = loc + eps * scale, eps the standard-normal call Pyro's
    ``Normal.rsample`` makes for the same batch shape (``num_particles``, or None, adds a
    particle dim in front), and log q summed over the last dim. log q is computed from eps,
    -eps^2/2 - log scale - log(2 pi)/2, the same number as ``normal_log_prob(z, loc, scale)`` to
    rounding with about half the element-wise passes (the hierarchies' training step)."""
    shape = loc.shape if num_particles is None else torch.Size((num_particles,)) + loc.shape
    eps = _standard_normal(shape, dtype=loc.dtype, device=loc.device)
    z = loc + eps * scale
    return z, (eps.square().mul(-0.5) - scale.log()).sum(-1) - HALF_LOG_2PI * loc.shape[-1]
