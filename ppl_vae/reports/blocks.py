"""Datapoints scored in fixed blocks, each with its own seed, on one process or several.

Why blocks: for results that do not depend on how datapoints are grouped, every driver
(``evaluate``, ``compare``, the multi-run comparison) scores the selected datapoints in fixed
blocks of ``block_size`` consecutive datapoints, and each block draws its randomness from a
seed derived from (``seed``, the block's first datapoint) — :func:`block_seed`. A block's
numbers are then the same whichever process scores it and whatever was scored before it, so
splitting the blocks over processes (``nproc``, or the ranks of a ``torchrun`` launch) and
joining them in order gives the per-datapoint results of one process exactly. Each block runs
under :func:`torch.random.fork_rng`, so the caller's global RNG state is left as it was.

Processes: :func:`map_blocks` gives each of W processes a contiguous run of whole blocks.
With ``nproc > 1`` it starts the processes itself (:func:`ppl_vae.inference.distributed.launch`)
and the parent joins their results; under ``torchrun`` every rank scores its share and the
results are exchanged with ``all_gather_object`` (gloo on CPU, nccl on CUDA), and only rank 0
writes files. A task sent to other processes is pickled without its loaded run and reloads
it there (:class:`BlockTask`).

Threads: :func:`set_threads` gives torch's intra-op pool the cores this process may use
(divided among the processes started on this machine) unless the user chose a number or
``OMP_NUM_THREADS`` is set. Matrix products may round differently with a different number of
threads, so "the same numbers as one process" is exact when the thread count per process is
the same (as in the tests); otherwise values agree to floating-point rounding.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ppl_vae.inference import modes
from ppl_vae.inference.modes import block_seed

Block = Tuple[int, int]


def block_bounds(num_datapoints: int, block_size: int) -> List[Block]:
    """``[(start, stop), ...]`` of consecutive blocks of ``block_size`` (the last may be shorter)."""
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return [(s, min(s + block_size, num_datapoints)) for s in range(0, num_datapoints, block_size)]


def shard(blocks: Sequence[Block], rank: int, world_size: int) -> List[Block]:
    """Rank ``rank``'s contiguous share of whole blocks (the first ranks take one more when uneven)."""
    m = len(blocks)
    lo, hi = (rank * m) // world_size, ((rank + 1) * m) // world_size
    return list(blocks[lo:hi])


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: Optional[int] = None, processes: int = 1) -> int:
    """Set torch's intra-op threads: ``threads`` when given, else the available cores divided
    among ``processes`` on this machine, unless ``OMP_NUM_THREADS`` says otherwise. Returns the
    number in use."""
    if threads is not None:
        if int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        torch.set_num_threads(int(threads))
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, available_cores() // max(1, processes)))
    return torch.get_num_threads()


def rank_device(device: str) -> str:
    """The device this process scores on. In a process of a torchrun launch or of
    :func:`map_blocks`' own (``LOCAL_RANK`` set), an unindexed ``"cuda"``, or ``"auto"`` where CUDA
    is present, is this process's GPU: ``cuda:LOCAL_RANK`` modulo the GPUs present, so ranks
    spread over the GPUs instead of all loading onto ``cuda:0``. Anything else is unchanged."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or device not in ("cuda", "auto") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % torch.cuda.device_count()}"


class BlockTask:
    """Scores one block: ``task(start, stop) -> picklable result``.

    Subclasses keep what they loaded (the run, the selection) in ``self._cache``, which is
    not pickled, so a task sent to another process reloads it there with :meth:`load`, on
    ``device_name`` (which that process first passes through :func:`rank_device`).
    """

    #: the device the task loads its runs onto ("cpu", "cuda", "cuda:1", "auto")
    device_name: str = "auto"

    @property
    def device(self) -> Optional[torch.device]:
        """``device_name`` as a torch device; None for "auto" (whatever the run loads onto)."""
        return None if self.device_name == "auto" else torch.device(self.device_name)

    def __init__(self) -> None:
        self._cache: Optional[Any] = None

    def load(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def loaded(self) -> Any:
        if self._cache is None:
            self._cache = self.load()
        return self._cache

    def score(self, start: int, stop: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state


def _score_blocks(
    task: BlockTask, blocks: Sequence[Block], seed: int, threads: Optional[int], processes: int, progress: bool
) -> List[Any]:
    from tqdm.auto import tqdm

    set_threads(threads, processes)
    _ = task.loaded  # load before any block is seeded: loading may draw random numbers (initial weights)
    out = []
    for start, stop in tqdm(blocks, disable=not progress, desc="blocks", unit="block", dynamic_ncols=True):
        with modes.seeded(block_seed(seed, start), task.device):
            out.append(task.score(start, stop))
    return out


def _launched_shard(
    task: BlockTask, blocks: Sequence[Block], seed: int, threads: Optional[int], nproc: int
) -> List[Any]:
    """One process started by :func:`map_blocks`: score this rank's share (no process group needed)."""
    rank = int(os.environ["RANK"])
    task.device_name = rank_device(task.device_name)
    return _score_blocks(task, shard(blocks, rank, nproc), seed, threads, nproc, progress=False)


def is_writer() -> bool:
    """Whether this process writes results: always, except on the ranks > 0 of a torchrun launch."""
    from ppl_vae.inference import distributed

    return not distributed.launched_by_torchrun() or distributed.env_rank() == 0


def map_blocks(
    task: BlockTask,
    num_datapoints: int,
    block_size: int,
    seed: int,
    *,
    nproc: int = 1,
    threads: Optional[int] = None,
    progress: bool = False,
) -> List[Any]:
    """``task(start, stop)`` for every block, each under :func:`block_seed`, in block order.

    ``nproc > 1`` starts that many processes here; under ``torchrun`` (``nproc`` must then
    be 1) the launch's ranks share the blocks and every rank gets every result.
    """
    from ppl_vae.inference import distributed

    if int(nproc) != nproc or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc}")
    blocks = block_bounds(num_datapoints, block_size)
    if distributed.launched_by_torchrun():
        if nproc != 1:
            raise ValueError(f"nproc must be 1 under torchrun (torchrun starts the processes), got {nproc}")
        device = task.device.type if task.device is not None else "cpu"
        with distributed.process_group(device) as ctx:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
            mine = _score_blocks(
                task, shard(blocks, ctx.rank, ctx.world_size), seed, threads, local, progress and ctx.is_main
            )
            gathered: List[Any] = [None] * ctx.world_size
            with ctx.collective("gathering the per-block results"):
                torch.distributed.all_gather_object(gathered, mine)
        return [r for part in gathered for r in part]
    if nproc > 1:
        nproc = min(nproc, len(blocks))
    if nproc > 1:
        parts = distributed.launch(_launched_shard, (task, blocks, seed, threads, nproc), nproc=nproc)
        return [r for part in parts for r in part]
    return _score_blocks(task, blocks, seed, threads, 1, progress)


__all__ = [
    "BlockTask",
    "rank_device",
    "available_cores",
    "block_bounds",
    "block_seed",
    "is_writer",
    "map_blocks",
    "set_threads",
    "shard",
]
