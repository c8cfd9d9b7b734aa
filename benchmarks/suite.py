"""The staged GPU suite: what a visit to a GPU machine runs, one stage per command, and how (gpu_suite.sh calls this).

    bash benchmarks/gpu_suite.sh STAGE OUT_DIR           # STAGE: check | kernels | train | ablations
    bash benchmarks/gpu_suite.sh --dry-run STAGE [OUT_DIR]   # the plan; nothing is run or written
    bash benchmarks/gpu_suite.sh --list                  # the stages, their budgets and steps

Each stage fits one 9-minute command with a minute to spare: its steps have time limits that add up to the stage
budget (tests/test_gpu_suite.py checks the sums), a step that runs out of time is stopped (SIGTERM, then SIGKILL
after a grace period) and the stage goes on. A failed prerequisite (installing okdfast from the checkout, importing
torch / triton / okdfast and seeing CUDA) stops the stage at once with one line saying what broke. Every step
writes its rows to CSV files the moment they are measured; whatever happens (success, a failure, a timeout, the
suite itself interrupted by SIGTERM / SIGINT) the stage ends by packing its folder into ``OUT_DIR/<stage>.tar.gz``
(files over 8 MiB and checkpoints are left out and listed) and a one-screen ``OUT_DIR/<stage>.txt`` summary, so
a GPU machine that returns at most 8 files returns two per stage. The stage's folder is a temporary directory, not
OUT_DIR (``--keep DIR`` keeps an unpacked copy).

Standard library only: the runner must report even when torch does not import.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_LIMIT_S = 540  # one command on the GPU machine
MARGIN_S = 60  # left free in every command: machine hiccups, packing, the transfer back
VISIT_S = 14 * 60  # device time of one visit, all commands together
MACHINE_START_S = 90  # what a cold machine costs before the first command runs
GRACE_S = 5  # between SIGTERM and SIGKILL of a step that ran out of time
PACK_RESERVE_S = 5  # kept back from the last step for packing
MAX_ARCHIVED_FILE = 8 * 2**20
NPZ_NAME = "cifar10-jpeg.npz"


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    argv: tuple[str, ...]  # placeholders: {python} {work} {results} {data}
    prerequisite: bool = False  # a failure stops the stage
    needs_file: str | None = None  # skipped (one line) when this repository path is absent
    about: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    about: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def planned_s(self) -> int:
        return sum(step.limit_s for step in self.steps)


def _prerequisites(install_s: int, environment_s: int) -> tuple[Step, ...]:
    return (
        Step(
            "install",
            install_s,
            ("{python}", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."),
            prerequisite=True,
            about="okdfast from this checkout into the machine's Python, no network ($OKDFAST_SKIP_INSTALL=1 skips)",
        ),
        Step(
            "environment",
            environment_s,
            ("{python}", "-m", "benchmarks.gpu_checks.environment", "--require-cuda"),
            prerequisite=True,
            about="imports torch, triton, okdfast's kernels; device facts: name, SMs, copy GB/s, bf16 TFLOP/s",
        ),
    )


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "check",
            360,
            "environment and device facts, every kernel against its reference on the GPU, the sm_90 compile "
            "report, the GPU test tier",
            _prerequisites(40, 25)
            + (
                Step(
                    "kernels-vs-reference",
                    85,
                    ("{python}", "-m", "benchmarks.gpu_checks.kernels_vs_reference"),
                    about="fresh random inputs, poisoned outputs, fp32/bf16/fp16, odd and strided shapes",
                ),
                Step(
                    "compile-report",
                    40,
                    ("{python}", "benchmarks/gpu_checks/compile_kernels.py", "--csv", "{results}/compile_sm90.csv"),
                    about="registers / spills of every benchmarked launch, compiled with its real specialisation",
                ),
                Step(
                    "gpu-tests",
                    165,
                    ("{python}", "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-rfE")
                    + ("--junitxml={results}/gpu-tests.xml",),
                    about="pytest -m gpu: the kernels, compile and CUDA-graph steps, a training run",
                ),
            ),
        ),
        Stage(
            "kernels",
            360,
            "the kernel and loader benchmarks at the README's shapes, GB/s against the measured copy bandwidth",
            _prerequisites(40, 25)
            + (
                Step(
                    "bench_loss",
                    140,
                    ("{python}", "-m", "benchmarks.bench_loss", "--preset", "suite", "--time-budget", "120"),
                    about="fused vs eager vs compiled reference, every teacher form, stream and CUDA-graph timing",
                ),
                Step(
                    "bench_loader",
                    55,
                    ("{python}", "-m", "benchmarks.bench_loader", "--quick", "--loaders", "gpu", "torch"),
                    about="images/s and GB/s of the gpu loader and the DataLoader reference",
                ),
                Step(
                    "bench_loader-kernel",
                    25,
                    ("{python}", "-m", "benchmarks.bench_loader", "--kernel"),
                    about="the augmentation kernel alone vs the PyTorch path, GB/s",
                ),
                Step(
                    "bench_branches",
                    60,
                    ("{python}", "-m", "benchmarks.bench_branches", "--quick", "--results-dir", "{results}"),
                    needs_file="benchmarks/bench_branches.py",
                    about="grouped vs loop branches",
                ),
            ),
        ),
        Stage(
            "train",
            480,
            "end to end: bench_train's reference, all-on and leave-one-out rows, then MDE ResNet-32 K=4 on the "
            "full (JPEG) CIFAR-10 for as many epochs as fit in 4 minutes",
            _prerequisites(40, 25)
            + (
                Step(
                    "bench_train",
                    150,
                    ("{python}", "-m", "benchmarks.bench_train", "--time-budget", "130"),
                    about="the eager reference trainer, all-on, all-on minus each feature (priority order)",
                ),
                Step(
                    "decode-data",
                    25,
                    ("{python}", "-m", "benchmarks.full_run", "decode", "--out", "{data}"),
                    about=f"{NPZ_NAME} from $OKDFAST_JPEG_NPZ, shared/data/ or ../shared/data/ -> cifar10.npz",
                ),
                Step(
                    "full-run",
                    240,
                    ("{python}", "-m", "benchmarks.full_run", "train", "--data", "{data}", "--seconds", "225")
                    + ("--run-dir", "{work}/runs/mde-resnet32-k4-cifar10jpeg"),
                    about="okdfast.train (CUDA defaults), epochs sized to the time; epoch time and accuracy per epoch",
                ),
            ),
        ),
        Stage(
            "ablations",
            480,
            "every bench_train row (add-one as well as leave-one-out), when the train stage's budget cut some",
            _prerequisites(40, 25)
            + (
                Step(
                    "bench_train-all",
                    400,
                    ("{python}", "-m", "benchmarks.bench_train", "--time-budget", "380"),
                    about="reference, base, +each feature, all-on, all-on minus each feature",
                ),
            ),
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# running a stage
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


class Runner:
    def __init__(self, stage: Stage, out_dir: Path, python: str, keep: Path | None) -> None:
        self.stage, self.out_dir, self.python, self.keep = stage, out_dir, python, keep
        self.start = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix=f"okdfast-{stage.name}-"))
        self.results = self.work / "results"
        self.logs = self.work / "logs"
        self.results.mkdir()
        self.logs.mkdir()
        self.log_path = self.work / "suite.log"
        self.status: list[dict[str, object]] = []
        self.final = "running"
        started = datetime.now(timezone.utc)
        commit = git_commit()
        self.env = dict(os.environ)
        for name in ("TRITON_INTERPRET", "OKDFAST_FORCE_TRITON"):
            self.env.pop(name, None)
        self.env |= {
            "OKDFAST_RESULTS_DIR": str(self.results),
            "OKDFAST_RUN_ID": f"{stage.name}-{started.strftime('%Y%m%dT%H%M%SZ')}-{commit[:10]}",
            "OKDFAST_GIT_COMMIT": commit,
            "PYTHONUNBUFFERED": "1",
            "MPLBACKEND": "Agg",
        }
        self.values = {"python": python, "work": str(self.work), "results": str(self.results)}
        self.values["data"] = str(self.work / "data")

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(line + "\n")

    def left(self) -> float:
        return self.stage.budget_s - (time.monotonic() - self.start)

    def record(self, step: Step, status: str, seconds: float, rc: object, detail: str = "") -> None:
        row = {"step": step.name, "status": status, "seconds": round(seconds, 1), "limit_s": step.limit_s}
        row |= {"rc": rc, "detail": detail}
        self.status.append(row)
        path = self.work / "steps.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def run(self) -> int:
        self.say(
            f"== stage {self.stage.name}: budget {self.stage.budget_s} s, {len(self.stage.steps)} steps, "
            f"run {self.env['OKDFAST_RUN_ID']}, work folder {self.work}"
        )
        (self.work / "plan.txt").write_text(render_plan(self.stage, self.values))
        failed = False
        for n, step in enumerate(self.stage.steps):
            outcome = self.run_step(n, step)
            failed |= outcome not in ("ok", "skipped")
            if outcome not in ("ok", "skipped") and step.prerequisite:
                self.final = f"stopped: prerequisite {step.name} {outcome}"
                return 1
            copy_gbps = self._copy_gbps()
            if copy_gbps:
                self.env["OKDFAST_COPY_GBPS"] = copy_gbps
        self.final = (
            "failed steps: " + ", ".join(str(r["step"]) for r in self.status if r["status"] not in ("ok", "skipped"))
            if failed
            else "all steps ok"
        )
        return 1 if failed else 0

    def _copy_gbps(self) -> str | None:
        facts = self.results / "device.json"
        if not facts.exists():
            return None
        try:
            return str(json.loads(facts.read_text())["copy_gbps"])
        except (ValueError, KeyError):
            return None

    def run_step(self, n: int, step: Step) -> str:
        if step.needs_file and not (REPO / step.needs_file).exists():
            self.say(f"-- {step.name}: skipped, {step.needs_file} is not in this checkout")
            self.record(step, "skipped", 0.0, "", f"no {step.needs_file}")
            return "skipped"
        if step.name == "install" and os.environ.get("OKDFAST_SKIP_INSTALL") == "1":
            self.say("-- install: skipped ($OKDFAST_SKIP_INSTALL=1)")
            self.record(step, "skipped", 0.0, "", "OKDFAST_SKIP_INSTALL=1")
            return "skipped"
        limit = min(step.limit_s, self.left() - PACK_RESERVE_S)
        if limit < 5:
            self.say(f"-- {step.name}: skipped, {self.left():.0f} s of the stage budget left")
            self.record(step, "no time", 0.0, "", "stage budget spent")
            return "no time"
        argv = expand(step.argv, self.values)
        log = self.logs / f"{n:02d}-{step.name}.log"
        self.say(f"-- {step.name} (limit {limit:.0f} s): {shlex.join(argv)}")
        start = time.monotonic()
        with log.open("w") as handle:
            try:
                proc = subprocess.Popen(
                    argv, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as error:
                self.say(f"   FAILED to start: {error}")
                self.record(step, "failed", 0.0, "", str(error))
                return "failed"
            try:
                rc = proc.wait(timeout=max(limit - GRACE_S, 1))
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                self._stop(proc)
                rc, status = proc.returncode, "timeout"
            except Interrupted:
                self._stop(proc)
                self.record(step, "interrupted", time.monotonic() - start, proc.returncode, "suite interrupted")
                raise
        seconds = time.monotonic() - start
        last = last_line(log)
        if status == "ok":
            self.say(f"   ok in {seconds:.0f} s")
        elif status == "timeout":
            self.say(f"   TIMEOUT after {seconds:.0f} s (limit {limit:.0f} s); last output: {last}")
        else:
            self.say(f"   FAILED (exit {rc}) after {seconds:.0f} s: {last}")
        self.record(step, status, seconds, rc, "" if status == "ok" else last)
        return status

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGTERM to the step's whole process group (a benchmark flushes, a training run checkpoints), SIGKILL
        after the grace period."""
        for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def pack(self) -> Path:
        """OUT_DIR/<stage>.tar.gz (the work folder as <stage>/...) and OUT_DIR/<stage>.txt, whatever happened."""
        elapsed = time.monotonic() - self.start
        self.say(f"== stage {self.stage.name}: {self.final} ({elapsed:.0f} s of {self.stage.budget_s} s)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        left_out = []
        archive = self.out_dir / f"{self.stage.name}.tar.gz"
        tmp = archive.with_suffix(".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if not path.is_file():
                    continue
                size = path.stat().st_size
                if size > MAX_ARCHIVED_FILE or path.suffix == ".pt":
                    left_out.append(f"{path.relative_to(self.work)} ({size} bytes)")
                    continue
                tar.add(path, arcname=f"{self.stage.name}/{path.relative_to(self.work)}")
            if left_out:
                listing = self.work / "left_out.txt"
                listing.write_text("\n".join(left_out) + "\n")
                tar.add(listing, arcname=f"{self.stage.name}/left_out.txt")
        tmp.replace(archive)
        lines = [f"stage {self.stage.name}: {self.final}", f"run {self.env['OKDFAST_RUN_ID']}", ""]
        for r in self.status:
            lines.append(f"{r['step']:22s} {r['status']:12s} {r['seconds']:>6} s / {r['limit_s']} s  {r['detail']}")
        lines += ["", f"archive: {archive.name} (tar xzf {archive.name})"]
        (self.out_dir / f"{self.stage.name}.txt").write_text("\n".join(lines) + "\n")
        if self.keep is not None:
            shutil.copytree(self.work, self.keep / self.stage.name, dirs_exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        print(f"packed {archive}", flush=True)
        return archive


def last_line(path: Path, n: int = 1) -> str:
    try:
        with path.open(errors="replace") as handle:
            lines = deque((line.rstrip() for line in handle if line.strip()), maxlen=n)
    except OSError:
        return ""
    return " | ".join(lines)[-300:]


def find_npz() -> Path | None:
    """The JPEG CIFAR-10 archive: $OKDFAST_JPEG_NPZ, else shared/data/ in the checkout, else ../shared/data/."""
    candidates = [os.environ.get("OKDFAST_JPEG_NPZ")] + [str(d / NPZ_NAME) for d in (REPO / "shared" / "data",)]
    candidates.append(str(REPO.parent / "shared" / "data" / NPZ_NAME))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def render_plan(stage: Stage, values: dict[str, str] | None = None) -> str:
    values = values or {"python": "python3", "work": "<work>", "results": "<work>/results", "data": "<work>/data"}
    lines = [
        f"stage {stage.name} (budget {stage.budget_s} s; steps planned {stage.planned_s} s; "
        f"one command's limit {COMMAND_LIMIT_S} s): {stage.about}"
    ]
    for step in stage.steps:
        flags = " [prerequisite]" if step.prerequisite else ""
        if step.needs_file and not (REPO / step.needs_file).exists():
            flags += f" [skipped: no {step.needs_file}]"
        lines.append(f"  {step.name:22s} {step.limit_s:4d} s{flags}  {step.about}")
        lines.append(f"  {'':22s}         $ {shlex.join(expand(step.argv, values))}")
    if stage.name == "train":
        npz = find_npz()
        lines.append(f"  data: {npz}" if npz else f"  data: no {NPZ_NAME} found: decode-data and full-run will skip")
    return "\n".join(lines)


def load_plan(path: Path) -> dict[str, Stage]:
    """A plan from JSON (tests): {stage: {"budget_s": N, "about": "", "steps": [{"name", "limit_s", "argv",
    "prerequisite"?, "needs_file"?}]}}."""
    raw = json.loads(path.read_text())
    return {
        name: Stage(
            name,
            int(spec["budget_s"]),
            spec.get("about", ""),
            tuple(Step(**(s | {"argv": tuple(s["argv"])})) for s in spec["steps"]),
        )
        for name, spec in raw.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_suite.sh", description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", help="check | kernels | train | ablations")
    parser.add_argument("out_dir", nargs="?", type=Path, help="where <stage>.tar.gz and <stage>.txt go (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run and write nothing")
    parser.add_argument("--list", action="store_true", help="print every stage's plan")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the steps")
    parser.add_argument("--keep", type=Path, default=None, help="also keep the unpacked stage folder under KEEP/")
    parser.add_argument("--plan-json", type=Path, default=None, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    stages = load_plan(args.plan_json) if args.plan_json else STAGES
    if args.dry_run and args.stage not in stages and args.out_dir is None:  # --dry-run [OUT_DIR]: every stage
        args.list = True
    if args.list:
        print("\n\n".join(render_plan(stage) for stage in stages.values()))
        if args.dry_run:
            print("dry run: nothing was run or written")
        return 0
    if args.stage not in stages:
        parser.error(f"stage {args.stage!r}: use one of {', '.join(stages)}")
    stage = stages[args.stage]
    if args.dry_run:
        print(render_plan(stage))
        print(f"dry run: nothing was run or written (results would go to {args.out_dir or '$OUT'}/{stage.name}.tar.gz)")
        return 0
    out_dir = args.out_dir or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out_dir is None:
        parser.error("OUT_DIR: give a folder (or set $OUT)")
    runner = Runner(stage, out_dir, args.python, args.keep)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    rc = 1
    try:
        rc = runner.run()
    except Interrupted as why:
        runner.final = f"interrupted by {why}"
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing stops the packing once it has begun
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        runner.pack()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
