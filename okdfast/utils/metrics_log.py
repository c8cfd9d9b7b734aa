"""Per-epoch metrics: appended to metrics.csv and metrics.jsonl in the run folder (rank 0 only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one row per epoch. A resumed run keeps the rows of the epochs it already finished."""

    def __init__(self, run_dir: str | Path, resume_epoch: int = 0) -> None:
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_epoch > 0 and self.jsonl_path.exists():
            with self.jsonl_path.open() as handle:
                self.rows = [json.loads(line) for line in handle if line.strip()]
            self.rows = [row for row in self.rows if row["epoch"] < resume_epoch]
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        # Rewritten whole (tiny files) so columns that appear later (e.g. a metric added mid-run) stay aligned.
        columns: list[str] = []
        for row in self.rows:
            columns.extend(key for key in row if key not in columns)
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        with self.jsonl_path.open("w") as handle:
            for row in self.rows:
                handle.write(json.dumps(row) + "\n")
