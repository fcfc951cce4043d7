"""Exceptions with messages meant for users; the CLI prints them as one line."""


class PplVaeError(Exception):
    """Base class of the library's user-facing errors."""


class DataError(PplVaeError, ValueError):
    """A dataset is missing, corrupt, or does not fit the chosen likelihood."""


class RunDirError(PplVaeError, ValueError):
    """A run directory is missing, incomplete, or holds files that cannot be read safely."""


class TrainingDiverged(PplVaeError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
