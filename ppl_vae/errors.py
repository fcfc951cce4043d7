"""Exceptions with messages meant for users; the CLI prints them as one line."""

from __future__ import annotations

from typing import Optional


def one_line(exc: BaseException) -> str:
    """The error as one line, without the table of trace shapes that Pyro appends to an error
    raised inside a model or guide (a Python caller's debugging aid, noise to a CLI user or in
    a report's note). An OSError reads as its message and file, without Python's "[Errno N]"."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        return " ".join(text.split())
    text = str(exc).split("\nTrace Shapes:", 1)[0]
    return " ".join(text.split()) or type(exc).__name__


class PplVaeError(Exception):
    """Base class of the library's user-facing errors."""


class ConfigError(PplVaeError, ValueError):
    """A config value is missing, unknown or of the wrong type.

    ``field`` names it as the config does (``"train.lr"``); the message uses that name, and
    the CLI, which knows which flag sets which field, may show the flag instead.
    """

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class DataError(PplVaeError, ValueError):
    """A dataset is missing, corrupt, or does not fit the chosen likelihood."""


class RunDirError(PplVaeError, ValueError):
    """A run directory is missing, incomplete, or holds files that cannot be read safely."""


class RunConfigError(RunDirError):
    """A run's config.json holds a setting that is out of range, unknown, or differs from what
    its checkpoint was trained under. The message names the file and the setting as the file
    spells it (``train.device``): the user typed no flag, so the CLI names none."""

    names_flags = False


class TrainingDiverged(PplVaeError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
