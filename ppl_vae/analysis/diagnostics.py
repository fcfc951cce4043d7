"""Posterior-collapse diagnostics: KL per latent dimension and active units.

A latent dimension u "collapses" when q(z_u|x) equals the prior for every x: it then carries
no information about x, its KL term is 0 and E_q[z_u] does not vary with x. Burda et al.
(2015, section 5.2) call u *active* when A_u = Cov_x(E_{q(z|x)}[z_u]) > 0.01.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, cast

import numpy as np
import torch
import xarray as xr
from pyro import distributions as dist
from torch import Tensor

from ppl_vae.inference.latents import model_layout
from ppl_vae.inference.meanfield import guide_moments
from ppl_vae.inference.modes import in_eval_mode, seeded
from ppl_vae.inference.traces import PARTICLE_PLATE, trace_pair

ACTIVE_UNIT_THRESHOLD = 0.01


def _factorized_normal(fn: dist.Distribution) -> Tuple[Tensor, Tensor]:
    base = fn
    while isinstance(base, (dist.Independent, dist.torch.Independent)):
        base = base.base_dist
    if not isinstance(base, (dist.Normal, torch.distributions.Normal)):
        raise ValueError(f"KL per dimension needs a factorized Gaussian prior and guide, got {type(base).__name__}")
    return base.loc, base.scale


def _site_kl(model_trace, guide_trace, site: str, n: int) -> Tensor:
    q_loc, q_scale = _factorized_normal(guide_trace.nodes[site]["fn"])
    p_loc, p_scale = _factorized_normal(model_trace.nodes[site]["fn"])
    # broadcast_tensors, not broadcast_shapes: the latter imports sympy (0.3-3 s) on first use
    q_loc, q_scale, p_loc, p_scale = torch.broadcast_tensors(q_loc, q_scale, p_loc, p_scale)
    return torch.distributions.kl_divergence(
        torch.distributions.Normal(q_loc, q_scale),
        torch.distributions.Normal(p_loc, p_scale),
    ).reshape(n, -1)


@torch.no_grad()
@in_eval_mode("model", "guide")
def kl_per_dimension(
    model: Callable,
    guide: Callable,
    x: Tensor,
    latent_site: Optional[str] = None,
    *,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> xr.DataArray:
    """KL(q(z_u|x) || p(z_u)) for each datapoint and latent dimension, dims (datapoint, latent).

    Closed form for diagonal-Gaussian guide sites and factorized Gaussian prior sites (e.g.
    AEVB's N(0, I)); the total KL of a datapoint is the sum over ``latent``. Averaged over
    datapoints, a value near 0 marks a collapsed dimension. Every continuous latent site is
    included (coordinate ``latent_site`` names each column's site) unless ``latent_site``
    picks one. For a hierarchical prior p(z1 | z2), the KL of z1 is that of its conditional at
    one draw of z2 from the guide: a one-sample estimate of the expected KL. ``seed``: that draw
    comes from a stream of its own and the caller's random state is left as it was (None: the
    caller's stream).
    """
    with seeded(seed, x.device):
        model_trace, guide_trace = trace_pair(model, guide, x, **kwargs)
    names = [latent_site] if latent_site is not None else list(model_layout(model, x, **kwargs).names)
    for name in names:
        if name not in guide_trace.nodes or name not in model_trace.nodes:
            raise ValueError(f"the model and guide need a sample site {name!r}")
    parts = [_site_kl(model_trace, guide_trace, name, x.shape[0]) for name in names]
    kl = torch.cat(parts, 1)
    sites = np.concatenate([np.full(p.shape[1], name) for name, p in zip(names, parts)])
    return xr.DataArray(
        kl.double().cpu().numpy(),
        dims=("datapoint", "latent"),
        coords={"datapoint": np.arange(x.shape[0]), "latent": np.arange(kl.shape[1]), "latent_site": ("latent", sites)},
        name="kl",
        attrs={"long_name": "KL(q(z_u|x) || p(z_u))", "units": "nats"},
    )


def active_units(
    posterior_mean: Tensor | np.ndarray | xr.DataArray, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> xr.Dataset:
    """Activity A_u = Var_x(E_q[z_u]) of each latent unit and whether it exceeds ``threshold``.

    ``posterior_mean``: ``(N, d)`` encoder means E_q[z|x] over a set of datapoints (Burda et
    al. 2015 use the test set). Returns ``activity`` and ``active`` over dim ``latent``, and
    attribute ``num_active``.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    mean = posterior_mean.values if isinstance(posterior_mean, xr.DataArray) else posterior_mean
    mean = mean.detach().double().cpu().numpy() if torch.is_tensor(mean) else np.asarray(mean, dtype=float)
    if mean.ndim != 2 or mean.shape[0] < 2:
        raise ValueError(f"posterior_mean must be (num_datapoints >= 2, latent_dim), got shape {mean.shape}")
    activity = mean.var(axis=0, ddof=1)
    ds = xr.Dataset(
        {"activity": ("latent", activity), "active": ("latent", activity > threshold)},
        coords={"latent": np.arange(mean.shape[1])},
    )
    ds["activity"].attrs["long_name"] = "Cov_x(E_q[z_u])"
    ds.attrs.update(
        {
            "threshold": float(threshold),
            "num_active": int((activity > threshold).sum()),
            "reference": "Burda, Grosse & Salakhutdinov (2015), section 5.2",
        }
    )
    return ds


POSTERIOR_MEAN_DRAWS = 256
"""Draws of the sites a guide samples first, over which a later site's conditional mean is averaged."""


def _posterior_means(guide: Callable, x: Tensor, layout, num_draws: int, seed: int, kwargs: dict) -> Tensor:
    """E_q[latents | x] ``(N, layout.size)`` for a guide with several sites: each site's conditional
    mean averaged over ``num_draws`` draws of the sites sampled before it (exact for a site with
    no latent parents). One draw would add the parents' sampling noise to Cov_x(E_q[z_u]) and
    count a collapsed unit of a lower layer as active."""
    import pyro
    from pyro import poutine

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with pyro.plate(PARTICLE_PLATE, num_draws, dim=-2):
            trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x, **kwargs)
    means = {}
    for site in layout.sites:
        if site.name not in trace.nodes:
            raise ValueError(f"the guide has no sample site {site.name!r}")
        mean = cast(torch.distributions.Distribution, trace.nodes[site.name]["fn"]).mean
        event = len(site.event_shape)
        means[site.name] = mean.mean(0) if mean.dim() > event + 1 else mean
    return layout.join(
        {k: v.expand((x.shape[0],) + v.shape[-len(s.event_shape) :]) for (k, v), s in zip(means.items(), layout.sites)},
        1,
    )


@torch.no_grad()
@in_eval_mode("model", "guide")
def collapse_diagnostics(
    model: Callable,
    guide: Callable,
    x: Tensor,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> xr.Dataset:
    """Mean KL per dimension and active units for datapoints ``x``, over dim ``latent``.

    KL is included only when prior and guide are factorized Gaussians (otherwise NaN). Every
    continuous latent site counts; the coordinate ``latent_site`` names each unit's site, and
    attribute ``num_active_<site>`` counts the active units of each. With several sites, E_q[z_u]
    of a site the guide samples after others is its conditional mean averaged over
    :data:`POSTERIOR_MEAN_DRAWS` draws of those. The draws (those and the one behind a hierarchical
    prior's KL) come from ``seed``; the caller's random state is left as it was.
    """
    layout = model_layout(model, x, **kwargs)
    if len(layout.sites) > 1:  # a hierarchical guide: average over the draws of each site's parents
        loc = _posterior_means(guide, x, layout, POSTERIOR_MEAN_DRAWS, seed, kwargs)
    else:
        loc, _ = guide_moments(guide, x, None, **kwargs)
    ds = active_units(loc.reshape(x.shape[0], -1), threshold)
    sites = layout.column_sites().astype(str)
    ds = ds.assign_coords(latent_site=("latent", sites))
    for name in layout.names:
        ds.attrs[f"num_active_{name}"] = int(ds["active"].values[sites == name].sum())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ds["kl"] = ("latent", kl_per_dimension(model, guide, x, **kwargs).mean("datapoint").values)
    except ValueError:
        ds["kl"] = ("latent", np.full(ds.sizes["latent"], np.nan))
    ds["kl"].attrs.update({"long_name": "mean over datapoints of KL(q(z_u|x) || p(z_u))", "units": "nats"})
    return ds
