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
    train.lock        locked (flock, exclusive) by the process that trains in the folder, with its pid, host and
                      start time: a second process is refused, naming the holder; the OS releases the lock when
                      the holder ends in any way (kill -9 too), so a lock is never stale

A folder is used only if it is new, empty or an okdfast run folder (its files are these, and none of them is a
symbolic link): okdfast never writes among a user's own files, nor through a link out of the folder. A start decides
from what the folder holds (a new run, or which checkpoint to continue); when it takes the lock it checks that the
folder still holds that, so two processes started at once never both train it.

Nothing is written before the run is ready to train (config checked, data read, network built), so a start that
fails leaves no folder behind; temporary files of a killed atomic write are removed by the next start. A resume
rewrites metrics.jsonl / metrics.csv from the checkpoint's history, and relinks best.pt if a kill fell between
last.pt and its link. Only rank 0 writes (``writer=False`` elsewhere).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from okdfast.config import read_yaml
from okdfast.errors import ConfigError, RunFolderError
from okdfast.run.checkpoint_file import atomic_save
from okdfast.utils.atomic_files import (
    append_text,
    atomic_link,
    atomic_write_text,
    is_temp_name,
    remove_orphaned_temps,
    write_error,
)
from okdfast.utils.metrics_log import MetricsLog, read_rows

CONFIG, ENVIRONMENT, SESSIONS, LOG = "config.yaml", "environment.json", "sessions.jsonl", "train.log"
METRICS_JSONL, METRICS_CSV, SUMMARY, LAST, BEST = "metrics.jsonl", "metrics.csv", "summary.json", "last.pt", "best.pt"
WRITTEN = (CONFIG, ENVIRONMENT, SESSIONS, LOG, METRICS_JSONL, METRICS_CSV, SUMMARY, LAST, BEST)
LOCK = "train.lock"
# Everything a run folder holds: these files, the lock, predictions.npz (okdfast.run.predictions), tensorboard/ and the
# plots/ of okdfast.plot.
OURS = frozenset(WRITTEN) | {LOCK, "predictions.npz", "tensorboard", "plots"}

# The run folders whose lock this process holds (real path -> lock file descriptor). A process trains one run at a
# time, so a lock of this process that another run of it (a library caller's next run() call) asks for belongs to
# a run that has ended: it is handed over. In a forked child (a DataLoader worker) they are closed, so that the lock
# goes with the process that took it and a kill -9 of the trainer frees it at once, whatever its workers still do.
_HELD_LOCKS: dict[str, tuple[int, object]] = {}  # (fd, the RunFolder.lock call that took it)


def _close_held_locks_in_child() -> None:
    for fd, _ in _HELD_LOCKS.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def default_run_dir(method: str, arch: str, dataset: str, branches: int, seed: int) -> Path:
    return Path("runs") / f"{method}_{arch}_{dataset}_k{branches}_s{seed}"


class RunFolder:
    def __init__(self, path: str | os.PathLike, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.created = False
        self._pending: list[str] = []  # log lines printed before the folder exists (written into train.log)
        self._lock_fd: int | None = None
        self._lock_key, self._lock_token = "", object()
        self.planned_state: tuple[Any, ...] | None = None  # what the start decided from (:meth:`state`)

    def __del__(self) -> None:
        self.release()

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
        """Refuse a path that is a file, a folder of other files than a run's, and links among a run's files."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(
                f"--out {self.path}: is a file; --out names the run folder (new, or an existing run's)"
            )
        if not self.path.is_dir():
            return
        for name in (*WRITTEN, LOCK):
            if (self.path / name).is_symlink():
                raise RunFolderError(
                    f"{self.path / name} is a symbolic link: okdfast writes a run folder's files itself and never "
                    "through a link (it could point anywhere); remove the link, or pass --out another folder"
                )
        if self.holds_run():
            return
        try:
            foreign = list(itertools.islice((e.name for e in os.scandir(self.path) if not _ours(e.name)), 4))
        except OSError as error:
            raise RunFolderError(f"--out {self.path}: cannot be read ({error.strerror or error})") from None
        if foreign:
            held = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RunFolderError(
                f"--out {self.path}: is not empty and not an okdfast run folder (it holds {held}); okdfast writes "
                "its files only into a new or empty folder or a run's own: pass --out a new folder"
            )

    def check_not_in_use(self) -> None:
        """Refuse at once when another process holds the folder's lock (the authoritative check is
        :meth:`lock`, when the folder is written; this one spares the set-up of a start that would be refused)."""
        path = self.path / LOCK
        if os.path.realpath(path) in _HELD_LOCKS:
            return  # this process's, from a run that has ended
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(_in_use(self.path, _holder(fd))) from None
        except OSError:
            pass  # a file system without locks: lock() says so
        finally:
            os.close(fd)

    def state(self) -> tuple[Any, ...]:
        """What a start decides from: config.yaml and last.pt (inode, size, mtime; None where missing)."""
        found = []
        for name in (CONFIG, LAST):
            try:
                stat = os.stat(self.path / name)
                found.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                found.append(None)
        return tuple(found)

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
            values = read_yaml(path, str(path))
        except ConfigError as error:
            raise RunFolderError(f"{error}; it is written atomically, so the file was changed by hand: restore it, "
                                 "or start a new run with --out NEW") from None  # fmt: skip
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
        self.lock()
        removed = remove_orphaned_temps(self.path, WRITTEN)
        self.created = True
        if self._pending:
            append_text(self.path / LOG, "".join(line + "\n" for line in self._pending))
            self._pending = []
        return removed

    def lock(self) -> None:
        """Take the folder's lock (flock on train.lock, exclusive), write this process into it, and check that the
        folder still holds what the start decided from; a RunFolderError when another process holds it or changed
        the folder meanwhile. Held until :meth:`release` or the process ends."""
        if self._lock_fd is not None:
            return
        path = self.path / LOCK
        ended = _HELD_LOCKS.pop(os.path.realpath(path), None)
        if ended is not None:  # a run of this process that has ended: close its lock first (see _HELD_LOCKS)
            os.close(ended[0])
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise write_error(path, error, "Nothing of the run was written.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderError(_in_use(self.path, holder)) from None
        except OSError as error:  # a file system without locks (some network mounts): train, and say so
            self._pending.append(f"note: {path} cannot be locked here ({error.strerror}): nothing stops a second "
                                 "process from training in this folder at the same time")  # fmt: skip
        self._lock_fd, self._lock_key, self._lock_token = fd, os.path.realpath(path), object()
        _HELD_LOCKS[self._lock_key] = (fd, self._lock_token)
        if self.planned_state is not None and self.state() != self.planned_state:
            self.release()
            raise RunFolderError(
                f"run folder {self.path} changed while this process was starting (another process wrote its "
                f"{CONFIG} or {LAST}): run the command again, to start from what the folder holds now"
            )
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)

    def release(self) -> None:
        """Let go of the lock (the end of the run; the OS does it anyway when the process ends)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None and _HELD_LOCKS.get(self._lock_key) == (fd, self._lock_token):  # not handed over since
            del _HELD_LOCKS[self._lock_key]
            os.close(fd)

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


def _ours(name: str) -> bool:
    return name in OURS or is_temp_name(name)


def _holder(fd: int) -> str:
    """Who holds a lock: the line its holder wrote into the lock file."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _in_use(path: Path, holder: str) -> str:
    pid = holder.split()[1] if holder.startswith("pid ") and len(holder.split()) > 1 else None
    who = f"process {holder.removeprefix('pid ')}" if pid else "another process"
    stop = f" or stop it (kill {pid})" if pid else ""
    return (
        f"run folder {path} is in use: {who} trains in it now ({path / LOCK} is locked); wait for it to end{stop}, "
        "or pass another --out. Two processes in one folder would write the same files"
    )


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
