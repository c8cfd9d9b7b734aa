"""The one benchmark harness every ``bench_*.py`` uses: timing, the machine's identity, and one CSV schema.

Timing: CUDA events on a GPU (after a warm-up that absorbs compilation and autotuning), ``time.perf_counter`` on
the CPU; ``repeats`` samples of ``inner`` calls each; median with p20 / p80. Peak memory: CUDA's
``max_memory_allocated`` on a GPU, the process's peak RSS growth on the CPU (a coarse upper bound).
Rows are appended to ``benchmarks/results/<name>.csv`` (``$OKDFAST_RESULTS_DIR`` overrides the folder) with
the same leading columns everywhere, so results of
different machines and dates sit in one file and can be compared side by side.
"""

from __future__ import annotations

import csv
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(os.environ.get("OKDFAST_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
COMMON_COLUMNS = ["date", "bench", "device", "device_name", "cpu_count", "torch", "triton", "cuda", "git_commit"]


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    samples: int

    def as_row(self) -> dict[str, float]:
        return {
            "median_ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "p80_ms": self.p80_ms,
            "peak_mem_mb": self.peak_mem_mb,
            "samples": self.samples,
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(round(q * 100)) - 1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 20,
    inner: int = 1,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn`` (``inner`` calls per sample, ``repeats`` samples) after ``warmup`` calls.

    ``setup`` (untimed) runs before every sample, e.g. to zero gradients.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / inner)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        rss_before = _peak_rss_mb()
        for _ in range(repeats):
            if setup is not None:
                setup()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) * 1e3 / inner)
        peak = max(_peak_rss_mb() - rss_before, 0.0)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), peak, len(samples))


def machine_columns(bench: str, device: torch.device) -> dict[str, Any]:
    """The leading columns of every row: what produced the number."""
    from okdfast.utils.environment import device_name, git_commit

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bench": bench,
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_commit": git_commit() or "",
    }


def append_rows(name: str, rows: list[dict[str, Any]], results_dir: Path | None = None) -> Path:
    """Append rows to ``<results_dir>/<name>.csv``; a header is written when the file is new. Rows that bring new
    columns start a new file version (``<name>.csv`` is rewritten with the union of columns)."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.csv"
    old_rows: list[dict[str, Any]] = []
    if path.exists():
        with path.open(newline="") as handle:
            old_rows = list(csv.DictReader(handle))
    columns: list[str] = []
    for row in old_rows + rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(old_rows + rows)
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_machine() -> str:
    return f"{platform.node()} {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
