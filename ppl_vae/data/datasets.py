"""Datasets: the embedded default (8x8 digits), MNIST, Fashion-MNIST, Frey Face, user arrays.

:func:`load_dataset` returns a :class:`Dataset` of float32 tensors, images as
``(N, 1, H, W)`` in [0, 1]. Named datasets come from :data:`DATASETS`; any other name is read
as a path to a ``.npy``, ``.npz`` or ``.csv`` file. Nothing is downloaded: files that are
absent give an error that says where to get them and which checksum to expect.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union, cast

import numpy as np
import torch
from torch import Tensor

from ppl_vae.data.ondisk import NpyRows, file_size, open_npy
from ppl_vae.data.readers import check_npy_magic, read_array_file, read_idx, read_mat_array
from ppl_vae.errors import DataError
from ppl_vae.registry import Registry

Arrays = Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]
"""(train, test or None, train labels or None, test labels or None); a loader of a data set with
known generative factors appends a fifth item, :class:`Factors`. train is None only from a
loader that declares ``reads_test_alone``, called with ``train_split=False``."""


@dataclass
class Factors:
    """Generative factors ``(N, F)`` of the train (and test, or None) points, one column per name."""

    train: np.ndarray
    test: Optional[np.ndarray]
    names: Tuple[str, ...]


DATASETS: Registry[Callable[[Optional[Path]], Arrays]] = Registry("dataset")

BINARIZE = ("none", "dynamic", "threshold")

MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FREY_FACE_SHA256 = "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

#: a ``.npy`` at least this large stays on disk (rows read per batch) rather than being loaded
ON_DISK_MIN_BYTES = 1 << 30

Rows = Union[Tensor, NpyRows]


@dataclass
class Dataset:
    """Train and test tensors (float32, ``(N, *event_shape)``), optional integer labels.

    ``dynamic_binarization``: training batches are resampled as x ~ Bernoulli(x) each time
    they are drawn (the test set was binarized once, with a fixed seed, at load time).

    ``train`` and ``test`` of a large ``.npy`` are :class:`~ppl_vae.data.ondisk.NpyRows`
    instead of tensors: ``x[idx]`` (indices, int or slice), ``x.shape``, ``x.device`` and
    ``x.to(device)`` work as for a tensor, and each ``x[idx]`` reads only those rows from disk.
    """

    name: str
    train: Rows
    test: Rows
    train_labels: Optional[Tensor] = None
    test_labels: Optional[Tensor] = None
    dynamic_binarization: bool = False
    info: Dict[str, object] = field(default_factory=dict)  # JSON-able facts (vocab_size, ...)
    #: generative factors ``(N, F)`` per point (dsprites, or a user's ``.npz`` with ``factors``),
    #: columns named by ``factor_names``; None for data without known factors
    train_factors: Optional[Tensor] = None
    test_factors: Optional[Tensor] = None
    factor_names: Tuple[str, ...] = ()

    @property
    def event_shape(self) -> Tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def data_info(self) -> Dict[str, object]:
        """Facts a model builder may need: ``num_classes`` (when labelled) and ``info``'s entries."""
        out: Dict[str, object] = dict(self.info)
        labels = [t for t in (self.train_labels, self.test_labels) if t is not None]
        if labels:
            out["num_classes"] = int(max(int(t.max()) for t in labels)) + 1
        return out

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with every tensor on ``device`` (data stays there for the whole training)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            train=self.train.to(device),
            test=self.test.to(device),
            train_labels=move(self.train_labels),
            test_labels=move(self.test_labels),
            train_factors=move(self.train_factors),
            test_factors=move(self.test_factors),
        )


def _require_dir(data_dir: Optional[Path], dataset: str, files: Dict[str, str], where: str) -> Path:
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} needs data_dir: a folder holding {', '.join(files)} ({where})")
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"data_dir {data_dir} is a file; give the folder holding {', '.join(files)}")
    missing = [f for f in files if not (data_dir / f).is_file()]
    if missing:
        checks = "; ".join(f"{f} sha256 {files[f]}" for f in missing) if all(files.values()) else ""
        raise DataError(
            f"{dataset}: {', '.join(missing)} not found in {data_dir} ({where})"
            + (f"; expected {checks}" if checks else "")
        )
    return data_dir


def _from_8bit(images: np.ndarray, path: "Path | str") -> np.ndarray:
    """8-bit grey levels 0-255 as float32 in [0, 1]; any other dtype is refused (float data already
    in [0, 1] would become [0, 1/255], and signed or wide integers have no 0-255 scale)."""
    if images.dtype != np.uint8:
        raise DataError(
            f"{path} holds {images.dtype.name} images; this dataset's files are 8-bit grey levels (uint8, 0-255), which "
            "are divided by 255: to train on other values, save them as a .npy or .npz array in [0, 1] and give "
            "that file as --dataset"
        )
    return images.astype(np.float32) / 255.0


def _idx_images(path: Path) -> np.ndarray:
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path} holds an array of shape {images.shape}, expected (N, rows, cols) images")
    return _from_8bit(images[:, None], path)


def _idx_labels(path: Path, n: int) -> np.ndarray:
    labels = read_idx(path)
    if labels.shape != (n,):
        raise DataError(f"{path} holds {labels.shape} labels for {n} images")
    return _as_labels(labels, str(path)).numpy()  # fractions, NaN and negatives refused, not truncated


def _idx_dataset(data_dir: Path, train_split: bool = True) -> Arrays:
    """The four IDX files; without ``train_split``, the test images and labels only (train None)."""
    # in the order a full load has always read them (the first bad file is the one reported)
    train = _idx_images(data_dir / "train-images-idx3-ubyte.gz") if train_split else None
    test = _idx_images(data_dir / "t10k-images-idx3-ubyte.gz")
    train_labels = None if train is None else _idx_labels(data_dir / "train-labels-idx1-ubyte.gz", len(train))
    test_labels = _idx_labels(data_dir / "t10k-labels-idx1-ubyte.gz", len(test))
    if train is None:  # no training rows (load_dataset's test_only; Arrays' train is None only here)
        return cast(Arrays, (None, test, None, test_labels))
    return train, test, train_labels, test_labels


@DATASETS.register("digits")
def load_digits_arrays(data_dir: Optional[Path] = None) -> Arrays:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), the embedded default (it reads
    no folder: ``reads_data_dir`` False, so a new run refuses a data_dir with it, :func:`check_data_dir`)."""
    pixels, target = _bundled_digits()
    images = (pixels.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return images, None, target.astype(np.int64), None


load_digits_arrays.reads_data_dir = False  # type: ignore[attr-defined]


def _bundled_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 64) in 0..16, labels) from the CSV scikit-learn ships: read directly, as
    ``sklearn.datasets.load_digits`` does, because importing scikit-learn costs about a second of
    every ``ppl-vae fit`` on the default dataset. Falls back to ``load_digits`` if the file moved."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.origin is not None:
        csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


@DATASETS.register("mnist")
def load_mnist_arrays(data_dir: Optional[Path], *, train_split: bool = True) -> Arrays:
    """MNIST (LeCun et al. 1998), the four original IDX gzip files in --data-dir."""
    where = "the original files from http://yann.lecun.com/exdb/mnist/ or a mirror"
    return _idx_dataset(_require_dir(data_dir, "mnist", MNIST_SHA256, where), train_split)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist_arrays(data_dir: Optional[Path], *, train_split: bool = True) -> Arrays:
    """Fashion-MNIST (Xiao et al. 2017), IDX gzip files; default dir from Debian's package."""
    files = {name: "" for name in MNIST_SHA256}
    where = "Debian's package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist"
    data_dir = FASHION_MNIST_DEFAULT_DIR if data_dir is None else data_dir
    return _idx_dataset(_require_dir(data_dir, "fashion-mnist", files, where), train_split)


# a declared capability, read with getattr by load_dataset: train_split=False reads the test split alone
for _loader in (load_mnist_arrays, load_fashion_mnist_arrays):
    _loader.__dict__["reads_test_alone"] = True


def labels_are_anomalies(name: str) -> bool:
    """Whether data set ``name`` labels its points 0 (normal) / 1 (anomaly) by construction (a
    loader declaring ``anomaly_labels``: the sensor CSV's label column, Fashion-MNIST one-class),
    rather than by class; a path or a data set with class labels gives False."""
    return name in DATASETS and bool(getattr(DATASETS.get(name), "anomaly_labels", False))


@DATASETS.register("frey-face")
def load_frey_face_arrays(data_dir: Optional[Path]) -> Arrays:
    """Frey Face: 1,965 greyscale 28x20 faces from frey_rawface.mat in --data-dir."""
    where = "from Sam Roweis' data page, https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
    data_dir = _require_dir(data_dir, "frey-face", {"frey_rawface.mat": FREY_FACE_SHA256}, where)
    ff = read_mat_array(data_dir / "frey_rawface.mat", "ff")
    if ff.ndim != 2 or ff.shape[0] != 28 * 20:
        raise DataError(f"frey_rawface.mat: variable 'ff' has shape {ff.shape}, expected (560, N)")
    images = _from_8bit(ff.T.reshape(-1, 1, 28, 20), data_dir / "frey_rawface.mat")
    return images, None, None, None


def _file_factors(
    path: Path, arrays: Dict[str, np.ndarray], train_key: str, test_key: Optional[str]
) -> Optional[Factors]:
    """Factor labels of a user's ``.npz``: ``factors`` (with ``data``) or ``train_factors`` and
    ``test_factors`` (with ``train``/``test``), ``(N, F)`` numbers; ``factor_names`` (F strings) optional."""
    if train_key not in arrays:
        return None
    train = np.asarray(arrays[train_key])
    test = None if test_key is None else arrays.get(test_key)
    if test_key is not None and test is None:
        raise DataError(f"{path} has '{train_key}' but no '{test_key}'")
    for key, a in ((train_key, train), (test_key, test)):
        if a is None:
            continue
        if a.dtype.kind not in "biuf" or a.ndim not in (1, 2) or not np.isfinite(a).all():
            raise DataError(f"{path}: '{key}' must be finite numbers of shape (N,) or (N, F), got {a.dtype} {a.shape}")
    train = train[:, None] if train.ndim == 1 else train
    test = None if test is None else (test[:, None] if test.ndim == 1 else test)
    if test is not None and test.shape[1] != train.shape[1]:
        raise DataError(f"{path}: '{train_key}' has {train.shape[1]} factors but '{test_key}' {test.shape[1]}")
    given_names = arrays.get("factor_names")
    if given_names is None:
        names = tuple(f"factor_{k}" for k in range(train.shape[1]))
    else:
        names = tuple(str(n) for n in np.asarray(given_names).reshape(-1))
        if len(names) != train.shape[1] or len(set(names)) != len(names):
            raise DataError(f"{path}: 'factor_names' must be {train.shape[1]} distinct names, got {list(names)}")
    return Factors(train, test, names)


def _arrays_from_file(path: Path):
    arrays = read_array_file(path)
    if "train" in arrays:
        if "test" not in arrays:
            raise DataError(f"{path} has a 'train' array but no 'test' array")
        return (
            arrays["train"],
            arrays["test"],
            arrays.get("train_labels"),
            arrays.get("test_labels"),
            _file_factors(path, arrays, "train_factors", "test_factors"),
        )
    if "data" in arrays:
        return arrays["data"], None, arrays.get("labels"), None, _file_factors(path, arrays, "factors", None)
    if len(arrays) == 1:
        return next(iter(arrays.values())), None, None, None
    held = f"arrays {', '.join(arrays)}" if arrays else "no array"
    raise DataError(f"{path} holds {held}; expected 'train' and 'test', or one array")


def _as_float_tensor(array: np.ndarray, what: str) -> Tensor:
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} has non-numeric dtype {array.dtype}")
    if array.ndim == 0:
        raise DataError(
            f"{what} holds a single number (a 0-d array); expected datapoints along the first axis, shape (N, ...)"
        )
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1:
        array = array[:, None]
    if array.shape[0] == 0 or array.size == 0:
        raise DataError(f"{what} is empty")
    # min and max propagate NaN and show infinities: count bad values only when they are there
    n_bad = 0 if np.isfinite(array.min()) and np.isfinite(array.max()) else int(np.count_nonzero(~np.isfinite(array)))
    if n_bad:
        raise DataError(f"{what} contains {n_bad} NaN or infinite value(s)")
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_labels(array: np.ndarray, what: str) -> Tensor:
    """Class labels as a long tensor ``(N,)``; refuses text, fractions, NaN and extra dims."""
    array = np.asarray(array)
    if array.ndim != 1:
        raise DataError(f"{what} must be a 1-d array of class indices, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
            raise DataError(f"{what} must be whole numbers (class indices)")
    elif array.dtype.kind not in "biu":
        raise DataError(f"{what} must be integer class indices, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise DataError(f"{what} must be class indices >= 0, got {array.min()}")
    return torch.as_tensor(array.astype(np.int64))


FINGERPRINT_ROWS = 1000
FINGERPRINT_CHUNK = 50  # rows per read (the same hash as one read of them all)
"""Rows (evenly spaced) whose bytes :func:`fingerprint` hashes: a file replaced since a run was
trained is caught without reading a large split whole."""


def fingerprint(x: "Tensor | NpyRows", labels: Optional["Tensor"] = None) -> Dict[str, object]:
    """What identifies a split's data: its shape and the sha256 of up to :data:`FINGERPRINT_ROWS`
    evenly spaced rows (float32 bytes, as the model scores them). A run records its test split's,
    so that evaluate and compare refuse to score other data under the run's name."""
    import hashlib

    n = int(x.shape[0])
    rows = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)
    digest = hashlib.sha256()
    for start in range(0, len(rows), FINGERPRINT_CHUNK):  # data kept on disk is read a few rows at a time
        sample = x[torch.as_tensor(rows[start : start + FINGERPRINT_CHUNK])]
        digest.update(torch.as_tensor(sample).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    out: Dict[str, object] = {"shape": [int(d) for d in x.shape], "sha256": digest.hexdigest()}
    if labels is not None:  # a conditional model scores x given them: other labels are other data
        out["labels_sha256"] = hashlib.sha256(
            torch.as_tensor(labels).cpu().to(torch.int64).numpy().tobytes()
        ).hexdigest()
    return out


def check_data_dir(name: str, data_dir: "str | Path | None") -> None:
    """Refuse (ValueError, one line) a ``data_dir`` for a dataset that reads none: the embedded
    digits (its loader declares ``reads_data_dir`` False) or a user's array file (read from its
    own path). :func:`load_dataset` ignores it there, so a new run checks it first instead of
    recording a setting that did nothing (runs already recorded with one still load)."""
    if data_dir is None:
        return
    if name in DATASETS:
        if getattr(DATASETS.get(name), "reads_data_dir", True):
            return
        what = f"dataset {name!r} is embedded"
    else:
        if Path(name).suffix.lower() not in (".npy", ".npz", ".csv") and not Path(name).expanduser().exists():
            DATASETS.get(name)  # raises: an unknown name, listing the valid ones (it is no file either)
        what = f"dataset {name!r} is a file, read from its own path"
    raise ValueError(f"data_dir applies to a dataset read from a folder; {what}: leave data_dir out")


_TRAIN_SIZE_CAPPED: contextvars.ContextVar[bool] = contextvars.ContextVar("train_size_capped", default=False)


def _check_train_size(train_size: int, available: int, label: str) -> None:
    """Refuse a ``train_size`` beyond the training points there are (it was kept as given, and the
    run recorded a size it never trained on); a test-only load takes what there is."""
    if train_size > available and not _TRAIN_SIZE_CAPPED.get():
        raise DataError(
            f"train_size {train_size} is larger than the training set of {label} ({available} points): "
            f"give at most {available}, or leave it out for all of them"
        )


def load_dataset(
    name: str = "digits",
    data_dir: str | Path | None = None,
    *,
    binarize: str = "none",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    train_size: Optional[int] = None,
    on_disk: Optional[bool] = None,
    num_images: Optional[int] = None,
    test_only: bool = False,
) -> Dataset:
    """Load a dataset by registered name or from a user's array file.

    ``binarize``: "none", "dynamic" (resample x ~ Bernoulli(x) per training batch; the test
    set is sampled once with ``split_seed``), or "threshold" (x > 0.5, static).
    ``test_fraction``: held-out share when the source has no test split (seeded by
    ``split_seed``). ``train_size``: keep only the first ``train_size`` training points.
    ``on_disk``: keep a ``.npy`` file on disk and read the rows of each batch from it instead of
    loading it (see :mod:`ppl_vae.data.ondisk`); ``None`` (default) does so for files of at least
    :data:`ON_DISK_MIN_BYTES` (1 GiB). The split is the same either way.
    ``num_images``: for a data set drawn from a large or generated collection (``dsprites``), the
    size of the seeded random subset taken (seeded by ``split_seed``; None: its default).
    ``test_only``: the caller reads the test split alone (``evaluate``, ``compare``). A dataset
    whose files hold their own test split (MNIST, Fashion-MNIST: the loader declares
    ``reads_test_alone``) then skips its training files and returns no training rows (``train``
    has 0 rows); the test split is the one a full load gives, its binarization draw included.
    Other datasets load whole (their test split is drawn from the rest).
    """
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {', '.join(BINARIZE)}, got {binarize!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if train_size is not None and train_size < 1:
        raise ValueError(f"train_size must be >= 1, got {train_size}")
    token = _TRAIN_SIZE_CAPPED.set(test_only)  # the test split alone: a run's recorded size is not checked again
    try:
        return _load_dataset(
            name, data_dir, binarize, test_fraction, split_seed, train_size, on_disk, num_images, test_only
        )
    finally:
        _TRAIN_SIZE_CAPPED.reset(token)


def _load_dataset(
    name: str,
    data_dir: "str | Path | None",
    binarize: str,
    test_fraction: float,
    split_seed: int,
    train_size: Optional[int],
    on_disk: Optional[bool],
    num_images: Optional[int],
    test_only: bool,
) -> Dataset:
    data_dir = None if data_dir is None else Path(data_dir).expanduser()  # "~/data" as a shell would read it
    if name not in DATASETS:
        name = str(Path(name).expanduser())
    if name not in DATASETS and Path(name).suffix.lower() == ".npy":
        path = Path(name)
        if on_disk or (on_disk is None and file_size(path) >= ON_DISK_MIN_BYTES):
            return _load_on_disk(path, binarize, test_fraction, split_seed, train_size)
    elif on_disk:
        raise ValueError(f"on_disk=True needs a .npy file, got dataset {name!r}")
    if name in DATASETS:
        loader = DATASETS.get(name)
        if getattr(loader, "takes_num_images", False):  # a declared capability of the loader
            subset_loader = cast(Callable[..., Arrays], loader)  # it takes the keywords too
            arrays = subset_loader(data_dir, num_images=num_images, seed=split_seed)
        elif test_only and getattr(loader, "reads_test_alone", False) and num_images is None:
            arrays = cast(Callable[..., Arrays], loader)(data_dir, train_split=False)
        elif num_images is not None:
            raise ValueError(f"num_images applies to generated or subsampled data sets (dsprites), not {name!r}")
        else:
            arrays = loader(data_dir)
        if not isinstance(arrays, (tuple, list)) or len(arrays) not in (4, 5):
            got = f"{len(arrays)} values" if isinstance(arrays, (tuple, list)) else type(arrays).__name__
            raise DataError(
                f"dataset {name!r}: its loader returned {got}; a dataset loader returns 4: "
                "(train, test, train_labels, test_labels), None for the parts it lacks (and factors)"
            )
        label = name
    else:
        if num_images is not None:
            raise ValueError(f"num_images applies to generated or subsampled data sets (dsprites), not {name!r}")
        path = Path(name)
        if path.suffix.lower() not in (".npy", ".npz", ".csv") and not path.exists():
            DATASETS.get(name)  # raises: unknown name, listing the valid ones
        arrays = _arrays_from_file(path)
        label = path.name
    train, test, train_labels, test_labels = arrays[:4]
    factors: Optional[Factors] = arrays[4] if len(arrays) > 4 else None
    if isinstance(train, NpyRows):  # a loader that leaves its rows on disk (dsprites' rendered file)
        assert test is None and train_labels is None, f"{label}: an on-disk loader returns train rows only"
        return _split_on_disk(train, label, binarize, test_fraction, split_seed, train_size, factors)
    train_fac = None if factors is None else torch.as_tensor(np.asarray(factors.train))
    test_fac = None if factors is None or factors.test is None else torch.as_tensor(np.asarray(factors.test))
    if train_fac is not None and len(train_fac) != len(train):
        raise DataError(f"{label}: {len(train_fac)} factor rows for {len(train)} training points")
    if test_fac is not None:
        assert test is not None, f"{label}: test factors without a test split"
        if len(test_fac) != len(test):
            raise DataError(f"{label}: {len(test_fac)} factor rows for {len(test)} test points")

    generator = torch.Generator().manual_seed(split_seed)
    if train is None:  # a test-only load: no training rows, of the test split's shape
        if test is None:
            raise DataError(f"{label}: its loader returned neither a training nor a test split")
        train_t = torch.zeros((0,) + tuple(np.shape(test)[1:]), dtype=torch.float32)
    else:
        train_t = _as_float_tensor(train, f"{label} (train)")
    train_lab = None if train_labels is None else _as_labels(train_labels, f"{label} (train labels)")
    if train_lab is not None and len(train_lab) != len(train_t):
        raise DataError(f"{label}: {len(train_lab)} labels for {len(train_t)} training points")
    if test is None:
        n = len(train_t)
        n_test = max(1, int(round(test_fraction * n)))
        if n - n_test < 1:
            raise DataError(f"{label} has {n} datapoint(s): too few to hold out a test set")
        perm = torch.randperm(n, generator=generator)
        test_t, train_t = train_t[perm[:n_test]], train_t[perm[n_test:]]
        if train_fac is not None:
            test_fac, train_fac = train_fac[perm[:n_test]], train_fac[perm[n_test:]]
        if train_lab is not None:
            test_lab, train_lab = train_lab[perm[:n_test]], train_lab[perm[n_test:]]
        else:
            test_lab = None
    else:
        test_t = _as_float_tensor(test, f"{label} (test)")
        if test_t.shape[1:] != train_t.shape[1:]:
            raise DataError(
                f"{label}: train points have shape {tuple(train_t.shape[1:])} but test points {tuple(test_t.shape[1:])}"
            )
        test_lab = None if test_labels is None else _as_labels(test_labels, f"{label} (test labels)")
        if test_lab is not None and len(test_lab) != len(test_t):
            raise DataError(f"{label}: {len(test_lab)} test labels for {len(test_t)} test points")

    if train_size is not None:
        _check_train_size(train_size, len(train_t), label)
        train_t = train_t[:train_size]
        train_lab = None if train_lab is None else train_lab[:train_size]
        train_fac = None if train_fac is None else train_fac[:train_size]

    if binarize != "none":
        for t, what in ((train_t, "train"), (test_t, "test")):
            if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
                raise DataError(f"cannot binarize {label} ({what}): values must lie in [0, 1]")
        if binarize == "threshold":
            train_t, test_t = (train_t > 0.5).float(), (test_t > 0.5).float()
        else:
            test_t = torch.bernoulli(test_t, generator=generator)
    return Dataset(
        name=label,
        train=train_t,
        test=test_t,
        train_labels=train_lab,
        test_labels=test_lab,
        dynamic_binarization=binarize == "dynamic",
        info={"binarize": binarize},
        train_factors=train_fac,
        test_factors=test_fac,
        factor_names=() if factors is None else tuple(factors.names),
    )


def _load_on_disk(
    path: Path, binarize: str, test_fraction: float, split_seed: int, train_size: Optional[int]
) -> Dataset:
    """:func:`load_dataset` for a ``.npy`` read from disk per batch: views of row indices, no copy."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    check_npy_magic(path)
    _refuse_dynamic_on_disk(path.name, binarize)  # before the scan of a large file
    return _split_on_disk(open_npy(path), path.name, binarize, test_fraction, split_seed, train_size)


def _refuse_dynamic_on_disk(label: str, binarize: str) -> None:
    if binarize == "dynamic":
        raise DataError(
            f"{label} stays on disk (rows are read per batch), and data.binarize 'dynamic' needs a test set "
            "sampled once in memory; use data.binarize 'threshold', or binarize the file beforehand"
        )


def _split_on_disk(
    data: NpyRows,
    label: str,
    binarize: str,
    test_fraction: float,
    split_seed: int,
    train_size: Optional[int],
    factors: Optional[Factors] = None,
) -> Dataset:
    """The train/test split of rows on disk (views of row indices, nothing read), with their
    factors (``factors.train``: one row per row of ``data``), as the in-memory path splits."""
    _refuse_dynamic_on_disk(label, binarize)
    n = data.num_rows
    n_test = max(1, int(round(test_fraction * n)))
    if n - n_test < 1:
        raise DataError(f"{label} has {n} datapoint(s): too few to hold out a test set")
    # the same permutation as the in-memory path, so a file gets the same split either way
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    perm = order.numpy()
    test, train = data.take(perm[:n_test]), data.take(perm[n_test:])
    train_fac = test_fac = None
    if factors is not None:
        all_fac = torch.as_tensor(np.asarray(factors.train))
        if len(all_fac) != n:
            raise DataError(f"{label}: {len(all_fac)} factor rows for {n} datapoints")
        test_fac, train_fac = all_fac[order[:n_test]], all_fac[order[n_test:]]
    if train_size is not None:
        _check_train_size(train_size, train.num_rows, label)
        train = train.take(np.arange(min(train_size, train.num_rows)))
        train_fac = None if train_fac is None else train_fac[:train_size]
    if binarize == "threshold":
        for view, what in ((train, "train"), (test, "test")):
            low, high, _ = view.value_range()
            if low < 0 or high > 1:
                raise DataError(f"cannot binarize {label} ({what}): values must lie in [0, 1]")
        train, test = replace(train, threshold=True), replace(test, threshold=True)
    return Dataset(
        name=label,
        train=train,
        test=test,
        info={"binarize": binarize},
        train_factors=train_fac,
        test_factors=test_fac,
        factor_names=() if factors is None else tuple(factors.names),
    )


@DATASETS.register("dsprites")
def load_dsprites_arrays(data_dir: Optional[Path] = None, *, num_images: Optional[int] = None, seed: int = 0):
    """dSprites (Matthey et al. 2017): 64x64 binary shapes with known factors; a seeded subset of
    num_images (default 10,000) re-rendered here, or read from the original .npz in --data-dir, or
    from the full render in --data-dir, on disk (see :mod:`ppl_vae.data.dsprites`)."""
    from ppl_vae.data import dsprites

    images, classes = dsprites.load_dsprites(data_dir, num_images=num_images, seed=seed)
    return images, None, None, None, Factors(classes, None, dsprites.FACTOR_NAMES)


load_dsprites_arrays.__dict__["takes_num_images"] = True  # read with getattr by load_dataset
