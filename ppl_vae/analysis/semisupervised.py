"""Label-based metrics of models with a categorical latent: M2's classification error and a
GMVAE's cluster accuracy (each cluster mapped to its majority label).

A model declares the ones it has (:attr:`ppl_vae.models.vae.VAE.label_metrics`, names from
:data:`LABEL_METRICS`); :func:`epoch_label_metrics` turns the declaration into what the training
loop records after every epoch on the test set (``ppl-vae fit``), and :func:`describe_label_metrics`
says the final values in words."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ppl_vae.inference.modes import eval_mode
from ppl_vae.inference.training import EpochMetrics
from ppl_vae.registry import Registry


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


def predicted_values(vae: Any, x: Tensor, batch_size: int = 1000) -> np.ndarray:
    """argmax_c q(c | x) ``(N,)`` (M2's classifier, a GMVAE's clusters), in eval mode."""
    return value_probs(vae, x, batch_size).argmax(-1).cpu().numpy()


def binomial_se(p: float, n: int) -> float:
    """The standard error sqrt(p (1 - p) / n) of a proportion ``p`` of ``n`` points."""
    return float(np.sqrt(p * (1 - p) / max(1, n)))


def classification_error(vae: Any, x: Tensor, y: Any, batch_size: int = 1000) -> Tuple[float, float]:
    """(error, standard error) of argmax_y q(y | x) against labels ``y`` (M2's classifier);
    the standard error is the binomial sqrt(e (1 - e) / N)."""
    y = _labels(y, x.shape[0], "labels y")
    error = float(np.mean(predicted_values(vae, x, batch_size) != y))
    return error, binomial_se(error, len(y))


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


def clusters_used(clusters: Any) -> int:
    """How many distinct clusters ``clusters`` ``(N,)`` (argmax q(c | x)) puts points in."""
    return int(len(np.unique(np.asarray(clusters))))


# -- what a model declares: metrics recorded per epoch -----------------------------------------------


@dataclass(frozen=True)
class LabelMetric:
    """A metric of argmax_c q(c | x) against labels: ``compute(predicted, labels, num_values)``
    (integer arrays ``(N,)``, the model's number of values of c) -> a number. ``description`` says
    what it is (the history's variable attribute); ``label`` and ``note`` say it in a sentence
    (:func:`describe_label_metrics`); ``proportion``: a share of the N points, said with its
    binomial standard error (else a count)."""

    compute: Callable[[np.ndarray, np.ndarray, int], float]
    description: str
    label: str
    note: str
    proportion: bool = True


LABEL_METRICS: Registry[LabelMetric] = Registry("label metric")
LABEL_METRICS.register("test_error", doc="M2: share of test points whose argmax_y q(y|x) is not their label")(
    LabelMetric(
        lambda predicted, labels, num_values: float(np.mean(predicted != labels)),
        "test error of q(y|x): share of the test images whose argmax_y q(y|x) differs from their label "
        "(M2's classifier, in eval mode)",
        "test error of q(y|x)",
        "argmax",
    )
)
LABEL_METRICS.register("cluster_accuracy", doc="clustering accuracy: clusters mapped to their majority label")(
    LabelMetric(
        lambda predicted, labels, num_values: cluster_accuracy(predicted, labels, num_values),
        "cluster accuracy: each test image's cluster argmax_c q(c|x) is mapped to the majority label of the "
        "test images in that cluster; the share of test images whose mapped label is their own (the usual "
        "unsupervised clustering accuracy, the mapping fitted on the same images)",
        "cluster accuracy",
        "argmax_c q(c|x), each cluster mapped to the majority label of its test images",
    )
)
LABEL_METRICS.register("clusters_used", doc="how many clusters argmax q(c|x) puts test points in")(
    LabelMetric(
        lambda predicted, labels, num_values: float(clusters_used(predicted)),
        "clusters used: how many of the model's components are argmax_c q(c|x) of at least one test image",
        "clusters used",
        "components that are argmax_c q(c|x) of at least one test image",
        proportion=False,
    )
)


def label_metrics(vae: Any, x: Tensor, labels: Any, batch_size: int = 1000) -> Dict[str, float]:
    """The metrics ``vae`` declares (``vae.label_metrics``, names from :data:`LABEL_METRICS`) of
    argmax q(c | x) on ``x`` against ``labels`` ``(N,)``; ``{}`` when it declares none."""
    names = tuple(vae.label_metrics)
    if not names:
        return {}
    y = _labels(labels, x.shape[0], "labels")
    predicted = predicted_values(vae, x, batch_size)
    return {name: float(LABEL_METRICS.get(name).compute(predicted, y, vae.num_values)) for name in names}


def epoch_label_metrics(vae: Any, x: Any, labels: Optional[Any], batch_size: int = 1000) -> Optional[EpochMetrics]:
    """What the training loop records after each epoch (``train(..., metrics=...)``): the model's
    :func:`label_metrics` on ``x`` (the test set) against ``labels``; None where the model declares
    none, or the data has no labels (or labels that are not class indices >= 0)."""
    names = tuple(vae.label_metrics)
    if not names or labels is None:
        return None
    try:
        y = _labels(labels, x.shape[0], "labels")
    except ValueError:
        return None
    return EpochMetrics(
        lambda model: label_metrics(model, x, y, batch_size),
        {name: LABEL_METRICS.get(name).description for name in names},
    )


def describe_label_metrics(
    vae: Any, values: Mapping[str, float], num_points: int, split: Optional[str] = None
) -> List[str]:
    """One line per metric ``vae`` declares among ``values`` (a run's final record, computed on
    ``num_points`` test images), saying what it is: ``test error
    of q(y|x) 0.3570 ± 0.0048 (argmax, n = 10000 test images; ± is the binomial standard error
    sqrt(p(1-p)/n))``. Metrics missing or NaN (not computed) are left out. ``split``: the split
    a selection of datapoints came from (``evaluate``), named in every line ("train error of
    q(y|x) ... n = 300 train datapoints")."""
    lines = _describe(vae, values, num_points)
    if split is None:
        return lines
    renames = [("test images", f"{split} datapoints"), ("test image", f"{split} datapoint"), ("test ", f"{split} ")]
    for old, new in renames:
        lines = [line.replace(old, new) for line in lines]
    return lines


def _describe(vae: Any, values: Mapping[str, float], num_points: int) -> List[str]:
    lines = []
    for name in vae.label_metrics:
        value = values.get(name)
        if value is None or not math.isfinite(value):
            continue
        metric = LABEL_METRICS.get(name)
        if metric.proportion:
            se = binomial_se(value, num_points)
            lines.append(
                f"{metric.label} {value:.4f} ± {se:.4f} ({metric.note}, n = {num_points} test images; "
                "± is the binomial standard error sqrt(p(1-p)/n))"
            )
        else:
            lines.append(
                f"{metric.label}: {int(value)} of {vae.num_values} ({metric.note}, n = {num_points} test images)"
            )
    return lines
