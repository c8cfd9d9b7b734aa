"""Per-epoch metrics of a run: metrics.jsonl (appended, one row per line) and metrics.csv (replaced atomically).

``metrics.jsonl`` is only ever appended to, one whole line per epoch, so a kill or a full disk can at worst cut
its last line short; :func:`read_rows` drops such an unterminated line. ``metrics.csv`` is rewritten whole (so
that a column that appears later stays aligned) through an atomic replace. The history of the finished epochs
also travels in every checkpoint, so a resumed run rewrites both files from the checkpoint it continues: rows of
the epoch a crash cut (or logged after the checkpoint) disappear, rows the files lost come back.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from okdfast.utils.atomic_files import append_text, atomic_write_text


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line without its newline (a write cut short) is dropped; a damaged line
    elsewhere raises ValueError naming the file and the line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    complete = text.split("\n")[:-1]  # what follows the last newline is a line a kill cut short (or '')
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not a JSON row ({error.msg})") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class MetricsLog:
    """The rows of a run; ``history`` are those of finished epochs (what a checkpoint carries).

    ``MetricsLog(run_dir, history)`` rewrites both files to exactly ``history`` (a new run: no rows; a resumed run:
    the checkpoint's), then :meth:`append` adds one row at a time.
    """

    def __init__(self, run_dir: str | Path, history: Iterable[dict[str, Any]] = ()) -> None:
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = [dict(row) for row in history]
        atomic_write_text(self.jsonl_path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self._write_csv()

    @property
    def history(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if not row.get("partial")]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        append_text(self.jsonl_path, json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        if self.rows:
            atomic_write_text(self.csv_path, csv_text(self.rows))
        elif self.csv_path.exists():
            self.csv_path.unlink()
