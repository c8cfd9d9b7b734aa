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


# A parent process (okdfast.reproduce's runner) that sets this variable to a path gets a structured record of the
# UserError a CLI exited with, {"error": class name, "kinds": the classes it derives from, "message": ...}, so that
# it tells failures apart by type, not by searching the log's text.
FAILURE_RECORD_ENV = "OKDFAST_FAILURE_RECORD"


def write_failure_record(error: BaseException) -> None:
    """Write the record of ``error`` where ``$OKDFAST_FAILURE_RECORD`` says (nothing when it is unset)."""
    import json
    import os

    path = os.environ.get(FAILURE_RECORD_ENV)
    if not path:
        return
    from okdfast.utils.atomic_files import atomic_write_text

    kinds = [cls.__name__ for cls in type(error).__mro__ if cls not in (object, BaseException)]
    record = {"error": type(error).__name__, "kinds": kinds, "message": str(error)}
    try:
        atomic_write_text(path, json.dumps(record) + "\n")
    except OSError:  # the record is a courtesy to the parent: never a second failure
        pass


def read_failure_record(path) -> dict | None:
    """The record a child wrote at ``path`` (None: none, or not readable as one)."""
    import json
    from pathlib import Path

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("kinds"), list) else None
