"""Anomaly scores from a trained VAE, detection metrics, and the size/latency comparison.

Scores (higher = more anomalous), for any model/guide pair following the contract:

- ``neg_elbo``: -ELBO(x), a bound on -log p(x) (Kim et al. 2017 score windows this way);
- ``reconstruction_probability`` (An & Cho 2015): -log (1/L) sum_l p(x | z_l), z_l ~ q(z|x),
  the probability of x under the decoder averaged over posterior draws (no KL term).

Metrics: AUROC and AUPRC (scikit-learn's ``roc_auc_score`` and ``average_precision_score``)
for 0/1 labels, 1 = anomaly.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from ppl_vae.data.ondisk import NpyRows
from ppl_vae.inference.importance import elbo_per_datapoint
from ppl_vae.inference.latents import traced_log_probs
from ppl_vae.inference.modes import eval_mode
from ppl_vae.models.vae import VAE
from ppl_vae.registry import Registry

ScoreFn = Callable[[VAE, Tensor, int], Tensor]
SCORES: Registry[ScoreFn] = Registry("anomaly score")


@SCORES.register(
    "neg_elbo",
    doc="-ELBO, -E_q[log p(x,z) - log q(z|x)]: a Monte Carlo estimate of an upper bound on -log p(x) (Kim et al. 2017)",
)
def neg_elbo_score(vae: VAE, x: Tensor, num_samples: int) -> Tensor:
    """-ELBO of each datapoint with ``num_samples`` draws of z, shape ``(N,)``."""
    return -elbo_per_datapoint(vae.model, vae.guide, x, num_particles=num_samples, batch_size=len(x))


@SCORES.register(
    "reconstruction_probability",
    doc="-log of p(x|z) averaged over draws z ~ q(z|x), a Monte Carlo estimate (An & Cho 2015)",
)
@torch.no_grad()
def reconstruction_probability_score(vae: VAE, x: Tensor, num_samples: int) -> Tensor:
    """-log (1/L) sum_l p(x | z_l) with z_l ~ q(z|x), ``L = num_samples``, shape ``(N,)``."""
    log_px = traced_log_probs(vae.model, vae.guide, x, num_particles=num_samples)[0].log_likelihood
    return -(torch.logsumexp(log_px, 0) - math.log(num_samples))


@torch.no_grad()
def anomaly_scores(
    vae: VAE,
    x: Tensor | NpyRows,
    *,
    score: str = "neg_elbo",
    num_samples: int = 10,
    batch_size: int = 500,
    progress: bool = False,
) -> Tensor:
    """Anomaly score of each datapoint of ``x`` (``(N, *event_shape)``) -> ``(N,)``, higher = more anomalous."""
    from tqdm.auto import tqdm

    fn = SCORES.get(score)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with eval_mode(vae):
        starts = range(0, len(x), batch_size)
        parts = [
            fn(vae, x[s : s + batch_size], num_samples)
            for s in tqdm(starts, disable=not progress, desc="scoring", unit="batch")
        ]
    return torch.cat(parts)


def detection_metrics(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> Dict[str, float]:
    """AUROC and AUPRC of ``scores`` (higher = anomaly) against 0/1 ``labels`` (1 = anomaly)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64)
    labels = np.asarray(torch.as_tensor(labels).detach().cpu())
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomaly); for class labels pass normal_class")
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC needs both normal (0) and anomalous (1) datapoints among the labels")
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
    }


def are_anomaly_labels(labels: Tensor | np.ndarray) -> bool:
    """Whether ``labels`` are anomaly labels (0 normal, 1 anomaly), not class labels."""
    values = torch.unique(torch.as_tensor(labels))
    return bool(((values == 0) | (values == 1)).all())


def score_dataset(
    vae: VAE,
    x: Tensor | NpyRows,
    labels: Optional[Tensor] = None,
    *,
    score: str = "neg_elbo",
    num_samples: int = 10,
    batch_size: int = 500,
    normal_class: Optional[int] = None,
    progress: bool = False,
) -> xr.Dataset:
    """Scores of every datapoint as an xarray Dataset (dim ``datapoint``).

    With ``labels`` (0/1, or class labels plus ``normal_class``: anomaly = any other class),
    the Dataset also holds ``label`` and attrs ``auroc``, ``auprc``, ``num_anomalies``.
    """
    if normal_class is not None:
        if labels is None:
            raise ValueError("normal_class needs labels: this data has none")
        classes = sorted(int(c) for c in torch.unique(torch.as_tensor(labels)).tolist())
        if normal_class not in classes:
            shown = f"{classes[0]}..{classes[-1]}" if classes == list(range(classes[0], classes[-1] + 1)) else classes
            raise ValueError(f"normal_class {normal_class} is not one of the data's classes ({shown})")
    elif labels is not None and not are_anomaly_labels(labels):  # refused before the scoring, not after
        raise ValueError("labels must be 0 (normal) or 1 (anomaly); for class labels pass normal_class")
    scores = anomaly_scores(vae, x, score=score, num_samples=num_samples, batch_size=batch_size, progress=progress)
    data_vars = {
        "score": (
            "datapoint",
            scores.cpu().numpy().astype(np.float64),
            {
                "description": f"anomaly score {score} (higher = more anomalous): {SCORES.describe(score)}",
                "units": "nats",
            },
        )
    }
    attrs: Dict[str, object] = {"score": score, "num_samples": num_samples}
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if normal_class is not None:
            labels = (labels != normal_class).long()
            attrs["normal_class"] = normal_class
        attrs["num_anomalies"] = int(labels.sum())
        if len(torch.unique(labels)) > 1 or not ((labels == 0) | (labels == 1)).all():
            attrs.update(detection_metrics(scores, labels))  # one class only: no AUROC to compute
        data_vars["label"] = ("datapoint", labels.numpy(), {"description": "1 = anomaly, 0 = normal"})
    return xr.Dataset(data_vars, coords={"datapoint": np.arange(len(x))}, attrs=attrs)


def num_parameters(module: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def size_and_latency(vaes: Mapping[str, VAE], x: Tensor, *, repeats: int = 50, warmup: int = 5) -> xr.Dataset:
    """Parameter count and median latency of one forward pass (encoder, then decoder at the
    posterior mean) of each model on ``x``, all timed in this one process, interleaved so
    that load on the machine affects every model alike. Dim ``model``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(vaes)
    times: Dict[str, list] = {n: [] for n in names}
    for vae in vaes.values():
        vae.eval()
    for i in range(warmup + repeats):
        for name in names:
            vae = vaes[name]
            start = time.perf_counter()
            vae.decoder(vae.encoder(x)[0])
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return xr.Dataset(
        {
            "num_parameters": ("model", np.array([num_parameters(vaes[n]) for n in names], dtype=np.int64)),
            "latency_median_s": (
                "model",
                np.array([statistics.median(times[n]) for n in names]),
                {"description": f"median over {repeats} timed forward passes"},
            ),
        },
        coords={"model": names},
        attrs={"batch_size": int(x.shape[0]), "repeats": repeats, "torch_threads": torch.get_num_threads()},
    )
