"""The errors a user causes, told apart from bugs.

A :class:`UserError` is raised for what the person running okdfast can fix: a flag or YAML value, a path, the data
set's files, a checkpoint, a run folder, a full disk, a run that diverged. The command-line entry points print its
message (what, where, the fix) on one line and exit with status 2, without a traceback; any other exception is a
bug and keeps its traceback. Library callers get the exception itself. Subclasses also derive from the built-in
exception a caller would have caught before (``ValueError``, ``FileExistsError``, ...).
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # argparse's status for a usage error; the CLIs use it for every UserError


class UserError(Exception):
    """Something the user can fix; the message says what, where, and the fix."""


class ConfigError(UserError, ValueError):
    """A config value (flag or YAML key) of the wrong type or out of range, or a contradiction between values."""


class RunFolderError(UserError, FileExistsError):
    """The run folder cannot be used as asked (it is a file, holds another run, or cannot be written)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, damaged, not okdfast's, or of another run."""


class DataError(UserError, ValueError):
    """The data set's files exist but cannot be read, or differ from the data a run was trained on."""
