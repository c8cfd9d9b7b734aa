"""The record of the error a CLI process exited with, for the parent that started it: okdfast.reproduce's runner
tells a run's failures apart by the error's type, not by searching the log's text."""

from __future__ import annotations

import json
import os
from pathlib import Path

from okdfast.utils.atomic_files import atomic_write_text

# A parent process (okdfast.reproduce's runner) that sets this variable to a path gets a structured record of the
# UserError a CLI exited with, {"error": class name, "kinds": the classes it derives from, "message": ...}, so that
# it tells failures apart by type, not by searching the log's text.
FAILURE_RECORD_ENV = "OKDFAST_FAILURE_RECORD"


def write_failure_record(error: BaseException) -> None:
    """Write the record of ``error`` where ``$OKDFAST_FAILURE_RECORD`` says (nothing when it is unset)."""
    path = os.environ.get(FAILURE_RECORD_ENV)
    if not path:
        return
    kinds = [cls.__name__ for cls in type(error).__mro__ if cls not in (object, BaseException)]
    record = {"error": type(error).__name__, "kinds": kinds, "message": str(error)}
    try:
        atomic_write_text(path, json.dumps(record) + "\n")
    except OSError:  # the record is a courtesy to the parent: never a second failure
        pass


def read_failure_record(path: str | os.PathLike) -> dict | None:
    """The record a child wrote at ``path`` (None: none, or not readable as one)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("kinds"), list) else None
