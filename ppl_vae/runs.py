"""Run directories: config, checkpoint and history; :func:`save` and :func:`restore` side by side.

Layout::

    RUN/config.json             RunConfig as JSON (read strictly: see ppl_vae.config)
    RUN/checkpoint.safetensors  model weights, optimizer state, RNG state, epoch (safetensors:
                                plain tensors and JSON metadata, so loading never executes code)
    RUN/history.nc              per-epoch history (xarray Dataset, netCDF), from the first
                                finished epoch on (an epoch-0 checkpoint has none)
    RUN/checkpoint-best.safetensors  with a validation split (train.val_fraction): the weights
                                and state of the epoch with the best validation ELBO so far

Every file is written atomically (:mod:`ppl_vae.io`). :func:`save` writes the history first
and the checkpoint last: the checkpoint is the commit point. A kill between the two leaves a
history one epoch ahead, which :func:`restore` trims; the other order would lose an epoch of
history for good. A folder holding a config but no checkpoint is a run that never took its
first step (:func:`started` is False): resume starts it from scratch.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ppl_vae.config import RunConfig, TrainConfig
from ppl_vae.errors import RunConfigError, RunDirError
from ppl_vae.inference.optim import optimizer_kind
from ppl_vae.inference.training import (
    Callback,
    Stepper,
    TrainContext,
    TrainState,
    attach_lr_schedulers,
    check_train_names,
    epochs_since_best,
    history_records,
    history_to_xarray,
)
from ppl_vae.io import TEMP_SUFFIX, file_set, remove_stale_temp_files, write_netcdf, write_text, write_with

if TYPE_CHECKING:  # xarray is imported where used: fit needs none of it before its first step
    import xarray as xr

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_BEST = "checkpoint-best.safetensors"
HISTORY = "history.nc"

__all__ = [
    "CONFIG",
    "CHECKPOINT",
    "CHECKPOINT_BEST",
    "HISTORY",
    "Checkpointer",
    "load_config",
    "load_history",
    "read_checkpoint",
    "remove_stale_temp_files",
    "restore",
    "restore_learning_rates",
    "check_writable",
    "save",
    "save_config",
    "started",
    "is_reusable",
]


# -- config ---------------------------------------------------------------------------------------


def save_config(run_dir: Path, config: RunConfig) -> None:
    write_text(Path(run_dir) / CONFIG, config.to_json() + "\n", run_files=True)


def load_config(run_dir: Path, *, check_names: bool = True) -> RunConfig:
    """The run's config; a missing folder or file, bad JSON, unknown keys or wrong types raise RunDirError.

    ``check_names``: also refuse a method, objective, optimizer... that no registry holds
    (:func:`check_config_names`). A caller that imports the run's plugins first (they may
    register those names) passes False and checks after them."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {CONFIG} is missing")
    try:
        config = RunConfig.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise RunConfigError(f"{path}: {exc}") from None
    if check_names:
        check_config_names(run_dir, config)
    return config


def check_config_names(run_dir: Path, config: RunConfig) -> None:
    """Refuse a run config naming a method, objective, optimizer, elbo or KL schedule no registry
    holds (an optimizer 'Adam' would be read, recorded and never run), naming the file."""
    try:
        check_train_names(config.train)
    except (ValueError, TypeError) as exc:
        raise RunConfigError(f"{Path(run_dir) / CONFIG}: {exc}") from None


CONFIG_KEY = "config"
"""The key of the checkpoint's metadata ``extra`` holding the config its weights were trained under."""

MAY_MOVE = ("data.data_dir",)
"""Settings config.json may hold apart from its checkpoint's wherever the run is read: where its
data files are (a folder moved to another machine)."""

RESUME_MAY_DIFFER = ("train.epochs", "train.device", "plugins", *MAY_MOVE)
"""Settings config.json may hold apart from its checkpoint's on resume: the target it trains
to, where it runs and where its data is (and the plugins, which only register parts by name and
are imported under the trust rules of :mod:`ppl_vae.plugins`). Learning rate and optimizer change through ``fit
--resume --lr/--optimizer``, which write both together; every other setting is fixed when the
run is made."""


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_config_matches_checkpoint(
    run_dir: Path,
    config: RunConfig,
    meta: Dict[str, Any],
    *,
    sections: Sequence[str] = (),
    may_differ: Sequence[str] = (),
) -> None:
    """Refuse a config.json edited by hand since its checkpoint was written: a different model,
    likelihood, batch size or objective would be trained or scored on weights made under another
    (a RunDirError naming the first setting that differs). ``sections``: compare only these
    (``("model", "data")`` to score a run); ``may_differ``: dotted settings left out.
    A checkpoint written before the config was kept with it is not checked."""
    import dataclasses

    saved = (meta.get("extra") or {}).get(CONFIG_KEY)
    if not isinstance(saved, dict):
        return
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    keep = lambda path: (not sections or path.split(".")[0] in sections) and path not in may_differ  # noqa: E731
    old_flat, new_flat = _flat(saved), _flat(now)
    for path in sorted(set(old_flat) | set(new_flat)):
        if keep(path) and old_flat.get(path) != new_flat.get(path):
            raise RunConfigError(
                f"{Path(run_dir) / CONFIG} has '{path}' = {json.dumps(new_flat.get(path))} but the run's "
                f"checkpoint was trained with {json.dumps(old_flat.get(path))}: a run's settings are fixed when "
                "it is made (fit --resume changes --epochs, --lr, --optimizer and --device); restore config.json, or "
                "start a new run"
            )


@contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process while it continues training it: a second ``fit --resume``
    or ``animate`` of the same run is refused in one line instead of both reporting success while
    the later one's files replace the other's epochs. An advisory lock on the folder itself
    (flock), released when the process ends however it ends; nothing is written. Where the
    filesystem has no locks the run is not guarded. Re-entrant within a process."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    key = os.path.realpath(run_dir)
    if key in _HELD:  # this process holds it already (animate, then the resume it calls)
        yield
        return
    try:
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not a folder: the command's own checks say so
        yield
        return
    _HELD.add(key)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{run_dir} is being trained by another process (a fit --resume or animate of it is running): "
                "wait for it to end, then continue the run"
            ) from None
        except OSError:  # a filesystem without flock (some network mounts)
            pass
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)


_HELD: set = set()  # the run directories this process holds (exclusive), by real path


def started(run_dir: Path) -> bool:
    """Whether the run has a checkpoint (a run whose first checkpoint was never written has not)."""
    return (Path(run_dir) / CHECKPOINT).is_file()


def is_reusable(path: Path) -> bool:
    """True for a folder a fresh run may be written into: missing, empty, or a run that never
    started (a config and perhaps temporary files, no checkpoint, history or anything else)."""
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir() if not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))}
    return names <= {CONFIG}


# -- checkpoint -----------------------------------------------------------------------------------


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
        meta[opt_name] = {"type": optimizer_kind(optimizer), "param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def _optimizer_states(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The optimizer state dicts saved by :func:`save`, by optimizer name (each with its ``"type"``)."""
    saved = meta.get("optimizers", {})
    if not all(isinstance(m, dict) and isinstance(m.get("param_groups"), list) for m in saved.values()):
        raise RunDirError("the checkpoint is damaged: its optimizer metadata lacks 'param_groups'")
    states: Dict[str, Dict[str, Any]] = {
        name: {"state": {}, "param_groups": m["param_groups"], "type": m.get("type")} for name, m in saved.items()
    }
    scalars = {k: v for m in saved.values() for k, v in m.get("scalars", {}).items()}
    for name, value in list(tensors.items()) + list(scalars.items()):
        if not name.startswith("optim."):
            continue
        parts = name.split(".", 3)
        if len(parts) != 4 or not parts[2].isdigit() or parts[1] not in states:
            raise RunDirError(
                f"the checkpoint is damaged: optimizer state {name!r} is not named "
                "optim.OPTIMIZER.INDEX.KEY after an optimizer it records"
            )
        _, opt_name, idx, key = parts
        if not torch.is_tensor(value) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RunDirError(f"the checkpoint is damaged: optimizer state {name!r} is {_short(value)}, not a number")
        states[opt_name]["state"].setdefault(int(idx), {})[key] = value
    return states


def _json_safe(value: Any) -> Any:
    """Scheduler state as JSON: tensors and numpy scalars become lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's metadata")


def _encode_state(value: Any) -> Any:
    """A state dict as JSON-able data that :func:`_decode_state` turns back into the same
    types: JSON object keys are strings, so a dict with other keys (MultiStepLR's milestones, a
    Counter of ints) is kept as a tagged list of pairs."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and "__items__" not in value:
            return {k: _encode_state(v) for k, v in value.items()}
        return {
            "__items__": [[_encode_state(k), _encode_state(v)] for k, v in value.items()],
            "__type__": "Counter" if isinstance(value, Counter) else "dict",
        }
    if isinstance(value, (list, tuple)):
        return [_encode_state(v) for v in value]
    return value


def _decode_state(value: Any) -> Any:
    if isinstance(value, dict):
        if "__items__" in value:
            pairs = {_decode_state(k): _decode_state(v) for k, v in value["__items__"]}
            return Counter(pairs) if value.get("__type__") == "Counter" else pairs
        return {k: _decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_state(v) for v in value]
    return value


def save(
    run_dir: Path,
    vae: torch.nn.Module,
    stepper: Optional[Stepper],
    state: TrainState,
    *,
    attrs: Optional[dict] = None,
    extra: Optional[Dict[str, Any]] = None,
    checkpoint: str = CHECKPOINT,
    descriptions: Optional[Dict[str, str]] = None,
) -> None:
    """Write the history, then the checkpoint (weights, optimizer and learning-rate scheduler
    state, RNG state, epoch and step).

    ``extra``: JSON metadata kept with the weights (e.g. ``event_shape``, ``data_info``, so that
    :func:`ppl_vae.pipeline.load_run` can rebuild the model without loading the data).
    ``checkpoint``: the file name (:data:`CHECKPOINT_BEST` writes the best epoch's, and no history).
    ``descriptions``: what the history's variables beside the ELBOs are (``TrainContext.descriptions``).
    """
    from safetensors.torch import save as serialize

    run_dir = Path(run_dir)
    meta: Dict[str, Any] = {"epoch": state.epoch, "step": state.step, "extra": extra or {}}
    if state.records:
        # no epoch finished (the checkpoint before a fresh run's first step): there is no history
        # to write yet, and restore() reads an epoch-0 checkpoint without one; skipping it keeps
        # xarray and h5netcdf (0.3 s of imports) out of fit's start-up
        history = history_to_xarray(state.records, attrs, descriptions)
        # which history these weights continue: restore() refuses another run's history.nc
        meta[HISTORY_DIGEST_KEY] = history_digest(history, state.epoch)
        if checkpoint == CHECKPOINT:
            _interruptible(lambda: write_netcdf(history, run_dir / HISTORY, run_files=True))
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    if stepper is not None and stepper.optimizers:
        optim_tensors, meta["optimizers"] = _flatten_optimizers(stepper.optimizers)
        tensors.update(optim_tensors)
    if stepper is not None and stepper.schedulers:
        meta["schedulers"] = {name: _encode_state(sched.state_dict()) for name, sched in stepper.schedulers.items()}
    method_state = stepper.method_state() if stepper is not None else {}
    if method_state:
        meta["method_state"] = method_state
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    text = json.dumps(meta, default=_json_safe)
    # serialized in memory, then written as plain bytes: a full disk is an OSError naming the file
    # (safetensors' own writer raised its SafetensorError, printed as a traceback)
    data = serialize(tensors, metadata={"ppl_vae": text})
    write_with(run_dir / checkpoint, lambda tmp: tmp.write_bytes(data), run_files=True)


def read_checkpoint(
    run_dir: Path, *, tensors: bool = True, checkpoint: str = CHECKPOINT
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, metadata) of a run's checkpoint (``checkpoint``: its file name); corrupt or
    unsafe files raise RunDirError.

    ``tensors=False`` reads the metadata only (the tensors come back empty)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {checkpoint}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head[:2] == b"\x80\x02" or head[:2] == b"PK":
            raise RunDirError(f"{path} is a pickle/zip file, not safetensors; refusing to load it")
        with safe_open(str(path), framework="pt") as fh:
            try:
                meta = json.loads((fh.metadata() or {})["ppl_vae"])
            except RecursionError:
                raise ValueError("its metadata is JSON nested too deeply") from None
        loaded = load_file(str(path)) if tensors else {}
    except RunDirError:
        raise
    except KeyError:
        raise RunDirError(
            f"{path} is not a ppl_vae checkpoint: it has no 'ppl_vae' metadata (epoch, step, optimizer state)"
        ) from None
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is corrupt or not a ppl_vae checkpoint ({str(exc).splitlines()[0]})") from None
    _check_meta(path, meta)
    return loaded, meta


def _check_meta(path: Path, meta: Any) -> None:
    """The checkpoint's metadata holds a non-negative integer ``epoch`` and ``step``."""
    if not isinstance(meta, dict):
        raise RunDirError(f"{path} is damaged: its metadata is not a JSON object")
    for key in ("epoch", "step"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            what = "lacks" if key not in meta else f"has an invalid ({value!r})"
            raise RunDirError(f"{path} is damaged: its metadata {what} {key!r}; restore the file or start a new run")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise RunDirError(f"{path} is damaged: its metadata 'extra' is not a JSON object")
    for key in ("data_info", "train_data", "test_data"):  # read as objects: built into the model, compared
        if key in extra and not isinstance(extra[key], dict):
            raise RunDirError(
                f"{path} is damaged: its metadata 'extra.{key}' is {_short(extra[key])}, not a JSON object"
            )
    shape = extra.get("event_shape", [1])
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise RunDirError(
            f"{path} is damaged: its metadata 'extra.event_shape' is {_short(shape)}, not a list of positive integers"
        )
    if not isinstance(meta.get("optimizers", {}), dict):
        raise RunDirError(f"{path} is damaged: its metadata 'optimizers' is not a JSON object")


def checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of the run's checkpoint (0: saved before the first step), from its metadata alone."""
    return int(read_checkpoint(run_dir, tensors=False)[1]["epoch"])


def load_weights(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], path: str = "") -> None:
    """Load the checkpoint's weights into ``module``; a mismatch says which tensors differ and how."""
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    wanted = module.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(wanted[k].shape)}"
        for k in sorted(set(state) & set(wanted))
        if state[k].shape != wanted[k].shape
    ]
    if missing or unexpected or resized:
        parts = []
        if resized:
            parts.append(f"{len(resized)} of other shape (saved vs model): {_few(resized)}")
        if missing:
            parts.append(f"{len(missing)} missing: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model: {_few(unexpected)}")
        raise RunDirError(
            f"the weights in {path or 'the checkpoint'} do not fit the model built from its config: " + "; ".join(parts)
        )
    module.load_state_dict(state)


def _few(names: list, limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def restore(
    run_dir: Path,
    vae: torch.nn.Module,
    stepper: Optional[Stepper] = None,
    *,
    optimizer_state: bool = True,
    history_vars: Sequence[str] = (),
) -> TrainState:
    """The inverse of :func:`save`: weights into ``vae``, optimizer states into ``stepper``, the
    torch RNG state, and the history trimmed to the checkpoint's epoch; returns the TrainState.

    A checkpoint past epoch 0 without its history, a history without one of ``history_vars``
    (e.g. ``val_elbo`` for a run with a validation split), an optimizer the method does not have,
    or state of another optimizer type raise RunDirError. ``optimizer_state=False`` leaves the
    stepper's optimizers as they are (a resume that switches optimizer starts its state afresh);
    the learning-rate schedule's state is kept for :func:`restore_lr_schedules` either way.
    """
    run_dir = Path(run_dir)
    tensors, meta = read_checkpoint(run_dir)
    load_weights(vae, tensors, str(run_dir / CHECKPOINT))
    epoch = int(meta["epoch"])
    if stepper is not None and optimizer_state:
        try:
            saved_states = _optimizer_states(tensors, meta)
        except RunDirError as exc:
            raise RunDirError(f"{run_dir / CHECKPOINT}: {exc}") from None
        for name, saved in saved_states.items():
            if name not in stepper.optimizers:
                raise RunDirError(f"{run_dir}: checkpoint has state for an optimizer {name!r} that method has not")
            saved_type, wanted_type = saved.pop("type", None), optimizer_kind(stepper.optimizers[name])
            if saved_type is not None and saved_type != wanted_type:
                raise RunDirError(
                    f"{run_dir}: the checkpoint holds {saved_type} state but the config asks for {wanted_type}"
                )
            # the settings as the optimizer has them (a learning rate as text, eps null, three betas,
            # params naming no parameter), or the first step fails with torch's words, after loading
            # (a number where the fresh optimizer has a number: SGD's momentum 0 is an int until a
            # cyclic schedule sets it to 0.87; only params, the parameters' indices, are integers)
            fresh_groups = [
                {k: float(v) if type(v) is int and k != "params" else v for k, v in group.items()}
                for group in stepper.optimizers[name].state_dict()["param_groups"]
            ]
            problem = _state_mismatch(saved.get("param_groups"), fresh_groups, "param_groups")
            if problem is not None:
                raise RunDirError(f"{run_dir / CHECKPOINT} is damaged: optimizer {name!r} {problem}")
            try:
                stepper.optimizers[name].load_state_dict(saved)
            except (ValueError, KeyError, TypeError) as exc:
                raise RunDirError(f"optimizer state in {run_dir} does not fit: {' '.join(str(exc).split())}") from None
            _check_optimizer_shapes(stepper.optimizers[name], f"{run_dir / CHECKPOINT} (optimizer {name!r})")
    if stepper is not None:
        method_state = meta.get("method_state", {})
        try:
            if not isinstance(method_state, dict):
                raise ValueError("its metadata 'method_state' is not a JSON object")
            stepper.load_method_state(method_state)
        except ValueError as exc:
            raise RunDirError(f"{run_dir / CHECKPOINT} is damaged: {exc}") from None
        # loaded by restore_learning_rates (or training.attach_lr_schedulers) once the schedulers exist;
        # kept when the optimizer's state starts afresh: the schedule continues across a new optimizer
        saved_schedules = meta.get("schedulers", {})
        if not isinstance(saved_schedules, dict):
            raise RunDirError(f"{run_dir / CHECKPOINT} is damaged: its metadata 'schedulers' is not a JSON object")
        stepper.pending_scheduler_state = {
            name: _decode_state(state) for name, state in saved_schedules.items()
        } or None
    if (run_dir / HISTORY).is_file():
        history = load_history(run_dir)
        lacking = [name for name in history_vars if name not in history.data_vars]
        if lacking and epoch > 0:
            raise RunDirError(
                f"{run_dir / HISTORY} is damaged: it lacks {lacking[0]!r}, which this run records every "
                "epoch (its validation split, early stopping and best checkpoint read it); restore the "
                "file or start a new run"
            )
        records = [r for r in history_records(history) if r["epoch"] <= epoch]
    elif epoch > 0:
        raise RunDirError(
            f"{run_dir} has a checkpoint from epoch {epoch} but no {HISTORY}: the history of its "
            "epochs is lost; restore the file or start a new run"
        )
    else:
        records = []
    if [r["epoch"] for r in records] != list(range(1, epoch + 1)):
        raise RunDirError(f"{run_dir / HISTORY} does not hold epochs 1..{epoch} of the checkpoint")
    digest = meta.get(HISTORY_DIGEST_KEY)  # checkpoints from before it was recorded have none
    if records and digest is not None and digest != history_digest(history, epoch):
        raise RunDirError(
            f"{run_dir / HISTORY} is not the history of {run_dir / CHECKPOINT}: its epochs 1..{epoch} hold other "
            "numbers than the ones these weights were trained through (another run's history, or an edited one); "
            "restore the run's own file or start a new run"
        )
    try:
        torch.set_rng_state(tensors["rng.cpu"])
    except (KeyError, TypeError, RuntimeError):
        raise RunDirError(
            f"{run_dir / CHECKPOINT} is damaged: it lacks a valid tensor 'rng.cpu' (the random state "
            "a resumed run continues from)"
        ) from None
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return TrainState(epoch=epoch, step=int(meta["step"]), records=records)


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, what: str) -> None:
    """Every per-parameter state tensor (Adam's moments, Adagrad's sums) has its parameter's shape."""
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise RunDirError(
                    f"{what} is damaged: state {key!r} has shape {tuple(value.shape)} but its "
                    f"parameter has shape {tuple(param.shape)}"
                )


HISTORY_DIGEST_KEY = "history_digest"
"""The checkpoint metadata's digest of the history it continues (:func:`history_digest`)."""


def history_digest(history: "xr.Dataset", epoch: int) -> str:
    """A digest of a history's numbers up to ``epoch``: every per-epoch variable, a column at a
    time as float64 bytes (NaN included), so a checkpoint costs one pass over the history."""
    import hashlib

    import numpy as np

    keep = np.flatnonzero(np.asarray(history["epoch"].values) <= epoch)
    h = hashlib.sha256(np.asarray(history["epoch"].values[keep], dtype=np.float64).tobytes())
    for name in sorted(str(k) for k in history.data_vars):
        column = history[name]
        if column.dims == ("epoch",):
            h.update(name.encode())
            h.update(np.asarray(column.values[keep], dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


MOMENTUM_KEYS = ("betas", "momentum")
"""The param-group settings a momentum-cycling schedule moves; a resume puts back the checkpoint's."""


def restore_learning_rates(
    run_dir: Path, stepper: Stepper, config: TrainConfig, *, lr_scale: float = 1.0, fresh_optimizer: bool = False
) -> None:
    """After :func:`restore`: make the stepper's learning-rate schedulers, load the checkpoint's
    schedule state into them, and set every optimizer's rates where the schedule left them.

    The schedule continues across a resume: its epoch count and decayed rate go on even when
    the optimizer's own state starts afresh (``fresh_optimizer``: another train.optimizer).
    ``lr_scale`` (new train.lr / old) multiplies the rates a resume continues from, and the
    schedule's base rates, so the schedule goes on as if the run had started at the new rate.
    A run with a schedule whose checkpoint lacks its state, or holds state of the wrong shape or
    types, raises RunDirError (one line naming the checkpoint) before anything is written.
    """
    path = Path(run_dir) / CHECKPOINT
    saved = stepper.pending_scheduler_state or {}
    stepper.pending_scheduler_state = None
    # a schedule that cycles the momentum (CyclicLR, OneCycleLR) sets each group's betas/momentum
    # to its cycle's start when it is made; the checkpoint's optimizer state holds where it was
    momenta = {
        name: [{k: group[k] for k in MOMENTUM_KEYS if k in group} for group in optimizer.param_groups]
        for name, optimizer in stepper.optimizers.items()
    }
    schedulers = attach_lr_schedulers(stepper, config)  # made afresh: nothing is pending
    for name in saved:
        if name not in schedulers:
            raise RunDirError(
                f"{path} holds a learning-rate schedule for optimizer {name!r} but the run's "
                f"train.lr_schedule is {config.lr_schedule!r}; restore the run's config.json or start a new run"
            )
    for name, optimizer in stepper.optimizers.items():
        scheduler = schedulers.get(name)
        if scheduler is None:
            if not fresh_optimizer:  # a fresh optimizer already has the new rate
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * lr_scale
            continue
        if name not in saved:
            raise RunDirError(
                f"{path} lacks the learning-rate scheduler state of optimizer {name!r} (the run's "
                f"train.lr_schedule is {config.lr_schedule}), so the schedule would restart; restore "
                "the file or start a new run"
            )
        state = saved[name]
        problem = _state_mismatch(state, scheduler.state_dict())
        if problem is None:
            try:
                scheduler.load_state_dict(state)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                problem = " ".join(str(exc).split())
        if problem is not None:
            raise RunDirError(
                f"{path} is damaged: its learning-rate scheduler state for optimizer {name!r} {problem}; "
                "restore the file or start a new run"
            )
        last = state.get("_last_lr") or [group["lr"] for group in optimizer.param_groups]
        base = getattr(scheduler, "base_lrs", None)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(last[i]) * lr_scale  # a fresh optimizer starts at the schedule's rate too
            if not fresh_optimizer:
                group.update(momenta[name][i])
            if base is not None:
                base[i] = base[i] * lr_scale
                if "initial_lr" in group:
                    group["initial_lr"] = base[i]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _state_mismatch(saved: Any, fresh: Any, key: str = "") -> Optional[str]:
    """How ``saved`` (a scheduler's state read from a checkpoint) differs in kind from ``fresh``
    (the state a new scheduler of the run's config has): a phrase naming the key, or None.
    A damaged entry (``last_epoch`` as text) would otherwise fail only after an epoch's training."""
    if not key and not isinstance(saved, dict):
        return f"is {_short(saved)}, not a JSON object"
    if not key and "last_epoch" in fresh and "last_epoch" not in saved:
        return "lacks 'last_epoch'"
    if fresh is None:
        return None
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"has {key} = {_short(saved)}, not a JSON object"
        for k, v in fresh.items():
            if k in saved:
                problem = _state_mismatch(saved[k], v, f"{key}[{k!r}]" if key else repr(k))
                if problem is not None:
                    return problem
        return None
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(fresh):
            return f"has {key} = {_short(saved)}, not a list of {len(fresh)}"
        for i, (s, f) in enumerate(zip(saved, fresh)):
            problem = _state_mismatch(s, f, f"{key}[{i}]")
            if problem is not None:
                return problem
        return None
    number = isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(fresh, bool):
        ok, what = isinstance(saved, bool), "true or false"
    elif isinstance(fresh, int):
        ok, what = number and isinstance(saved, int), "an integer"
    elif isinstance(fresh, float):
        ok, what = number, "a number"
    elif isinstance(fresh, str):
        ok, what = isinstance(saved, str), "a string"
    else:
        return None
    return None if ok else f"has {key} = {_short(saved)}, not {what}"


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_writable(run_dir: Path, *, files: Sequence[str] = (), folders: Sequence[str] = ()) -> None:
    """Refuse (RunDirError, one line) a run directory where what a resume writes is a symlink or
    of the wrong kind: the run's own files (config, checkpoints, history) and ``files``/``folders``
    (a resume's sample grids, say). A received run directory could hold a link leading anywhere,
    and a resume writes nothing through one; a folder where a file goes (or a file where a folder
    goes) would fail only after training. Called before anything is written."""
    run_dir = Path(run_dir)
    wanted = [(name, "file") for name in (CONFIG, CHECKPOINT, CHECKPOINT_BEST, HISTORY, *files)]
    for name, kind in wanted + [(name, "folder") for name in folders]:
        path = run_dir / name
        if path.is_symlink():
            raise RunDirError(
                f"{path} is a symlink (to {os.readlink(path)}); a run's files are written in the run "
                "directory itself, never through a link: replace the link with what it points to, or start a new run"
            )
        if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
            other = "folder" if kind == "file" else "file"
            raise RunDirError(f"{path} is a {other} where the run writes a {kind}; move it away and resume again")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first 8 bytes of an HDF5 file, which a netCDF-4 history is."""


def check_history_file(run_dir: Path) -> None:
    """A one-line RunDirError unless the run's history, where it has one, starts as an HDF5 file
    does: what can be told without importing xarray (a truncated or foreign file fails here; a
    damaged inside fails when :func:`load_history` reads it)."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise RunDirError(f"{path} is corrupt (not an HDF5/netCDF-4 file)")


def load_history(run_dir: Path) -> xr.Dataset:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {HISTORY}")
    import xarray as xr

    def read() -> xr.Dataset:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return ds.load()

    try:
        history = _interruptible(read, errors_too=True)
    except Exception as exc:  # h5py/h5netcdf raise many types for damaged files
        raise RunDirError(f"{path} is corrupt ({type(exc).__name__})") from None
    problem = _history_problem(history)
    if problem is not None:
        raise RunDirError(f"{path} is damaged: {problem}; restore the file or start a new run")
    return history


def _history_problem(history: "xr.Dataset") -> Optional[str]:
    """How a history read from disk is not one (epochs as integers along ``epoch``, every
    variable a number per epoch), or None: read on, such a file failed with KeyError or TypeError
    tracebacks in the middle of a resume."""
    import numpy as np

    if "epoch" not in history.dims and history.data_vars:
        return "it has no 'epoch' dimension"
    if "epoch" in history.coords and history["epoch"].dtype.kind not in "iu":
        return f"its epochs are {history['epoch'].dtype} values, not integers"
    for name, var in history.data_vars.items():
        if var.dims != ("epoch",):
            return f"its variable {name!r} has dimensions {var.dims}, not one value per epoch"
        if not np.issubdtype(var.dtype, np.number) and var.dtype.kind != "b":
            return f"its variable {name!r} holds {var.dtype} values, not numbers"
    return None


def _interruptible(io: Callable[[], Any], *, errors_too: bool = False) -> Any:
    """``io()`` (a netCDF read or write), where a Ctrl-C inside it stops it without noise.

    An h5netcdf ``File`` interrupted while it was being built has no ``_closed`` yet: its
    ``__del__`` printed "Exception ignored ... AttributeError: 'File' object has no attribute
    '_closed'" when it was collected (about 1 Ctrl-C during ``fit`` in 12). The interrupted
    call's frames, which hold that File, are freed here with h5netcdf/h5py's errors from
    ``__del__`` dropped; then the KeyboardInterrupt goes on. ``errors_too``: any error alike (a
    read of a damaged file, said in one line by the caller, whose half-opened File printed the
    same noise); other errors keep their traceback. (Writes are atomic, so the previous file
    stays whole.)"""
    try:
        return io()
    except KeyboardInterrupt as exc:
        interrupted: BaseException = exc  # keeps the frames, and any half-built File, alive until the hook is in place
    except Exception as exc:
        if not errors_too:
            raise
        interrupted = exc
    hook = sys.unraisablehook

    def quiet(args: Any) -> None:
        if not str(getattr(args.object, "__module__", "")).startswith(("h5netcdf", "h5py")):
            hook(args)

    sys.unraisablehook = quiet
    try:
        interrupted.__traceback__ = None
        interrupted.__context__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise interrupted


class Checkpointer(Callback):
    """Saves the run (:func:`save`) before a fresh run's first step, every ``every`` epochs and
    after the last (or the one training stops early after); ``last_epoch`` is the epoch of the
    newest checkpoint written. With a validation split, the epoch with the best validation
    ELBO so far is also saved as :data:`CHECKPOINT_BEST`. ``before_first_save`` runs once, just
    before the first checkpoint (a resume writes its new settings to config.json there)."""

    def __init__(
        self,
        run_dir: Path,
        every: int = 1,
        extra: Optional[Dict[str, Any]] = None,
        before_first_save: Optional[Callable[[], None]] = None,
    ):
        self.run_dir = Path(run_dir)
        self.every = every
        self.extra = extra or {}
        self.last_epoch: Optional[int] = None
        self.before_first_save = before_first_save

    def _save(self, ctx: TrainContext) -> None:
        # one set: config.json (a resume's new settings), the history and the checkpoint go into
        # place together or not at all, so an interrupt never leaves a config the checkpoint was
        # not trained under (every later resume refused it) or a history ahead of its checkpoint
        with file_set():
            if self.before_first_save is not None:  # once, just before the first checkpoint
                self.before_first_save()
            self._write(ctx, CHECKPOINT)
        self.before_first_save = None
        self.last_epoch = ctx.state.epoch

    def _write(self, ctx: TrainContext, checkpoint: str) -> None:
        save(
            self.run_dir,
            ctx.vae,
            ctx.stepper,
            ctx.state,
            attrs=ctx.attrs,
            extra=self.extra,
            checkpoint=checkpoint,
            descriptions=ctx.descriptions,
        )

    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.state.fresh:
            self._save(ctx)  # a good checkpoint exists before the first step
        else:
            self.last_epoch = ctx.state.epoch

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if ctx.config.val_fraction > 0 and epochs_since_best(ctx.state.records) == 0:
            self._write(ctx, CHECKPOINT_BEST)
        if ctx.state.epoch % self.every == 0 or ctx.state.epoch == ctx.config.epochs or ctx.stopping:
            self._save(ctx)
