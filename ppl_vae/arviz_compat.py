"""ArviZ, imported in this one module, and what the library takes from it: the version switch
between ArviZ 1.x (xarray DataTree; ``arviz_stats``) and 0.x (InferenceData), and PSIS k-hat.

Torch-free on purpose: the ArviZ 1.x export is tested in a Python >= 3.12 environment without
torch (``make test-arviz1``). :mod:`ppl_vae.inference.stats` re-exports :func:`psis_khat`
for the estimators; :mod:`ppl_vae.analysis.results` builds InferenceData with :data:`az`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x announces its refactor on import
    import arviz as az

#: ArviZ's major version: 1 builds xarray DataTrees (arviz-base/arviz-stats), 0 InferenceData
ARVIZ_MAJOR = int(az.__version__.split(".")[0])


def _numpy(value: Any) -> np.ndarray:
    """A tensor or array as float64 numpy (tensors detached and moved to the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


FLAT_LOG_WEIGHTS = 1e-4
"""nats: log-weights spread less than this are constant up to rounding (no tail for k-hat to fit)."""


def psis_khat(log_weights: Any) -> np.ndarray:
    """Pareto k̂ of each datapoint's importance weights (PSIS, Vehtari et al. 2024), via ArviZ's
    ``psislw`` (``arviz.psislw`` in 0.x, ``arviz_stats`` in 1.x).

    ``log_weights``: ``(K, N)``, K draws for each of N datapoints. k̂ is the shape of a
    generalized Pareto distribution fitted to the largest weights: below 0.5 the weights have
    finite variance; 0.5-0.7 the IW estimate is usable but noisy; above 0.7 its error is
    dominated by rare huge weights and its standard error cannot be trusted (use more samples, a
    better guide, or AIS). Weights constant to within 1e-4 nats (q equal to the posterior, up to
    float32 rounding of the log-weights) have no tail to fit: -inf. NaN where K is too small for
    a tail fit (ArviZ 0.x fits the top ceil(0.2 K) draws and needs 5 of them: K >= 21; 1.x
    needs more) or where the tail cannot be fitted (all its values equal).
    """
    lw = _numpy(log_weights)
    if lw.ndim != 2:
        raise ValueError(f"log_weights must have shape (num_samples, num_datapoints), got {lw.shape}")
    lw = (lw - lw.max(axis=0, keepdims=True)).T  # arviz reads the last dim as draws
    flat = lw.min(axis=1) > -FLAT_LOG_WEIGHTS
    if lw.shape[1] < 21:  # ArviZ fits the top ceil(0.2 K) draws and needs at least 5 of them
        khat = np.full(lw.shape[0], np.nan)
    elif ARVIZ_MAJOR >= 1:
        khat = np.array([np.nan if f else _khat_1x(row) for row, f in zip(lw, flat)])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flat tails: k̂ comes back inf, with a warning
            _, khat = az.psislw(lw)
    khat = np.asarray(khat, dtype=np.float64).reshape(lw.shape[0])
    khat[np.isposinf(khat)] = np.nan  # ArviZ's marker for "too few tail draws to fit"
    khat[flat] = -np.inf
    return khat


def _khat_1x(log_weights: np.ndarray) -> float:
    """k̂ of one datapoint's log-weights ``(K,)`` under ArviZ 1.x, whose ``psislw`` takes log
    *ratios* as LOO does (it smooths the tail of ``-ary``): pass the log-weights negated."""
    from arviz_stats.base import array_stats

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, khat = array_stats.psislw(-log_weights, axis=-1)
    except ValueError:  # too few tail draws, or a tail of equal values: nothing to fit
        return float("nan")
    return float(khat)
