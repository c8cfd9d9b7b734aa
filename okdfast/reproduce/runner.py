"""Runs the plan: each run is its own ``python -m okdfast.train`` process, ``--jobs`` of them at a time.

A process per run isolates runs from each other (memory, CUDA state, a crash) and gives a clean way to stop one:
SIGTERM, which the training loop turns into a checkpoint of the step it is at and exit code 143; the next
invocation continues it with ``--resume auto``. The time budget works that way: at the deadline every running
run gets SIGTERM (then SIGKILL after ``grace`` seconds), and no new run starts once the budget is spent.
Ctrl-C or SIGTERM to the runner does the same. The runs live in their own sessions, so a Ctrl-C in the terminal
reaches the runner only and each run gets exactly one signal (a second one would make the loop stop without
saving the step it is at). Each process's output goes to OUT/logs/<run>.log, outside its run folder.

Several runs on one GPU (``--jobs N``): the runs share the device. Small CIFAR networks (ResNet-32, batch 128)
leave a large GPU mostly idle, so 2-4 concurrent runs raise the throughput; check with ``nvidia-smi`` that the
runs' memory fits. On the CPU each of the N processes gets cores/N threads (OMP_NUM_THREADS), unless set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from okdfast.reproduce.plan import PlannedRun
from okdfast.utils.failure_record import FAILURE_RECORD_ENV, read_failure_record

POLL_SECONDS = 0.2


class Interrupted(Exception):
    """Ctrl-C or SIGTERM to the runner: the runs were stopped with a checkpoint; ``outcomes`` says how far."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__("interrupted")
        self.outcomes = outcomes


@dataclass
class Outcome:
    run: PlannedRun
    result: str  # finished | stopped (resumable) | failed | skipped (finished before) | not started (budget)
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.result != "failed"


def stdout_log(run: PlannedRun) -> Path:
    """Where a run's process output goes: OUT/logs/<run>.log, beside the run folder, which holds only what
    okdfast.train writes (okdfast/run/folder.py)."""
    return run.run_dir.parent / "logs" / f"{run.name}.log"


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def failure_record_path(run: PlannedRun) -> Path:
    """Where a run's process writes the record of the error it exited with (okdfast.errors.FAILURE_RECORD_ENV)."""
    return stdout_log(run).with_suffix(".failure.json")


def execute(
    runs: list[PlannedRun],
    *,
    jobs: int = 1,
    deadline: float | None = None,
    grace: float = 120.0,
    report: Callable[[str], None] = print,
    command: Callable[[PlannedRun], list[str]] | None = None,
) -> list[Outcome]:
    """Runs every unfinished run in order; ``deadline`` is a ``time.monotonic()`` value (None: no budget).

    ``command`` builds a run's command line (default: its ``python -m okdfast.train`` command; tests swap it).
    A data set that is missing fails the first run within seconds (its process's failure record says so); the
    runner then stops rather than failing every other run the same way. Raises :class:`Interrupted` (with the
    outcomes) after Ctrl-C / SIGTERM.
    """
    runner = _Runner(runs, jobs, grace, report, command or (lambda run: run.command))
    try:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread
        previous = None
    interrupted = False
    try:
        runner.loop(deadline)
    except KeyboardInterrupt:
        interrupted = True
        runner.stop_all("interrupted")
        for index in list(runner.active):
            runner.finish(index, runner.active[index].process.wait())
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    ordered = runner.outcomes_in_order(interrupted)
    if interrupted:
        raise Interrupted(ordered)
    return ordered


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@dataclass
class _Active:
    run: PlannedRun
    process: subprocess.Popen
    started: float
    handle: IO[str]


class _Runner:
    """The state of one :func:`execute`: the runs waiting, running and done, and whether it is stopping."""

    def __init__(self, runs, jobs, grace, report, command) -> None:
        self.runs, self.jobs, self.grace, self.report, self.command = runs, jobs, grace, report, command
        self.outcomes: dict[int, Outcome] = {}
        self.pending: list[PlannedRun] = []
        for run in runs:
            if run.status == "finished":
                self.outcomes[run.index] = Outcome(run, "skipped (finished before)")
            else:
                self.pending.append(run)
        self.env = os.environ.copy()
        if jobs > 1 and "OMP_NUM_THREADS" not in self.env:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        self.active: dict[int, _Active] = {}
        self.stopping = False  # deadline reached or Ctrl-C: SIGTERM sent, no new runs
        self.stop_sent: dict[int, float] = {}
        self.fatal: str | None = None

    def loop(self, deadline: float | None) -> None:
        """Start runs while there is room, collect the ones that end, stop them all at the deadline."""
        while self.pending or self.active:
            if deadline is not None and time.monotonic() >= deadline and not self.stopping:
                self.stop_all("time budget spent")
            while not self.stopping and self.fatal is None and self.pending and len(self.active) < self.jobs:
                self.start(self.pending.pop(0))
            for index in list(self.active):
                entry = self.active[index]
                returncode = entry.process.poll()
                if returncode is not None:
                    self.finish(index, returncode)
                elif index in self.stop_sent and time.monotonic() - self.stop_sent[index] > self.grace:
                    entry.process.kill()  # did not checkpoint within the grace time; resumes from its last epoch
            if (self.stopping or self.fatal is not None) and not self.active:
                break
            time.sleep(POLL_SECONDS)

    def start(self, run: PlannedRun) -> None:
        log_path = stdout_log(run)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        record = failure_record_path(run)
        record.unlink(missing_ok=True)  # a record left by an earlier attempt says nothing about this one
        handle = log_path.open("a")
        handle.write(f"\n$ {' '.join(self.command(run))}\n")
        handle.flush()
        resume = f" (resuming at epoch {run.epochs_done})" if run.status == "partial" else ""
        self.report(
            f"[{run.index}/{len(self.runs)}] start {run.method} {run.arch} seed {run.seed}{resume} -> {run.run_dir}"
        )
        env = self.env | {FAILURE_RECORD_ENV: str(record)}
        process = subprocess.Popen(
            self.command(run), stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.active[run.index] = _Active(run, process, time.monotonic(), handle)

    def finish(self, index: int, returncode: int) -> None:
        entry = self.active.pop(index)
        entry.handle.close()
        run, seconds, log_path = entry.run, time.monotonic() - entry.started, stdout_log(entry.run)
        run.refresh()
        if returncode == 0 and run.status == "finished":
            result = "finished"
        elif index in self.stop_sent or returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM):
            result = "stopped (resumable)"
        else:
            result = "failed"
        self.outcomes[index] = Outcome(run, result, seconds, returncode, log_path)
        self.report(
            f"[{index}/{len(self.runs)}] {result} after {seconds:.0f} s: {run.method} {run.arch} seed {run.seed}"
        )
        if result == "failed":
            self.report(f"    exit code {returncode}; last lines of {log_path}:\n" + _indent(log_tail(log_path)))
            record = read_failure_record(failure_record_path(run))
            if record is not None and "DatasetNotFoundError" in record["kinds"]:
                self.fatal = "the data set is missing (see above): every other run would fail the same way"

    def stop_all(self, reason: str) -> None:
        if not self.stopping:
            self.report(f"{reason}: stopping {len(self.active)} running run(s) with a checkpoint (SIGTERM)")
        self.stopping = True
        for index, entry in self.active.items():
            if index not in self.stop_sent and entry.process.poll() is None:
                entry.process.send_signal(signal.SIGTERM)
                self.stop_sent[index] = time.monotonic()

    def outcomes_in_order(self, interrupted: bool) -> list[Outcome]:
        for run in self.pending:
            budget = " (time budget)" if self.stopping and not interrupted else ""
            self.outcomes[run.index] = Outcome(run, "not started" + budget)
        if self.fatal:
            self.report(f"stopped: {self.fatal}")
        return [self.outcomes[run.index] for run in self.runs if run.index in self.outcomes]


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
