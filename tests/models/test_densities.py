"""The closed-form log densities of the fused paths against torch.distributions (float64, so the
comparison is to rounding of the formulas, not of float32)."""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal

from ppl_vae.models.densities import normal_draw, normal_log_prob


def test_normal_log_prob_equals_torchs():
    g = torch.Generator().manual_seed(0)
    value, loc = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    scale = torch.rand(7, 5, generator=g, dtype=torch.float64) + 0.1
    assert torch.allclose(normal_log_prob(value, loc, scale), Normal(loc, scale).log_prob(value), rtol=1e-12)
    assert torch.allclose(normal_log_prob(value), Normal(0.0, 1.0).log_prob(value), rtol=1e-12)


def test_normal_draw_is_pyros_draw_and_its_log_density():
    loc = torch.randn(4, 3, dtype=torch.float64)
    scale = torch.rand(4, 3, dtype=torch.float64) + 0.2
    for particles in (None, 2):
        torch.manual_seed(3)
        z, log_q = normal_draw(loc, scale, particles)
        torch.manual_seed(3)
        shape = () if particles is None else (particles,)
        expected = Normal(loc, scale).rsample(shape)  # the same standard-normal call, so the same z
        assert torch.equal(z, expected)
        assert torch.allclose(log_q, Normal(loc, scale).log_prob(z).sum(-1), rtol=1e-12)
    _, log_q = normal_draw(torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
    assert log_q.shape == (1,) and float(log_q) <= -2 * math.log(2 * math.pi)  # the density's maximum
