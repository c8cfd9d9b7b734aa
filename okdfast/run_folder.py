"""The run folder: every file a training run writes, and how each is written so that a kill -9 or a full disk at any
moment leaves a folder the next ``--resume auto`` continues exactly.

    config.yaml       the run's config (the recipe and the first session's settings): written once, atomically,
                      when the run starts; never rewritten (a resume that changes a setting records it below)
    environment.json  git commit, versions, device of the first session: written once, atomically
    sessions.jsonl    appended: one line per process that trained in the folder (when, from which checkpoint, the
                      settings it changed, its environment)
    train.log         appended: what the loop printed
    metrics.jsonl     appended: one row per epoch (and a 'partial' row when a run stops inside an epoch)
    metrics.csv       replaced atomically after every row (the same rows as a table)
    last.pt           replaced atomically after every epoch and when a run stops (signal, --max-steps)
    best.pt           the last.pt of the best epoch: a hard link to it, renamed into place atomically
    summary.json      replaced atomically when the process ends (finished or not)

Nothing is written before the run is ready to train (config checked, data read, network built), so a start that
fails leaves no folder behind; temporary files of a killed atomic write are removed by the next start. A resume
rewrites metrics.jsonl / metrics.csv from the checkpoint's history, and relinks best.pt if a kill fell between
last.pt and its link. Only rank 0 writes (``writer=False`` elsewhere).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from okdfast.errors import RunFolderError
from okdfast.utils.atomic_files import append_text, atomic_link, atomic_write_text, remove_orphaned_temps
from okdfast.utils.checkpoint import atomic_save
from okdfast.utils.metrics_log import MetricsLog, read_rows

CONFIG, ENVIRONMENT, SESSIONS, LOG = "config.yaml", "environment.json", "sessions.jsonl", "train.log"
METRICS_JSONL, METRICS_CSV, SUMMARY, LAST, BEST = "metrics.jsonl", "metrics.csv", "summary.json", "last.pt", "best.pt"
WRITTEN = (CONFIG, ENVIRONMENT, SESSIONS, LOG, METRICS_JSONL, METRICS_CSV, SUMMARY, LAST, BEST)


def default_run_dir(method: str, arch: str, dataset: str, branches: int, seed: int) -> Path:
    return Path("runs") / f"{method}_{arch}_{dataset}_k{branches}_s{seed}"


class RunFolder:
    def __init__(self, path: str | os.PathLike, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.created = False
        self._pending: list[str] = []  # log lines printed before the folder exists (written into train.log)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    # ---------------------------------------------------------------------------------------------------- reading
    def check_usable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(
                f"--out {self.path}: is a file; --out names the run folder (new, or an existing run's)"
            )

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def holds_run(self) -> bool:
        return (self.path / CONFIG).is_file() or self.last.is_file()

    def stored_config(self) -> dict[str, Any] | None:
        """The run's config.yaml as written, None when the folder holds none."""
        path = self.path / CONFIG
        if not path.is_file():
            return None
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise RunFolderError(f"{path} cannot be read ({error}); it is written atomically, so the file was changed "
                                 "by hand: restore it, or start a new run with --out NEW") from None  # fmt: skip
        if not isinstance(values, dict):
            raise RunFolderError(f"{path} is not a mapping of config keys; restore it, or start a new run")
        return values

    # ---------------------------------------------------------------------------------------------------- writing
    def create(self) -> list[Path]:
        """Make the folder (when the run is ready to train); removes the temporary files of writes a kill cut short
        and returns them. Log lines printed before are written into train.log now."""
        if not self.writer:
            return []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"--out {self.path}: cannot be created ({error.strerror or error}); pass --out a "
                                 "folder you can write") from None  # fmt: skip
        removed = remove_orphaned_temps(self.path, WRITTEN)
        self.created = True
        if self._pending:
            append_text(self.path / LOG, "".join(line + "\n" for line in self._pending))
            self._pending = []
        return removed

    def log(self, message: str) -> None:
        """Print on the writer rank and append the same line to train.log (kept until the folder exists)."""
        if not self.writer:
            return
        print(message, flush=True)
        if self.created:
            append_text(self.path / LOG, message + "\n")
        else:
            self._pending.append(message)

    def write_config(self, resolved: dict[str, Any]) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(resolved, sort_keys=False))

    def write_environment(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.path / ENVIRONMENT, json.dumps(manifest, indent=2))

    def append_session(self, record: dict[str, Any]) -> None:
        append_text(self.path / SESSIONS, json.dumps(record) + "\n")

    def sessions(self) -> int:
        """How many sessions sessions.jsonl records (0 when it does not exist)."""
        path = self.path / SESSIONS
        return sum(1 for line in path.read_text().split("\n")[:-1] if line.strip()) if path.is_file() else 0

    def metrics(self, history: list[dict[str, Any]]) -> MetricsLog:
        """metrics.jsonl / metrics.csv rewritten to ``history`` (the rows of the checkpoint resumed; none for a new
        run), then appended to."""
        return MetricsLog(self.path, history)

    def rows_before(self, epochs_done: int) -> list[dict[str, Any]]:
        """The finished-epoch rows metrics.jsonl holds for epochs < ``epochs_done`` (for a format-1 checkpoint,
        which carries no history of its own)."""
        try:
            rows = read_rows(self.path / METRICS_JSONL) if self.has(METRICS_JSONL) else []
        except ValueError:
            rows = []
        return [row for row in rows if not row.get("partial") and row.get("epoch", epochs_done) < epochs_done]

    def save_checkpoint(self, payload: dict[str, Any], *, best: bool = False) -> None:
        """last.pt, and best.pt as the same file when this is the best epoch."""
        atomic_save(payload, self.last)
        if best:
            atomic_link(self.last, self.best)

    def repair_best(self, resumed: Path, state: dict[str, Any]) -> bool:
        """When the checkpoint resumed is this folder's last.pt and the best epoch's (``state`` at an epoch boundary
        with best_epoch = the epoch just done), best.pt must be that file: relink it if a kill fell between the two.
        Returns whether it did."""
        if not (self.last.is_file() and resumed.is_file() and os.path.samefile(resumed, self.last)):
            return False
        at_boundary = state.get("step_in_epoch", 0) == 0
        if not (at_boundary and state.get("best_epoch", -1) == state.get("epoch", 0) - 1):
            return False
        if self.best.is_file() and os.path.samefile(self.best, self.last):
            return False
        atomic_link(self.last, self.best)
        return True

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))


def record_start(
    folder: RunFolder,
    *,
    new_run: bool,
    resolved: dict[str, Any],
    environment: dict[str, Any],
    resumed_from: dict[str, Any] | None,
    changes: dict[str, tuple[Any, Any]],
    world_size: int,
) -> None:
    """config.yaml (``resolved``) and environment.json for a new run, written once; a sessions.jsonl line for
    every start (``resumed_from``: the checkpoint and position continued, None for a fresh start)."""
    if new_run:
        folder.write_config(resolved)
    if new_run or not folder.has(ENVIRONMENT):  # also when a kill cut the first session's write short
        folder.write_environment(environment)
    folder.append_session(
        {
            "session": folder.sessions() + 1,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": resumed_from,
            "changed": {name: {"run": before, "now": now} for name, (before, now) in changes.items()},
            "world_size": world_size,
            "environment": environment,
        }
    )
