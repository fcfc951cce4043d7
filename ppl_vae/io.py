"""Atomic file writes: the one place that writes a file so that no reader ever sees half of it.

Each writer writes to a temporary name in the target's folder and renames it onto the target
only when the whole write succeeded (``os.replace`` is atomic on POSIX and Windows), so a run
killed at any moment leaves the previous complete file, or none. A failed write names the
target, never the temporary file.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

_UMASK = os.umask(0)
os.umask(_UMASK)

TEMP_SUFFIX = ".tmp"

# a run directory's own files (ppl_vae.runs names them): only the run layer writes them
RUN_CONFIG_NAME = "config.json"
RUN_FILE_PATTERNS = (RUN_CONFIG_NAME, "checkpoint*.safetensors", "history.nc")


def _is_run_dir(folder: Path) -> bool:
    return (folder / RUN_CONFIG_NAME).is_file()


def check_target(path: Path, *, run_files: bool = False, shown: Optional[Path] = None) -> Path:
    """Refuse (``ValueError``, one line) a write that would replace a run directory's own file
    (config.json, checkpoint*.safetensors, history.nc; unless ``run_files``), or that would go
    through a symlink leaving a run directory above it: a run directory may come from someone
    else, and a link inside it (``RUN/multirun -> ~/elsewhere``) must not redirect our writes.
    ``shown``: what the message names instead of ``path`` (the folder a probe file stands for)."""
    path = Path(path)
    named = path if shown is None else shown
    absolute = Path(os.path.abspath(path))
    if (
        not run_files
        and _is_run_dir(absolute.parent)
        and any(fnmatch.fnmatch(absolute.name, pattern) for pattern in RUN_FILE_PATTERNS)
    ):
        raise ValueError(
            f"refusing to write {named}: it is one of the run directory's own files "
            f"({', '.join(RUN_FILE_PATTERNS)}); write the output elsewhere"
        )
    real_parent = os.path.realpath(absolute.parent)
    for ancestor in absolute.parents:
        if _is_run_dir(ancestor):
            root = os.path.realpath(ancestor)
            if real_parent != root and not real_parent.startswith(root.rstrip(os.sep) + os.sep):
                link = next(
                    (a for a in [absolute.parent, *absolute.parent.parents] if a != ancestor and a.is_symlink()),
                    absolute.parent,
                )
                raise ValueError(
                    f"refusing to write {named}: {link} is a symlink that leads out of the run "
                    f"directory {ancestor} (to {os.path.realpath(link)}); remove the link or "
                    "write elsewhere"
                )
    return path


@contextmanager
def atomic_path(path: Path, *, run_files: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Raises ``ValueError`` naming ``path`` when its folder does not exist or is not a folder,
    and when ``path`` is an existing folder; :func:`check_target` refusals come first.
    """
    path = check_target(Path(path), run_files=run_files)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise NotADirectoryError(f"cannot write {path}: {path.parent} {what}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:  # a read-only or full file system, a folder without write permission
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    pending = _PENDING.get()
    kept = False
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers recreate the file): give it the usual mode
        os.chmod(tmp, 0o666 & ~_UMASK)
        if pending is not None:  # inside file_set(): renamed with the rest of the set
            pending.append((Path(tmp), path))
            kept = True
        else:
            os.replace(tmp, path)
    except OSError as exc:
        # the caller should see the file it asked for, not our temporary name
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if not kept and os.path.exists(tmp):
            os.unlink(tmp)


# the (temporary, target) pairs of the files written inside file_set(), renamed when it ends
_PENDING: ContextVar[Optional[List[Tuple[Path, Path]]]] = ContextVar("ppl_vae_pending_files", default=None)


@contextmanager
def file_set() -> Iterator[None]:
    """The files written inside the block (through :func:`atomic_path` and the writers above) are
    one set: each stays under its temporary name until the block ends without error, then all
    are renamed into place; when it fails or is interrupted, none is, and the temporary files are
    removed. A report's netCDF files, figures and HTML page therefore replace an earlier report
    in the same folder together, never leaving new files beside an old page. Nested blocks
    belong to the outermost one."""
    if _PENDING.get() is not None:
        yield
        return
    pending: List[Tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _PENDING.reset(token)
    for i, (tmp, path) in enumerate(pending):
        try:
            os.replace(tmp, path)
        except OSError as exc:
            for rest, _ in pending[i:]:
                rest.unlink(missing_ok=True)
            raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def write_with(path: Path, writer: Callable[[Path], Any], *, run_files: bool = False) -> Path:
    """``writer(tmp)`` writes the whole file to ``tmp``; it then replaces ``path``. Returns ``path``.

    ``run_files``: the caller is the run layer, which may replace a run's own files."""
    with atomic_path(path, run_files=run_files) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: Path, text: str, *, run_files: bool = False) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text), run_files=run_files)


def write_bytes(path: Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_netcdf(dataset: Any, path: Path, *, run_files: bool = False) -> Path:
    """An xarray Dataset or DataArray as netCDF (h5netcdf engine)."""
    return write_with(path, lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"), run_files=run_files)


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


# folders this process made for its output, newest last (:func:`make_folder`)
_MADE_FOLDERS: List[Path] = []


def make_folder(folder: Path) -> Path:
    """Create ``folder`` and its missing parents (``mkdir -p``), remembering the ones made here,
    so that a command that then fails or is interrupted before writing anything into them can
    remove them (:func:`remove_empty_made_folders`) instead of leaving empty folders behind."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    _MADE_FOLDERS.extend(reversed(missing))  # parents before children
    return folder


def remove_empty_made_folders(*, keep: bool = False) -> List[Path]:
    """Remove the folders :func:`make_folder` made in this process that are still empty, deepest
    first; a folder that holds anything (a file written, or someone else's) stays. Returns the
    removed ones. ``keep``: forget them instead (a command that succeeded keeps what it made)."""
    removed: List[Path] = []
    while _MADE_FOLDERS:
        folder = _MADE_FOLDERS.pop()
        if keep:
            continue
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            continue
        removed.append(folder)
    return removed
