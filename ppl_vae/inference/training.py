"""SVI training of a VAE's encoder and decoder (AEVB algorithm 1).

The loss is Pyro's ``differentiable_loss`` of the chosen ELBO, minimized with a plain torch
optimizer over ``vae.parameters()``: no global param store is involved, so several models can
live in one process and a checkpoint is just the module's and optimizer's state dicts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pyro
import torch
import xarray as xr
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO

from ppl_vae import runs
from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.errors import TrainingDiverged
from ppl_vae.inference.importance import elbo_per_datapoint
from ppl_vae.models.vae import VAE
from ppl_vae.registry import Registry

ELBOS: Registry[Callable[..., pyro.infer.ELBO]] = Registry("elbo")
ELBOS.register("trace", doc="Trace_ELBO: AEVB's SGVB estimator A (Monte Carlo KL)")(Trace_ELBO)
ELBOS.register("mean_field", doc="TraceMeanField_ELBO: AEVB's estimator B (analytic KL)")(
    TraceMeanField_ELBO
)
ELBOS.register("jit_trace", doc="JitTrace_ELBO: estimator A, compiled with torch.jit")(JitTrace_ELBO)
ELBOS.register("jit_mean_field", doc="JitTraceMeanField_ELBO: estimator B, compiled")(
    JitTraceMeanField_ELBO
)

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("adam", doc="Adam (Kingma & Ba 2015)")(torch.optim.Adam)
OPTIMIZERS.register("adagrad", doc="Adagrad (Duchi et al. 2011), AEVB's choice")(torch.optim.Adagrad)
OPTIMIZERS.register("sgd", doc="plain stochastic gradient descent")(torch.optim.SGD)


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def validate_train_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad field."""
    ELBOS.get(config.elbo)
    OPTIMIZERS.get(config.optimizer)
    for name in ("batch_size", "num_particles", "eval_num_particles", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {config.epochs}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"lr must be a positive number, got {config.lr}")
    if config.kl_warmup_epochs < 0:
        raise ValueError(f"kl_warmup_epochs must be >= 0, got {config.kl_warmup_epochs}")
    if config.elbo.startswith("jit") and config.kl_warmup_epochs:
        raise ValueError("KL warm-up needs a non-JIT elbo (a changing KL weight would recompile every step)")
    resolve_device(config.device)


def make_optimizer(vae: VAE, config: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(config.optimizer)(vae.parameters(), lr=config.lr)


class _JitPair:
    """Model/guide that register the VAE's parameters, so Pyro's JIT passes them as inputs.

    The unique name keeps this VAE's entries apart from anything else in the param store;
    :meth:`close` removes them.
    """

    def __init__(self, vae: VAE):
        self.vae = vae
        self.name = f"ppl_vae_jit_{id(vae)}_{time.monotonic_ns()}"

    def model(self, x, num_data=None):
        pyro.module(self.name, self.vae)
        return self.vae.model(x, num_data=num_data)

    def guide(self, x, num_data=None):
        pyro.module(self.name, self.vae)
        return self.vae.guide(x, num_data=num_data)

    def close(self) -> None:
        store = pyro.get_param_store()
        for key in [k for k in store.keys() if k.startswith(self.name)]:
            del store[key]


@dataclass
class TrainState:
    """Where training stands: epochs done, optimizer steps done, per-epoch records."""

    epoch: int = 0
    step: int = 0
    records: List[Dict[str, float]] = field(default_factory=list)


HISTORY_VARS = {
    "train_elbo": "ELBO per datapoint on the training set, nats (KL weight 1)",
    "test_elbo": "ELBO per datapoint on the test set, nats (KL weight 1)",
    "train_loss": "mean minibatch objective per datapoint, nats (with the epoch's KL weight)",
    "kl_weight": "KL weight at the end of the epoch",
    "wall_time": "cumulative training time, seconds (evaluation excluded)",
    "num_train_samples": "training datapoints processed so far",
}


def history_to_xarray(records: List[Dict[str, float]], attrs: Optional[dict] = None) -> xr.Dataset:
    """Per-epoch records as a Dataset with dim ``epoch``."""
    epochs = np.array([int(r["epoch"]) for r in records], dtype=np.int64)
    data_vars = {
        name: ("epoch", np.array([r[name] for r in records], dtype=np.float64), {"description": desc})
        for name, desc in HISTORY_VARS.items()
    }
    return xr.Dataset(data_vars, coords={"epoch": epochs}, attrs=attrs or {})


def history_records(history: xr.Dataset) -> List[Dict[str, float]]:
    return [
        {"epoch": int(e), **{k: float(history[k].sel(epoch=e)) for k in HISTORY_VARS}}
        for e in history["epoch"].values
    ]


def _kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    if config.kl_warmup_epochs == 0:
        return 1.0
    return min(1.0, (step + 1) / (config.kl_warmup_epochs * steps_per_epoch))


def train(
    vae: VAE,
    data: Dataset,
    config: TrainConfig,
    *,
    run_dir: Optional[Path] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    state: Optional[TrainState] = None,
    progress: bool = True,
    history_attrs: Optional[dict] = None,
) -> xr.Dataset:
    """Train ``vae`` on ``data.train`` until ``config.epochs`` epochs are done.

    ``vae`` and ``data`` must already be on the training device. With ``run_dir``, a
    checkpoint and the history are written (atomically) every ``config.checkpoint_every``
    epochs and at the end. A NaN or infinite loss raises :class:`TrainingDiverged` naming
    the step; the run directory keeps the last good checkpoint. Returns the history.
    """
    from tqdm.auto import tqdm

    validate_train_config(config)
    state = state or TrainState()
    optimizer = optimizer or make_optimizer(vae, config)
    elbo = ELBOS.get(config.elbo)(num_particles=config.num_particles, vectorize_particles=config.num_particles > 1,
                                  max_plate_nesting=1)
    jit = config.elbo.startswith("jit")
    pair = _JitPair(vae) if jit else None
    model, guide = (pair.model, pair.guide) if pair else (vae.model, vae.guide)

    x_train = data.train
    n_train = x_train.shape[0]
    batch_size = min(config.batch_size, n_train)
    # The JIT trace fixes the batch shape, so it drops the last, smaller batch.
    steps_per_epoch = n_train // batch_size if jit else math.ceil(n_train / batch_size)
    attrs = dict(history_attrs or {})

    def evaluate(x: torch.Tensor) -> float:
        vae.eval()
        value = elbo_per_datapoint(vae.model, vae.guide, x, num_particles=config.eval_num_particles).mean()
        vae.train()
        return float(value)

    def checkpoint() -> None:
        if run_dir is not None:
            runs.save_checkpoint(run_dir, vae, optimizer, epoch=state.epoch, step=state.step,
                                 extra={"event_shape": list(data.event_shape)})
            runs.save_history(run_dir, history_to_xarray(state.records, attrs))

    if run_dir is not None and state.epoch == 0 and state.step == 0:
        checkpoint()  # a good checkpoint exists before the first step

    wall = state.records[-1]["wall_time"] if state.records else 0.0
    seen = state.records[-1]["num_train_samples"] if state.records else 0.0
    bar = tqdm(total=config.epochs, initial=state.epoch, disable=not progress, desc="epochs", unit="epoch",
               dynamic_ncols=True)
    try:
        vae.train()
        while state.epoch < config.epochs:
            start = time.perf_counter()
            order = torch.randperm(n_train, device=x_train.device)
            loss_sum = torch.zeros((), device=x_train.device)
            kl_weight = 1.0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x = x_train[idx]
                if data.dynamic_binarization:
                    x = torch.bernoulli(x)
                kl_weight = _kl_weight(config, state.step, steps_per_epoch)
                kwargs = {"num_data": n_train}
                if not jit and kl_weight != 1.0:
                    kwargs["kl_weight"] = kl_weight
                loss = elbo.differentiable_loss(model, guide, x, **kwargs)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {float(loss)} at step {state.step + 1} (epoch {state.epoch + 1}); "
                        f"the last good checkpoint is from epoch {state.records[-1]['epoch'] if state.records else 0}"
                        + (f" in {run_dir}" if run_dir is not None else "")
                        + "; try a smaller --lr",
                        step=state.step + 1,
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()  # each minibatch loss is scaled to the full data
                state.step += 1
                seen += len(idx)
            wall += time.perf_counter() - start
            state.epoch += 1
            record = {
                "epoch": state.epoch,
                "train_elbo": evaluate(x_train if not data.dynamic_binarization else torch.bernoulli(x_train)),
                "test_elbo": evaluate(data.test),
                "train_loss": float(loss_sum) / (steps_per_epoch * n_train),
                "kl_weight": kl_weight,
                "wall_time": wall,
                "num_train_samples": seen,
            }
            state.records.append(record)
            bar.update(1)
            bar.set_postfix(train=f"{record['train_elbo']:.2f}", test=f"{record['test_elbo']:.2f}")
            if state.epoch % config.checkpoint_every == 0 or state.epoch == config.epochs:
                checkpoint()
    finally:
        bar.close()
        if pair is not None:
            pair.close()
    return history_to_xarray(state.records, attrs)
