"""The GPU visits: what one command on a lent GPU machine runs, in order of value, and how (gpu_suite.sh calls this).

    bash benchmarks/gpu_suite.sh visit1 "$OUT"           # the headline numbers (``visit`` is the same)
    bash benchmarks/gpu_suite.sh visit2 "$OUT"           # the rest of the GPU tests and kernel checks, every form
    bash benchmarks/gpu_suite.sh visit3 "$OUT"           # the CUDA defaults, a short run on real (JPEG) data, ablations
    bash benchmarks/gpu_suite.sh ablations "$OUT"        # every bench_train row the visits cut
    bash benchmarks/gpu_suite.sh --dry-run VISIT         # the plan: steps, limits, what each limit holds, files
    bash benchmarks/gpu_suite.sh --cpu VISIT OUT_DIR     # a rehearsal on the CPU: every step, tiny shapes

A visit is one command of at most ``VISIT_S`` seconds (the device allows ``COMMAND_LIMIT_S``; the rest is the
machine's start-up and the transfer back). Its steps run in order of value, each under a hard limit that includes
its first-time compiles (``Step.parts`` says what the limit holds; tests/test_gpu_suite.py checks the sums), so a
command cut short keeps the most valuable numbers.

Nothing waits for the end to be written. Every benchmark appends each row to a CSV in OUT_DIR itself the moment it
is measured (``$OKDFAST_RESULTS_DIR`` is OUT_DIR), every step's output goes straight to ``OUT_DIR/log.txt``, and
``OUT_DIR/summary.txt`` (the steps, their status, the headline numbers read from the rows so far) is rewritten
before and after every step. A step killed at its limit, or the whole command killed by the device, therefore
still returns every row measured before the kill. The device returns at most ``MAX_FILES`` files from OUT_DIR: each
visit declares the files its steps write (at most 8, with the log and the summary); a file no step declared is moved
out of OUT_DIR after each step and named in the summary, so the planned files always come back.

Steps run in their own process group in the runner's session (no new session: a child the device would not
reap). A step that reaches its limit gets SIGTERM (benchmarks have flushed their rows, a training run checkpoints),
then SIGKILL after ``GRACE_S``; any process a step leaves behind, at its limit or after a normal exit, is killed
with its group before the next step starts. The first two steps are prerequisites (installing okdfast from the
checkout; ``benchmarks/gpu_checks/environment.py``, which imports every package any step needs and measures the
device): if one fails, the visit stops with one line naming what broke.

Standard library only: the runner must report even when torch does not import.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_LIMIT_S = 600  # one command on the lent GPU machine
VISIT_S = 520  # one visit's command: the rest of COMMAND_LIMIT_S is the transfer and a margin
RUNNER_RESERVE_S = 10  # the runner's own start, the summaries and the moves between steps
MACHINE_START_S = 120  # a cold machine before the first command runs (1-2 minutes)
DEVICE_TIME_S = 15 * 60  # a session's device time, all calls together
GRACE_S = 5  # between SIGTERM and SIGKILL of a step at its limit
MIN_STEP_S = 8  # a step is not started with less time than this left
MAX_FILES = 8  # files that come back from OUT_DIR
MAX_FILE_BYTES = 16 * 2**20
SUMMARY, LOG = "summary.txt", "log.txt"
NPZ_NAME = "cifar10-jpeg.npz"


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    argv: tuple[str, ...]  # placeholders: {python} {out} {work} {data}
    files: tuple[str, ...] = ()  # what it writes in OUT_DIR (besides its output in log.txt)
    parts: tuple[tuple[str, int], ...] = ()  # what the limit holds, in seconds (estimates; first compiles included)
    cpu_argv: tuple[str, ...] | None = None  # the CPU rehearsal's command (tiny shapes); None: skipped there
    interpreter: bool = False  # the rehearsal runs the Triton kernels in the interpreter
    prerequisite: bool = False  # a failure stops the visit
    needs_file: str | None = None  # skipped (one line) when this repository path is absent
    about: str = ""


@dataclass(frozen=True)
class Visit:
    name: str
    about: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def planned_s(self) -> int:
        return sum(step.limit_s for step in self.steps)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the visit leaves in OUT_DIR: the summary, the log, then each step's files."""
        names = [SUMMARY, LOG] + [name for step in self.steps for name in step.files]
        return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------

IMPORT_S = 8  # a Python process importing torch (and triton, okdfast) on the GPU machine


def _prerequisites() -> tuple[Step, ...]:
    return (
        Step(
            "install",
            25,
            ("{python}", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."),
            parts=(("pip install -e . (no network, no dependencies)", 15),),
            prerequisite=True,
            about="okdfast from this checkout into the machine's Python ($OKDFAST_SKIP_INSTALL=1 skips)",
        ),
        Step(
            "environment",
            35,
            ("{python}", "-m", "benchmarks.gpu_checks.environment", "--require-cuda"),
            files=("environment.json",),
            parts=(
                ("import every package", IMPORT_S + 4),
                ("CUDA init, copy and matmul ceilings", 6),
                ("nvidia-smi", 15),
            ),
            cpu_argv=("{python}", "-m", "benchmarks.gpu_checks.environment"),
            prerequisite=True,
            about="imports every package a step needs (one line naming a missing one); device facts: name, SMs, "
            "copy GB/s, bf16 TFLOP/s, nvidia-smi -q (its timeout caught)",
        ),
    )


def _kernels_vs_reference(cases: str, limit: int, parts: tuple[tuple[str, int], ...]) -> Step:
    return Step(
        f"kernels-vs-reference-{cases}",
        limit,
        ("{python}", "-m", "benchmarks.gpu_checks.kernels_vs_reference", "--cases", cases),
        files=("check_kernels.csv",),
        parts=parts,
        cpu_argv=("{python}", "-m", "benchmarks.gpu_checks.kernels_vs_reference", "--device", "cpu")
        + ("--cases", cases, "--first", "2"),
        interpreter=True,
        about="the Triton kernels through the real op against the reference: fresh seed, poisoned outputs, odd and "
        "strided shapes; a row per case and per compiled kernel (registers, spills) as each is checked",
    )


def _bench_train(name: str, limit: int, rows: tuple[str, ...], parts: tuple[tuple[str, int], ...], about: str) -> Step:
    budget = limit - GRACE_S - 5
    return Step(
        name,
        limit,
        ("{python}", "-m", "benchmarks.bench_train", "--only", *rows, "--time-budget", str(budget), "--no-plot"),
        files=("train.csv",),
        parts=parts,
        cpu_argv=("{python}", "-m", "benchmarks.bench_train", "--device", "cpu", "--arch", "resnet8")
        + ("--only", *rows, "--without", "compile", "--train-images", "256", "--batch-size", "16", "--warmup", "1")
        + ("--steps", "1", "--repeats", "1", "--workers", "0", "--no-plot"),
        about=about,
    )


def _loss(name: str, limit: int, mode: tuple[str, ...], parts: tuple[tuple[str, int], ...], about: str) -> Step:
    budget = limit - GRACE_S - 5
    cpu = ("--device", "cpu", "--repeats", "2", "--warmup", "1", "--tiny")
    return Step(
        name,
        limit,
        ("{python}", "-m", "benchmarks.bench_loss", *mode, "--time-budget", str(budget), "--no-plot"),
        files=("loss.csv",),
        parts=parts,
        cpu_argv=("{python}", "-m", "benchmarks.bench_loss", *mode, *cpu, "--no-plot"),
        interpreter="--sweep" in mode,
        about=about,
    )


VISIT1 = Visit(
    "visit1",
    "the headline numbers: device ceilings, kernels vs reference, the loss op at 128x4x100 (CUDA graphs) and "
    "4096x4x32768 (% of copy bandwidth), end to end (reference, all-on, all-but-fused, all-but-grouped), grouped "
    "branches, the loader kernel, the kernels' launch-configuration sweep",
    _prerequisites()
    + (
        _kernels_vs_reference(
            "visit",
            50,
            (("import", IMPORT_S), ("~60 kernel variants compiled cold (~0.5 s each)", 30), ("checks", 8)),
        ),
        _loss(
            "loss-headline",
            80,
            ("--preset", "headline"),
            (
                ("import", IMPORT_S),
                ("2 cold torch.compile of the reference fwd+bwd (inductor's first compile)", 40),
                ("fused kernels compiled (the one-pass head, the online-KD op of the composed head)", 7),
                ("validation and timing, 4 implementations, 3 phases, stream + CUDA graphs", 15),
            ),
            "MDE's whole loss head at 128x4x100 and 4096x4x32768 bf16: the eager reference, torch.compile of it, the "
            "one-pass kernel, the composition it replaced; fwd+bwd, fwd, bwd; launches per call; CUDA-graph timing "
            "at 128x4x100",
        ),
        _bench_train(
            "train-headline",
            190,
            ("reference", "all-on", "all-but-fused", "all-but-grouped"),
            (
                ("import, 50,000 synthetic images", 12),
                ("reference trainer (eager)", 15),
                ("all-on: cold compile of the step + CUDA-graph capture", 75),
                ("all-but-fused: compile (inductor caches warm)", 40),
                ("all-but-grouped: compile of the loop form", 40),
            ),
            "MDE ResNet-32 K=4 batch 128: the eager reference trainer, all-on, all-on without the fused loss, "
            "all-on with loop branches (a row that would not finish in the time left is skipped, named)",
        ),
        Step(
            "branches",
            45,
            ("{python}", "-m", "benchmarks.gpu_checks.no_plot", "benchmarks.bench_branches", "--quick")
            + ("--time-budget", "25"),
            files=("branches.csv",),
            parts=(("import", IMPORT_S), ("rows until 25 s (eager; resnet32 K=4 first)", 25), ("the last row", 10)),
            cpu_argv=("{python}", "-m", "benchmarks.gpu_checks.no_plot", "benchmarks.bench_branches", "--device")
            + ("cpu", "--archs", "resnet8", "--branches", "2", "--trunks", "shared", "--batch-size", "4")
            + ("--warmup", "1", "--repeats", "1"),
            needs_file="benchmarks/bench_branches.py",
            about="grouped vs loop branches, fwd+bwd of the K-branch network, ResNet-32 K=4 first",
        ),
        Step(
            "loader-kernel",
            25,
            ("{python}", "-m", "benchmarks.bench_loader", "--kernel"),
            files=("augment.csv",),
            parts=(("import, 50,000 images on the device", IMPORT_S + 3), ("compile + timing, 3 batch sizes", 8)),
            cpu_argv=("{python}", "-m", "benchmarks.bench_loader", "--device", "cpu", "--kernel")
            + ("--kernel-batches", "16", "--epochs", "1"),
            about="the fused augmentation kernel vs the PyTorch path: GB/s, % of copy bandwidth",
        ),
        _loss(
            "launch-sweep",
            60,
            ("--sweep", "headline"),
            (
                ("import", IMPORT_S),
                ("~25 of the 72 configs x (forward + backward compiled, ~1.5 s); each case's farthest cut", 38),
                ("validation and timing", 8),
            ),
            "block_c x num_warps (x rows per program at 128x4x100) of the forward and backward kernels at 128x4x100 "
            "and 4096x4x32768 (bf16): MDE's head (its attention mode), then the online-KD op's mde form, each case "
            "an equal share of the budget, the default first, then its neighbours; fwd, bwd and fwd+bwd times, "
            "registers and spills per config",
        ),
    ),
)

VISIT2 = Visit(
    "visit2",
    "the rest: every kernel case, every teacher form at the headline shapes and the op inside torch.compile, the "
    "loaders' epochs, then the GPU test tier (compile-heavy tests last)",
    _prerequisites()
    + (
        _kernels_vs_reference(
            "rest",
            70,
            (("import", IMPORT_S), ("~120 kernel variants compiled cold", 50), ("checks", 10)),
        ),
        _loss(
            "loss-mde-head",
            70,
            ("--preset", "mde-head", "mde-head-fp32"),
            (
                ("import", IMPORT_S),
                ("7 torch.compile of the head's reference (15 s cold, then ~6 s)", 45),
                ("validation and timing", 7),
            ),
            "the rest of MDE's head grid: 128x4x10, 1024x4x100 and per-auxiliary targets at 128x4x100 in bf16, then "
            "128x4x10, 128x4x100, 1024x4x100, 4096x4x32768 in fp32",
        ),
        _loss(
            "loss-forms",
            70,
            ("--preset", "forms"),
            (
                ("import", IMPORT_S),
                ("~6 torch.compile of the reference or of the op (15 s cold, then ~8 s)", 45),
                ("validation and timing", 7),
            ),
            "the online-KD op: MDE's two-level weights (and inside torch.compile), one, explicit, mean, okddip, "
            "cl_ilr, dml at the headline shapes",
        ),
        Step(
            "loaders",
            55,
            ("{python}", "-m", "benchmarks.gpu_checks.no_plot", "benchmarks.bench_loader", "--quick")
            + ("--loaders", "gpu", "torch"),
            files=("loader.csv",),
            parts=(("import, data sets", IMPORT_S + 5), ("gpu and torch loaders, 2 data sets, 3 epochs each", 35)),
            cpu_argv=("{python}", "-m", "benchmarks.gpu_checks.no_plot", "benchmarks.bench_loader", "--device")
            + ("cpu", "--loaders", "torch", "--datasets", "cifar100", "--scale", "0.005", "--epochs", "1")
            + ("--warmup", "0", "--workers", "0"),
            about="images/s of an epoch: the gpu loader and the DataLoader reference, CIFAR-100 and CINIC-10 shapes",
        ),
        Step(
            "gpu-tests",
            185,
            ("{python}", "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-rfE")
            + ("-p", "benchmarks.gpu_checks.pytest_rows"),
            files=("gpu_tests.csv",),
            parts=(
                ("collect (imports every test module)", 15),
                ("kernels vs reference, loaders on the device", 50),
                ("compile-heavy last: opcheck + compiled step, CUDA-graph step, all-features training run", 115),
            ),
            cpu_argv=("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p")
            + ("benchmarks.gpu_checks.pytest_rows", "tests/test_benchmarks.py", "-k", "append_row or every_row"),
            about="pytest -m gpu: a row per test in gpu_tests.csv as it finishes; the compile-heavy ones run last",
        ),
    ),
)

VISIT3 = Visit(
    "visit3",
    "the CUDA defaults end to end, then MDE ResNet-32 K=4 on the full (JPEG) CIFAR-10 for about 3 minutes, then "
    "the leave-one-out rows that fit",
    _prerequisites()
    + (
        _bench_train(
            "train-defaults",
            110,
            ("all-but-cuda_graphs", "all-but-compile"),
            (
                ("import, 50,000 synthetic images", 12),
                ("all-but-cuda_graphs (the CUDA defaults): cold compile", 75),
                ("all-but-compile (eager)", 15),
            ),
            "the CUDA defaults (all-on minus CUDA graphs: what okdfast.train runs; the full run is sized from it) "
            "and all-on minus compile",
        ),
        Step(
            "decode-data",
            25,
            ("{python}", "-m", "benchmarks.full_run", "decode", "--out", "{data}"),
            parts=(("decode 60,000 JPEGs on every core, write the npz", 15),),
            cpu_argv=("{python}", "-m", "benchmarks.full_run", "decode", "--out", "{data}", "--limit", "64"),
            about=f"{NPZ_NAME} ($OKDFAST_JPEG_NPZ, shared/data/ or ../shared/data/) -> cifar10.npz, which keeps its "
            "provenance (lossy, partial, the source file)",
        ),
        Step(
            "full-run",
            215,
            ("{python}", "-m", "benchmarks.full_run", "train", "--data", "{data}", "--seconds", "200")
            + ("--run-dir", "{work}/runs/mde-resnet32-k4-cifar10jpeg"),
            files=("full_run.csv", "full_run_config.yaml", "full_run_summary.json"),
            parts=(("start, data to the device, compiles (train, partial batch, eval)", 90), ("epochs", 115)),
            cpu_argv=("{python}", "-m", "benchmarks.full_run", "train", "--data", "{data}", "--seconds", "60")
            + ("--epochs", "1", "--run-dir", "{work}/runs/rehearsal", "--", "--arch", "resnet8", "--device", "cpu")
            + ("--batch-size", "16", "--compile", "off", "--amp", "off"),
            about="okdfast.train with the CUDA defaults, epochs sized from train-defaults (compiles included), "
            "stopped at 200 s; a row per finished epoch",
        ),
        _bench_train(
            "train-ablations",
            95,
            ("all-but-fast_loader", "all-but-amp", "all-but-channels_last", "okdfast-base", "base+compile"),
            (("import, data", 12), ("one or two compiled rows (caches warm)", 80)),
            "leave-one-out rows in order, as many as fit (the rest: the ablations command)",
        ),
    ),
)

ABLATIONS = Visit(
    "ablations",
    "every bench_train row, for a visit after the first three",
    _prerequisites()
    + (
        _bench_train(
            "train-all",
            450,
            (
                "all-but-fast_loader",
                "all-but-amp",
                "all-but-channels_last",
                "okdfast-base",
                "base+compile",
                "base+fused",
                "base+cuda_graphs",
                "base+fast_loader",
                "base+amp",
                "base+channels_last",
                "base+grouped",
                "reference",
                "all-on",
                "all-but-compile",
                "all-but-fused",
                "all-but-cuda_graphs",
                "all-but-grouped",
            ),
            (("import, data", 12), ("~8 compiled rows (caches warm, ~40 s each)", 330), ("eager rows", 80)),
            "the rows the visits did not reach first, then the visits' rows again",
        ),
    ),
)

VISITS: dict[str, Visit] = {v.name: v for v in (VISIT1, VISIT2, VISIT3, ABLATIONS)}
ALIASES = {"visit": "visit1"}


# ---------------------------------------------------------------------------------------------------------------
# running a visit
# ---------------------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def git_commit() -> str:
    if os.environ.get("OKDFAST_GIT_COMMIT"):
        return os.environ["OKDFAST_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def expand(argv: tuple[str, ...], values: dict[str, str]) -> list[str]:
    return [arg.format(**values) for arg in argv]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(pgid: int, proc: subprocess.Popen | None = None, grace: float = GRACE_S) -> bool:
    """SIGTERM to the process group, SIGKILL after ``grace`` s to whatever is left; reaps ``proc``. True when
    something was still running."""
    if not _group_alive(pgid) and (proc is None or proc.poll() is not None):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            if not _group_alive(pgid) and (proc is None or proc.returncode is not None):
                break
            time.sleep(0.05)
        else:
            continue
        break
    if proc is not None:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    return True


class Runner:
    def __init__(
        self,
        visit: Visit,
        out_dir: Path,
        python: str,
        *,
        cpu: bool = False,
        budget: float | None = None,
        limits: dict[str, float] | None = None,
    ) -> None:
        self.visit, self.out, self.python, self.cpu = visit, out_dir, python, cpu
        self.limits = limits or {}
        self.budget = float(budget if budget is not None else visit.planned_s)
        self.start = time.monotonic()
        self.started = datetime.now(timezone.utc)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f"okdfast-{visit.name}-"))
        self.log_path = self.out / LOG
        self.status: dict[str, dict[str, object]] = {
            s.name: {"status": "pending", "seconds": "", "limit_s": self.limit_of(s), "detail": ""} for s in visit.steps
        }
        self.final = "running"
        self.moved: list[str] = []
        commit = git_commit()
        mode = "cpu-" if cpu else ""
        self.run_id = f"{mode}{visit.name}-{self.started.strftime('%Y%m%dT%H%M%SZ')}-{commit[:10]}"
        self.env = dict(os.environ)
        for name in ("TRITON_INTERPRET", "OKDFAST_FORCE_TRITON", "OKDFAST_COPY_GBPS"):
            self.env.pop(name, None)
        self.env |= {
            "OKDFAST_RESULTS_DIR": str(self.out),
            "OKDFAST_RUN_ID": self.run_id,
            "OKDFAST_GIT_COMMIT": commit,
            "OKDFAST_VISIT": visit.name,
            "PYTHONUNBUFFERED": "1",
            "MPLBACKEND": "Agg",
        }
        if cpu:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.values = {"python": python, "out": str(self.out), "work": str(self.work), "data": str(self.work / "data")}
        self.current: tuple[Step, float] | None = None

    def limit_of(self, step: Step) -> float:
        return float(self.limits.get(step.name, step.limit_s))

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(line + "\n")

    # -- the summary, rewritten before and after every step --------------------------------------------------

    def write_summary(self) -> None:
        from benchmarks.gpu_checks.headlines import headline_lines

        mode = " (CPU rehearsal: no GPU number)" if self.cpu else ""
        state = self.final
        if self.current is not None:
            step, began = self.current
            state = f"running {step.name} since {began:.0f} s"
        lines = [
            f"okdfast GPU visit {self.visit.name}{mode}: {state}",
            f"run_id {self.run_id}   commit {self.env['OKDFAST_GIT_COMMIT']}   started {self.started.isoformat()}",
            f"elapsed {self.elapsed():.0f} s of a {self.budget:.0f} s budget (the device allows {COMMAND_LIMIT_S} s)",
            "",
            f"{'step':28s} {'status':12s} {'seconds':>8s} / limit  detail",
        ]
        for step in self.visit.steps:
            r = self.status[step.name]
            lines.append(
                f"{step.name:28s} {r['status']!s:12s} {r['seconds']!s:>8s} / {r['limit_s']:<5.0f} {r['detail']}"
            )
        try:
            numbers = headline_lines(self.out)
        except Exception as error:  # the summary must never fail
            numbers = [f"(could not read the rows: {type(error).__name__}: {error})"]
        lines += ["", "headline numbers (read from the rows in this folder):"] + [f"  {n}" for n in numbers]
        files = sorted(p for p in self.out.iterdir() if p.is_file() and not p.name.startswith("."))
        lines += ["", f"files here ({len(files)} of at most {MAX_FILES} come back):"]
        lines += [f"  {p.name} ({p.stat().st_size:,} bytes)" for p in files if p.name != SUMMARY]
        if self.moved:
            lines.append("not returned (no step declared them; moved out of this folder): " + ", ".join(self.moved))
        tmp = self.out / f".{SUMMARY}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.out / SUMMARY)

    def sweep_strays(self) -> None:
        """Move out of OUT_DIR every file no step declared, so the declared ones are the files that come back."""
        planned = set(self.visit.files)
        for path in sorted(self.out.iterdir()):
            if path.name in planned or path.name.startswith(f".{SUMMARY}"):
                continue
            if path.name.endswith(".tmp"):  # a row being written this instant by a killed writer: not a result
                continue
            target = self.work / "not-returned" / path.name
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(path), str(target))
            self.moved.append(path.name)
        for name in planned:
            path = self.out / name
            if path.exists() and path.stat().st_size > MAX_FILE_BYTES:
                self.say(f"!! {name} is {path.stat().st_size:,} bytes: over the {MAX_FILE_BYTES:,} that come back")

    # -- steps ------------------------------------------------------------------------------------------------

    def record(self, step: Step, status: str, seconds: float, detail: str = "") -> None:
        self.status[step.name] |= {"status": status, "seconds": f"{seconds:.1f}", "detail": detail[:200]}

    def run(self) -> int:
        self.say(
            f"== visit {self.visit.name}{' (CPU rehearsal)' if self.cpu else ''}: budget {self.budget:.0f} s, "
            f"{len(self.visit.steps)} steps, run {self.run_id}, work folder {self.work}"
        )
        self.say(render_plan(self.visit, self.values, cpu=self.cpu))
        self.write_summary()
        failed = False
        for step in self.visit.steps:
            outcome = self.run_step(step)
            self.sweep_strays()
            self.current = None
            if outcome not in ("ok", "skipped") and step.prerequisite:
                self.final = f"stopped: prerequisite {step.name} {outcome}"
                self.write_summary()
                return 1
            failed |= outcome not in ("ok", "skipped")
            copy_gbps = self._copy_gbps()
            if copy_gbps:
                self.env["OKDFAST_COPY_GBPS"] = copy_gbps
            self.write_summary()
        bad = [name for name, r in self.status.items() if r["status"] not in ("ok", "skipped")]
        self.final = ("steps not ok: " + ", ".join(bad)) if failed or bad else "all steps ok"
        self.write_summary()
        return 1 if failed else 0

    def _copy_gbps(self) -> str | None:
        facts = self.out / "environment.json"
        try:
            value = json.loads(facts.read_text())["device"]["copy_gbps"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return str(value) if value else None

    def run_step(self, step: Step) -> str:
        argv_spec = step.cpu_argv if self.cpu else step.argv
        if step.needs_file and not (REPO / step.needs_file).exists():
            return self._skip(step, f"{step.needs_file} is not in this checkout")
        if step.name == "install" and (self.cpu or os.environ.get("OKDFAST_SKIP_INSTALL") == "1"):
            return self._skip(step, "CPU rehearsal" if self.cpu else "$OKDFAST_SKIP_INSTALL=1")
        if argv_spec is None:
            return self._skip(step, "no CPU rehearsal of this step")
        available = self.left() - RUNNER_RESERVE_S / 2
        limit = min(self.limit_of(step), available)
        if available < MIN_STEP_S:
            self.say(f"-- {step.name}: not started, {self.left():.0f} s of the visit's budget left")
            self.record(step, "no time", 0.0, "the visit's budget was spent")
            return "no time"
        argv = expand(argv_spec, self.values)
        env = dict(self.env)
        if self.cpu and step.interpreter:
            env |= {"TRITON_INTERPRET": "1", "OKDFAST_FORCE_TRITON": "1"}
        self.say(f"-- {step.name} (limit {limit:.0f} s): {shlex.join(argv)}")
        self.current = (step, self.elapsed())
        self.status[step.name] |= {"status": "running", "limit_s": limit}
        self.write_summary()
        offset = self.log_path.stat().st_size
        start = time.monotonic()
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        with self.log_path.open("a") as handle:
            try:
                proc = subprocess.Popen(
                    argv, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **group
                )
            except OSError as error:
                self.say(f"   FAILED to start: {error}")
                self.record(step, "failed", 0.0, str(error))
                return "failed"
            try:
                rc = proc.wait(timeout=max(limit - GRACE_S, 1))
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                stop_group(proc.pid, proc)
                rc, status = proc.returncode, "timeout"
            except Interrupted:
                stop_group(proc.pid, proc)
                self.record(step, "interrupted", time.monotonic() - start, "the visit was interrupted")
                raise
        leftovers = stop_group(proc.pid, None, grace=1.0)  # a child the step left running does not outlive it
        seconds = time.monotonic() - start
        last = last_line(self.log_path, offset)
        if leftovers:
            self.say(f"   stopped the processes {step.name} left running")
        if status == "ok":
            self.say(f"   ok in {seconds:.0f} s")
        elif status == "timeout":
            self.say(f"   TIMEOUT after {seconds:.0f} s (limit {limit:.0f} s); its rows so far are kept; last: {last}")
        else:
            self.say(f"   FAILED (exit {rc}) after {seconds:.0f} s: {last}")
        self.record(step, status, seconds, "" if status == "ok" else last)
        return status

    def _skip(self, step: Step, why: str) -> str:
        self.say(f"-- {step.name}: skipped, {why}")
        self.record(step, "skipped", 0.0, why)
        return "skipped"

    def finish(self) -> None:
        self.current = None
        self.sweep_strays()
        self.write_summary()
        self.say(f"== visit {self.visit.name}: {self.final} ({self.elapsed():.0f} s of {self.budget:.0f} s)")
        shutil.rmtree(self.work, ignore_errors=True)


def last_line(path: Path, offset: int = 0) -> str:
    """The last non-empty line written to ``path`` after ``offset``."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(offset, path.stat().st_size - 64 * 1024))
            lines = [line for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[-300:] if lines else ""


def find_npz() -> Path | None:
    """The JPEG CIFAR-10 archive: $OKDFAST_JPEG_NPZ, else shared/data/ in the checkout, else ../shared/data/."""
    candidates = [os.environ.get("OKDFAST_JPEG_NPZ"), str(REPO / "shared" / "data" / NPZ_NAME)]
    candidates.append(str(REPO.parent / "shared" / "data" / NPZ_NAME))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def render_plan(visit: Visit, values: dict[str, str] | None = None, cpu: bool = False) -> str:
    values = values or {"python": "python3", "out": "$OUT", "work": "<work>", "data": "<work>/data"}
    lines = [
        f"visit {visit.name} (steps planned {visit.planned_s} s of a {VISIT_S} s command; the device allows "
        f"{COMMAND_LIMIT_S} s): {visit.about}",
        f"  files back ({len(visit.files)} of {MAX_FILES}): {', '.join(visit.files)}",
    ]
    for step in visit.steps:
        flags = " [prerequisite]" if step.prerequisite else ""
        if step.needs_file and not (REPO / step.needs_file).exists():
            flags += f" [skipped: no {step.needs_file}]"
        lines.append(f"  {step.name:28s} {step.limit_s:4d} s{flags}  {step.about}")
        if step.parts:
            lines.append(f"  {'':28s}        limit holds: " + "; ".join(f"{what} {s} s" for what, s in step.parts))
        if step.files:
            lines.append(f"  {'':28s}        writes: {', '.join(step.files)}")
        argv = step.cpu_argv if cpu else step.argv
        command = shlex.join(expand(argv, values)) if argv is not None else "(skipped in the CPU rehearsal)"
        lines.append(f"  {'':28s}        $ {command}")
    if any(step.name == "decode-data" for step in visit.steps):
        npz = find_npz()
        lines.append(f"  data: {npz}" if npz else f"  data: no {NPZ_NAME} found: decode-data and full-run will skip")
    return "\n".join(lines)


def load_plan(path: Path) -> dict[str, Visit]:
    """A plan from JSON (tests): {visit: {"about": "", "steps": [{"name", "limit_s", "argv", "files"?,
    "prerequisite"?, "needs_file"?, "cpu_argv"?}]}}."""
    raw = json.loads(path.read_text())

    def step(spec: dict) -> Step:
        spec = spec | {"argv": tuple(spec["argv"]), "files": tuple(spec.get("files", ()))}
        if spec.get("cpu_argv") is not None:
            spec["cpu_argv"] = tuple(spec["cpu_argv"])
        return Step(**spec)

    return {
        name: Visit(name, spec.get("about", ""), tuple(step(s) for s in spec["steps"])) for name, spec in raw.items()
    }


def _limits(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        if not seconds:
            raise SystemExit(f"--limit {pair!r}: use STEP=SECONDS")
        out[name] = float(seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_suite.sh", description=__doc__.splitlines()[0])
    parser.add_argument("visit", nargs="?", help=" | ".join(list(VISITS) + list(ALIASES)))
    parser.add_argument("out_dir", nargs="?", type=Path, help="where the rows, log and summary go (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run and write nothing")
    parser.add_argument("--list", action="store_true", help="print every visit's plan")
    parser.add_argument("--cpu", action="store_true", help="rehearse on the CPU: every step's tiny-shape command")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole visit (default: the plan's)")
    parser.add_argument("--limit", action="append", default=[], metavar="STEP=S", help="shorten one step's limit")
    parser.add_argument("--steps", default=None, help="only these steps (comma-separated), after the prerequisites")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the steps")
    parser.add_argument("--plan-json", type=Path, default=None, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    visits = load_plan(args.plan_json) if args.plan_json else VISITS
    name = ALIASES.get(args.visit, args.visit) if not args.plan_json else args.visit
    if args.dry_run and name not in visits and args.out_dir is None:
        args.list = True
    if args.list:
        print("\n\n".join(render_plan(v, cpu=args.cpu) for v in visits.values()))
        if args.dry_run:
            print("dry run: nothing was run or written")
        return 0
    if name not in visits:
        parser.error(f"visit {args.visit!r}: use one of {', '.join(list(visits) + list(ALIASES))}")
    visit = visits[name]
    if args.dry_run:
        print(render_plan(visit, cpu=args.cpu))
        print(f"dry run: nothing was run or written (results would go to {args.out_dir or '$OUT'}/)")
        return 0
    out_dir = args.out_dir or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out_dir is None:
        parser.error("OUT_DIR: give a folder (or set $OUT)")
    clash = [name for name in visit.files if (out_dir / name).exists()]
    if clash:
        parser.error(f"{out_dir} already holds {', '.join(clash)}: give an empty folder for a new visit")
    if args.steps:
        wanted = set(args.steps.split(","))
        unknown = wanted - {s.name for s in visit.steps}
        if unknown:
            parser.error(f"--steps: no step {', '.join(sorted(unknown))} in {visit.name}")
        visit = Visit(visit.name, visit.about, tuple(s for s in visit.steps if s.prerequisite or s.name in wanted))
    runner = Runner(visit, out_dir, args.python, cpu=args.cpu, budget=args.budget, limits=_limits(args.limit))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    rc = 1
    try:
        rc = runner.run()
    except Interrupted as why:
        runner.final = f"interrupted by {why}"
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the last summary is written whatever comes next
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        runner.finish()
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
