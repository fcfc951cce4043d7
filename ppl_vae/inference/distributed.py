"""Data-parallel SVI on several processes, GPUs and machines with torch.distributed.

Each process (a *rank*) holds a replica of the VAE and trains on its shard of every global
minibatch: a :class:`torch.utils.data.DistributedSampler` splits each epoch's permutation so
that, with world size W and ``--batch-size B``, rank r gets B/W points of the same global
batch that a single process would draw. The ELBO is computed by an ``nn.Module`` whose
``forward`` returns Pyro's ``differentiable_loss`` (:class:`ELBOLoss`), wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients over ranks.

Why the arithmetic matches one process: Pyro scales a minibatch of b = B/W points by
N/b (AEVB eq. 8), so rank r's loss is (N W / B) sum_{i in shard r} l_i; DDP averages, giving
(1/W) sum_r of that = (N / B) sum_{i in batch} l_i, the single-process loss of the global
batch, and so the same gradient. Every rank has the same shard size (the sampler pads the
epoch to a multiple of W), so this holds for the last, smaller batch too.

Backends: gloo on CPU, nccl on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). Collectives
have a timeout, so a rank that dies or stalls stops the run with :class:`DistributedError`
instead of a hang. Only rank 0 writes the run directory. Launch with ``torchrun`` (several
machines) or :func:`launch` / ``ppl-vae fit --nproc N`` (one machine).
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, cast

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from ppl_vae.config import TrainConfig
from ppl_vae.errors import ConfigError, PplVaeError
from ppl_vae.inference.capabilities import one_process, processes
from ppl_vae.inference.training import Stepper, resolve_device, stepper_class, validate_train_config

DEFAULT_TIMEOUT_S = 300.0
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


class DistributedError(PplVaeError, RuntimeError):
    """A collective failed or timed out: another rank died or stalled."""


def env_int(name: str, default: object) -> int:
    """The integer a launcher put in environment variable ``name`` (``default`` when unset); a
    ValueError naming the variable otherwise (not Python's "invalid literal for int()")."""
    value: Any = os.environ.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"environment variable {name} must be an integer (torchrun sets it), got {value!r}; "
            f"unset it outside a distributed launch"
        ) from None


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of several started by torchrun (or :func:`launch`)."""
    return env_int("WORLD_SIZE", "1") > 1


def env_world_size() -> int:
    """The number of ranks torchrun started (1 outside a distributed launch)."""
    return env_int("WORLD_SIZE", "1")


def env_rank() -> int:
    """This process's global rank from the environment (0 outside a distributed launch)."""
    return env_int("RANK", "0")


def check_config(config: TrainConfig, world_size: int) -> None:
    """Raise ValueError unless ``config`` can be trained data-parallel on ``world_size`` ranks."""
    validate_train_config(config)
    if world_size < 1:
        raise ValueError(f"nproc must be >= 1, got {world_size}")
    stepper = stepper_class(config)
    if not stepper.data_parallel:
        raise ConfigError(
            f"{stepper.describe()} cannot run data-parallel ({processes(world_size)}): it needs a method and objective "
            f"whose step is one loss over all parameters (see `ppl-vae models`); {one_process()}",
            field="train.method" if config.objective == "elbo" else "train.objective",
        )
    if config.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size ({config.batch_size}) must be divisible by the number of processes ({world_size})",
            field="train.batch_size",
        )
    if config.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"train.device must be cpu, cuda or auto with several processes (rank r uses cuda:r), "
            f"got {config.device!r}",
            field="train.device",
        )
    device = resolve_device(config.device)
    local = env_int("LOCAL_WORLD_SIZE", world_size)
    if device.type == "cuda" and local > torch.cuda.device_count():
        raise ValueError(f"{local} processes per machine need as many GPUs; {torch.cuda.device_count()} are visible")


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the process group, and the collectives training needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a one-line :class:`DistributedError`."""
        try:
            yield
        except RuntimeError as exc:
            if not isinstance(exc, tdist.DistError) and not _looks_like_comm_error(exc):
                raise
            first = " ".join(str(exc).split())[:300]
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed or timed out (timeout {self.timeout_s:g} s); "
                f"another process failed or stalled ({first})"
            ) from None

    # -- data ---------------------------------------------------------------------------

    def num_samples(self, num_data: int) -> int:
        """Points per rank per epoch: ceil(N / W), as DistributedSampler pads the epoch."""
        return math.ceil(num_data / self.world_size)

    def local_batch_size(self, batch_size: int, num_data: int) -> int:
        """Each rank's share B/W of the global batch (all of its points when B >= N)."""
        return min(batch_size // self.world_size, self.num_samples(num_data))

    def start_epoch(self, num_data: int, *, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
        """This rank's indices for ``epoch`` (0-based), and a fresh RNG seed for its noise.

        The indices are DistributedSampler's: a permutation seeded by ``seed + epoch`` (the
        same on every rank), padded to a multiple of W and strided by rank, so positions
        ``[b B/W, (b+1) B/W)`` of every rank together form the global batch b. The torch RNG
        is reseeded from (seed, epoch, rank): ranks draw different z, and a resumed run
        repeats the uninterrupted one.
        """
        from torch.utils.data import Dataset, DistributedSampler

        indices = cast("Dataset[int]", range(num_data))  # the sampler only takes its len()
        sampler: DistributedSampler[int] = DistributedSampler(
            indices, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)[0]))
        return torch.tensor(list(iter(sampler)), dtype=torch.long, device=device)

    def shard(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Rows ``rank, rank + W, ...`` of ``x`` (evaluation work split; no padding)."""
        return None if x is None else x[self.rank :: self.world_size]

    # -- collectives ----------------------------------------------------------------------

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of a scalar tensor over ranks (each rank gets the same value)."""
        value = value.detach().clone()
        with self.collective("averaging the loss"):
            tdist.all_reduce(value)
        return value / self.world_size

    def global_mean(self, values: torch.Tensor) -> float:
        """Mean of per-datapoint ``values`` of all ranks' shards together (sum and count all-reduced)."""
        total = torch.stack([values.double().sum(), values.new_tensor(values.numel(), dtype=torch.float64)])
        with self.collective("averaging the ELBO"):
            tdist.all_reduce(total)
        return float(total[0] / total[1])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with self.collective("broadcasting from rank 0"):
            tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        with self.collective("waiting for all ranks"):
            tdist.barrier()

    def wrap_stepper(self, stepper: Stepper) -> Stepper:
        """Make ``stepper``'s step this rank's: its loss runs through DistributedDataParallel
        (gradients averaged over ranks), the value it reports is the mean over ranks (the
        single-process loss of the global batch), and a non-finite mean stops every rank alike."""
        if not stepper.data_parallel:
            raise ConfigError(
                f"{stepper.describe()} cannot run data-parallel (train.method/train.objective); {one_process()}",
                field="train.method",
            )
        stepper.dist = self
        return stepper

    def ddp_module(
        self, vae: nn.Module, loss_fn: Callable[..., Any], x: torch.Tensor, kwargs: Dict[str, Any]
    ) -> nn.parallel.DistributedDataParallel:
        """``loss_fn`` (a stepper's loss) as the forward of a DDP module that owns ``vae``."""
        module = ELBOLoss(vae, loss_fn)
        # DDP must be told about parameters that get no gradient; find out once with a probe.
        # The probe runs on a forked RNG, so that a resumed run draws the same z as an uninterrupted one.
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = module(x, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        unused = any(g is None for g in grads)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with self.collective("wrapping the model in DistributedDataParallel"):
            return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=unused)


def _looks_like_comm_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        k in text
        for k in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "gloo", "nccl")
    )


class ELBOLoss(nn.Module):
    """``forward(x, **kwargs)`` = a stepper's loss of ``module`` (Pyro's ELBOModule pattern).

    DDP triggers its gradient all-reduce from the wrapped module's forward; the model and
    guide are methods of the VAE, so this module owns the VAE (its parameters are DDP's) and
    its forward calls ``loss_fn``, the stepper's own loss.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.module = module
        self._loss_fn = loss_fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        return self._loss_fn(x, **kwargs)


# -- process group --------------------------------------------------------------------------


def init_process_group(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group described by torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Backend gloo for ``device`` cpu, nccl for cuda (rank uses ``cuda:LOCAL_RANK``); "auto"
    picks CUDA when available. Every collective fails after ``timeout_s`` seconds.
    """
    check_timeout(timeout_s)
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"not launched by torchrun: {', '.join(missing)} not set; use torchrun or nproc > 1")
    rank, world_size = env_int("RANK", None), env_int("WORLD_SIZE", None)
    local_rank = env_int("LOCAL_RANK", rank)
    kind = resolve_device(device if device in ("cpu", "auto") else "cuda").type
    dev = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not tdist.is_initialized():
        tdist.init_process_group(BACKENDS[kind], timeout=timeout, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, timeout_s=timeout_s)


@contextmanager
def process_group(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """:func:`init_process_group` for the block, then leave the group if this block joined it
    (a group that already existed, e.g. one the caller set up, stays)."""
    joined = not tdist.is_initialized()
    ctx = init_process_group(device, timeout_s)
    try:
        yield ctx
    finally:
        if joined and tdist.is_initialized():
            tdist.destroy_process_group()


def check_timeout(timeout_s: float) -> None:
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")


# -- launcher for one machine ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    local_rank: int, nproc: int, port: int, fn: Callable, args: Sequence, kwargs: dict, errors: Any, results: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(nproc),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        text = " ".join(str(exc).split())
        errors.put(text if isinstance(exc, DistributedError) else f"rank {local_rank}: {type(exc).__name__}: {text}")
        raise
    # plain pickle copies tensors; torch's queue pickler would share memory that dies with us
    results.put((local_rank, pickle.dumps(result)))


def launch(fn: Callable, args: Sequence = (), kwargs: Optional[dict] = None, *, nproc: int) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` processes on this machine, as torchrun would.

    Each process gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), so ``fn`` joins the group with :func:`init_process_group`. ``fn`` must be
    importable (a module-level function) and its result picklable. Returns the results by
    rank. When a process fails, the others are stopped and :class:`DistributedError` names
    the first failure.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    spawn = mp.get_context("spawn")
    errors, results = spawn.SimpleQueue(), spawn.SimpleQueue()
    context = mp.start_processes(
        _worker,
        args=(nproc, _free_port(), fn, tuple(args), dict(kwargs or {}), errors, results),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )
    by_rank: Dict[int, Any] = {}
    try:
        while True:
            while not results.empty():  # drain, so a large result never blocks its process
                rank, value = results.get()
                by_rank[rank] = pickle.loads(value)
            if context.join(timeout=0.2):
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        first = errors.get() if not errors.empty() else f"process {exc.error_index} failed ({exc})"
        raise DistributedError(f"distributed run stopped: {first}") from None
    finally:  # on Ctrl-C (or any error here) leave no process behind
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    while not results.empty():
        rank, value = results.get()
        by_rank[rank] = pickle.loads(value)
    return [by_rank.get(r) for r in range(nproc)]
