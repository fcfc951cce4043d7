"""From a config to a trained run directory, and back: :func:`fit`, :func:`resume`, :func:`load_run`.

Everything that can fail on bad input (names, data, support) is checked before the run
directory is created, so a bad command never leaves a half-written run behind.
"""

from __future__ import annotations

import datetime as _dt
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import pyro
import torch
import xarray as xr

from ppl_vae import runs
from ppl_vae.config import RunConfig
from ppl_vae.data.datasets import Dataset, load_dataset
from ppl_vae.errors import RunDirError
from ppl_vae.inference.training import (
    METHODS,
    TrainState,
    history_records,
    resolve_device,
    train,
    validate_train_config,
)
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import build_vae

if TYPE_CHECKING:  # pragma: no cover
    from ppl_vae.inference.distributed import DistContext


@dataclass
class Run:
    """A trained (or loaded) run: its directory, config, model, and history."""

    run_dir: Optional[Path]
    config: RunConfig
    vae: VAE
    history: xr.Dataset

    @property
    def final(self) -> dict:
        """The last epoch's record (train_elbo, test_elbo, ...)."""
        if not self.history.sizes.get("epoch"):
            return {}
        last = self.history.isel(epoch=-1)
        return {k: float(last[k]) for k in self.history.data_vars}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def load_data(config: RunConfig) -> Dataset:
    d = config.data
    return load_dataset(
        d.dataset,
        d.data_dir,
        binarize=d.binarize,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        train_size=d.train_size,
    )


def build_model(config: RunConfig, event_shape, data_info: Optional[dict] = None) -> VAE:
    m = config.model
    return build_vae(
        m.model,
        event_shape,
        prior=m.prior,
        likelihood=m.likelihood,
        latent_dim=m.latent_dim,
        hidden_dim=m.hidden_dim,
        prior_options=m.prior_options,
        likelihood_options=m.likelihood_options,
        data_info=data_info,
    )


def default_run_dir(config: RunConfig, root: Path = Path("runs")) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{config.model.model}-{Path(config.data.dataset).stem}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def _prepare(config: RunConfig, dist: Optional["DistContext"] = None):
    """Validate the config, load data, build the model; no files are touched."""
    validate_train_config(config.train)
    seed_everything(config.train.seed)
    data = load_data(config)
    vae = build_model(config, data.event_shape, data.data_info)
    vae.likelihood.check_support(data.train, what=f"the training data of {data.name}")
    vae.likelihood.check_support(data.test, what=f"the test data of {data.name}")
    device = resolve_device(config.train.device) if dist is None else dist.device
    return vae.to(device), data.to(device)


def fit(config: RunConfig, out: Optional[Path] = None, *, progress: bool = True,
        dist: Optional["DistContext"] = None, callbacks: Sequence[Callable[[int, VAE], object]] = ()) -> Run:
    """Train a model from ``config``, writing the run to ``out`` (a fresh ``runs/...`` when None).

    ``out`` must not exist or be an empty folder; use :func:`resume` to continue a run.
    ``dist``: train as one rank of a data-parallel run (only rank 0 writes files); see
    :func:`ppl_vae.inference.distributed.fit`.
    """
    vae, data = _prepare(config, dist)
    run_dir = default_run_dir(config) if out is None else Path(out)
    writer = dist is None or dist.is_main
    if writer:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise RunDirError(f"{run_dir} already exists and is not empty; choose another --out or --resume it")
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.save_config(run_dir, config)
    history = train(vae, data, config.train, run_dir=run_dir if writer else None, progress=progress,
                    history_attrs=_history_attrs(config, data), dist=dist, callbacks=callbacks)
    return Run(run_dir, config, vae, history)


def _history_attrs(config: RunConfig, data: Dataset) -> dict:
    return {
        "model": config.model.model,
        "dataset": data.name,
        "num_train": int(data.train.shape[0]),
        "num_test": int(data.test.shape[0]),
    }


def resume(run_dir: Path, *, epochs: Optional[int] = None, progress: bool = True,
           dist: Optional["DistContext"] = None, callbacks: Sequence[Callable[[int, VAE], object]] = ()) -> Run:
    """Continue a run from its checkpoint up to ``epochs`` (default: the config's); ``dist`` and
    ``callbacks`` (see :func:`ppl_vae.inference.training.train`) as in :func:`fit`."""
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    runs.remove_stale_temp_files(run_dir)
    if epochs is not None:
        config.train.epochs = epochs
    vae, data = _prepare(config, dist)
    tensors, meta = runs.read_checkpoint(run_dir)
    runs.load_weights(vae, tensors, str(run_dir / runs.CHECKPOINT))
    stepper = METHODS.get(config.train.method)(vae, config.train)
    for name, saved in runs.optimizer_states(tensors, meta).items():
        if name not in stepper.optimizers:
            raise RunDirError(f"{run_dir}: checkpoint has state for an unknown optimizer {name!r}")
        saved_type, wanted_type = saved.pop("type", None), type(stepper.optimizers[name]).__name__
        if saved_type is not None and saved_type != wanted_type:
            raise RunDirError(
                f"{run_dir}: the checkpoint holds {saved_type} state but the config asks for {wanted_type}"
            )
        try:
            stepper.optimizers[name].load_state_dict(saved)
        except (ValueError, KeyError) as exc:
            raise RunDirError(f"optimizer state in {run_dir} does not fit: {exc}") from None
    records = history_records(runs.load_history(run_dir)) if (run_dir / runs.HISTORY).is_file() else []
    records = [r for r in records if r["epoch"] <= meta["epoch"]]
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    state = TrainState(epoch=int(meta["epoch"]), step=int(meta["step"]), records=records)
    writer = dist is None or dist.is_main
    if epochs is not None and writer:
        runs.save_config(run_dir, config)
    history = train(vae, data, config.train, run_dir=run_dir if writer else None, stepper=stepper, state=state,
                    progress=progress, history_attrs=_history_attrs(config, data), dist=dist,
                    callbacks=callbacks)
    return Run(run_dir, config, vae, history)


def load_run(run_dir: Path, device: str = "cpu") -> Run:
    """Rebuild a run's model with its trained weights (no data is loaded except its shape)."""
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    tensors, meta = runs.read_checkpoint(run_dir)
    extra = meta.get("extra", {})
    if "event_shape" in extra:
        event_shape, data_info = extra["event_shape"], extra.get("data_info", {})
    else:
        data = load_data(config)
        event_shape, data_info = data.event_shape, data.data_info
    vae = build_model(config, event_shape, data_info)
    runs.load_weights(vae, tensors, str(run_dir / runs.CHECKPOINT))
    vae.eval()
    history = runs.load_history(run_dir) if (run_dir / runs.HISTORY).is_file() else xr.Dataset()
    return Run(run_dir, config, vae.to(resolve_device(device)), history)
