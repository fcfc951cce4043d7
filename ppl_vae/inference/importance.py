"""Per-datapoint log importance weights for any model/guide pair that follows the contract.

For K particles z_k ~ q(z|x), log w_k = log p(x, z_k) - log q(z_k|x), vectorized over
particles with an outer plate. The ELBO is E_q[log w] and the importance-weighted bound of
Burda et al. (2015) is log (1/K) sum_k w_k.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Tuple

import pyro
import torch
from pyro import poutine
from torch import Tensor

PARTICLE_PLATE = "num_particles_vectorized"


def _site_log_prob(site: Dict[str, Any], shape: Tuple[int, int]) -> Tensor:
    log_p = site["log_prob"]
    try:
        return log_p.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"site {site['name']!r} has log-prob shape {tuple(log_p.shape)}, which does not "
            f"broadcast to (num_particles, num_datapoints) = {shape}; per-datapoint estimates need "
            "every sample site inside the 'data' plate"
        ) from None


def log_importance_weights(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    """log p(x, z_k) - log q(z_k | x), shape ``(num_particles, num_datapoints)``.

    ``model(x, *args, **kwargs)`` and ``guide(...)`` put datapoints in ``pyro.plate("data")``
    at dim -1 (or inside ``max_plate_nesting`` plates); the particles live in one more plate
    to the left, so the guide's networks run once per datapoint, not once per particle.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    num_data = x.shape[0]
    shape = (num_particles, num_data)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            x, *args, **kwargs
        )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = x.new_zeros(shape)
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            log_w = log_w + _site_log_prob(site, shape)
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            log_w = log_w - _site_log_prob(site, shape)
    return log_w


def _batches(x: Tensor, kwargs: Dict[str, Any], batch_size: int) -> Iterator[Tuple[Tensor, Dict[str, Any]]]:
    """Slices of ``x`` and of every tensor kwarg that has one row per datapoint."""
    n = x.shape[0]
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        batch_kwargs = {
            k: (v[sl] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v)
            for k, v in kwargs.items()
        }
        yield x[sl], batch_kwargs


@torch.no_grad()
def elbo_per_datapoint(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_particles: int = 1,
    batch_size: int = 1000,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    """Monte Carlo ELBO of each datapoint, E_q[log p(x,z) - log q(z|x)], shape ``(N,)``."""
    parts = [
        log_importance_weights(
            model, guide, xb, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kw
        ).mean(0)
        for xb, kw in _batches(x, kwargs, batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def iw_log_likelihood(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 100,
    batch_size: int = 1000,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    """Importance-weighted estimate log (1/K) sum_k w_k of log p(x) (Burda et al. 2015), ``(N,)``."""
    parts = []
    for xb, kw in _batches(x, kwargs, batch_size):
        log_w = log_importance_weights(
            model, guide, xb, num_particles=num_samples, max_plate_nesting=max_plate_nesting, **kw
        )
        parts.append(torch.logsumexp(log_w, 0) - math.log(num_samples))
    return torch.cat(parts)
