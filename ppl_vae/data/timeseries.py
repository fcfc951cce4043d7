"""Anomaly-detection data: sliding windows over multivariate sensor time series (CSV), and the
one-class Fashion-MNIST benchmark.

Anomaly labels everywhere follow one convention: 0 = normal, 1 = anomaly.

Time series (Kim et al. 2017 score windows of sensor readings): a CSV with one row per time
step, numeric columns = sensors, an optional header, and optionally a column named ``label``
(0/1 per time step). A window is ``(sensors, window)`` (Conv1d layout: channels = sensors) and
is anomalous when any of its time steps is. The split is chronological: the first
``1 - test_fraction`` of the rows give training windows, the rest test windows. Sensors are
standardized with the training rows' mean and standard deviation. By default training keeps
only normal windows (the semi-supervised setting: the model learns what normal looks like).

Fashion-MNIST one-class (``fashion-mnist-oneclass-K``): train on the training images of class
K only; the test set is all 10,000 test images, labelled 1 when their class is not K.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ppl_vae.data.datasets import DATASETS, Arrays, load_fashion_mnist_arrays
from ppl_vae.data.readers import is_csv_header, read_csv
from ppl_vae.errors import DataError

DEFAULT_WINDOW = 32
LABEL_COLUMN = "label"


def read_timeseries_csv(
    path: str | Path, label_column: str = LABEL_COLUMN
) -> Tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """(values ``(time, sensors)``, labels ``(time,)`` or None, sensor names) from a CSV file.

    Every column must be numeric (else a one-line :class:`DataError` naming the value);
    the column named ``label_column`` in the header, if any, holds 0/1 anomaly labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"time-series CSV not found: {path}")
    values = read_csv(path)
    try:
        first = next(line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())
    except (StopIteration, OSError, UnicodeDecodeError):  # read_csv has already rejected these
        first = ""
    names = (
        [f.strip() for f in first.split(",")]
        if is_csv_header(first)
        else [f"sensor{i}" for i in range(values.shape[1])]
    )
    labels = None
    if label_column in names:
        j = names.index(label_column)
        labels = values[:, j]
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{path}: column {label_column!r} must hold 0 (normal) or 1 (anomaly)")
        labels = labels.astype(np.int64)
        values = np.delete(values, j, axis=1)
        names = names[:j] + names[j + 1 :]
    if values.shape[1] == 0:
        raise DataError(f"{path} has no sensor columns besides {label_column!r}")
    if not np.isfinite(values).all():
        raise DataError(f"{path} contains NaN or infinite values")
    return values, labels, names


def sliding_windows(values: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Windows ``(num_windows, sensors, window)`` of a ``(time, sensors)`` array, every ``stride`` steps."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if len(values) < window:
        raise DataError(f"a time series of {len(values)} steps is shorter than the window of {window}")
    starts = np.arange(0, len(values) - window + 1, stride)
    return np.stack([values[s : s + window].T for s in starts]).astype(np.float32)


def load_timeseries_arrays(
    path: str | Path,
    *,
    window: int = DEFAULT_WINDOW,
    stride: Optional[int] = None,
    test_fraction: float = 0.3,
    label_column: str = LABEL_COLUMN,
    train_on_normal: bool = True,
) -> Arrays:
    """Standardized sliding windows over a sensor CSV, split chronologically (see the module doc).

    ``stride`` defaults to ``window // 4``. Returns (train, test, train labels, test labels),
    windows shaped ``(N, sensors, window)``; the labels are None when the CSV has none.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    stride = max(1, window // 4) if stride is None else stride
    values, labels, _ = read_timeseries_csv(path, label_column)
    n_train = int(round((1.0 - test_fraction) * len(values)))
    if n_train < window or len(values) - n_train < window:
        raise DataError(
            f"{path}: {len(values)} time steps are too few for a train/test split of "
            f"{1 - test_fraction:g}/{test_fraction:g} with windows of {window} steps"
        )
    mean = values[:n_train].mean(0)
    std = values[:n_train].std(0)
    values = (values - mean) / np.where(std > 0, std, 1.0)
    parts = []
    for rows in (slice(0, n_train), slice(n_train, None)):
        x = sliding_windows(values[rows], window, stride)
        y = None if labels is None else sliding_windows(labels[rows, None], window, stride).max(axis=(1, 2))
        parts.append((x, None if y is None else y.astype(np.int64)))
    (train, train_labels), (test, test_labels) = parts
    if train_on_normal and train_labels is not None:
        keep = train_labels == 0
        if not keep.any():
            raise DataError(f"{path}: every training window contains an anomaly; nothing normal to learn from")
        train, train_labels = train[keep], train_labels[keep]
    return train, test, train_labels, test_labels


@DATASETS.register(
    "timeseries-csv",
    doc=f"sliding windows ({DEFAULT_WINDOW} steps) over the sensor CSV given as data_dir (--data-dir); optional 0/1 'label' column",
)
def load_timeseries_csv_arrays(data_dir: Optional[Path]) -> Arrays:
    """Windows of the CSV file that ``--data-dir`` names (defaults of :func:`load_timeseries_arrays`)."""
    if data_dir is None:
        raise DataError("dataset 'timeseries-csv' needs data_dir: the path of a CSV file of sensor readings")
    return load_timeseries_arrays(data_dir)


load_timeseries_csv_arrays.__dict__["anomaly_labels"] = True  # read by datasets.labels_are_anomalies


def load_fashion_mnist_oneclass_arrays(normal_class: int, data_dir: Optional[Path] = None) -> Arrays:
    """Train on Fashion-MNIST training images of ``normal_class``; test on all test images,
    labelled 1 (anomaly) when their class differs."""
    if normal_class not in range(10):
        raise ValueError(f"normal_class must be 0..9, got {normal_class}")
    train, test, train_labels, test_labels = load_fashion_mnist_arrays(data_dir)
    assert train_labels is not None and test_labels is not None  # Fashion-MNIST is labelled
    keep = train_labels == normal_class
    return (
        train[keep],
        test,
        np.zeros(int(keep.sum()), dtype=np.int64),
        (test_labels != normal_class).astype(np.int64),
    )


for _k in range(10):
    DATASETS.register(
        f"fashion-mnist-oneclass-{_k}",
        doc=f"Fashion-MNIST one-class: train on class {_k}; test labels 1 = any other class (anomaly)",
    )(partial(load_fashion_mnist_oneclass_arrays, _k))
    DATASETS.get(f"fashion-mnist-oneclass-{_k}").anomaly_labels = True  # type: ignore[attr-defined]
