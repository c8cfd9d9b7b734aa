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

from okdfast.reproduce.plan import PlannedRun

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
    okdfast.train writes (okdfast/run_folder.py)."""
    return run.run_dir.parent / "logs" / f"{run.name}.log"


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


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
    A data set that is missing fails the first run within seconds; the runner then stops rather than failing
    every other run the same way. Raises :class:`Interrupted` (with the outcomes) after Ctrl-C / SIGTERM.
    """
    command = command or (lambda run: run.command)
    outcomes: dict[int, Outcome] = {}
    pending = []
    for run in runs:
        if run.status == "finished":
            outcomes[run.index] = Outcome(run, "skipped (finished before)")
        else:
            pending.append(run)
    env = os.environ.copy()
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    active: dict[int, tuple[PlannedRun, subprocess.Popen, float, object]] = {}
    stopping = False  # deadline reached or Ctrl-C: SIGTERM sent, no new runs
    stop_sent: dict[int, float] = {}
    fatal: str | None = None
    total = len(runs)

    def start(run: PlannedRun) -> None:
        log_path = stdout_log(run)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = log_path.open("a")
        handle.write(f"\n$ {' '.join(command(run))}\n")
        handle.flush()
        resume = f" (resuming at epoch {run.epochs_done})" if run.status == "partial" else ""
        report(f"[{run.index}/{total}] start {run.method} {run.arch} seed {run.seed}{resume} -> {run.run_dir}")
        process = subprocess.Popen(
            command(run), stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        active[run.index] = (run, process, time.monotonic(), handle)

    def finish(index: int, returncode: int) -> None:
        nonlocal fatal
        run, _, started, handle = active.pop(index)
        handle.close()  # type: ignore[attr-defined]
        seconds = time.monotonic() - started
        log_path = stdout_log(run)
        run.refresh()
        if returncode == 0 and run.status == "finished":
            result = "finished"
        elif index in stop_sent or returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM):
            result = "stopped (resumable)"
        else:
            result = "failed"
        outcomes[index] = Outcome(run, result, seconds, returncode, log_path)
        report(f"[{index}/{total}] {result} after {seconds:.0f} s: {run.method} {run.arch} seed {run.seed}")
        if result == "failed":
            tail = log_tail(log_path)
            report(f"    exit code {returncode}; last lines of {log_path}:\n" + _indent(tail))
            if "DatasetNotFoundError" in tail:
                fatal = "the data set is missing (see above): every other run would fail the same way"

    def stop_all(reason: str) -> None:
        nonlocal stopping
        if not stopping:
            report(f"{reason}: stopping {len(active)} running run(s) with a checkpoint (SIGTERM)")
        stopping = True
        for index, (_, process, _, _) in active.items():
            if index not in stop_sent and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                stop_sent[index] = time.monotonic()

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    interrupted = False
    try:
        while pending or active:
            if deadline is not None and time.monotonic() >= deadline and not stopping:
                stop_all("time budget spent")
            while not stopping and fatal is None and pending and len(active) < jobs:
                start(pending.pop(0))
            for index in list(active):
                _, process, _, _ = active[index]
                returncode = process.poll()
                if returncode is not None:
                    finish(index, returncode)
                elif index in stop_sent and time.monotonic() - stop_sent[index] > grace:
                    process.kill()  # did not checkpoint within the grace time; resumes from its last epoch
            if (stopping or fatal is not None) and not active:
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        interrupted = True
        stop_all("interrupted")
        for index in list(active):
            finish(index, active[index][1].wait())
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for run in pending:
        outcomes[run.index] = Outcome(run, "not started" + (" (time budget)" if stopping and not interrupted else ""))
    if fatal:
        report(f"stopped: {fatal}")
    ordered = [outcomes[run.index] for run in runs if run.index in outcomes]
    if interrupted:
        raise Interrupted(ordered)
    return ordered


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
