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


#: nats: log-weights spread less than this are constant up to rounding (no tail for k̂ to fit); the
#: same threshold as ppl_vae.arviz_compat (torch-free, so it cannot import this module)
FLAT_LOG_WEIGHTS = 1e-4


def psis_khat(log_weights: np.ndarray | Tensor) -> np.ndarray:
    """Pareto k̂ of each datapoint's importance weights ``(K, N)`` (PSIS, Vehtari et al. 2024).

    For each datapoint, a generalized Pareto distribution is fitted to its largest
    ceil(min(K/5, 3 sqrt(K))) weights by the empirical-Bayes estimate of Zhang & Stephens (2009),
    with the weakly informative prior on k of Vehtari et al. (the same steps and constants as
    ArviZ 0.x's ``psislw``, which :func:`ppl_vae.arviz_compat.psis_khat` calls and a test
    compares against; computed here in NumPy, so scoring imports no ArviZ). Above
    :attr:`Thresholds.khat` (0.7) an IW estimate and its standard error are unreliable; below 0.5
    the weights have finite variance. -inf where the log-weights are constant to within
    :data:`FLAT_LOG_WEIGHTS` (q equal to the posterior); NaN where K < 21 (fewer than 5 tail
    draws) or the tail cannot be fitted.
    """
    lw = log_weights.detach().cpu().double().numpy() if isinstance(log_weights, Tensor) else np.asarray(log_weights)
    lw = np.asarray(lw, dtype=np.float64)
    if lw.ndim != 2:
        raise ValueError(f"log_weights must have shape (num_samples, num_datapoints), got {lw.shape}")
    k_draws = lw.shape[0]
    out = np.full(lw.shape[1], np.nan)
    if k_draws < 21:  # the top ceil(0.2 K) draws must be at least 5
        return out
    cutoff_index = -int(np.ceil(min(k_draws / 5.0, 3 * k_draws**0.5))) - 1
    cutoff_min = np.log(np.finfo(float).tiny)
    for i in range(lw.shape[1]):
        x = lw[:, i] - lw[:, i].max()
        if x.min() > -FLAT_LOG_WEIGHTS:
            out[i] = -np.inf
            continue
        cutoff = max(np.sort(x)[cutoff_index], cutoff_min)
        tail = np.sort(x[x > cutoff])
        if tail.size <= 4:
            continue
        out[i] = _gpd_shape(np.exp(tail) - np.exp(cutoff))
    return out


def _gpd_shape(tail: np.ndarray) -> float:
    """The generalized Pareto shape k fitted to the sorted exceedances ``tail`` (Zhang & Stephens
    2009, with Vehtari et al.'s prior pulling k toward 0.5 with weight 10); NaN if it cannot be fitted."""
    n = tail.size
    m = 30 + int(n**0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b /= 3 * tail[int(n / 4 + 0.5) - 1]
    b += 1 / tail[-1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = np.log1p(-b[:, None] * tail).mean(axis=1)
        profile = n * (np.log(-(b / k)) - k - 1)
        weights = 1 / np.exp(profile - profile[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, b = weights[keep], b[keep]
    if not weights.size or not np.isfinite(weights).all():
        return float("nan")
    weights /= weights.sum()
    b_post = float(np.sum(b * weights))
    k_post = float(np.log1p(-b_post * tail).mean())
    k_post = (n * k_post + 10 * 0.5) / (n + 10)
    return k_post if np.isfinite(k_post) else float("nan")
