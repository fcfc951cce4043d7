"""Readers for on-disk formats: IDX (MNIST, Fashion-MNIST), MATLAB .mat, .npy/.npz/.csv.

Every reader raises :class:`~ppl_vae.errors.DataError` with a one-line message for a missing,
truncated or malformed file; none downloads anything.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Dict

import numpy as np
from numpy.typing import DTypeLike

from ppl_vae.errors import DataError

# IDX magic: two zero bytes, a type code, the number of dimensions.
_IDX_DTYPES: Dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), as in LeCun's MNIST distribution."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: corrupt or truncated gzip data ({exc})") from None
    if not raw:
        raise DataError(f"{path} is empty: restore the file (an IDX file starts with a 4-byte magic number)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} is not an IDX file (bad header)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(int(d) for d in shape) * dtype.itemsize  # Python ints: np.prod wraps at 2**63
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header says shape {shape} "
            f"({expected} bytes of data) but it holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def read_mat_array(path: str | Path, key: str) -> np.ndarray:
    """One array ``key`` from a MATLAB (v5) .mat file."""
    from scipy.io import loadmat  # imported lazily: only this reader needs scipy.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f".mat file not found: {path}")
    try:
        contents = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for corrupt files
        raise DataError(f"cannot read {path} as a MATLAB .mat file: {exc}") from None
    if key not in contents:
        names = [k for k in contents if not k.startswith("__")]
        raise DataError(f"{path} has no variable {key!r} (it has: {', '.join(names)})")
    return np.asarray(contents[key])


def read_csv(path: Path) -> np.ndarray:
    """A numeric CSV (comma-separated, optional one-line header) as a float array.

    The first row is a header only when none of its fields is a number (``x1,x2,label``); a
    first row that mixes numbers and text (``0.5x,1,2``: a typo) is an error, never a header
    that silently drops a datapoint. A UTF-8 byte-order mark is ignored."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as text: {exc}") from None
    rows = [line for line in lines if line.strip()]
    if rows and is_csv_header(rows[0]):
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path} holds no data rows")
    values = []
    width = None
    for lineno, line in enumerate(rows, start=1):
        fields = line.split(",")
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            raise DataError(f"{path}: row {lineno} has {len(fields)} columns, expected {width}")
        try:
            values.append([float(f) for f in fields])
        except ValueError:
            bad = next(f for f in fields if not _is_float(f))
            raise DataError(f"{path}: non-numeric value {bad.strip()!r} in data row {lineno}") from None
    return np.asarray(values, dtype=np.float64)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_csv_header(line: str) -> bool:
    """Whether a CSV line is a header: none of its fields is a number."""
    return not any(_is_float(f) for f in line.split(","))


_MAGIC = {
    ".npy": (b"\x93NUMPY", "a NumPy .npy file", "numpy.save"),
    ".npz": (b"PK", "a NumPy .npz archive", "numpy.savez"),
}


def check_npy_magic(path: Path) -> None:
    """Refuse a ``.npy``/``.npz`` whose first bytes are not that format's (e.g. text named .npy),
    before numpy would read it as a pickle and advise ``allow_pickle``."""
    magic, what, writer = _MAGIC[path.suffix.lower()]
    try:
        with open(path, "rb") as f:
            head = f.read(len(magic))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != magic:
        hint = (
            " (it looks like text: use the .csv suffix for comma-separated numbers)" if _looks_like_text(path) else ""
        )
        raise DataError(
            f"{path} is not {what}: it does not start with the format's signature{hint}; write arrays with {writer}"
        )


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(head) and all(c >= 32 or c in (9, 10, 13) for c in head)


def read_array_file(path: str | Path) -> Dict[str, np.ndarray]:
    """Arrays from a user's file: ``.npy`` -> {"data"}, ``.npz`` -> its arrays, ``.csv`` -> {"data"}.

    Never unpickles: a file that is not really ``.npy``/``.npz`` is refused by its first bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path} is a folder, not a data file: for a registered dataset's files give --dataset NAME "
            "--data-dir FOLDER (ppl-vae models lists the names), or give a .npy, .npz or .csv file"
        )
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _MAGIC:
        check_npy_magic(path)
    try:
        if suffix == ".npy":
            return {"data": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        if "pickle" in str(exc) or "Python objects" in str(exc):
            raise DataError(
                f"{path} holds Python objects (an object array), which are never unpickled; save a numeric array"
            ) from None
        raise DataError(f"cannot read {path}: {exc}".splitlines()[0]) from None
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise DataError(f"cannot read {path}: corrupt file ({type(exc).__name__})") from None
    if suffix == ".csv":
        return {"data": read_csv(path)}
    raise DataError(f"unsupported data file type {suffix!r} for {path}; use .npy, .npz or .csv")
