"""The staged GPU suite (benchmarks/suite.py, benchmarks/gpu_suite.sh), on the CPU: the stage budgets add up and fit
a GPU machine's command limit, the dry run writes nothing, and a stage's archive is written on success, on a failed
step, on a step that hangs, on a broken prerequisite and when the suite itself is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import suite

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(suite.STAGES))
def test_stage_budgets_add_up_and_fit_one_command(name):
    stage = suite.STAGES[name]
    assert stage.planned_s <= stage.budget_s, f"{name}: steps plan {stage.planned_s} s > budget {stage.budget_s} s"
    assert stage.budget_s + suite.MARGIN_S <= suite.COMMAND_LIMIT_S, f"{name}: no margin within one command"
    assert [s.name for s in stage.steps[:2]] == ["install", "environment"]
    assert all(s.prerequisite for s in stage.steps[:2]) and not any(s.prerequisite for s in stage.steps[2:])
    for step in stage.steps:
        assert step.limit_s >= 15, f"{name}/{step.name}: a limit under 15 s cannot start Python and torch"
        argv = list(step.argv)
        if "--time-budget" in argv:  # a benchmark's own soft budget ends before the hard limit stops it
            assert float(argv[argv.index("--time-budget") + 1]) <= step.limit_s - 10, (name, step.name)
        module = argv[2] if argv[1:2] == ["-m"] else None
        if module and module not in ("pip", "pytest"):
            path = REPO / (module.replace(".", "/") + ".py")
            assert path.exists() or step.needs_file, f"{name}/{step.name}: no {path}"
        elif argv[1].endswith(".py"):
            assert (REPO / argv[1]).exists(), f"{name}/{step.name}: no {argv[1]}"


def test_one_visit_holds_the_check_and_kernels_stages():
    total = suite.STAGES["check"].budget_s + suite.STAGES["kernels"].budget_s
    assert total + suite.MACHINE_START_S <= suite.VISIT_S


def test_train_stage_runs_the_benchmark_then_the_full_size_run():
    names = [s.name for s in suite.STAGES["train"].steps]
    assert names.index("bench_train") < names.index("decode-data") < names.index("full-run")
    full_run = next(s for s in suite.STAGES["train"].steps if s.name == "full-run")
    seconds = float(full_run.argv[full_run.argv.index("--seconds") + 1])
    assert 200 <= seconds <= full_run.limit_s - 10  # about 4 minutes, stopped by itself before the hard limit


@pytest.mark.parametrize("name", sorted(suite.STAGES))
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, name):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", name, str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for step in suite.STAGES[name].steps:
        assert step.name in result.stdout
    assert "nothing was run or written" in result.stdout
    assert not out.exists()


def test_dry_run_without_a_stage_lists_every_stage(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(f"stage {name}" in result.stdout for name in suite.STAGES)
    assert not (tmp_path / "x").exists()


def test_train_plan_names_where_the_data_comes_from(monkeypatch, tmp_path):
    monkeypatch.setenv("OKDFAST_JPEG_NPZ", str(tmp_path / "missing.npz"))
    monkeypatch.setattr(suite, "REPO", tmp_path)  # neither shared/data/ nor ../shared/data/ exists there
    assert suite.find_npz() is None
    assert "decode-data and full-run will skip" in suite.render_plan(suite.STAGES["train"])
    npz = tmp_path / "cifar10-jpeg.npz"
    npz.write_bytes(b"")
    monkeypatch.setenv("OKDFAST_JPEG_NPZ", str(npz))
    assert suite.find_npz() == npz


# ---------------------------------------------------------------------------------------------------------------
# running a stage (a plan of tiny steps)
# ---------------------------------------------------------------------------------------------------------------

PY = sys.executable


def _plan(tmp_path: Path, steps: list[dict], budget: int = 60) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"mini": {"budget_s": budget, "steps": steps}}))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"))  # where the stage's work folder goes


def _run(tmp_path: Path, plan: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    command = [PY, "-m", "benchmarks.suite", "mini", str(out), "--plan-json", str(plan)]
    result = subprocess.run(command, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert not list((tmp_path / "tmp").iterdir()), "the work folder is removed once packed"
    return result, out


def _archive(out: Path) -> dict[str, str]:
    with tarfile.open(out / "mini.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


def test_archive_on_success_with_rows_logs_and_summary(tmp_path):
    write_row = "import os; open(os.environ['OKDFAST_RESULTS_DIR'] + '/rows.csv', 'w').write('a,b\\n1,2\\n')"
    steps = [
        {"name": "first", "limit_s": 20, "argv": _py("print('hello')")},
        {"name": "rows", "limit_s": 20, "argv": _py(write_row)},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 0, result.stdout + result.stderr
    files = _archive(out)
    assert files["mini/results/rows.csv"] == "a,b\n1,2\n"
    assert "hello" in files["mini/logs/00-first.log"]
    assert "first,ok" in files["mini/steps.csv"] and "rows,ok" in files["mini/steps.csv"]
    assert "all steps ok" in (out / "mini.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["mini.tar.gz", "mini.txt"]  # two files back per stage


def test_a_failed_step_is_reported_and_the_stage_goes_on(tmp_path):
    steps = [
        {"name": "broken", "limit_s": 20, "argv": _py("import sys; print('it broke here'); sys.exit(3)")},
        {"name": "after", "limit_s": 20, "argv": _py("print('still ran')")},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 1
    assert "FAILED (exit 3)" in result.stdout and "it broke here" in result.stdout
    files = _archive(out)
    assert "still ran" in files["mini/logs/01-after.log"]
    assert "failed steps: broken" in (out / "mini.txt").read_text()


def test_a_hanging_step_is_stopped_at_its_limit_and_the_archive_is_written(tmp_path):
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('hanging', flush=True)"
    steps = [
        {"name": "hangs", "limit_s": 7, "argv": _py(ignore_term + "; time.sleep(120)")},  # needs the SIGKILL
        {"name": "after", "limit_s": 20, "argv": _py("print('next step')")},
    ]
    start = time.monotonic()
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert time.monotonic() - start < 30
    assert "TIMEOUT" in result.stdout, result.stdout
    files = _archive(out)
    assert "hangs,timeout" in files["mini/steps.csv"]
    assert "hanging" in files["mini/logs/00-hangs.log"] and "next step" in files["mini/logs/01-after.log"]


def test_a_broken_prerequisite_stops_the_stage_with_one_line(tmp_path):
    marker = tmp_path / "ran"
    steps = [
        {
            "name": "environment",
            "limit_s": 20,
            "argv": _py("import sys; print('environment: import torch failed: no module'); sys.exit(1)"),
            "prerequisite": True,
        },
        {"name": "bench", "limit_s": 20, "argv": _py(f"open({str(marker)!r}, 'w')")},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 1 and not marker.exists()
    assert "environment: import torch failed: no module" in result.stdout
    assert "stopped: prerequisite environment failed" in (out / "mini.txt").read_text()
    assert "mini/logs/00-environment.log" in _archive(out)


def test_an_interrupted_suite_still_packs(tmp_path):
    steps = [{"name": "long", "limit_s": 50, "argv": _py("import time; print('started', flush=True); time.sleep(60)")}]
    out = tmp_path / "out"
    command = [PY, "-m", "benchmarks.suite", "mini", str(out), "--plan-json", str(_plan(tmp_path, steps))]
    env = _env(tmp_path)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list((tmp_path / "tmp").glob("okdfast-mini-*/logs/00-long.log")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, output
    assert "interrupted by SIGTERM" in (out / "mini.txt").read_text()
    assert "long,interrupted" in _archive(out)["mini/steps.csv"]


def test_a_step_whose_file_is_absent_is_skipped_with_a_line(tmp_path):
    steps = [{"name": "branches", "limit_s": 20, "argv": _py("raise SystemExit(9)"), "needs_file": "nope/x.py"}]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 0 and "skipped, nope/x.py is not in this checkout" in result.stdout
