"""log p(x) and the ELBO with a categorical latent site summed out exactly, value by value.

For a model with a categorical site c over C values and a guide q(c | x) q(z | x, c) (M2's y,
the GMVAE's component), the marginal is a finite sum,

    p(x) = sum_c p(x, c),   p(x, c) = E_{q(z|x,c)}[ p(x, c, z) / q(z | x, c) ],

so each p(x, c) is estimated by importance weighting with the site clamped to c (Burda et al.
2015) and the C estimates are added: an unbiased estimate of p(x) whose log is a stochastic
lower bound on log p(x), with no sampling of c (stratified over its values). The ELBO with c
summed out is the exact expectation over q(c | x) of the per-value ELBOs plus the entropy of
q(c | x) (Kingma et al. 2014, eq. 7):

    U(x) = sum_c q(c | x) [ ELBO_c(x) - log q(c | x) ],  ELBO_c = E_{q(z|x,c)}[log p(x, c, z) - log q(z|x, c)].

The pair must accept ``component=`` (an integer tensor ``(N,)``) that clamps the site in both
model and guide, as :class:`ppl_vae.models.discrete.EnumeratedCategoricalVAE` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import xarray as xr
from pyro import poutine
from torch import Tensor

from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.modes import batches, check_positive, in_eval_mode, seeded


@dataclass
class EnumeratedEstimate:
    """Per-datapoint results, each ``(N,)`` unless said: ``log_px`` log p̂(x) with the site
    summed out and its Monte Carlo ``log_px_stderr`` (delta method over the C independent
    per-value estimates); ``elbo`` U(x) with ``elbo_stderr``; ``log_joint`` ``(N, C)`` the
    per-value log p̂(x, c); ``log_q`` ``(N, C)`` log q(c | x)."""

    log_px: Tensor
    log_px_stderr: Tensor
    elbo: Tensor
    elbo_stderr: Tensor
    log_joint: Tensor
    log_q: Tensor
    num_samples: int

    @property
    def log_posterior(self) -> Tensor:
        """The estimated p(c | x), as logs ``(N, C)``."""
        return self.log_joint - self.log_px.unsqueeze(-1)

    def to_dataset(self) -> xr.Dataset:
        n, c = self.log_joint.shape
        arr = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        ds = xr.Dataset(
            {
                "log_px": ("datapoint", arr(self.log_px)),
                "log_px_stderr": ("datapoint", arr(self.log_px_stderr)),
                "elbo": ("datapoint", arr(self.elbo)),
                "elbo_stderr": ("datapoint", arr(self.elbo_stderr)),
                "log_joint": (("datapoint", "value"), arr(self.log_joint)),
                "log_q": (("datapoint", "value"), arr(self.log_q)),
            },
            coords={"datapoint": np.arange(n), "value": np.arange(c)},
            attrs={
                "num_samples": int(self.num_samples),
                "method": "iw_enumerated",
                "reference": "Burda et al. (2015) per value; Kingma et al. (2014) eq. 7",
            },
        )
        return ds


@torch.no_grad()
def guide_value_log_probs(guide: Callable, x: Tensor, site: str, **kwargs: Any) -> Tensor:
    """log q(c | x) ``(N, C)`` of the guide's categorical ``site`` (traced once, no draw kept)."""
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device.index or 0]):
        trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x, **kwargs)
    node = trace.nodes.get(site)
    if node is None or not hasattr(node["fn"], "logits"):
        raise ValueError(f"the guide has no categorical sample site {site!r}")
    return torch.log_softmax(node["fn"].logits, -1).expand(x.shape[0], -1)


@torch.no_grad()
def check_enumerable(model: Callable, x: Tensor, site: str, num_values: int, **kwargs: Any) -> None:
    """A one-line ValueError unless ``model`` samples ``site`` from a distribution over exactly
    ``num_values`` values that it marks for enumeration."""
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device.index or 0]):
        trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(x, **kwargs)
    node = trace.nodes.get(site)
    if node is None or node["type"] != "sample" or node["is_observed"]:
        raise ValueError(f"the model has no latent sample site {site!r}")
    fn: Any = node["fn"]
    name = type(getattr(fn, "base_dist", fn)).__name__
    if not (fn.support.is_discrete and getattr(fn, "has_enumerate_support", False)):
        raise ValueError(
            f"site {site!r} ({name}) cannot be enumerated: it needs a finite discrete support "
            "(Categorical, Bernoulli, ...); sample it from the guide or relax it instead"
        )
    if (node.get("infer") or {}).get("enumerate") != "parallel":
        raise ValueError(
            f"site {site!r} cannot be enumerated as the model samples it: mark it infer={{'enumerate': 'parallel'}}"
        )
    size = int(fn.enumerate_support(expand=False).shape[0])
    if size != num_values:
        raise ValueError(f"site {site!r} takes {size} values, not num_values={num_values}")


@torch.no_grad()
@in_eval_mode("model", "guide")
def enumerated_estimate(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    site: str,
    num_values: int,
    num_samples: int = 1000,
    batch_size: int = 100,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> EnumeratedEstimate:
    """log p̂(x) = log sum_c p̂(x, c) and U(x) for ``model``/``guide`` with categorical ``site``
    over ``num_values`` values (see the module docstring), ``num_samples`` draws of z per value.

    The site is clamped to each value in turn, so labels passed as ``y`` do not change log p̂(x)
    (they would clamp q(c | x) in ``elbo`` and ``log_q``): score M2 without them.
    ``seed``: each value draws from its own stream (and each block of datapoints, as in
    :func:`~ppl_vae.inference.importance.importance_estimate`); the caller's RNG state is kept.
    """
    check_positive("num_samples", num_samples)
    check_positive("num_values", num_values)
    n = x.shape[0]
    if "component" in kwargs:
        raise ValueError("enumerated_estimate clamps the site itself: do not pass component")
    check_enumerable(
        model,
        x[:2],
        site,
        num_values,
        **{k: (v[:2] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v) for k, v in kwargs.items()},
    )
    log_joint, log_joint_se, elbo_c, elbo_c_se = [], [], [], []
    for c in range(num_values):
        component = torch.full((n,), c, dtype=torch.long, device=x.device)
        est = importance_estimate(
            model,
            guide,
            x,
            num_samples=num_samples,
            batch_size=batch_size,
            tail_diagnostic=False,
            seed=None if seed is None else seed + 7919 * (c + 1),
            component=component,
            **kwargs,
        )
        log_joint.append(est.log_px)
        log_joint_se.append(est.log_px_stderr)
        elbo_c.append(est.elbo)
        elbo_c_se.append(est.elbo_stderr)
    lj, lj_se = torch.stack(log_joint, -1), torch.stack(log_joint_se, -1)
    log_p = lj.logsumexp(-1)
    # delta method: Var(p̂)/p^2 = sum_c (p_c / p)^2 Var(p̂_c)/p_c^2, and se(log p̂_c) = sd(p̂_c)/p_c
    log_p_se = ((2 * (lj - log_p.unsqueeze(-1))).exp() * lj_se.square()).sum(-1).sqrt()
    parts = []
    with seeded(None if seed is None else seed, x.device):
        for xb, kw in batches(x, kwargs, batch_size):
            parts.append(guide_value_log_probs(guide, xb, site, **kw))
    log_q = torch.cat(parts).to(lj.dtype)
    q = log_q.exp()
    ec, ec_se = torch.stack(elbo_c, -1), torch.stack(elbo_c_se, -1)
    # 0 * log 0 is 0: values with no mass under q add nothing
    elbo = (q * (ec - torch.where(q > 0, log_q, torch.zeros_like(log_q)))).sum(-1)
    elbo_se = (q.square() * ec_se.square()).sum(-1).sqrt()
    return EnumeratedEstimate(log_p, log_p_se, elbo, elbo_se, lj, log_q, num_samples)
