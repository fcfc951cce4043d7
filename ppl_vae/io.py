"""Atomic file writes: the one place that writes a file so that no reader ever sees half of it.

Each writer writes to a temporary name in the target's folder and renames it onto the target
only when the whole write succeeded (``os.replace`` is atomic on POSIX and Windows), so a run
killed at any moment leaves the previous complete file, or none. A failed write names the
target, never the temporary file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List

_UMASK = os.umask(0)
os.umask(_UMASK)

TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Raises ``ValueError`` naming ``path`` when its folder does not exist or is not a folder,
    and when ``path`` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise NotADirectoryError(f"cannot write {path}: {path.parent} {what}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers recreate the file): give it the usual mode
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        # the caller should see the file it asked for, not our temporary name
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_with(path: Path, writer: Callable[[Path], Any]) -> Path:
    """``writer(tmp)`` writes the whole file to ``tmp``; it then replaces ``path``. Returns ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_netcdf(dataset: Any, path: Path) -> Path:
    """An xarray Dataset or DataArray as netCDF (h5netcdf engine)."""
    return write_with(path, lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"))


def write_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> Path:
    """A matplotlib Figure in the format that ``path``'s suffix names (png, svg, pdf, ...)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))


def remove_stale_temp_files(folder: Path) -> List[Path]:
    """Delete the temporary files that a killed writer left in ``folder``; returns them.

    Safe when several processes clean the same folder at once: a file another process
    removed first is skipped.
    """
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
