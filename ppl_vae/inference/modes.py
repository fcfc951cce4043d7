"""The shared work of every estimator: evaluation mode, batches of datapoints, and its own random stream.

Evaluation mode: every estimator scores the model as it is used at test time.

A model in training mode may behave differently (dropout, word dropout, batch-norm batch
statistics), so an estimate computed on it depends on how the caller left it. The analysis
functions wrap their work in :func:`eval_mode`, which switches every torch module behind the
given callables (a module, or a bound method of one, such as ``vae.model``) to eval mode and
restores each submodule's own mode afterwards.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


def _modules_of(fns: Any) -> List[nn.Module]:
    found: List[nn.Module] = []
    for fn in fns:
        module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(module, nn.Module) and all(module is not m for m in found):
            found.append(module)
    return found


@contextmanager
def eval_mode(*fns: Any) -> Iterator[None]:
    """Put the modules behind ``fns`` in eval mode for the block; restore every submodule's mode."""
    modules = _modules_of(fns)
    saved = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, mode in saved:
            sub.training = mode


def in_eval_mode(*arg_names: str) -> Callable[[F], F]:
    """Decorator: run the function inside :func:`eval_mode` of its arguments ``arg_names``."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs).arguments
            with eval_mode(*(bound[n] for n in arg_names if bound.get(n) is not None)):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def batches(x: Any, kwargs: Mapping[str, Any], batch_size: int) -> Iterator[Tuple[Any, Dict[str, Any]]]:
    """``(x[i:i+batch_size], kwargs sliced alike)`` in order: every tensor kwarg with one row per
    datapoint (labels ``y``, say) is sliced with ``x``; other values pass through."""
    n = x.shape[0]
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        yield x[sl], {k: rows(v, n, sl) for k, v in kwargs.items()}


def rows(value: Any, n: int, index: Any) -> Any:
    """``value[index]`` when ``value`` is a tensor with one row per datapoint (``n`` rows), else ``value``."""
    if torch.is_tensor(value) and value.dim() and value.shape[0] == n:
        return value[index]
    return value


@contextmanager
def seeded(seed: Optional[int], device: Any = None) -> Iterator[None]:
    """Run the block on its own random stream: with ``seed``, torch (CPU and ``device``'s CUDA),
    NumPy and Python's ``random`` are seeded for the block and the caller's states are restored
    afterwards, so a library call never changes the caller's random stream. ``seed=None``: the
    block draws from (and advances) the caller's stream, as any torch call does."""
    if seed is None:
        yield
        return
    import random

    import numpy as np

    devices = []
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        devices = [torch.device(device)]
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def block_seed(seed: int, start: int, stream: int = 0) -> int:
    """A 63-bit seed for the block of datapoints starting at index ``start``, derived from
    ``seed`` (``stream`` separates independent uses, e.g. the scores and a report's draws):
    results then do not depend on how the blocks are shared among processes (the block size
    itself is part of the seeding: other blocks draw other samples)."""
    import numpy as np

    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(start)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def check_positive(name: str, value: Any) -> None:
    """A one-line ValueError naming ``name`` unless ``value`` is a positive integer."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def check_call_convention(name: str, guide: Any, x: Any) -> None:
    """A one-line TypeError when ``name`` is called the old way, ``(model, x, guide=...)``:
    every estimator takes ``(model, guide, x, *, ...)`` (guide None where none is used)."""
    if isinstance(guide, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} takes (model, guide, x, *, ...) like every estimator; got a "
            f"{type(guide).__name__} as guide and a {type(x).__name__} as x (pass guide=None where none is used)"
        )
