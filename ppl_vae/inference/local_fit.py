"""The loop shared by the per-datapoint fits: Adam on each datapoint's own variational parameters.

:func:`~ppl_vae.inference.meanfield.fit_mean_field` (diagonal Gaussians) and
:func:`~ppl_vae.inference.local_flows.fit_local_flow` (flows) both fit, with the model frozen, a
separate q*_i to every datapoint, a block of datapoints at a time: one Adam step updates every
q*_i of the block (the loss is a sum of independent per-datapoint terms and Adam's steps are per
element, so each datapoint follows its own trajectory) until the :class:`~ppl_vae.inference.plateau.Plateau` rule or
``max_steps`` stops the block. :func:`fit_local` is that loop (batching, seeding, eval mode, the
progress bar, the finite check, the stopping rule, the trace); a family supplies only a
:class:`LocalBlock` per block of datapoints: its parameters, its loss, and what it makes of the
fitted block (a polish, the final evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from ppl_vae.inference.modes import batches, eval_mode, seeded
from ppl_vae.inference.optim import EagerAdam
from ppl_vae.inference.plateau import Plateau

__all__ = ["LocalBlock", "LocalFit", "fit_local"]

R = TypeVar("R")


@dataclass(frozen=True)
class LocalBlock(Generic[R]):
    """A block's variational parameters and how they are scored, from the family's ``start``.

    ``params``: the leaf tensors Adam updates (only they get gradients: the model stays frozen).
    ``loss()``: the block's negative ELBO estimate summed over its datapoints, each term depending
    only on its own datapoint's parameters. ``finish(params, history, converged)``: the block's
    result, given the fitted ``params`` (detached; the last full window's mean iterate with
    ``average``), ``history`` (mean ELBO per datapoint at every step) and whether the plateau
    rule stopped the block before ``max_steps``.
    """

    params: Sequence[Tensor]
    loss: Callable[[], Tensor]
    finish: Callable[[List[Tensor], List[float], bool], R]


@dataclass
class LocalFit(Generic[R]):
    """What :func:`fit_local` returns. ``blocks``: what each block's ``finish`` returned, in order.
    ``num_steps``: ``(N,)`` Adam steps taken by each datapoint's block. ``converged``: ``(N,)`` bool,
    whether its block met the plateau rule before ``max_steps``. ``trace``: ``(block, step)`` mean
    ELBO per datapoint at every step (NaN after a block stopped)."""

    blocks: List[R]
    num_steps: Tensor
    converged: Tensor
    trace: Tensor


def fit_local(
    x: Tensor,
    kwargs: Dict[str, Any],
    start: Callable[[Tensor, Dict[str, Any], slice], LocalBlock[R]],
    *,
    what: str,
    modules: Sequence[Any] = (),
    lr: float,
    max_steps: int,
    window: int,
    tol: float,
    num_lr_decays: int,
    batch_size: int,
    progress: bool,
    seed: Optional[int],
    average: bool = False,
) -> LocalFit[R]:
    """Fit every block of ``batch_size`` datapoints of ``x`` (with ``kwargs`` sliced alike).

    ``start(xb, kw, rows)`` makes the block of datapoints ``rows`` of ``x`` at its initial
    parameters. Adam with learning rate ``lr`` then steps on its loss; every ``window`` steps the
    mean ELBO over the window is compared with the previous window's, a relative change below
    ``tol`` halves the learning rate, and after ``num_lr_decays`` halvings the next plateau stops
    the block (``max_steps`` stops it otherwise). ``what`` names the fit in the progress bar and
    in errors; ``modules`` (model, guide) are in eval mode throughout, and ``seed`` gives the fit its
    own random stream (the caller's RNG state is left as it was). With ``average``, ``finish`` gets
    the mean iterate of the last full window (Polyak averaging: far less SGD noise than the last
    iterate), or the last iterate when the block stopped before a full window. Options are
    checked by the caller.
    """
    from tqdm.auto import tqdm

    blocks: List[R] = []
    traces: List[List[float]] = []
    steps: List[Tensor] = []
    converged: List[Tensor] = []
    bar = tqdm(
        total=math.ceil(x.shape[0] / batch_size) * max_steps,
        disable=not progress,
        desc=what,
        unit="step",
        dynamic_ncols=True,
    )
    with eval_mode(*modules), seeded(seed, x.device), bar:
        for i, (xb, kw) in enumerate(batches(x, kwargs, batch_size)):
            block = start(xb, kw, slice(i * batch_size, i * batch_size + xb.shape[0]))
            params = list(block.params)
            optim = EagerAdam(params, lr=lr)  # torch's Adam, without importing torch._dynamo (1.4 s)
            history: List[float] = []
            done, plateau = False, Plateau(optim, window=window, tol=tol, num_decays=num_lr_decays)
            sums = [torch.zeros_like(p) for p in params] if average else []
            fitted: List[Tensor] = []
            for step in range(max_steps):
                loss = block.loss()
                if not torch.isfinite(loss):
                    raise ValueError(f"{what} diverged (non-finite ELBO at step {step}); lower lr (now {lr})")
                grads = torch.autograd.grad(loss, params)  # the model's parameters get no gradient
                for p, g in zip(params, grads):
                    p.grad = g
                optim.step()
                history.append(-float(loss.detach()) / xb.shape[0])
                bar.update(1)
                if average:
                    with torch.no_grad():
                        for total, p in zip(sums, params):
                            total += p
                    if plateau.window_ends(history):
                        fitted = [total / window for total in sums]
                        sums = [torch.zeros_like(p) for p in params]
                if plateau.update(history):  # a plateau halves the step size; the last one stops
                    done = True
                    bar.update(max_steps - step - 1)
                    break
            if not average or len(history) < window:
                fitted = [p.detach() for p in params]
            blocks.append(block.finish(fitted, history, done))
            steps.append(torch.full((xb.shape[0],), len(history), dtype=torch.long))
            converged.append(torch.full((xb.shape[0],), done, dtype=torch.bool))
            traces.append(history)
    longest = max(len(t) for t in traces)
    trace = torch.full((len(traces), longest), math.nan)
    for i, t in enumerate(traces):
        trace[i, : len(t)] = torch.tensor(t)
    return LocalFit(blocks, torch.cat(steps), torch.cat(converged), trace)
