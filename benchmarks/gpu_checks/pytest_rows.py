"""A pytest plugin for the GPU test tier of a visit: the compile-heavy tests run last, and every test's outcome is a
row of ``$OKDFAST_RESULTS_DIR/gpu_tests.csv`` the moment it finishes (a tier cut at its limit keeps every result
before the cut; a junit file would be written only at the end).

    python -m pytest -m gpu tests -p benchmarks.gpu_checks.pytest_rows

Compile-heavy: a test whose name holds one of ``COMPILE_HEAVY`` (torch.compile, CUDA-graph capture, a training run
with every feature): minutes of first-time compiles that must not stop the quick kernel and loader tests from
reporting. The order within each group is pytest's. Standard library only.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime, timezone
from pathlib import Path

COMPILE_HEAVY = ("compile", "cuda_graph", "speed_features", "opcheck")
COLUMNS = ["date", "run_id", "git_commit", "test", "outcome", "seconds", "compile_heavy", "message"]


def is_compile_heavy(name: str) -> bool:
    return any(word in name.lower() for word in COMPILE_HEAVY)


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ARG001 (pytest's hook signature)
    items.sort(key=lambda item: is_compile_heavy(item.name))  # stable: pytest's order within each group


def _path() -> Path:
    return Path(os.environ.get("OKDFAST_RESULTS_DIR") or ".") / "gpu_tests.csv"


def _append(row: dict[str, object]) -> None:
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


def pytest_runtest_logreport(report) -> None:
    """One row per test: its call's outcome, or its setup's when that failed or skipped it."""
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif not report.passed:
            lines = str(getattr(report.longrepr, "reprcrash", None) or report.longrepr).splitlines()
            message = lines[-1] if lines else ""
        _append(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "run_id": os.environ.get("OKDFAST_RUN_ID", ""),
                "git_commit": os.environ.get("OKDFAST_GIT_COMMIT", ""),
                "test": report.nodeid,
                "outcome": outcome,
                "seconds": round(report.duration, 2),
                "compile_heavy": is_compile_heavy(report.nodeid.rpartition("::")[2]),
                "message": message[:300],
            }
        )
