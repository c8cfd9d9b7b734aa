"""The one benchmark harness every ``bench_*.py`` uses: timing, the machine's identity and ceilings, one CSV schema,
rows written the moment they are measured, and where they go.

Timing: CUDA events on a GPU (after a warm-up that absorbs compilation and autotuning), ``time.perf_counter`` on
the CPU; ``repeats`` samples of ``inner`` calls each; median with p20 / p80. :func:`time_cuda_graph` times the
same call captured in a CUDA graph and replayed (what a step under CUDA graphs pays: no launch overhead). Peak
memory: CUDA's ``max_memory_allocated`` on a GPU, the process's peak RSS growth on the CPU (a coarse upper bound).

Ceilings: :func:`copy_bandwidth_gbps` (a device-to-device copy, bytes read + written) and
:func:`matmul_tflops` (bf16 on CUDA) are measured, not taken from a datasheet; memory-bound rows report their GB/s
as a fraction of the measured copy bandwidth.

Whether the machine was quiet (:class:`LoadWatch`): every benchmark prints a header (what runs where, the load
average, where the rows go) and gives every row the 1-minute load average at its start and end, the cores other
processes kept busy while it was measured (``/proc/stat`` minus this benchmark's own process tree) and a
``load_warning``: the load average above the cores, other processes using half a core or more, or a load average
that moved a core's worth away from what this benchmark's own work explains. A warned row is printed with its
warning too; CPU ratios measured on a loaded machine flip (issue 23: a 2.82x that was 1.03x quiet).

Ctrl-C (:func:`run_cli`): a benchmark stops without a traceback and says where the rows it wrote are.

Where rows go (:func:`results_dir`): ``--results-dir``, else ``$OKDFAST_RESULTS_DIR`` (gpu_suite.sh sets it to
its stage's folder), else ``runs/bench/`` (untracked). The committed files in ``benchmarks/results/`` are written
only on request (``--commit-results``), so a user's run never overwrites the numbers the README quotes. Every
row starts with the same columns (date, run id, device, versions, commit), so results of different machines and
dates sit in one file side by side.
"""

from __future__ import annotations

import csv
import math
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
WRITTEN: dict[Path, int] = {}  # the CSV files this process appended rows to, and how many (run_cli names them)


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
    WRITTEN[path] = WRITTEN.get(path, 0) + 1
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


def read_rows(path: Path | str) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------------
# what produced a number
# ---------------------------------------------------------------------------------------------------------------


def machine_columns(bench: str, device: torch.device) -> dict[str, Any]:
    """The leading columns of every row: what produced the number (``run_id``: ``$OKDFAST_RUN_ID``, set by
    gpu_suite.sh to the stage and its start time, else this process's start time and pid)."""
    from okdfast.ops.fused_default import device_arch
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
        "device_arch": device_arch(device),  # sm_90 (H100, H200): the key of okdfast/ops/fused_verdicts.json
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_commit": os.environ.get("OKDFAST_GIT_COMMIT") or git_commit() or "",  # a checkout without .git: the env
        "load_avg_1m": round(os.getloadavg()[0], 2),  # CPU numbers mean little on a busy machine
    }


# ---------------------------------------------------------------------------------------------------------------
# was the machine quiet: the load average, other processes' CPU time, one warning per row
# ---------------------------------------------------------------------------------------------------------------
LOAD_TAU_S = 60.0  # the time constant of the kernel's 1-minute load average (an exponential average)
# the load average above the cores by more than this is warned (a benchmark using every core sits at the cores
# plus the system's own noise, a few hundredths)
LOAD_SLACK = 0.25
OTHER_CORES_WARN = 0.5  # other processes keeping this many cores busy while a row is measured: warned
LOAD_CHANGE_WARN = 1.0  # the load average this far (in cores) from what this benchmark's own work explains: warned


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() where that is not known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _machine_busy_seconds() -> float | None:
    """CPU seconds every process of the machine has used since boot (``/proc/stat``; None where there is none)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds() -> float:
    """CPU seconds of this process, the children it reaped, and every live descendant (DataLoader workers,
    spawned measuring processes): ``/proc/<pid>/stat``, else this process's own rusage."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    after_name = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            parent, utime, stime, cutime, cstime = int(after_name[1]), *map(int, after_name[11:15])
            stats[int(entry.name)] = (parent, (utime + stime + cutime + cstime) / tick)
    except OSError:
        usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return sum(u.ru_utime + u.ru_stime for u in usage)
    tree, frontier = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[pid][1] for pid in tree if pid in stats)


class LoadWatch:
    """Whether the machine was quiet while each row was measured.

    ``begin()`` before a row's measurement, ``columns()`` after it: ``load_avg_1m`` (at the row's start),
    ``load_avg_1m_end``, ``other_cores`` (the cores other processes kept busy meanwhile, from ``/proc/stat``) and
    ``load_warning`` ("" when none), which is also printed. The warnings: the load average above the cores (by more
    than ``LOAD_SLACK``); other
    processes using ``OTHER_CORES_WARN`` cores or more; the load average ``LOAD_CHANGE_WARN`` away from what it was
    when the benchmark started plus what its own work adds (the 1-minute average moves towards the cores this
    benchmark keeps busy with time constant ``LOAD_TAU_S``)."""

    def __init__(self) -> None:
        self.cores = cpu_cores()
        self.started = time.monotonic()
        self.start_load = os.getloadavg()[0]
        self.warned: list[str] = []
        self.rows = 0
        self._own_at_start = _own_busy_seconds()
        self.begin()

    def begin(self) -> None:
        self._t, self._load = time.monotonic(), os.getloadavg()[0]
        self._machine, self._own = _machine_busy_seconds(), _own_busy_seconds()

    def other_cores(self) -> float | None:
        """The cores other processes kept busy since :meth:`begin` (None where /proc/stat is not there)."""
        machine = _machine_busy_seconds()
        if machine is None or self._machine is None:
            return None
        wall = max(time.monotonic() - self._t, 1e-3)
        return max(machine - self._machine - (_own_busy_seconds() - self._own), 0.0) / wall

    def warnings(self, load_start: float, load_end: float, other: float | None) -> list[str]:
        found = []
        if max(load_start, load_end) > self.cores + LOAD_SLACK:
            found.append(f"load average {max(load_start, load_end):.2f} above the {self.cores} cores")
        if other is not None and other >= OTHER_CORES_WARN:
            found.append(f"other processes kept {other:.1f} of the {self.cores} cores busy")
        elapsed = time.monotonic() - self.started
        own = (_own_busy_seconds() - self._own_at_start) / max(elapsed, 1e-3)  # cores this benchmark kept busy
        expected = self.start_load + own * (1 - math.exp(-elapsed / LOAD_TAU_S))
        if abs(load_end - expected) >= LOAD_CHANGE_WARN:
            found.append(
                f"load average changed during the run: {self.start_load:.2f} at its start, {load_end:.2f} now "
                f"({expected:.2f} expected from this benchmark's own {own:.1f} cores)"
            )
        return found

    def columns(self, label: str = "") -> dict[str, Any]:
        """The row's load columns; prints its warning (``label`` names the row)."""
        other, load_end = self.other_cores(), os.getloadavg()[0]
        found = self.warnings(self._load, load_end, other)
        self.rows += 1
        warning = "; ".join(found)
        if warning:
            self.warned.append(label)
            print(f"WARNING{' ' + label if label else ''}: {warning}: this row's times are not a quiet machine's",
                  flush=True)  # fmt: skip
        return {
            "load_avg_1m": round(self._load, 2),
            "load_avg_1m_end": round(load_end, 2),
            "other_cores": "" if other is None else round(other, 2),
            "load_warning": warning,
        }

    def summary(self) -> str | None:
        """A closing line when rows were warned, else None."""
        if not self.warned:
            return None
        return (
            f"WARNING: {len(self.warned)} of {self.rows} rows ran on a busy machine (their load_warning column); "
            "compare ratios only between quiet rows, or rerun when the machine is idle"
        )


def print_header(bench: str, device: torch.device, rows_to: Path | str, details: str = "") -> LoadWatch:
    """The first lines of a benchmark: what runs where, the load now, where the rows go; warns at once when the
    machine is already busy. Returns the run's :class:`LoadWatch`."""
    from okdfast.utils.environment import device_name, git_commit

    watch = LoadWatch()
    loads = os.getloadavg()
    threads = torch.get_num_threads()
    print(
        f"== {bench} | {device_name(device)} ({device}) | {watch.cores} cores, {threads} torch threads | torch "
        f"{torch.__version__} | commit {(git_commit() or '?')[:10]} | load average {loads[0]:.2f} (1 min) "
        f"{loads[1]:.2f} (5 min) | rows -> {rows_to}" + (f" | {details}" if details else ""),
        flush=True,
    )
    time.sleep(0.5)  # a short look at what else runs
    other = watch.other_cores()
    found = watch.warnings(loads[0], loads[0], other)
    if found:
        print(f"WARNING: {'; '.join(found)}: the machine is not quiet; its numbers will be slower and noisier",
              flush=True)  # fmt: skip
    watch.begin()
    return watch


def run_cli(main: Callable[[], Any]) -> int:
    """Run a benchmark's ``main``; Ctrl-C ends it with one line naming the rows this call wrote (exit 130)."""
    WRITTEN.clear()  # the rows of this run only (a caller may run several mains in one process)
    try:
        status = main()
    except KeyboardInterrupt:
        written = ", ".join(f"{count} in {path}" for path, count in WRITTEN.items()) or "none"
        print(f"\ninterrupted (Ctrl-C): rows written so far: {written}", file=sys.stderr, flush=True)
        return 130
    return int(status or 0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def verdict(this: Timing, other: Timing) -> str:
    """'wins' when ``this`` is faster than ``other`` beyond one run's spread (its 80th percentile below the other's
    20th), 'loses' when slower the same way, else 'cannot tell apart' (the 20th-80th percentile ranges overlap):
    the resolution of a comparison inside one run. okdfast.ops.fused_default reads it for the fused ops' default."""
    from okdfast.ops.fused_default import CANNOT_TELL, LOSES, WINS

    if this.p80_ms < other.p20_ms:
        return WINS
    if this.p20_ms > other.p80_ms:
        return LOSES
    return CANNOT_TELL


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
