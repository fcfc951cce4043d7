"""Results as ArviZ InferenceData and xarray files (ArviZ itself comes from :mod:`ppl_vae.arviz_compat`).

ArviZ 1.x (an ``xarray.DataTree`` with one child per group; Python >= 3.12) and 0.x
(``arviz.InferenceData``) are both supported: ``idata.posterior["z_amortized"]`` and
:func:`inference_data_groups` read either.

:func:`guide_draws` draws z from each guide (the amortized q(z|x) and the mean-field q*)
for a set of datapoints; :func:`to_inference_data` puts them in the groups ArviZ knows:

- ``posterior``: ``<site>_<guide>`` for each latent site over (chain, draw, datapoint, latent)
  (the latent dim is ``latent`` for site ``z``, ``<site>_latent`` for others);
- ``log_likelihood``: ``x_<guide>`` = log p(x_i | z) per draw and datapoint;
- ``sample_stats``: ``log_weight_<guide>`` = log p(x, z) - log q(z|x) per draw and datapoint
  (the importance weights behind the IW estimate of log p(x)).

Files are written atomically (:mod:`ppl_vae.io`) as netCDF (h5netcdf).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import xarray as xr

from ppl_vae.io import netcdf_in_memory, write_netcdf, write_with

if TYPE_CHECKING:
    from torch import Tensor


def _arviz() -> Any:
    """(ArviZ's major version, the arviz module), imported on first use: writing a netCDF file of
    estimates (``evaluate``) needs neither ArviZ nor its 1 s import."""
    from ppl_vae import arviz_compat

    return arviz_compat.ARVIZ_MAJOR, arviz_compat.az


def __getattr__(name: str) -> Any:  # results.az and results.ARVIZ_MAJOR, as before, imported when read
    if name in ("az", "ARVIZ_MAJOR"):
        major, az = _arviz()
        return az if name == "az" else major
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
) -> Dict[str, Dict[str, Any]]:
    """For each named guide, ``num_draws`` draws of every latent site with log p(x|z) and log-weights.

    Returns ``{name: {"latents": {site: (S, N, *event)}, "log_likelihood": (S, N), "log_weight": (S, N)}}``
    (see :func:`ppl_vae.inference.importance.importance_samples`).
    """
    import torch

    from ppl_vae.inference.importance import importance_samples

    with torch.no_grad():
        return {name: importance_samples(model, g, x, num_samples=num_draws, **kwargs) for name, g in guides.items()}


def _groups(
    draws: Mapping[str, Mapping[str, Any]],
    datapoint: Optional[Sequence[int] | np.ndarray],
    attrs: Optional[Dict[str, Any]],
) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, np.ndarray], Dict[str, List[str]], Dict[str, Any]]:
    """(groups {group: {variable: array}}, coords, dims, root attrs) of :func:`guide_draws` output."""
    if not draws:
        raise ValueError("draws is empty: give at least one guide's draws")
    posterior, log_lik, stats = {}, {}, {}
    dims: Dict[str, List[str]] = {}
    n = 0
    for name, d in draws.items():
        for site, value in d["latents"].items():
            z = _numpy(value)
            s, n = z.shape[0], z.shape[1]
            posterior[f"{site}_{name}"] = z.reshape(s, n, -1)[None]  # (chain=1, draw, datapoint, latent)
            dims[f"{site}_{name}"] = ["datapoint", "latent" if site == "z" else f"{site}_latent"]
        log_lik[f"x_{name}"] = _numpy(d["log_likelihood"])[None]
        stats[f"log_weight_{name}"] = _numpy(d["log_weight"])[None]
        dims[f"x_{name}"] = ["datapoint"]
        dims[f"log_weight_{name}"] = ["datapoint"]
    coords = {"datapoint": np.arange(n) if datapoint is None else np.asarray(datapoint)}
    all_attrs = {"inference_library": "pyro", "guides": ", ".join(draws), **(attrs or {})}
    groups = {"posterior": posterior, "log_likelihood": log_lik, "sample_stats": stats}
    return groups, coords, dims, all_attrs


def to_inference_data(
    draws: Mapping[str, Mapping[str, Any]],
    *,
    datapoint: Optional[Sequence[int] | np.ndarray] = None,
    attrs: Optional[Dict[str, Any]] = None,
) -> InferenceData:
    """ArviZ InferenceData (a DataTree under ArviZ 1.x) from :func:`guide_draws` output (one chain per guide)."""
    groups, coords, dims, all_attrs = _groups(draws, datapoint, attrs)
    major, az = _arviz()
    if major >= 1:  # groups in one mapping; the attrs go on the root, as 0.x's on the InferenceData
        tree = az.from_dict(groups, coords=coords, dims=dims)
        tree.attrs.update(all_attrs)
        return tree
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=all_attrs)


def save_draws(
    draws: Mapping[str, Mapping[str, Any]],
    path: Path,
    *,
    datapoint: Optional[Sequence[int] | np.ndarray] = None,
    attrs: Optional[Dict[str, Any]] = None,
) -> Path:
    """:func:`to_inference_data` of ``draws`` written as :func:`save_inference_data` writes it, without
    importing ArviZ (about 1 s): each group a netCDF group of (chain, draw, datapoint, ...) with
    integer coordinates, the attrs on the root. :func:`load_inference_data` (ArviZ 0.x or 1.x)
    reads it back as the same groups, values, dims and coordinates; written atomically."""
    from datetime import datetime, timezone

    groups, coords, dims, all_attrs = _groups(draws, datapoint, attrs)
    created = {"created_at": datetime.now(timezone.utc).isoformat(), "creation_library": "ppl_vae"}
    datasets = {}
    for group, variables in groups.items():
        data_vars: Dict[str, Any] = {}
        ds_coords: Dict[str, np.ndarray] = {}
        for var, value in variables.items():
            names = ["chain", "draw", *dims[var]]
            data_vars[var] = (names, value)
            for dim, size in zip(names, value.shape):
                ds_coords.setdefault(dim, coords[dim] if dim in coords else np.arange(size))
        datasets[group] = xr.Dataset(data_vars, coords=ds_coords, attrs=created)

    def write(target: Any) -> None:
        xr.Dataset(attrs=all_attrs).to_netcdf(target, mode="w", engine="h5netcdf")
        for group, ds in datasets.items():
            ds.to_netcdf(target, mode="a", group=group, engine="h5netcdf")

    data = netcdf_in_memory(write)  # in memory where xarray can (io.netcdf_in_memory says why)
    if data is None:
        return write_with(Path(path), write)
    return write_with(Path(path), lambda tmp: tmp.write_bytes(data))


def inference_data_groups(idata: InferenceData) -> List[str]:
    """The group names of ``idata`` (``posterior``, ``log_likelihood``, ...), for either ArviZ."""
    if _arviz()[0] >= 1:  # an xarray.DataTree: one child per group
        return list(idata.children)
    return list(idata.groups())


def save_inference_data(idata: InferenceData, path: Path) -> Path:
    """Write ``idata`` to a netCDF file atomically; returns ``path``."""
    return write_with(Path(path), lambda tmp: idata.to_netcdf(str(tmp), engine="h5netcdf"))


def load_inference_data(path: Path) -> InferenceData:
    """Read InferenceData written by :func:`save_inference_data` (into memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    major, az = _arviz()
    idata = az.from_netcdf(str(path), engine="h5netcdf")
    if major >= 1:
        return idata.load()
    for group in idata.groups():
        idata[group].load()  # in place: assigning the group again would list it twice in groups()
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
