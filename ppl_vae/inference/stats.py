"""The statistics every estimator shares: log-mean-exp, effective sample size, standard errors,
PSIS k-hat, and the one table of diagnostic thresholds.

Inference estimators compute with these and the analysis code reads their results; neither
re-implements them. This is the only module that imports ArviZ (lazily: it is slow to import),
and :func:`arviz` hands the module to the code that builds InferenceData.

Conventions: weights are given as log-weights with the draws along dim 0, ``(K, N)`` for K
draws of each of N datapoints; every function reduces dim 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Tuple

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Thresholds:
    """When an estimate is flagged as weak; every warning of the library reads this one table.

    ``khat``: PSIS k̂ above it means the importance-sampling estimate and its standard error are
    unreliable (Vehtari et al. 2024). ``min_ess``: K weights (importance draws or AIS chains)
    whose ESS is below ``min(min_ess, K / 2)`` rest on a few draws (:meth:`low_ess`, the one
    rule for every estimator). ``flat_log_weights``:
    log-weights spread less than this (nats) are constant up to rounding (q equals the
    posterior), and have no tail for k̂ to fit. ``min_datapoints``: fewer datapoints than this
    make means over datapoints too noisy to compare.
    """

    khat: float = 0.7
    min_ess: float = 10.0
    flat_log_weights: float = 1e-4
    min_datapoints: int = 30

    def low_ess(self, ess: Tensor | np.ndarray, num_draws: int) -> np.ndarray:
        """Boolean mask of the ESS values that count as low for ``num_draws`` weights."""
        ess = ess.detach().cpu().numpy() if torch.is_tensor(ess) else np.asarray(ess)
        return ess < min(self.min_ess, 0.5 * num_draws)


THRESHOLDS = Thresholds()


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K) sum_k exp(log_w_k) over ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def ess(log_w: Tensor, dim: int = 0) -> Tensor:
    """Effective sample size (sum w)^2 / sum w^2 over ``dim`` (Kong 1992), between 1 and K."""
    return torch.exp(2 * torch.logsumexp(log_w, dim) - torch.logsumexp(2 * log_w, dim))


def log_mean_exp_se_from_ess(ess_: Tensor, num_draws: int) -> Tensor:
    """Delta-method standard error of log mean w from the weights' ESS:
    sqrt(Var(w) / K) / mean(w) = sqrt((1/ESS - 1/K) K / (K - 1)); NaN for K = 1."""
    if num_draws < 2:
        return torch.full_like(ess_, math.nan)
    k = num_draws
    return ((1.0 / ess_ - 1.0 / k).clamp_min(0.0) * k / (k - 1)).sqrt()


def log_mean_exp_stats(log_w: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(log mean w, its delta-method standard error, ESS) over dim 0 of ``log_w`` ``(K, N)``."""
    e = ess(log_w)
    return log_mean_exp(log_w), log_mean_exp_se_from_ess(e, log_w.shape[0]), e


def mean_se(u: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean over dim 0 and its standard error sd / sqrt(K) (NaN for K = 1)."""
    k = u.shape[0]
    se = u.std(0, unbiased=True) / math.sqrt(k) if k > 1 else torch.full_like(u[0], math.nan)
    return u.mean(0), se


def arviz() -> ModuleType:
    """The ArviZ module, imported on first use (its import announcements silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its refactor on import
        import arviz as az
    return az


def psis_khat(log_weights: np.ndarray | Tensor) -> np.ndarray:
    """Pareto k̂ of each datapoint's importance weights (PSIS, Vehtari et al. 2024), via ArviZ.

    ``log_weights``: ``(K, N)``, K draws for each of N datapoints. k̂ is the shape of a
    generalized Pareto distribution fitted to the largest weights: below 0.5 the weights have
    finite variance; 0.5-0.7 the IW estimate is usable but noisy; above
    :attr:`Thresholds.khat` (0.7) its error is dominated by rare huge weights and its standard
    error cannot be trusted (use more samples, a better guide, or AIS). Weights constant to
    within :attr:`Thresholds.flat_log_weights` (q equal to the posterior, up to float32
    rounding) have no tail to fit: -inf. NaN where K is too small for a tail fit (ArviZ needs
    5 tail draws: K >= 21).
    """
    lw = (log_weights.detach().cpu().double().numpy() if torch.is_tensor(log_weights)
          else np.asarray(log_weights, dtype=np.float64))
    if lw.ndim != 2:
        raise ValueError(f"log_weights must have shape (num_samples, num_datapoints), got {lw.shape}")
    lw = (lw - lw.max(axis=0, keepdims=True)).T  # arviz reads the last dim as draws
    if lw.shape[1] < 21:  # ArviZ fits the top ceil(0.2 K) draws and needs at least 5 of them
        khat = np.full(lw.shape[0], np.nan)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flat tails: k̂ comes back inf, with a warning
            _, khat = arviz().psislw(lw)
    khat = np.asarray(khat, dtype=np.float64).reshape(lw.shape[0])
    khat[np.isposinf(khat)] = np.nan  # ArviZ's marker for "too few tail draws to fit"
    khat[lw.min(axis=1) > -THRESHOLDS.flat_log_weights] = -np.inf
    return khat
