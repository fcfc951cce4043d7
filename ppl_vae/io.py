"""Atomic file writes: the one place that writes a file so that no reader ever sees half of it.

Each writer writes to a temporary name in the target's folder and renames it onto the target
only when the whole write succeeded (``os.replace`` is atomic on POSIX and Windows), so a run
killed at any moment leaves the previous complete file, or none. A failed write names the
target, never the temporary file.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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
# what to do once the set is in place (print what was written), in order
_AFTER: ContextVar[Optional[List[Callable[[], Any]]]] = ContextVar("ppl_vae_after_commit", default=None)
_LAST_SET_IN_PLACE = [False]
_LAST_SET_REMOVED: List[List[Path]] = [[]]
# files of an earlier report that the current file_set replaces as a whole (supersedes())
_SUPERSEDED: ContextVar[Optional[List[Path]]] = ContextVar("ppl_vae_superseded_files", default=None)


def after_commit(action: Callable[[], Any]) -> None:
    """Run ``action`` once the files of the current :func:`file_set` are in place (now, outside
    one): a command's "wrote ..." line is printed only when it is true."""
    pending = _AFTER.get()
    if pending is None:
        action()
    else:
        pending.append(action)


def supersedes(paths: Iterable[Path]) -> None:
    """The current :func:`file_set` replaces the report ``paths`` belong to (all its file names):
    those of them the set does not write are removed when it goes into place, since they are an
    earlier report's optional files (calibrate's predictive checks, say) and would otherwise lie
    beside a page that does not describe them. Outside a file_set: nothing is removed."""
    pending = _SUPERSEDED.get()
    if pending is not None:
        pending.extend(Path(p) for p in paths)


def last_set_removed() -> List[Path]:
    """The earlier report's files the last :func:`file_set` removed (:func:`supersedes`)."""
    return list(_LAST_SET_REMOVED[0])


def last_set_in_place() -> bool:
    """Whether the last :func:`file_set` of this process renamed all its files into place (an
    interrupt that arrives during the renames is held until they are done)."""
    return _LAST_SET_IN_PLACE[0]


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive during the block are held and handled when it ends, as they
    would have been (their handlers are swapped for one that records them: a thread mask would
    not do, since the kernel hands a process's signal to any of its threads, torch's included)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    received: List[int] = []
    previous: Dict[int, Any] = {}
    for held in (signal.SIGINT, signal.SIGTERM):
        previous[held] = signal.signal(held, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            first, handler = received[0], previous[received[0]]
            if callable(handler):
                handler(first, None)  # KeyboardInterrupt, as if it came now
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), first)


@contextmanager
def file_set() -> Iterator[None]:
    """The files written inside the block (through :func:`atomic_path` and the writers above) are
    one set: each stays under its temporary name until the block ends without error, then all
    are renamed into place, with Ctrl-C and SIGTERM held until the renames are done, and the
    :func:`after_commit` actions run; when the block fails or is interrupted, no file is renamed
    and the temporary files are removed. A report's netCDF files, figures and HTML page therefore
    replace an earlier report in the same folder together, never leaving new files beside an old
    page. Nested blocks belong to the outermost one."""
    if _PENDING.get() is not None:
        yield
        return
    pending: List[Tuple[Path, Path]] = []
    after: List[Callable[[], Any]] = []
    superseded: List[Path] = []
    tokens = _PENDING.set(pending), _AFTER.set(after), _SUPERSEDED.set(superseded)
    _LAST_SET_IN_PLACE[0] = False
    _LAST_SET_REMOVED[0] = []
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _PENDING.reset(tokens[0])
        _AFTER.reset(tokens[1])
        _SUPERSEDED.reset(tokens[2])
    written = {os.path.abspath(path) for _, path in pending}
    stale = [
        p for p in dict.fromkeys(superseded) if os.path.abspath(p) not in written and p.is_file() and not p.is_symlink()
    ]
    with _signals_held():
        _LAST_SET_REMOVED[0] = _rename_all(pending, stale)
        _LAST_SET_IN_PLACE[0] = True
        for action in after:
            action()


def _rename_all(pending: List[Tuple[Path, Path]], stale: Sequence[Path] = ()) -> List[Path]:
    """Rename each temporary file onto its target, then remove the ``stale`` files (an earlier
    report's, :func:`supersedes`). A rename or removal that fails (the folder changed under
    the command) undoes the ones before it: each replaced or removed file was kept under a second
    name (a hard link) until all are done, and goes back. Returns the files removed."""
    kept: List[Tuple[Path, Optional[Path], bool]] = []  # (target, its earlier file's second name, it existed)
    removed: List[Path] = []
    try:
        for path in stale:
            doing = "remove"
            second = path.with_name(f".{path.name}.{os.getpid()}.earlier{TEMP_SUFFIX}")
            try:
                os.link(path, second)
            except OSError:  # a file system without hard links: no undo, so the file stays
                continue
            try:
                os.unlink(path)
            except OSError:
                second.unlink(missing_ok=True)
                raise
            kept.append((path, second, True))
            removed.append(path)
        for tmp, path in pending:
            doing = "write"
            backup: Optional[Path] = None
            existed = path.is_file()
            if existed:
                backup = path.with_name(f".{path.name}.{os.getpid()}.earlier{TEMP_SUFFIX}")
                try:
                    os.link(path, backup)
                except OSError:  # a file system without hard links: no undo for this one
                    backup = None
            try:
                os.replace(tmp, path)
            except OSError:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            kept.append((path, backup, existed))
    except OSError as exc:
        for target, backup, existed in reversed(kept):
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                target.unlink(missing_ok=True)  # new: the set is not in place, so neither is it
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise type(exc)(exc.errno, f"cannot {doing} {path}: {exc.strerror or exc}") from None
    for _, backup, _ in kept:
        if backup is not None:
            backup.unlink(missing_ok=True)
    return removed


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


def netcdf_in_memory(write: Callable[[Any], Any]) -> Optional[bytes]:
    """The bytes ``write(buffer)`` puts into an in-memory file (xarray's ``to_netcdf`` with the
    h5netcdf engine), or None where xarray writes h5netcdf to paths only (releases before 2025).
    Written to disk as plain bytes, a full disk is an OSError naming the file: HDF5 writing to a
    full disk itself crashed the process (SIGSEGV after pages of h5py errors)."""
    import io as _io

    buffer = _io.BytesIO()
    try:
        write(buffer)
    except (TypeError, ValueError, NotImplementedError):  # "only the scipy engine writes file-like objects"
        return None
    return buffer.getvalue()


def write_netcdf(dataset: Any, path: Path, *, run_files: bool = False) -> Path:
    """An xarray Dataset or DataArray as netCDF (h5netcdf engine), made in memory where xarray can
    (:func:`netcdf_in_memory`)."""
    data = netcdf_in_memory(lambda buffer: dataset.to_netcdf(buffer, engine="h5netcdf"))
    if data is None:
        return write_with(path, lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"), run_files=run_files)
    return write_with(path, lambda tmp: tmp.write_bytes(data), run_files=run_files)


def write_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> Path:
    """A matplotlib Figure in the format that ``path``'s suffix names (png, svg, pdf, ...)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))


# a temporary file of atomic_path: "." + the target's name + "." + mkstemp's 8 characters + ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


def remove_stale_temp_files(folder: Path) -> List[Path]:
    """Delete the temporary files that a killed writer left in ``folder``; returns them.

    Only this module's own temporary files (".NAME.XXXXXXXX.tmp", regular files, not links): a
    user's ".notes.tmp" or a link of that name stays. Safe when several processes clean the same
    folder at once: a file another process removed first is skipped.
    """
    stale = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if _TEMP_NAME.match(path.name) and stat.S_ISREG(info.st_mode):
            stale.append(path)
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
