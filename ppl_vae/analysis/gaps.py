"""The inference-gap decomposition of Cremer, Li & Duvenaud (2018), per datapoint.

For a fitted model and its amortized guide q(z|x):

    log p(x) - L[q] = (log p(x) - L[q*]) + (L[q*] - L[q])
    inference gap   =  approximation gap  +  amortization gap

where q* is the best diagonal Gaussian for that datapoint alone (non-amortized mean-field VI,
:mod:`ppl_vae.inference.meanfield`) and log p(x) is estimated by importance weighting with K
samples from q (Burda et al. 2015). Both gaps are >= 0 up to Monte Carlo and optimization
error. Only the model/guide contract is used, so any conforming pair can be analysed.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import Tensor

from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.meanfield import MeanFieldResult, fit_mean_field, guide_moments

ESTIMATORS = ("log_px", "iw_amortized", "iw_meanfield", "elbo_meanfield", "elbo_amortized")
"""estimator coordinate: log p̂ (the larger of the two IW estimates); log p̂_K with q as the
proposal; log p̂_K with q* as the proposal; L[q*]; L[q]."""

GAPS = ("approximation_gap", "amortization_gap", "inference_gap")

LABELS = {
    "log_px": "log p̂(x) (best IW estimate)",
    "iw_amortized": "log p̂(x) (IW, amortized q)",
    "elbo_meanfield": "L[q*] (mean-field VI)",
    "elbo_amortized": "L[q] (amortized)",
    "iw_meanfield": "log p̂(x) (IW, q* proposal)",
    "approximation_gap": "approximation gap log p̂ − L[q*]",
    "amortization_gap": "amortization gap L[q*] − L[q]",
    "inference_gap": "inference gap log p̂ − L[q]",
}


def gap_decomposition(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    mean_field: Optional[MeanFieldResult] = None,
    mean_field_options: Optional[Dict[str, Any]] = None,
    datapoint: Optional[Sequence[int]] = None,
    progress: bool = True,
    **kwargs: Any,
) -> xr.Dataset:
    """Per-datapoint estimates and gaps as an xarray Dataset (Cremer et al. 2018).

    ``x``: ``(N, ...)``; tensor kwargs with one row per datapoint (``y`` labels) go with it.
    log p̂ and L[q] come from the same ``num_samples`` importance samples of the amortized
    guide; L[q*] from :func:`~ppl_vae.inference.meanfield.fit_mean_field` (run here with
    ``mean_field_options`` unless a fitted ``mean_field`` is given; its evaluation also uses
    ``num_samples`` unless the options say otherwise); log p̂ is the larger of the IW
    estimates with q and with q* as proposals. ``datapoint``: the indices of ``x``
    in its dataset, stored as the ``datapoint`` coordinate.

    Returns variables ``estimate`` and ``stderr`` over (datapoint, estimator) (see
    :data:`ESTIMATORS`), the gaps and their standard errors over datapoint, the ESS of both
    proposals, and the (loc, scale) of q and q* over (datapoint, latent).
    """
    amortized = importance_estimate(model, guide, x, num_samples=num_samples, batch_size=batch_size,
                                    particle_batch_size=particle_batch_size, progress=progress, **kwargs)
    if mean_field is None:
        options = {"num_eval_samples": num_samples, "progress": progress, **(mean_field_options or {})}
        mean_field = fit_mean_field(model, x, guide=guide, **options, **kwargs)
    elif mean_field.loc.shape[0] != x.shape[0]:
        raise ValueError(f"mean_field holds {mean_field.loc.shape[0]} datapoints but x has {x.shape[0]}")
    q_loc, q_scale = guide_moments(guide, x, **kwargs)
    mf = mean_field.estimate

    n = x.shape[0]
    as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    flat = lambda t: as_np(t.reshape(n, -1))  # noqa: E731
    raw = ESTIMATORS[1:]
    estimate = np.stack([as_np(amortized.log_likelihood), as_np(mf.log_likelihood), as_np(mf.elbo),
                         as_np(amortized.elbo)], axis=1)
    stderr = np.stack([as_np(amortized.log_likelihood_stderr), as_np(mf.log_likelihood_stderr),
                       as_np(mf.elbo_stderr), as_np(amortized.elbo_stderr)], axis=1)
    coords = {
        "datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint),
        "estimator": list(raw),
        "latent": np.arange(flat(q_loc).shape[1]),
    }
    ds = xr.Dataset(
        {
            "estimate": (("datapoint", "estimator"), estimate),
            "stderr": (("datapoint", "estimator"), stderr),
            "ess_amortized": ("datapoint", as_np(amortized.ess)),
            "ess_meanfield": ("datapoint", as_np(mf.ess)),
            "amortized_loc": (("datapoint", "latent"), flat(q_loc)),
            "amortized_scale": (("datapoint", "latent"), flat(q_scale)),
            "meanfield_loc": (("datapoint", "latent"), flat(mean_field.loc)),
            "meanfield_scale": (("datapoint", "latent"), flat(mean_field.scale)),
        },
        coords=coords,
    )
    ds.attrs.update(
        {
            "reference": "Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders",
            "num_samples": int(num_samples),
            "meanfield_num_samples": int(mf.num_samples),
            "meanfield_converged_batches": int(mean_field.converged.sum()),
            "meanfield_num_batches": int(mean_field.converged.numel()),
            "meanfield_max_steps_taken": int(mean_field.num_steps.max()),
        }
    )
    return decompose(ds)


def decompose(estimates: xr.Dataset) -> xr.Dataset:
    """Add log p̂ (the larger IW estimate per datapoint) and the three gaps to a Dataset of estimates.

    ``estimates`` holds ``estimate`` and ``stderr`` over (datapoint, estimator) with at least
    iw_amortized, iw_meanfield, elbo_meanfield and elbo_amortized; any gaps already there
    are recomputed.
    """
    ds = estimates.drop_vars([g for g in GAPS + tuple(f"{g}_stderr" for g in GAPS) if g in estimates])
    ds = ds.drop_sel(estimator=[e for e in ("log_px",) if e in ds.estimator.values])
    est, se = ds["estimate"], ds["stderr"]
    iw = est.sel(estimator=["iw_amortized", "iw_meanfield"])
    best = iw.argmax("estimator")
    log_px = iw.isel(estimator=best).drop_vars("estimator").expand_dims(estimator=["log_px"])
    log_px_se = se.sel(estimator=["iw_amortized", "iw_meanfield"]).isel(estimator=best).drop_vars("estimator")
    ds = xr.concat([xr.Dataset({"estimate": log_px, "stderr": log_px_se.expand_dims(estimator=["log_px"])}),
                    ds[["estimate", "stderr"]]], dim="estimator").merge(ds.drop_vars(["estimate", "stderr", "estimator"]))
    ds = ds.sel(estimator=[e for e in ESTIMATORS if e in ds.estimator.values]).transpose("datapoint", "estimator", ...)
    est, se = ds["estimate"], ds["stderr"]
    pairs = {
        "approximation_gap": ("log_px", "elbo_meanfield"),
        "amortization_gap": ("elbo_meanfield", "elbo_amortized"),
        "inference_gap": ("log_px", "elbo_amortized"),
    }
    for name, (hi, lo) in pairs.items():
        ds[name] = est.sel(estimator=hi, drop=True) - est.sel(estimator=lo, drop=True)
        # The two terms use independent samples, so their Monte Carlo variances add.
        ds[f"{name}_stderr"] = np.hypot(se.sel(estimator=hi, drop=True), se.sel(estimator=lo, drop=True))
        ds[name].attrs["long_name"] = LABELS[name]
    ds["estimate"].attrs["units"] = "nats"
    ds["log_px_source"] = xr.DataArray(np.array(["iw_amortized", "iw_meanfield"])[best.values], dims="datapoint")
    ds.attrs = dict(estimates.attrs)  # concat/merge drop them
    return ds


def gap_table(gaps: xr.Dataset) -> pd.DataFrame:
    """Mean over datapoints of each estimator and gap, with two standard errors.

    ``se``: the spread across datapoints, sd / sqrt(N) (how well the mean over the data
    population is known). ``mc_se``: the Monte Carlo error of the mean for these datapoints,
    sqrt(sum_i se_i^2) / N.
    """
    rows = []
    n = gaps.sizes["datapoint"]

    def row(name: str, values: xr.DataArray, stderr: xr.DataArray) -> None:
        v = values.values
        rows.append(
            {
                "quantity": name,
                "description": LABELS[name],
                "mean": float(np.mean(v)),
                "se": float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                "mc_se": float(np.sqrt(np.nansum(stderr.values**2)) / n),
                "median": float(np.median(v)),
            }
        )

    for e in gaps.estimator.values:
        row(str(e), gaps["estimate"].sel(estimator=e), gaps["stderr"].sel(estimator=e))
    for g in GAPS:
        row(g, gaps[g], gaps[f"{g}_stderr"])
    return pd.DataFrame(rows).set_index("quantity")


def format_gap_table(table: pd.DataFrame) -> str:
    """The table as aligned text: ``mean ± se`` per quantity (nats)."""
    width = max(len(d) for d in table["description"])
    lines = [f"{'quantity':<{width}}  {'mean ± se (nats)':>22}  {'MC se':>7}"]
    for _, r in table.iterrows():
        lines.append(f"{r['description']:<{width}}  {r['mean']:>12.3f} ± {r['se']:<7.3f}  {r['mc_se']:>7.3f}")
    return "\n".join(lines)
