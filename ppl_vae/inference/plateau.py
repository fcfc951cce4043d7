"""A stopping rule for stochastic optimization that sits above the Monte Carlo noise.

Per-step ELBO estimates are noisy, so :class:`Plateau` compares the mean objective of whole
windows: when a window's mean differs from the previous one's by at most ``tol`` (relative),
the step size is halved (the iterates' SGD noise scales with it), and after ``num_decays``
halvings the next plateau ends the optimization. Used by per-datapoint mean-field VI and
local flows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


class Plateau:
    """Call :meth:`update` after each step with the objective history; True means stop."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, window: int, tol: float, num_decays: int):
        self.optimizer = optimizer
        self.window = window
        self.tol = tol
        self.decays_left = num_decays
        self.previous: Optional[float] = None

    def window_ends(self, history: Sequence[float]) -> bool:
        """Whether the last step completed a window."""
        return len(history) % self.window == 0

    def update(self, history: Sequence[float]) -> bool:
        """At the end of a window: halve the step size on a plateau, or stop when no halving is
        left. True when the optimization has converged."""
        if not self.window_ends(history):
            return False
        current = float(np.mean(history[-self.window :]))
        previous, self.previous = self.previous, current
        if previous is None or abs(current - previous) > self.tol * max(abs(previous), 1e-8):
            return False
        if self.decays_left == 0:
            return True
        self.decays_left -= 1
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5
        return False
