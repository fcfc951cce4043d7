"""Run directories: config, checkpoint and history, each written atomically.

Layout::

    RUN/config.json          RunConfig as JSON
    RUN/checkpoint.safetensors  model weights, optimizer state, RNG state, epoch (safetensors:
                                 plain tensors and JSON metadata, so loading never executes code)
    RUN/history.nc           per-epoch history (xarray Dataset, netCDF)

A file is written to a temporary name in the same folder and renamed into place, so a run
killed at any moment leaves the previous complete file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import xarray as xr

from ppl_vae.config import RunConfig
from ppl_vae.errors import RunDirError
from ppl_vae.io import atomic_path, remove_stale_temp_files, write_netcdf, write_text  # noqa: F401 (re-exported until callers move)

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.nc"


def save_config(run_dir: Path, config: RunConfig) -> None:
    write_text(Path(run_dir) / CONFIG, config.to_json() + "\n")


def load_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {CONFIG} is missing")
    try:
        return RunConfig.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise RunDirError(f"{path}: {exc}") from None


def _flatten_optimizers(optimizers: Dict[str, torch.optim.Optimizer]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Optimizer state dicts as flat tensors ``optim.NAME.IDX.KEY`` plus JSON metadata."""
    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, Any] = {}
    for opt_name, optimizer in optimizers.items():
        if "." in opt_name:
            raise ValueError(f"optimizer name {opt_name!r} must not contain '.'")
        state = optimizer.state_dict()
        scalars: Dict[str, Any] = {}
        for idx, param_state in state["state"].items():
            for key, value in param_state.items():
                name = f"optim.{opt_name}.{idx}.{key}"
                if torch.is_tensor(value):
                    tensors[name] = value.detach().cpu().contiguous()
                else:
                    scalars[name] = value
        meta[opt_name] = {
            "type": type(optimizer).__name__,
            "param_groups": state["param_groups"],
            "scalars": scalars,
        }
    return tensors, meta


def optimizer_states(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The optimizer state dicts saved by :func:`save_checkpoint`, by optimizer name.

    Each also carries ``"type"``, the optimizer's class name; pop it before ``load_state_dict``.
    """
    saved = meta.get("optimizers", {})
    states: Dict[str, Dict[str, Any]] = {
        name: {"state": {}, "param_groups": m["param_groups"], "type": m.get("type")}
        for name, m in saved.items()
    }
    scalars = {k: v for m in saved.values() for k, v in m.get("scalars", {}).items()}
    for name, value in list(tensors.items()) + list(scalars.items()):
        if not name.startswith("optim."):
            continue
        _, opt_name, idx, key = name.split(".", 3)
        states[opt_name]["state"].setdefault(int(idx), {})[key] = value
    return states


def save_checkpoint(
    run_dir: Path,
    module: torch.nn.Module,
    optimizers: Dict[str, torch.optim.Optimizer] | None,
    *,
    epoch: int,
    step: int,
    extra: Dict[str, Any] | None = None,
) -> None:
    """Weights, optimizer state and the torch RNG state after ``epoch`` (0: before training)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta: Dict[str, Any] = {"epoch": epoch, "step": step, "extra": extra or {}}
    if optimizers:
        optim_tensors, meta["optimizers"] = _flatten_optimizers(optimizers)
        tensors.update(optim_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    path = Path(run_dir) / CHECKPOINT
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ppl_vae": json.dumps(meta)})


def read_checkpoint(run_dir: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, metadata) of a run's checkpoint; corrupt or unsafe files raise RunDirError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {CHECKPOINT}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head[:2] == b"\x80\x02" or head[:2] == b"PK":
            raise RunDirError(f"{path} is a pickle/zip file, not safetensors; refusing to load it")
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["ppl_vae"])
    except RunDirError:
        raise
    except (SafetensorError, KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is corrupt or not a ppl_vae checkpoint ({str(exc).splitlines()[0]})") from None
    return tensors, meta


def load_weights(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], path: str = "") -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise RunDirError(f"weights in {path or 'checkpoint'} do not fit the model: {str(exc).splitlines()[0]}") from None


def save_history(run_dir: Path, history: xr.Dataset) -> None:
    write_netcdf(history, Path(run_dir) / HISTORY)


def load_history(run_dir: Path) -> xr.Dataset:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {HISTORY}")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return ds.load()
    except Exception as exc:  # h5py/h5netcdf raise many types for damaged files
        raise RunDirError(f"{path} is corrupt ({type(exc).__name__})") from None
