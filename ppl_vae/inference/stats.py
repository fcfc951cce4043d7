"""The statistics every estimator shares: log-mean-exp, effective sample size, standard errors,
PSIS k-hat, and the one table of diagnostic thresholds.

Inference estimators compute with these and the analysis code reads their results; neither
re-implements them. PSIS k-hat comes from ArviZ through :mod:`ppl_vae.arviz_compat` (the one
module that imports it), imported on first use since ArviZ is slow to import.

Conventions: weights are given as log-weights with the draws along dim 0, ``(K, N)`` for K
draws of each of N datapoints; every function reduces dim 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    rule for every estimator). ``min_datapoints``: fewer datapoints than this make means over
    datapoints too noisy to compare. (Log-weights flat to within
    :data:`ppl_vae.arviz_compat.FLAT_LOG_WEIGHTS` have no tail for k̂ to fit.)
    """

    khat: float = 0.7
    min_ess: float = 10.0
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


def leave_one_out_log_mean_exp(log_w: Tensor) -> Tensor:
    """log (1/(K-1)) sum_{j != i} w_j for each i, ``(K, N)`` from ``log_w`` ``(K, N)`` (K >= 2).

    log(S - w_i) = log S + log1p(-w_i / S) is exact to rounding where w_i / S <= 1/2, which holds
    for every weight but the largest; the largest one's sum of the others is a logsumexp of its own.
    """
    k = log_w.shape[0]
    if k < 2:
        raise ValueError(f"leaving one of K weights out needs K >= 2, got {k}")
    log_s = torch.logsumexp(log_w, 0)
    loo = log_s + torch.log1p(-torch.exp(log_w - log_s).clamp(max=0.5))
    top = log_w.argmax(0, keepdim=True)
    others = torch.logsumexp(log_w.scatter(0, top, -math.inf), 0, keepdim=True)
    return loo.scatter(0, top, others) - math.log(k - 1)


def jackknife_log_mean_exp(log_w: Tensor) -> Tuple[Tensor, Tensor]:
    """The jackknife-debiased log mean w and its jackknife standard error over dim 0 (K >= 2).

    L_JK = K L_K - (K-1) mean_i L_{K-1}^(-i), with L_K the IW estimate log (1/K) sum_k w_k and
    L_{K-1}^(-i) the same without draw i (Nowozin 2018, "Debiasing evidence approximations",
    eq. 8 with order 1): the O(1/K) bias of L_K cancels, leaving O(1/K^2). It is an estimate of
    log p(x), neither a lower nor an upper bound. The standard error is the jackknife's,
    sqrt((K-1)/K sum_i (L_{K-1}^(-i) - mean)^2) (Efron & Stein 1981)."""
    k = log_w.shape[0]
    loo = leave_one_out_log_mean_exp(log_w)
    mean_loo = loo.mean(0)
    estimate = k * log_mean_exp(log_w) - (k - 1) * mean_loo
    se = ((k - 1) / k * ((loo - mean_loo) ** 2).sum(0)).sqrt()
    return estimate, se


def mean_se(u: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean over dim 0 and its standard error sd / sqrt(K) (NaN for K = 1)."""
    k = u.shape[0]
    se = u.std(0, unbiased=True) / math.sqrt(k) if k > 1 else torch.full_like(u[0], math.nan)
    return u.mean(0), se


def psis_khat(log_weights: np.ndarray | Tensor) -> np.ndarray:
    """Pareto k̂ of each datapoint's importance weights ``(K, N)`` (PSIS, Vehtari et al. 2024):
    :func:`ppl_vae.arviz_compat.psis_khat`, with ArviZ imported on first use. Above
    :attr:`Thresholds.khat` (0.7) an IW estimate and its standard error are unreliable."""
    from ppl_vae.arviz_compat import psis_khat as khat

    return khat(log_weights)
