"""Label-based metrics of models with a categorical latent: M2's classification error and a
GMVAE's cluster accuracy (each cluster mapped to its majority label)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ppl_vae.inference.modes import eval_mode


def _labels(y: Any, n: int, what: str) -> np.ndarray:
    y = np.asarray(y.detach().cpu() if torch.is_tensor(y) else y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise ValueError(f"{what} must be {n} class indices >= 0, got shape {y.shape} and dtype {y.dtype}")
    return y.astype(np.int64)


@torch.no_grad()
def value_probs(vae: Any, x: Tensor, batch_size: int = 1000) -> Tensor:
    """q(c | x) ``(N, C)`` of a model with a categorical latent (``vae.value_logits``), in eval mode."""
    with eval_mode(vae):
        parts = [vae.value_logits(x[i : i + batch_size]).exp() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(parts)


def classification_error(vae: Any, x: Tensor, y: Any, batch_size: int = 1000) -> Tuple[float, float]:
    """(error, standard error) of argmax_y q(y | x) against labels ``y`` (M2's classifier);
    the standard error is the binomial sqrt(e (1 - e) / N)."""
    y = _labels(y, x.shape[0], "labels y")
    predicted = value_probs(vae, x, batch_size).argmax(-1).cpu().numpy()
    error = float(np.mean(predicted != y))
    return error, float(np.sqrt(error * (1 - error) / max(1, len(y))))


def majority_mapping(clusters: Any, labels: Any, num_clusters: int) -> np.ndarray:
    """Each cluster's most frequent label ``(num_clusters,)`` (-1 for a cluster with no points)."""
    clusters = _labels(clusters, len(np.asarray(clusters)), "clusters")
    labels = _labels(labels, len(clusters), "labels")
    if len(clusters) and clusters.max() >= num_clusters:
        raise ValueError(f"clusters must lie in [0, {num_clusters - 1}], got {clusters.max()}")
    counts = np.zeros((num_clusters, int(labels.max()) + 1 if len(labels) else 1), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)


def cluster_accuracy(clusters: Any, labels: Any, num_clusters: int, *, mapping: Optional[np.ndarray] = None) -> float:
    """Share of points whose cluster's label equals their own: each cluster is mapped to its
    majority label (on these points, or by ``mapping`` from :func:`majority_mapping` on others)."""
    clusters = _labels(clusters, len(np.asarray(clusters)), "clusters")
    labels = _labels(labels, len(clusters), "labels")
    if mapping is None:
        mapping = majority_mapping(clusters, labels, num_clusters)
    return float(np.mean(np.asarray(mapping)[clusters] == labels))
