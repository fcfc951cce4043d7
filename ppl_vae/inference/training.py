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
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyro
import torch
import xarray as xr
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO

from ppl_vae import runs
from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.errors import DataError, TrainingDiverged
from ppl_vae.inference.fused import fused_elbo_loss, supports_fused_elbo
from ppl_vae.inference.importance import elbo_per_datapoint
from ppl_vae.models.vae import VAE
from ppl_vae.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ppl_vae.inference.distributed import DistContext

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
    METHODS.get(config.method)
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
    if config.finite_check not in FINITE_CHECKS:
        raise ValueError(f"finite_check must be one of {', '.join(FINITE_CHECKS)}, got {config.finite_check!r}")
    if config.elbo.startswith("jit") and config.kl_warmup_epochs:
        raise ValueError("KL warm-up needs a non-JIT elbo (a changing KL weight would recompile every step)")
    resolve_device(config.device)


def make_optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured torch optimizer over ``module.parameters()``."""
    return OPTIMIZERS.get(config.optimizer)(module.parameters(), lr=config.lr)


class NonFiniteLoss(ArithmeticError):
    """Raised by a stepper before it updates anything, when the loss is NaN or infinite."""

    def __init__(self, value: float):
        super().__init__(f"the loss became {value}")
        self.value = value


class Stepper:
    """A training method: how one minibatch updates the model.

    ``optimizers`` maps a name to each torch optimizer the method uses; their states are
    checkpointed and restored by name. ``step`` returns the detached minibatch loss (the
    negative objective, scaled to the full dataset) and must raise :class:`NonFiniteLoss`
    *before* updating parameters when that loss is not finite.
    """

    optimizers: Dict[str, torch.optim.Optimizer]
    #: True when ``step`` skips the host-side finiteness check (no device sync per step); the
    #: training loop then tracks the first non-finite loss on the device and stops at epoch end.
    defers_finite_check: bool = False

    def __init__(self, vae: VAE, config: TrainConfig):  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    @property
    def drop_last(self) -> bool:
        """Whether every minibatch must have the same size (compiled steppers)."""
        return False

    def close(self) -> None:
        """Release anything the stepper registered globally."""


METHODS: Registry[Callable[[VAE, TrainConfig], Stepper]] = Registry("method")

# When SVI checks that the loss is finite: every step (a host-device sync each step, and no
# update ever sees a NaN) or once per epoch (no per-step sync: the right choice on a GPU).
FINITE_CHECKS = {"auto": "step on CPU, epoch on CUDA", "step": "step", "epoch": "epoch"}


class _JitPair:
    """Model/guide that register the VAE's parameters, so Pyro's JIT passes them as inputs.

    The unique name keeps this VAE's entries apart from anything else in the param store;
    :meth:`close` removes them.
    """

    def __init__(self, vae: VAE):
        self.vae = vae
        self.name = f"ppl_vae_jit_{id(vae)}_{time.monotonic_ns()}"

    def model(self, x, num_data=None, **kwargs):
        pyro.module(self.name, self.vae)
        return self.vae.model(x, num_data=num_data, **kwargs)

    def guide(self, x, num_data=None, **kwargs):
        pyro.module(self.name, self.vae)
        return self.vae.guide(x, num_data=num_data, **kwargs)

    def close(self) -> None:
        store = pyro.get_param_store()
        for key in [k for k in store.keys() if k.startswith(self.name)]:
            del store[key]


@METHODS.register("svi", doc="SVI on the ELBO: AEVB's algorithm 1 (encoder and decoder jointly)")
class SVIStepper(Stepper):
    """AEVB: one gradient step on the chosen ELBO for encoder and decoder together."""

    def __init__(self, vae: VAE, config: TrainConfig):
        self.vae = vae
        self.jit = config.elbo.startswith("jit")
        options = {"ignore_jit_warnings": True} if self.jit else {}
        self.elbo = ELBOS.get(config.elbo)(
            num_particles=config.num_particles,
            vectorize_particles=config.num_particles > 1,
            max_plate_nesting=1,
            **options,
        )
        self._pair = _JitPair(vae) if self.jit else None
        self.model, self.guide = (self._pair.model, self._pair.guide) if self._pair else (vae.model, vae.guide)
        # The fused path computes the same estimator without Pyro's tracing (see inference/fused.py).
        self.fused = config.fused_elbo and not self.jit and supports_fused_elbo(vae)
        self._num_particles = config.num_particles
        self._analytic_kl = config.elbo == "mean_field"
        self.optimizers = {"svi": make_optimizer(vae, config)}
        device_type = next(iter(vae.parameters()), torch.empty(0)).device.type
        self.defers_finite_check = config.finite_check == "epoch" or (
            config.finite_check == "auto" and device_type == "cuda"
        )

    @property
    def drop_last(self) -> bool:
        # Pyro's JIT caches one trace per argument count, so the batch shape must not change.
        return self.jit

    def loss(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        """The differentiable minibatch loss (negative ELBO scaled to ``num_data``)."""
        if self.fused:
            return fused_elbo_loss(self.vae, x, num_data=num_data, kl_weight=kl_weight,
                                   num_particles=self._num_particles, analytic_kl=self._analytic_kl)
        if kl_weight != 1.0:
            kwargs["kl_weight"] = kl_weight
        return self.elbo.differentiable_loss(self.model, self.guide, x, num_data=num_data, **kwargs)

    def step(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        loss = self.loss(x, num_data=num_data, kl_weight=kl_weight, **kwargs)
        if not self.defers_finite_check and not torch.isfinite(loss):
            raise NonFiniteLoss(float(loss.detach()))
        optimizer = self.optimizers["svi"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def close(self) -> None:
        if self._pair is not None:
            self._pair.close()


@dataclass
class TrainState:
    """Where training stands: epochs done, optimizer steps done, per-epoch records."""

    epoch: int = 0
    step: int = 0
    records: List[Dict[str, float]] = field(default_factory=list)


HISTORY_VARS = {
    "train_elbo": "ELBO per datapoint on the training set, nats (KL weight 1)",
    "test_elbo": "ELBO per datapoint on the test set, nats (KL weight 1)",
    "train_loss": "mean minibatch loss (negative ELBO) per datapoint during the epoch, nats (with its KL weight)",
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
    stepper: Optional[Stepper] = None,
    state: Optional[TrainState] = None,
    progress: bool = True,
    history_attrs: Optional[dict] = None,
    dist: Optional["DistContext"] = None,
    callbacks: Sequence[Callable[[int, VAE], object]] = (),
) -> xr.Dataset:
    """Train ``vae`` on ``data.train`` until ``config.epochs`` epochs are done.

    ``vae`` and ``data`` must already be on the training device. With ``run_dir``, a
    checkpoint and the history are written (atomically) every ``config.checkpoint_every``
    epochs and at the end. A NaN or infinite loss raises :class:`TrainingDiverged` naming
    the step; the run directory keeps the last good checkpoint. Returns the history.

    ``stepper`` (default: the one ``config.method`` names) carries the optimizer state when
    resuming. A VAE with ``conditional = True`` gets the labels as ``y``.

    ``dist`` (see :mod:`ppl_vae.inference.distributed`) makes this one rank of a data-parallel
    run: it trains on its shard of each global batch with gradients averaged over ranks, and
    the losses and ELBOs are averaged over ranks. Pass ``run_dir`` on rank 0 only.

    ``callbacks``: each is called as ``callback(epoch, vae)`` after every epoch's record and
    checkpoint, and with epoch 0 before a fresh run's first step (on rank 0 only); e.g.
    :class:`ppl_vae.analysis.generation.SampleGridRecorder`.
    """
    from tqdm.auto import tqdm

    validate_train_config(config)
    state = state or TrainState()
    stepper = stepper or METHODS.get(config.method)(vae, config)
    if dist is not None:
        stepper = dist.wrap_stepper(stepper)
    labelled = data.train_labels is not None
    if getattr(vae, "num_classes", None) is not None and not labelled:
        raise DataError(f"model {type(vae).__name__} is conditional and needs labels, but {data.name} has none")

    x_train = data.train
    n_train = x_train.shape[0]
    batch_size = min(config.batch_size, n_train) if dist is None else dist.local_batch_size(config.batch_size, n_train)
    n_local, world = (n_train, 1) if dist is None else (dist.num_samples(n_train), dist.world_size)
    # The JIT trace fixes the batch shape, so it drops the last, smaller batch.
    steps_per_epoch = n_local // batch_size if stepper.drop_last else math.ceil(n_local / batch_size)
    attrs = dict(history_attrs or {})

    def evaluate(x: torch.Tensor, labels: Optional[torch.Tensor]) -> float:
        vae.eval()
        if dist is not None:
            x, labels = dist.shard(x), dist.shard(labels)
        kwargs = {"y": labels} if labels is not None else {}
        value = elbo_per_datapoint(vae.model, vae.guide, x, num_particles=config.eval_num_particles, **kwargs)
        vae.train()
        return float(value.mean()) if dist is None else dist.global_mean(value)

    def diverged(what: str, step: int) -> TrainingDiverged:
        last = state.records[-1]["epoch"] if state.records else 0
        return TrainingDiverged(
            f"{what} at step {step} (epoch {state.epoch + 1}); the last good checkpoint is from epoch {last}"
            + (f" in {run_dir}" if run_dir is not None else "") + "; try a smaller --lr",
            step=step,
        )

    def checkpoint() -> None:
        if run_dir is not None:
            # History first, checkpoint last: the checkpoint is the commit point. A kill between the
            # two writes leaves a history one epoch ahead, which resume trims to the checkpoint's
            # epoch; the other order would leave an epoch missing from the history for good.
            runs.save_history(run_dir, history_to_xarray(state.records, attrs))
            runs.save_checkpoint(run_dir, vae, stepper.optimizers, epoch=state.epoch, step=state.step,
                                 extra={"event_shape": list(data.event_shape), "data_info": data.data_info})

    is_main = dist is None or dist.is_main
    if state.epoch == 0 and state.step == 0:
        if run_dir is not None:
            checkpoint()  # a good checkpoint exists before the first step
        for callback in callbacks if is_main else ():
            callback(0, vae)

    wall = state.records[-1]["wall_time"] if state.records else 0.0
    seen = state.records[-1]["num_train_samples"] if state.records else 0.0
    bar = tqdm(total=config.epochs, initial=state.epoch, disable=not progress, desc="epochs", unit="epoch",
               dynamic_ncols=True)
    try:
        vae.train()
        while state.epoch < config.epochs:
            start = time.perf_counter()
            if dist is None:
                order = torch.randperm(n_train, device=x_train.device)
            else:
                order = dist.start_epoch(n_train, seed=config.seed, epoch=state.epoch, device=x_train.device)
            loss_sum = torch.zeros((), device=x_train.device)
            first_bad = torch.full((), -1, dtype=torch.long, device=x_train.device)
            kl_weight = 1.0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x = x_train[idx]
                if data.dynamic_binarization:
                    x = torch.bernoulli(x)
                kl_weight = _kl_weight(config, state.step, steps_per_epoch)
                kwargs = {"y": data.train_labels[idx]} if labelled else {}
                try:
                    loss = stepper.step(x, num_data=n_train, kl_weight=kl_weight, **kwargs)
                except NonFiniteLoss as exc:
                    raise diverged(str(exc), state.step + 1) from None
                if stepper.defers_finite_check:  # recorded on the device: no sync here
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), state.step + 1, first_bad)
                loss_sum += loss  # each minibatch loss is scaled to the full data
                state.step += 1
                seen += len(idx) * world
            if stepper.defers_finite_check and int(first_bad) >= 0:
                raise diverged("the loss became non-finite", int(first_bad))
            wall += time.perf_counter() - start
            state.epoch += 1
            record = {
                "epoch": state.epoch,
                "train_elbo": evaluate(
                    torch.bernoulli(x_train) if data.dynamic_binarization else x_train, data.train_labels
                ),
                "test_elbo": evaluate(data.test, data.test_labels),
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
            for callback in callbacks if is_main else ():
                callback(state.epoch, vae)
    finally:
        bar.close()
        stepper.close()
    return history_to_xarray(state.records, attrs)
