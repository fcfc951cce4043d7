"""Results as ArviZ InferenceData and xarray files. The only module that imports ArviZ.

ArviZ 1.x (an ``xarray.DataTree`` with one child per group; Python >= 3.12) and 0.x
(``arviz.InferenceData``) are both supported: ``idata.posterior["z_amortized"]`` and
:func:`inference_data_groups` read either. The version switch lives in this module alone.

:func:`guide_draws` draws z from each guide (the amortized q(z|x) and the mean-field q*)
for a set of datapoints; :func:`to_inference_data` puts them in the groups ArviZ knows:

- ``posterior``: ``z_<guide>`` over (chain, draw, datapoint, latent);
- ``log_likelihood``: ``x_<guide>`` = log p(x_i | z) per draw and datapoint;
- ``sample_stats``: ``log_weight_<guide>`` = log p(x, z) - log q(z|x) per draw and datapoint
  (the importance weights behind the IW estimate of log p(x)).

Files are written atomically (:mod:`ppl_vae.io`) as netCDF (h5netcdf).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ppl_vae.io import write_netcdf, write_with

if TYPE_CHECKING:
    from torch import Tensor

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x announces its refactor on import
    import arviz as az

#: ArviZ's major version: 1 builds xarray DataTrees (arviz-base/arviz-stats), 0 InferenceData
ARVIZ_MAJOR = int(az.__version__.split(".")[0])
#: what :func:`to_inference_data` returns: ``xarray.DataTree`` (ArviZ 1.x) or ``arviz.InferenceData`` (0.x)
InferenceData = Any


def _numpy(value: Any) -> np.ndarray:
    """A tensor or array as float64 numpy (tensors detached and moved to the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def guide_draws(
    model: Callable,
    guides: Mapping[str, Callable],
    x: Tensor,
    *,
    num_draws: int = 100,
    **kwargs: Any,
) -> Dict[str, Dict[str, Tensor]]:
    """For each named guide, ``num_draws`` z ~ q(z|x) with log p(x|z) and log-weights.

    Returns ``{name: {"z": (S, N, d), "log_likelihood": (S, N), "log_weight": (S, N)}}``
    (see :func:`ppl_vae.inference.importance.importance_samples`).
    """
    import torch

    from ppl_vae.inference.importance import importance_samples

    with torch.no_grad():
        return {name: importance_samples(model, g, x, num_samples=num_draws, **kwargs) for name, g in guides.items()}


def to_inference_data(
    draws: Mapping[str, Mapping[str, Tensor]],
    *,
    datapoint: Optional[Sequence[int]] = None,
    attrs: Optional[Dict[str, Any]] = None,
) -> InferenceData:
    """ArviZ InferenceData (a DataTree under ArviZ 1.x) from :func:`guide_draws` output (one chain per guide)."""
    if not draws:
        raise ValueError("draws is empty: give at least one guide's draws")
    posterior, log_lik, stats = {}, {}, {}
    dims: Dict[str, list] = {}
    n = 0
    for name, d in draws.items():
        z = _numpy(d["z"])
        s, n = z.shape[0], z.shape[1]
        posterior[f"z_{name}"] = z.reshape(s, n, -1)[None]  # (chain=1, draw, datapoint, latent)
        log_lik[f"x_{name}"] = _numpy(d["log_likelihood"])[None]
        stats[f"log_weight_{name}"] = _numpy(d["log_weight"])[None]
        dims[f"z_{name}"] = ["datapoint", "latent"]
        dims[f"x_{name}"] = ["datapoint"]
        dims[f"log_weight_{name}"] = ["datapoint"]
    coords = {"datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint)}
    all_attrs = {"inference_library": "pyro", "guides": ", ".join(draws), **(attrs or {})}
    groups: Dict[str, Any] = {"posterior": posterior, "log_likelihood": log_lik, "sample_stats": stats}
    if ARVIZ_MAJOR >= 1:  # groups in one mapping; the attrs go on the root, as 0.x's on the InferenceData
        tree = az.from_dict(groups, coords=coords, dims=dims)
        tree.attrs.update(all_attrs)
        return tree
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=all_attrs)


def inference_data_groups(idata: InferenceData) -> List[str]:
    """The group names of ``idata`` (``posterior``, ``log_likelihood``, ...), for either ArviZ."""
    if ARVIZ_MAJOR >= 1:  # an xarray.DataTree: one child per group
        return list(idata.children)
    return list(idata.groups())


FLAT_LOG_WEIGHTS = 1e-4  # nats: log-weights spread less than this are constant up to rounding


def psis_khat(log_weights: np.ndarray | Tensor) -> np.ndarray:
    """Pareto k̂ of each datapoint's importance weights (PSIS, Vehtari et al. 2024), via ArviZ's
    ``psislw`` (``arviz.psislw`` in 0.x, ``arviz_stats`` in 1.x).

    ``log_weights``: ``(K, N)``, K draws for each of N datapoints. k̂ is the shape of a
    generalized Pareto distribution fitted to the largest weights: below 0.5 the weights have
    finite variance; 0.5-0.7 the IW estimate is usable but noisy; above 0.7 its error is
    dominated by rare huge weights and its standard error cannot be trusted (use more samples, a
    better guide, or AIS). Weights constant to within 1e-4 nats (q equal to the posterior, up to
    float32 rounding of the log-weights) have no tail to fit: -inf. NaN where K is too small for
    a tail fit (ArviZ 0.x fits the top ceil(0.2 K) draws and needs 5 of them: K >= 21; 1.x
    needs more) or where the tail cannot be fitted (all its values equal).
    """
    lw = _numpy(log_weights)
    if lw.ndim != 2:
        raise ValueError(f"log_weights must have shape (num_samples, num_datapoints), got {lw.shape}")
    lw = (lw - lw.max(axis=0, keepdims=True)).T  # arviz reads the last dim as draws
    flat = lw.min(axis=1) > -FLAT_LOG_WEIGHTS
    if lw.shape[1] < 21:  # ArviZ fits the top ceil(0.2 K) draws and needs at least 5 of them
        khat = np.full(lw.shape[0], np.nan)
    elif ARVIZ_MAJOR >= 1:
        khat = np.array([np.nan if f else _khat_1x(row) for row, f in zip(lw, flat)])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flat tails: k̂ comes back inf, with a warning
            _, khat = az.psislw(lw)
    khat = np.asarray(khat, dtype=np.float64).reshape(lw.shape[0])
    khat[np.isposinf(khat)] = np.nan  # ArviZ's marker for "too few tail draws to fit"
    khat[flat] = -np.inf
    return khat


def _khat_1x(log_weights: np.ndarray) -> float:
    """k̂ of one datapoint's log-weights ``(K,)`` under ArviZ 1.x, whose ``psislw`` takes log
    *ratios* as LOO does (it smooths the tail of ``-ary``): pass the log-weights negated."""
    from arviz_stats.base import array_stats

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, khat = array_stats.psislw(-log_weights, axis=-1)
    except ValueError:  # too few tail draws, or a tail of equal values: nothing to fit
        return float("nan")
    return float(khat)


def save_inference_data(idata: InferenceData, path: Path) -> Path:
    """Write ``idata`` to a netCDF file atomically; returns ``path``."""
    return write_with(Path(path), lambda tmp: idata.to_netcdf(str(tmp), engine="h5netcdf"))


def load_inference_data(path: Path) -> InferenceData:
    """Read InferenceData written by :func:`save_inference_data` (into memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    idata = az.from_netcdf(str(path), engine="h5netcdf")
    if ARVIZ_MAJOR >= 1:
        return idata.load()
    for group in idata.groups():
        idata[group] = idata[group].load()
    return idata


def save_netcdf(ds: xr.Dataset, path: Path) -> Path:
    """Write an xarray Dataset to netCDF (h5netcdf) atomically; returns ``path``."""
    return write_netcdf(ds, Path(path))


def load_netcdf(path: Path) -> xr.Dataset:
    """Read a Dataset written by :func:`save_netcdf` into memory."""
    with xr.open_dataset(Path(path), engine="h5netcdf") as ds:
        return ds.load()


def save_csv(table: pd.DataFrame | xr.Dataset, path: Path) -> Path:
    """Write a table (a DataFrame, or a Dataset flattened to one row per coordinate) atomically."""
    if isinstance(table, xr.Dataset):
        table = table.to_dataframe()
    return write_with(Path(path), table.to_csv)
