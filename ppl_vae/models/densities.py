"""Closed-form log densities used on every training step, computed without building a
distribution object (the fused ELBO's hot path). Each repeats torch's own arithmetic, so the
values equal ``torch.distributions.Normal(loc, scale).log_prob`` to rounding."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def normal_log_prob(value: Tensor, loc: Union[Tensor, float] = 0.0, scale: Union[Tensor, float] = 1.0) -> Tensor:
    """log N(value; loc, scale) element-wise (broadcast), as Normal.log_prob computes it."""
    log_scale = scale.log() if torch.is_tensor(scale) else math.log(scale)
    return -((value - loc) ** 2) / (2 * scale**2) - log_scale - HALF_LOG_2PI
