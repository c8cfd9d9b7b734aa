"""The one benchmark harness every ``bench_*.py`` uses: timing, the machine's identity and ceilings, one CSV schema,
rows written the moment they are measured, and where they go.

Timing: CUDA events on a GPU (after a warm-up that absorbs compilation and autotuning), ``time.perf_counter`` on
the CPU; ``repeats`` samples of ``inner`` calls each; median with p20 / p80. :func:`time_cuda_graph` times the
same call captured in a CUDA graph and replayed (what a step under CUDA graphs pays: no launch overhead). Peak
memory: CUDA's ``max_memory_allocated`` on a GPU, the process's peak RSS growth on the CPU (a coarse upper bound).

Ceilings: :func:`copy_bandwidth_gbps` (a device-to-device copy, bytes read + written) and
:func:`matmul_tflops` (bf16 on CUDA) are measured, not taken from a datasheet; memory-bound rows report their GB/s
as a fraction of the measured copy bandwidth.

Where rows go (:func:`results_dir`): ``--results-dir``, else ``$OKDFAST_RESULTS_DIR`` (gpu_suite.sh sets it to
its stage's folder), else ``runs/bench/`` (untracked). The committed files in ``benchmarks/results/`` are written
only on request (``--commit-results``), so a user's run never overwrites the numbers the README quotes. Every
row starts with the same columns (date, run id, device, versions, commit), so results of different machines and
dates sit in one file side by side.
"""

from __future__ import annotations

import csv
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent / "results"  # what the README quotes; --commit-results
DEFAULT_RESULTS_DIR = REPO_ROOT / "runs" / "bench"  # untracked (runs/ is in .gitignore): where a plain run writes
# the folder of "commit-worthy" rows: $OKDFAST_RESULTS_DIR, else benchmarks/results (bench_branches.py --save)
RESULTS_DIR = Path(os.environ.get("OKDFAST_RESULTS_DIR") or COMMITTED_RESULTS_DIR)
COMMON_COLUMNS = [
    "date",
    "run_id",
    "bench",
    "device",
    "device_name",
    "cpu_count",
    "python",
    "torch",
    "triton",
    "cuda",
    "git_commit",
]
_RUN_ID = os.environ.get("OKDFAST_RUN_ID") or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------------
# where rows go, and writing them one by one
# ---------------------------------------------------------------------------------------------------------------


def add_output_arguments(parser: Any) -> None:
    """``--results-dir`` and ``--commit-results``, the same in every benchmark."""
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="folder of the CSV/PNG results (default: $OKDFAST_RESULTS_DIR, else runs/bench/, untracked)",
    )
    parser.add_argument(
        "--commit-results",
        action="store_true",
        help=f"write into {COMMITTED_RESULTS_DIR.relative_to(REPO_ROOT)}/, the committed results the README quotes",
    )


def results_dir(explicit: Path | str | None = None, commit: bool = False) -> Path:
    """``explicit`` > ``--commit-results`` (benchmarks/results) > ``$OKDFAST_RESULTS_DIR`` > runs/bench."""
    if explicit is not None:
        return Path(explicit)
    if commit:
        return COMMITTED_RESULTS_DIR
    return Path(os.environ.get("OKDFAST_RESULTS_DIR") or DEFAULT_RESULTS_DIR)


def append_row(name: str, row: dict[str, Any], folder: Path | str | None = None) -> Path:
    """Append one row to ``<folder>/<name>.csv`` now, flushed to disk: a benchmark killed midway keeps every row it
    measured. A new file gets a header; a row bringing new columns rewrites the file with the union of columns
    (old rows get empty cells)."""
    folder = results_dir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
    if header and all(k in header for k in row):
        with path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=header, restval="").writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
        return path
    old_rows: list[dict[str, Any]] = []
    if header:
        with path.open(newline="") as handle:
            old_rows = list(csv.DictReader(handle))
    columns = list(header) + [k for k in row if k not in header]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old_rows + [row])
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def append_rows(name: str, rows: list[dict[str, Any]], folder: Path | str | None = None) -> Path:
    """:func:`append_row` for each row (kept for callers that measure a batch of rows at once)."""
    path = results_dir(folder) / f"{name}.csv"
    for row in rows:
        path = append_row(name, row, folder)
    return path


def read_rows(path: Path | str) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------------
# what produced a number
# ---------------------------------------------------------------------------------------------------------------


def machine_columns(bench: str, device: torch.device) -> dict[str, Any]:
    """The leading columns of every row: what produced the number (``run_id``: ``$OKDFAST_RUN_ID``, set by
    gpu_suite.sh to the stage and its start time, else this process's start time and pid)."""
    from okdfast.utils.environment import device_name, git_commit

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": _RUN_ID,
        "bench": bench,
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_commit": os.environ.get("OKDFAST_GIT_COMMIT") or git_commit() or "",  # a checkout without .git: the env
        "load_avg_1m": round(os.getloadavg()[0], 2),  # CPU numbers mean little on a busy machine
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_machine() -> str:
    return f"{platform.node()} {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


class TimeBudget:
    """A soft limit of a benchmark's own: it stops before the suite's hard per-step limit kills it, so the rows not
    measured are named in the log instead of lost mid-write. ``seconds`` None: no limit."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def skip(self, what: str) -> bool:
        """True (and one line saying so) when the budget is spent; ``what`` names the work that is skipped."""
        if not self.exhausted():
            return False
        print(f"time budget of {self.seconds:.0f} s spent after {self.elapsed():.0f} s: skipped {what}", flush=True)
        return True


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


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


def _summary(samples: list[float], peak: float) -> Timing:
    samples = sorted(samples)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), peak, len(samples))


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

    ``setup`` (untimed) runs before every sample, e.g. to rerun a forward before a timed backward.
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
    return _summary(samples, peak)


def time_cuda_graph(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeats: int = 20, inner: int = 10
) -> Timing:
    """``fn`` captured ``inner`` times into one CUDA graph, each replay timed with CUDA events (per-call ms).

    What a training step under CUDA graphs pays for ``fn``: its kernels, without the CPU's launch overhead
    (the method of ``triton.testing.do_bench_cudagraph``). ``fn`` must not synchronise with the host. Warm-up runs
    on a side stream first, as graph capture requires (lazy initialisation, compilation, autotuning).
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        samples.append(start.elapsed_time(end) / inner)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del graph
    return _summary(samples, peak)


# ---------------------------------------------------------------------------------------------------------------
# the machine's ceilings, measured
# ---------------------------------------------------------------------------------------------------------------

_CEILINGS: dict[tuple[str, str], float] = {}


def copy_bandwidth_gbps(device: torch.device, mib: int | None = None) -> float:
    """GB/s of a device-to-device copy, counting bytes read + written (the ceiling of a memory-bound kernel).

    ``$OKDFAST_COPY_GBPS`` overrides (e.g. the value the suite's check stage measured); measured once per process
    otherwise: CUDA 1 GiB (several times the L2), CPU 256 MiB, median of 10 copies after 3 warm-ups.
    """
    if os.environ.get("OKDFAST_COPY_GBPS"):
        return float(os.environ["OKDFAST_COPY_GBPS"])
    key = ("copy", str(device))
    if key not in _CEILINGS:
        mib = mib or (1024 if device.type == "cuda" else 256)
        src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        timing = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=10)
        _CEILINGS[key] = 2 * src.numel() / (timing.median_ms * 1e-3) / 1e9
        del src, dst
    return _CEILINGS[key]


def matmul_tflops(device: torch.device, n: int | None = None) -> float:
    """TFLOP/s of an n x n x n matrix product on random data: bf16 on CUDA (n = 8192), fp32 on the CPU (n = 1024)."""
    key = ("matmul", str(device))
    if key not in _CEILINGS:
        n = n or (8192 if device.type == "cuda" else 1024)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timing = time_fn(lambda: a @ b, device, warmup=3, repeats=10)
        _CEILINGS[key] = 2 * n**3 / (timing.median_ms * 1e-3) / 1e12
        del a, b
    return _CEILINGS[key]


def device_facts(device: torch.device) -> dict[str, Any]:
    """What the ceilings of this machine are, for the first rows of a suite stage."""
    facts: dict[str, Any] = {"device": str(device), "python_executable": sys.executable}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "driver_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        facts |= {"name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    facts["copy_gbps"] = round(copy_bandwidth_gbps(device), 1)
    facts["matmul_tflops"] = round(matmul_tflops(device), 1)
    facts["matmul_dtype"] = "bf16" if device.type == "cuda" else "fp32"
    return facts
