"""One per-datapoint trace of a model/guide pair: the guide traced, the model replayed on it.

Every estimator that needs log p(x, z), log p(x | z) or log q(z | x) per datapoint (the ELBO,
importance weights, ArviZ draws, anomaly scores, KL diagnostics) goes through
:func:`trace_pair` and :func:`log_probs`, so the contract (datapoints in ``pyro.plate("data")``,
particles in one plate to its left) is enforced in one place.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

import pyro
from pyro import poutine
from torch import Tensor

PARTICLE_PLATE = "num_particles_vectorized"


def trace_pair(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: Optional[int] = None,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tuple[poutine.Trace, poutine.Trace]:
    """(model trace, guide trace): the guide run on ``x``, the model replayed on its draws.

    With ``num_particles``, both run inside a particle plate at dim ``-(max_plate_nesting + 1)``,
    so the guide's networks run once per datapoint and its sites get a leading particle dim.
    """
    plate = (
        pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))
        if num_particles is not None
        else nullcontext()
    )
    with plate:
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    return model_trace, guide_trace


@dataclass
class LogProbs:
    """Per-datapoint log densities of one :func:`trace_pair`, each of shape ``shape``."""

    log_joint: Tensor  #: log p(x, z): every model sample site
    log_likelihood: Tensor  #: log p(x | z): the model's observed sites
    log_guide: Tensor  #: log q(z | x): the guide's latent sites

    @property
    def log_weight(self) -> Tensor:
        """log p(x, z) - log q(z | x)."""
        return self.log_joint - self.log_guide


def _site_log_prob(site: Mapping[str, Any], shape: Tuple[int, ...]) -> Tensor:
    log_p = site["log_prob"]
    try:
        return log_p.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"site {site['name']!r} has log-prob shape {tuple(log_p.shape)}, which does not "
            f"broadcast to {shape} (particles, datapoints); per-datapoint estimates need "
            "every sample site inside the 'data' plate"
        ) from None


def log_probs(model_trace: poutine.Trace, guide_trace: poutine.Trace, shape: Tuple[int, ...]) -> LogProbs:
    """Sum the traces' site log-probs per datapoint, each broadcast to ``shape``."""
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    joint = likelihood = guide = None
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            lp = _site_log_prob(site, shape)
            joint = lp if joint is None else joint + lp
            if site["is_observed"]:
                likelihood = lp if likelihood is None else likelihood + lp
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            lp = _site_log_prob(site, shape)
            guide = lp if guide is None else guide + lp
    if joint is None:
        raise ValueError("the model has no sample sites")
    zero = joint.new_zeros(shape)
    return LogProbs(joint, zero if likelihood is None else likelihood, zero if guide is None else guide)
