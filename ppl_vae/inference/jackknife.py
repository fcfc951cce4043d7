"""The jackknife estimator of log p(x) (Nowozin 2018, "Debiasing evidence approximations").

The importance-weighted estimate L_K = log (1/K) sum_k w_k is biased low by O(1/K). The
jackknife L_JK = K L_K - (K-1) mean_i L_{K-1}^(-i), from the same K weights with each left out
in turn, cancels that term, leaving O(1/K^2): closer to log p(x) at the same K, but an
estimate, neither a lower nor an upper bound (at small K it can overshoot log p(x)).

This module is the whole of the estimator: it draws the weights as IW does
(:func:`~ppl_vae.inference.importance.weight_chunks`: the same draws for the same seed) and
registers itself; ``ppl-vae evaluate --estimator jackknife``, multi-run ``compare --estimator
jackknife`` and the docs' table pick it up from the registry.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ppl_vae.inference.estimators import Estimate, diagnostic, register_estimator, variable, weight_warnings
from ppl_vae.inference.importance import _WeightAccumulator, weight_chunks
from ppl_vae.inference.modes import in_eval_mode
from ppl_vae.inference.stats import jackknife_log_mean_exp, psis_khat

REFERENCE = "Nowozin (2018), Debiasing evidence approximations (ICLR); Efron & Stein (1981)"


def _warnings(ds: Any, names: Dict[str, str]) -> List[str]:
    return weight_warnings(ds, names, num_draws=int(ds.attrs["num_samples"]), what="jackknife")


@register_estimator(
    "jackknife",
    title="jackknife-debiased importance sampling with the guide (bias O(1/K^2) against IW's O(1/K))",
    bound="neither",
    reference=REFERENCE,
    warnings=_warnings,
)
@torch.no_grad()
@in_eval_mode("model", "guide")
def jackknife(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    seed: Optional[int] = None,
    num_samples: int = 1000,
    batch_size: int = 100,
    particle_batch_size: Optional[int] = None,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    """The jackknife estimate of log p(x) per datapoint from K = ``num_samples`` draws of q(z|x)
    (K >= 2), its jackknife standard error, and from the same weights the IW estimate it
    debiases (``log_px_iw``, a stochastic lower bound), the ELBO, ESS and PSIS k̂. Keeps one
    batch's ``batch_size`` x K weights in memory."""
    if num_samples < 2:
        raise ValueError(
            f"the jackknife leaves one of num_samples draws out: needs num_samples >= 2, got {num_samples}"
        )
    parts: List[tuple] = []
    for xb, chunks in weight_chunks(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        particle_batch_size=particle_batch_size,
        progress=progress,
        seed=seed,
        desc="jackknife",
        **kwargs,
    ):
        acc = _WeightAccumulator(xb.shape[0], xb.device)
        kept = []
        for log_w in chunks:
            acc.add(log_w)
            kept.append(log_w.detach().double().cpu())
        log_w = torch.cat(kept)
        jk, jk_se = jackknife_log_mean_exp(log_w)
        khat = torch.from_numpy(psis_khat(log_w))
        parts.append((jk, jk_se, *(t.cpu() for t in acc.result()), khat))
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    jk, jk_se, log_p, log_p_se, elbo, elbo_se, ess, khat = (torch.cat(p).to(dtype).to(x.device) for p in zip(*parts))
    k = int(num_samples)
    return Estimate(
        "jackknife",
        jk,
        jk_se,
        "neither",
        f"jackknife-debiased estimate of log p(x) from K={k} draws of q (Nowozin 2018; bias O(1/K^2); nats; "
        "neither a lower nor an upper bound)",
        {
            "log_px_iw": variable(log_p, "lower bound", f"IW estimate of log p(x) from the same K={k} weights (nats)"),
            "log_px_iw_stderr": variable(log_p_se, "neither", "Monte Carlo standard error of log_px_iw (nats)"),
            "elbo": variable(elbo, "lower bound", "Monte Carlo ELBO of q from the same draws (nats)"),
            "elbo_stderr": variable(elbo_se, "neither", "Monte Carlo standard error of elbo (nats)"),
            "ess": diagnostic(ess, f"effective sample size of the {k} importance weights"),
            "khat": diagnostic(khat, "PSIS Pareto k-hat of the importance weights (> 0.7: unreliable)"),
        },
        settings={"num_samples": k},
        reference=REFERENCE,
    )
