"""Training loggers: :class:`~ppl_vae.inference.training.Callback` objects that send the
training curves somewhere a user watches them.

:class:`TensorBoardLogger` writes TensorBoard event files (``torch.utils.tensorboard``; needs
the ``tensorboard`` package: ``pip install "ppl_vae[tensorboard]"``). Another service (W&B,
MLflow) is a small subclass of :class:`ScalarLogger` that implements ``log_scalars`` (see
docs/training.md). Loggers run on the main rank only, like every callback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from ppl_vae.inference.training import HISTORY_VARS, Callback, TrainContext
from ppl_vae.registry import Registry

LOGGERS: Registry[Callable[..., Callback]] = Registry("logger")


class ScalarLogger(Callback):
    """Logs every ``every_steps`` optimizer steps (``step/loss``: the minibatch loss per
    datapoint, ``step/kl_weight``, ``step/lr``) and at each epoch's end (``epoch/NAME`` for each
    history variable, and ``epoch/epoch``, the epoch's number). Every call's ``step`` is the
    optimizer step count, which never decreases, as W&B's ``wandb.log(step=...)`` and MLflow need
    (an epoch's scalars at the step that ended it; plot them against ``epoch/epoch`` for an epoch
    axis). Subclasses implement :meth:`log_scalars` and may override :meth:`log_epoch_end` to add
    images."""

    def __init__(self, every_steps: int = 50):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.every_steps = every_steps

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_step_end(self, ctx: TrainContext) -> bool:
        if ctx.state.step % self.every_steps == 0 and ctx.last_loss is not None:
            loss = float(ctx.last_loss) / max(ctx.num_train, 1)  # one host-device sync every N steps
            self.log_scalars({"step/loss": loss, "step/kl_weight": ctx.kl_weight, "step/lr": ctx.lr}, ctx.state.step)
        return False

    def on_epoch_end(self, ctx: TrainContext) -> None:
        record = ctx.state.records[-1]
        scalars = {
            f"epoch/{name}": record[name] for name in HISTORY_VARS if name in record and math.isfinite(record[name])
        }
        scalars["epoch/epoch"] = float(ctx.state.epoch)
        self.log_scalars(scalars, ctx.state.step)  # one axis for every call: W&B drops a step that goes back
        self.log_epoch_end(ctx)

    def log_epoch_end(self, ctx: TrainContext) -> None:
        """Called after the epoch's scalars; nothing by default."""


@LOGGERS.register("tensorboard", doc="TensorBoard event files under RUN/tensorboard (needs the tensorboard package)")
class TensorBoardLogger(ScalarLogger):
    """TensorBoard event files in ``log_dir``: the scalars of :class:`ScalarLogger` and, after
    each epoch, a grid of ``num_images`` decoded samples from fixed z ~ p(z) (``samples``)."""

    def __init__(self, log_dir: Union[str, Path], every_steps: int = 50, num_images: int = 16, seed: int = 0):
        super().__init__(every_steps)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                '--log tensorboard needs the tensorboard package: pip install "ppl_vae[tensorboard]"'
            ) from None
        self.log_dir = Path(log_dir)
        self.num_images = num_images
        self.seed = seed
        self._writer_cls = SummaryWriter
        self._writer: Optional[SummaryWriter] = None
        self.check_log_dir()  # before the run starts: a resume writes nothing until every check passed

    def check_log_dir(self) -> None:
        """Refuse (ValueError, one line) a ``log_dir`` that is a file, or a symlink leading out of
        the folder that holds it (the run directory): event files are never written through it."""
        path = self.log_dir
        if path.is_symlink():
            real, parent = os.path.realpath(path), os.path.realpath(path.parent)
            if not real.startswith(parent.rstrip(os.sep) + os.sep):
                raise ValueError(
                    f"refusing to log to {path}: it is a symlink that leads out of the run directory "
                    f"(to {real}); remove the link or log elsewhere"
                )
        if path.exists() and not path.is_dir():
            raise ValueError(f"cannot log to {path}: it is a file, not a folder; move it away or log elsewhere")

    @property
    def writer(self):
        if self._writer is None:  # made at the first use, so a logger can be pickled to a rank
            self.check_log_dir()
            self._writer = self._writer_cls(str(self.log_dir))
        return self._writer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_writer": None}

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_epoch_end(self, ctx: TrainContext) -> None:
        # a sample grid only where a decoded mean is an image (not a text model's character indices)
        if self.num_images and getattr(ctx.vae, "generates_images", True):
            from ppl_vae.analysis.generation import sample_images
            from ppl_vae.analysis.plots import tile_images

            images = sample_images(ctx.vae, self.num_images, seed=self.seed).values  # (n, C, H, W)
            ncols = max(1, int(math.ceil(math.sqrt(len(images)))))
            if images.shape[1] in (1, 3):
                import numpy as np

                grid = np.stack([tile_images(images[:, k], ncols) for k in range(images.shape[1])])
                grid = np.nan_to_num(grid, nan=0.0).clip(0, 1)  # the gaps between tiles are NaN
                self.writer.add_image("samples", grid, ctx.state.step, dataformats="CHW")
        self.writer.flush()

    def on_train_end(self, ctx: TrainContext) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class StopWhenInterrupted(Callback):
    """Raise KeyboardInterrupt at the step after an interrupt was recorded in ``hits`` (the CLI's
    SIGINT handler appends to it): one whose exception Python swallowed (raised inside a weakref
    callback or ``__del__``, printed as "Exception ignored") would otherwise let training run to
    its last epoch before the command stopped."""

    def __init__(self, hits: List[int]):
        self.hits = hits

    def on_step_end(self, ctx: TrainContext) -> bool:
        if self.hits:
            raise KeyboardInterrupt
        return False


class CompileNotice(Callback):
    """Says on stderr, as training starts, that ``train.compile`` makes the first steps slow: after
    every check has passed, so a refused ``--compile`` is never announced."""

    def on_train_start(self, ctx: TrainContext) -> None:
        backend = ctx.config.compile
        if backend:
            import sys

            print(
                f"compiling the loss with torch.compile (backend {backend}): the first steps take longer "
                "(up to a minute or more on CPU), later ones are faster",
                file=sys.stderr,
                flush=True,
            )


def make_logger(name: str, run_dir: Union[str, Path], every_steps: int = 50) -> Callback:
    """The logger ``name`` (see :data:`LOGGERS`) writing under ``run_dir``."""
    return LOGGERS.get(name)(Path(run_dir) / name, every_steps=every_steps)
