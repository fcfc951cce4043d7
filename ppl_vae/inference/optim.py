"""torch's Adam without importing torch.compile's machinery.

Every public method of ``torch.optim.Optimizer`` (``add_param_group``, ``zero_grad``,
``state_dict``, ``load_state_dict``) and ``Adam.step`` is wrapped so that torch.compile does not
trace into it, and the first call of each wrapper imports ``torch._dynamo``: on this project's CPU
machine that import is about 1 s, longer than ``import torch`` itself and most of ``ppl-vae fit``'s
start-up to its first training step (benchmarks/README.md, ``bench_startup.py``).

:class:`EagerAdam` is ``torch.optim.Adam`` with those methods bound to the functions the wrappers
wrap (``functools.wraps`` keeps them as ``__wrapped__``), and ``step`` run under the grad mode
the wrapper would set. The update, the state and the ``state_dict`` format are torch's own, so
checkpoints load into either class and ``torch.optim.lr_scheduler`` accepts it
(``tests/inference/test_optim.py`` checks bit-identical steps against ``torch.optim.Adam``). The
only difference is that torch.compile may trace into its methods if someone compiles a function
that calls them; ppl_vae compiles the loss only, never the optimizer step.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The name of the torch.optim class ``optimizer`` is (``"Adam"`` for :class:`EagerAdam`), or
    of its own class when it derives from none: what a checkpoint records, so that runs saved by
    either Adam resume with the other."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls is not torch.optim.Optimizer:
            return cls.__name__
    return type(optimizer).__name__


class EagerAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, update and state) whose methods do not import
    ``torch._dynamo``; see the module docstring."""

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)
    _adam_step = inspect.unwrap(torch.optim.Adam.step)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One Adam update (``closure``, if given, re-evaluates the loss with grad enabled)."""
        previous = torch.is_grad_enabled()
        try:
            # what torch's _use_grad_for_differentiable wrapper does, minus its graph breaks
            torch.set_grad_enabled(self.defaults["differentiable"])
            return self._adam_step(closure)
        finally:
            torch.set_grad_enabled(previous)


def burda_stage(epoch: int, num_stages: int) -> int:
    """The stage i of Burda et al.'s schedule that epoch ``epoch`` (from 0) falls in: stage i spans
    the 3^i epochs [(3^i - 1) / 2, (3^(i+1) - 1) / 2); after the last stage it stays there."""
    stage, end = 0, 1
    while epoch >= end and stage < num_stages - 1:
        stage += 1
        end += 3**stage
    return stage


class BurdaLR(torch.optim.lr_scheduler.LRScheduler):
    """Burda, Grosse & Salakhutdinov (2015), section 5: 3^i epochs at lr · 10^(-i/7) for i = 0 ..
    ``num_stages`` - 1 (3,280 epochs for their 8 stages), then the last rate. Stepped once per
    epoch like every ``train.lr_schedule``; ``train.lr`` is the first stage's rate (theirs: 1e-3)."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_stages: int = 8, last_epoch: int = -1):
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        self.num_stages = num_stages
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:  # type: ignore[override]
        factor = 10 ** (-burda_stage(max(self.last_epoch, 0), self.num_stages) / 7)
        return [base * factor for base in self.base_lrs]


#: learning-rate schedules of the library's own, beside torch's ``lr_scheduler`` classes
LR_SCHEDULES = {"BurdaLR": BurdaLR}
