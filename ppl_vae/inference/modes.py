"""Evaluation mode for analysis: every estimator scores the model as it is used at test time.

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
from typing import Any, Callable, Iterator, List, TypeVar

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
