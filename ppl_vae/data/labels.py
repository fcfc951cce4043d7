"""Semi-supervised splits: keep N training labels, balanced per class, and mark the rest unlabelled."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from ppl_vae.data.datasets import Dataset
from ppl_vae.errors import DataError

UNLABELLED = -1
"""The label of a training point whose label is hidden (as :data:`ppl_vae.models.discrete.UNLABELLED`)."""


def labelled_indices(labels: torch.Tensor, num_labels: int, seed: int) -> np.ndarray:
    """Indices (sorted) of ``num_labels`` points drawn from ``seed``, balanced per class: each of the
    C classes gets num_labels // C, and the first num_labels % C classes one more."""
    y = labels.detach().cpu().numpy().astype(np.int64)
    classes = np.unique(y)
    if num_labels < len(classes):
        raise DataError(
            f"--labels {num_labels} is fewer than the {len(classes)} classes: a balanced split needs "
            f"at least one label per class"
        )
    if num_labels > len(y):
        raise DataError(f"--labels {num_labels} is larger than the training set ({len(y)} points)")
    rng = np.random.default_rng(seed)
    per_class = np.full(len(classes), num_labels // len(classes))
    per_class[: num_labels % len(classes)] += 1
    chosen = []
    for c, k in zip(classes, per_class):
        members = np.flatnonzero(y == c)
        if k > len(members):
            raise DataError(
                f"--labels {num_labels} needs {k} labels of class {c} but the training set has {len(members)}"
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def keep_labels(data: Dataset, num_labels: int, seed: int = 0, among: Optional[torch.Tensor] = None) -> Dataset:
    """``data`` with only ``num_labels`` training labels kept (see :func:`labelled_indices`), the
    others set to :data:`UNLABELLED`; test labels are kept (they measure the classifier).
    ``among``: the indices of the training points the model trains on (the validation split
    left out), which the labels are drawn from, so that all ``num_labels`` are trained on.
    ``info`` records ``num_labelled``, ``num_train`` and the indices (``labelled_indices``)."""
    if data.train_labels is None:
        raise DataError(f"--labels needs a dataset with labels; {data.name} has none")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise DataError(f"--labels must be a positive number of labelled points, got {num_labels!r}")
    if among is None:
        idx = labelled_indices(data.train_labels, num_labels, seed)
    else:
        pool = among.detach().cpu().numpy().astype(np.int64)
        idx = np.sort(pool[labelled_indices(data.train_labels.cpu()[among.cpu()], num_labels, seed)])
    masked = torch.full_like(data.train_labels, UNLABELLED)
    keep = torch.as_tensor(idx, device=data.train_labels.device)
    masked[keep] = data.train_labels[keep]
    info = dict(
        data.info,
        num_labelled=int(num_labels),
        num_train=int(data.train.shape[0]),
        labelled_indices=[int(i) for i in idx],
    )
    return replace(data, train_labels=masked, info=info)
