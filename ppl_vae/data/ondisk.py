"""Datasets larger than memory: rows of a ``.npy`` file read from disk per minibatch.

:class:`NpyRows` stands where a :class:`~ppl_vae.data.Dataset` holds a tensor. It answers
what the training loop and the batched estimators ask of a tensor — ``.shape``, ``.device``,
``len()``, ``x[idx]`` for a tensor of indices, an int or a slice, ``.to(device)`` — and
returns a float32 tensor on its device holding just those rows. The file is never loaded:
its header is read as ``np.load(path, mmap_mode="r")`` reads it, and each gather reads the
rows it needs with positioned reads (``os.preadv``, consecutive rows in one call) straight
into the batch's buffer. Pages of a memory map would count in the process's resident memory
(and recent kernels map whole multi-page folios of the page cache per fault, so a scattered
batch of 1,000 rows could map most of a file), whereas the page cache that positioned reads go
through does not: resident memory stays at the model plus a batch, whatever the file's size.
On CUDA each batch is read into pinned host memory and copied asynchronously.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ppl_vae.errors import DataError

#: bytes per read when the whole file is scanned once at load (range and NaN check)
SCAN_BYTES = 16 << 20

Index = Union[Tensor, np.ndarray, slice, int, list]

# numpy dtypes torch.from_numpy takes as they are (others are converted to float32 by numpy)
_TORCH_READABLE = {"float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool"}


class _NpyFile:
    """One ``.npy`` file, shared by its train and test views: header, an open descriptor, and
    per-row statistics (min, max, number of non-finite values) from one scan at load."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            header = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            if "pickle" in str(exc) or "Python objects" in str(exc):
                raise DataError(
                    f"{self.path} holds Python objects (an object array), which are never "
                    "unpickled; save a numeric array"
                ) from None
            raise DataError(f"cannot read {self.path}: {' '.join(str(exc).split())}") from None
        if header.dtype.kind not in "biuf":
            raise DataError(f"{self.path.name} has non-numeric dtype {header.dtype}")
        if header.ndim == 0:
            raise DataError(
                f"{self.path.name} holds a single number (a 0-d array); expected datapoints "
                "along the first axis, shape (N, ...)"
            )
        if not header.flags.c_contiguous and header.ndim > 1:
            raise DataError(
                f"{self.path.name} is stored in Fortran order; rows can only be read from a "
                "C-ordered .npy (save it with numpy.save(path, numpy.ascontiguousarray(a)))"
            )
        self.dtype = header.dtype
        self.shape = tuple(int(s) for s in header.shape)
        self.offset = int(header.offset)
        del header  # only the header was wanted; no page of the data stays mapped
        if self.shape[0] == 0 or math.prod(self.shape) == 0:
            raise DataError(f"{self.path.name} is empty")
        self.row_bytes = int(self.dtype.itemsize * math.prod(self.shape[1:]))
        expected = self.offset + self.shape[0] * self.row_bytes
        if os.path.getsize(self.path) < expected:
            raise DataError(f"{self.path} is truncated: its header promises {expected} bytes")
        self._fd = os.open(self.path, os.O_RDONLY)
        self.row_min, self.row_max, self.row_bad = self._scan()

    # pickling (spawned worker processes) reopens the file by path
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_fd")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = self.__dict__.get("_fd")
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        while len(buffer):
            n = os.preadv(self._fd, [buffer], offset)
            if n == 0:
                raise DataError(f"{self.path} ended early: was it truncated while training?")
            buffer, offset = buffer[n:], offset + n

    def _scan(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.shape[0]
        row_min = np.empty(n, np.float64)
        row_max = np.empty(n, np.float64)
        row_bad = np.zeros(n, np.int64)
        step = max(1, SCAN_BYTES // self.row_bytes)
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk = self.read_rows(np.arange(start, stop)).reshape(stop - start, -1)
            if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
                finite = np.isfinite(chunk)  # the range is that of the finite values
                row_bad[start:stop] = (~finite).sum(axis=1)
                row_min[start:stop] = np.where(finite, chunk, np.inf).min(axis=1)
                row_max[start:stop] = np.where(finite, chunk, -np.inf).max(axis=1)
            else:
                row_min[start:stop] = chunk.min(axis=1)
                row_max[start:stop] = chunk.max(axis=1)
        return row_min, row_max, row_bad

    def read_rows(self, rows: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """File rows ``rows`` in that order, as an array ``(len(rows), *shape[1:])`` of the file's
        dtype; read into ``out`` (a C-contiguous byte buffer of the right size) when given."""
        rows = np.asarray(rows, dtype=np.int64)
        n, rb = len(rows), self.row_bytes
        if out is None:
            out = np.empty(n * rb, np.uint8)
        view = out.data.cast("B")  # the array's buffer, as memoryview(out)
        # runs of consecutive rows are read with one call each
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1 if n > 1 else np.empty(0, np.int64)
        starts = [0, *breaks.tolist()] if n else []
        ends = [*breaks.tolist(), n]
        for s, e in zip(starts, ends):
            self._read_into(view[s * rb : e * rb], self.offset + int(rows[s]) * rb)
        return np.frombuffer(out, self.dtype, count=n * math.prod(self.shape[1:])).reshape(n, *self.shape[1:])


@dataclass(frozen=True, eq=False)
class NpyRows:
    """Rows ``rows`` (all when None) of a ``.npy`` file, read as float32 on ``device``.

    ``threshold``: rows are binarized as ``x > 0.5`` when read. Shapes follow the tensor they
    stand for: ``(N, *event_shape)``, a 1-d file read as ``(N, 1)``.
    """

    file: _NpyFile = field(repr=False)
    rows: Optional[np.ndarray] = field(default=None, repr=False)
    device: torch.device = torch.device("cpu")
    threshold: bool = False

    dtype = torch.float32

    # tensor-like surface -------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        event = self.file.shape[1:] or (1,)
        return torch.Size((self.num_rows, *event))

    @property
    def num_rows(self) -> int:
        return self.file.shape[0] if self.rows is None else len(self.rows)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.num_rows

    def to(self, device: Union[str, torch.device], *args, **kwargs) -> "NpyRows":
        """The same rows, read onto ``device`` from now on (nothing is copied here)."""
        return replace(self, device=torch.device(device))

    def __getitem__(self, index: Index) -> Tensor:
        if isinstance(index, (int, np.integer)):
            return self._read(self._file_rows(np.array([int(index)])))[0]
        if isinstance(index, slice):
            if index.step is not None and index.step <= 0:
                raise ValueError("step must be greater than zero")  # as for a torch.Tensor
            positions = np.arange(*index.indices(self.num_rows))
        elif torch.is_tensor(index):
            positions = index.detach().cpu().numpy()
        else:
            positions = np.asarray(index)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        if positions.ndim != 1 or (positions.size and positions.dtype.kind not in "iu"):
            raise IndexError("rows of a .npy on disk are indexed by an int, a slice or a 1-d array of indices")
        return self._read(self._file_rows(positions))

    def __repr__(self) -> str:
        return (
            f"NpyRows({self.file.path.name}, shape={tuple(self.shape)}, device={self.device}"
            f"{', threshold' if self.threshold else ''})"
        )

    # reading -----------------------------------------------------------------------
    def _file_rows(self, positions: np.ndarray) -> np.ndarray:
        n = self.num_rows
        positions = positions.astype(np.int64, copy=False)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} rows")
        positions = np.where(positions < 0, positions + n, positions)
        return positions if self.rows is None else self.rows[positions]

    def _read(self, file_rows: np.ndarray) -> Tensor:
        nbytes = len(file_rows) * self.file.row_bytes
        cuda = self.device.type == "cuda"
        # on CUDA, read straight into pinned memory so the copy to the device is asynchronous
        staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        array = self.file.read_rows(file_rows, out=staging.numpy())
        if not array.dtype.isnative or array.dtype.name not in _TORCH_READABLE:
            array = array.astype(np.float32)  # big-endian or unsigned wider than a byte: convert here
        raw = torch.from_numpy(array)
        shape = (len(file_rows), *self.shape[1:])
        if cuda:
            out = raw.to(self.device, non_blocking=True).reshape(shape).to(torch.float32)
        else:
            out = raw.reshape(shape).to(torch.float32)
            out = out if self.device.type == "cpu" else out.to(self.device)
        return (out > 0.5).to(torch.float32) if self.threshold else out

    # views and statistics ----------------------------------------------------------
    def take(self, positions: np.ndarray) -> "NpyRows":
        """A view of some of these rows (no data is read)."""
        return replace(self, rows=self._file_rows(np.asarray(positions)))

    def value_range(self) -> Tuple[float, float, int]:
        """(min, max, number of NaN/infinite values) of these rows as they are read, from the
        per-row statistics of the scan at load (no data is read)."""
        rows = slice(None) if self.rows is None else self.rows
        low, high = float(self.file.row_min[rows].min()), float(self.file.row_max[rows].max())
        bad = int(self.file.row_bad[rows].sum())
        if self.threshold:
            low, high = float(low > 0.5), float(high > 0.5)
        return low, high, bad

    @property
    def nbytes_float32(self) -> int:
        """What these rows would take as one float32 tensor (memory that is *not* allocated)."""
        return 4 * math.prod(self.shape)


def open_npy(path: Union[str, Path]) -> NpyRows:
    """All rows of ``path`` (a C-ordered numeric ``.npy``), after one scan for range and NaNs.

    Raises :class:`DataError` for a file that is not a readable numeric ``.npy`` or that holds
    NaN or infinite values.
    """
    rows = NpyRows(_NpyFile(Path(path)))
    bad = int(rows.file.row_bad.sum())
    if bad:
        raise DataError(f"{Path(path).name} contains {bad} NaN or infinite value(s)")
    return rows


def file_size(path: Union[str, Path]) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
