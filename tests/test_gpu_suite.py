"""The GPU visits (benchmarks/suite.py, benchmarks/gpu_suite.sh), on the CPU: each visit fits one command and its
files fit what comes back, the first visit runs its steps in order of value, the prerequisite imports every package
a step imports, the dry run writes nothing; a visit's rows reach OUT_DIR as they are measured, so a step cut at its
limit, a visit killed mid-step or an interrupted runner keeps every row measured before; no child outlives its step;
and the CPU rehearsal of the first visit (every step, tiny shapes) runs."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import suite
from benchmarks.gpu_checks import environment

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
PY = sys.executable


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(suite.VISITS))
def test_a_visit_fits_one_command_and_its_files_come_back(name):
    visit = suite.VISITS[name]
    assert visit.planned_s + suite.RUNNER_RESERVE_S <= suite.VISIT_S <= suite.COMMAND_LIMIT_S - 60, name
    assert [s.name for s in visit.steps[:2]] == ["install", "environment"], "every visit is self-contained"
    assert all(s.prerequisite for s in visit.steps[:2]) and not any(s.prerequisite for s in visit.steps[2:])
    assert len(visit.files) <= suite.MAX_FILES, f"{name}: {len(visit.files)} files, {suite.MAX_FILES} come back"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in visit.files), visit.files  # no folders, plain names
    for step in visit.steps:
        assert step.limit_s >= 15, f"{name}/{step.name}: a limit under 15 s cannot start Python and torch"
        assert sum(s for _, s in step.parts) <= step.limit_s, f"{name}/{step.name}: its parts outgrow its limit"
        argv = list(step.argv)
        if "--time-budget" in argv:  # a benchmark's own budget ends before the hard limit stops it
            assert float(argv[argv.index("--time-budget") + 1]) <= step.limit_s - suite.GRACE_S - 5, step.name
        for command in (argv, list(step.cpu_argv or ())):
            modules = [command[2]] if command[1:2] == ["-m"] else []  # python -m MODULE (pytest's -m is a marker)
            modules += [a for a in command if a.startswith("benchmarks.")]
            for module in modules:
                if module not in ("pip", "pytest"):
                    path = REPO / (module.replace(".", "/") + ".py")
                    assert path.exists() or step.needs_file, f"{name}/{step.name}: no {path}"
        if step.name != "install":
            assert step.cpu_argv is not None, f"{name}/{step.name}: no CPU rehearsal"
        assert "{out}" not in " ".join(argv) or step.files, step.name  # whatever lands in OUT_DIR is declared


def test_one_visit_fits_a_sessions_device_time():
    assert suite.MACHINE_START_S + suite.VISIT_S <= suite.DEVICE_TIME_S


def test_the_first_visit_runs_in_order_of_value():
    names = [s.name for s in suite.VISITS["visit1"].steps]
    assert names == [
        "install",
        "environment",  # the device's facts: copy GB/s, bf16 TFLOP/s
        "kernels-vs-reference-visit",
        "loss-headline",  # 128x4x100 under CUDA graphs, 4096x4x32768 as % of copy
        "train-headline",  # reference, all-on, all-but-fused, all-but-grouped
        "branches",
        "loader-kernel",
        "launch-sweep",
    ]
    train = next(s for s in suite.VISITS["visit1"].steps if s.name == "train-headline")
    assert train.argv[train.argv.index("--only") + 1 :][:4] == (
        "reference",
        "all-on",
        "all-but-fused",
        "all-but-grouped",
    )
    tests = next(s for s in suite.VISITS["visit2"].steps if s.name == "gpu-tests")
    assert suite.VISITS["visit2"].steps[-1] is tests, "the compile-heavy GPU test tier runs last"
    assert suite.ALIASES["visit"] == "visit1"


def test_the_real_data_run_is_sized_after_the_defaults_were_measured():
    names = [s.name for s in suite.VISITS["visit3"].steps]
    assert names.index("train-defaults") < names.index("decode-data") < names.index("full-run")
    defaults = next(s for s in suite.VISITS["visit3"].steps if s.name == "train-defaults")
    assert "all-but-cuda_graphs" in defaults.argv  # what okdfast.train runs by default on CUDA
    full_run = next(s for s in suite.VISITS["visit3"].steps if s.name == "full-run")
    seconds = float(full_run.argv[full_run.argv.index("--seconds") + 1])
    assert 150 <= seconds <= full_run.limit_s - 10  # stopped by itself before the hard limit


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names of every absolute import in okdfast/, kernels/, benchmarks/ and tests/ (module -> files)."""
    local = {"okdfast", "kernels", "benchmarks", "tests"} | {p.stem for p in (REPO / "tests").glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in ("okdfast", "kernels", "benchmarks", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        key = ".".join(name.split(".")[:2]) if top == "nvidia" else top  # nvidia.dali, ...
                        found.setdefault(key, set()).add(str(path.relative_to(REPO)))
    return found


def test_the_prerequisite_imports_every_package_a_step_imports():
    known = set(environment.REQUIRED) | set(environment.OPTIONAL)
    missing = {name: sorted(files)[:3] for name, files in _third_party_imports().items() if name not in known}
    assert not missing, f"imported but not checked by benchmarks/gpu_checks/environment.py: {missing}"


def test_a_missing_package_fails_the_prerequisite_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(environment.REQUIRED, "no_such_package_okdfast", "a test")
    assert environment.main([]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["environment: import no_such_package_okdfast failed: ModuleNotFoundError: No module named "
                   "'no_such_package_okdfast' (needed by: a test)"]  # fmt: skip


def test_a_hanging_nvidia_smi_is_caught(monkeypatch):
    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], environment.NVIDIA_SMI_TIMEOUT_S)

    monkeypatch.setattr(environment.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(environment.subprocess, "run", hang)
    assert "no answer within" in environment.nvidia_smi()


@pytest.mark.parametrize("name", sorted(suite.VISITS))
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, name):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", name, str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for step in suite.VISITS[name].steps:
        assert step.name in result.stdout
    assert "limit holds:" in result.stdout and "files back" in result.stdout
    assert "nothing was run or written" in result.stdout
    assert not out.exists()


def test_dry_run_without_a_visit_lists_every_visit(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(f"visit {name}" in result.stdout for name in suite.VISITS)
    assert not (tmp_path / "x").exists()


def test_the_data_plan_names_where_the_data_comes_from(monkeypatch, tmp_path):
    monkeypatch.setenv("OKDFAST_JPEG_NPZ", str(tmp_path / "missing.npz"))
    monkeypatch.setattr(suite, "REPO", tmp_path)  # neither shared/data/ nor ../shared/data/ exists there
    assert suite.find_npz() is None
    assert "decode-data and full-run will skip" in suite.render_plan(suite.VISITS["visit3"])
    npz = tmp_path / "cifar10-jpeg.npz"
    npz.write_bytes(b"")
    monkeypatch.setenv("OKDFAST_JPEG_NPZ", str(npz))
    assert suite.find_npz() == npz


# ---------------------------------------------------------------------------------------------------------------
# running a visit (a plan of tiny steps)
# ---------------------------------------------------------------------------------------------------------------


def _plan(tmp_path: Path, steps: list[dict]) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"mini": {"steps": steps}}))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"))  # where the visit's work folder goes


def _command(tmp_path: Path, plan: Path, *extra: str) -> list[str]:
    return [PY, "-m", "benchmarks.suite", "mini", str(tmp_path / "out"), "--plan-json", str(plan), *extra]


def _run(tmp_path: Path, plan: Path, *extra: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, Path]:
    command = _command(tmp_path, plan, *extra)
    result = subprocess.run(command, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert not list((tmp_path / "tmp").iterdir()), "the work folder is removed at the end"
    return result, tmp_path / "out"


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


ROW = "import csv, os; csv.writer(open(os.environ['OKDFAST_RESULTS_DIR'] + '/rows.csv', 'a')).writerow([{}])"


def test_rows_log_and_summary_reach_out_dir_and_only_declared_files_stay(tmp_path):
    stray = "import os; open(os.environ['OKDFAST_RESULTS_DIR'] + '/chart.png', 'w').write('x')"
    steps = [
        {"name": "first", "limit_s": 20, "argv": _py("print('hello from first')"), "prerequisite": True},
        {"name": "rows", "limit_s": 20, "argv": _py(ROW.format(1) + "; " + stray), "files": ["rows.csv"]},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "rows.csv", "summary.txt"]
    assert (out / "rows.csv").read_text() == "1\n"
    log = (out / "log.txt").read_text()
    assert "hello from first" in log and "-- rows" in log
    summary = (out / "summary.txt").read_text()
    assert "all steps ok" in summary and re.search(r"rows\s+ok", summary)
    assert "not returned (no step declared them; moved out of this folder): chart.png" in summary


def test_a_failed_step_is_reported_and_the_visit_goes_on(tmp_path):
    steps = [
        {"name": "broken", "limit_s": 20, "argv": _py("import sys; print('it broke here'); sys.exit(3)")},
        {"name": "after", "limit_s": 20, "argv": _py("print('still ran')")},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 1
    assert "FAILED (exit 3)" in result.stdout and "it broke here" in result.stdout
    assert "still ran" in (out / "log.txt").read_text()
    assert "steps not ok: broken" in (out / "summary.txt").read_text()


def test_a_step_cut_at_its_limit_keeps_the_rows_it_measured(tmp_path):
    """A step that writes rows and then hangs (ignoring SIGTERM) is killed at its limit: its rows are in OUT_DIR,
    the summary says timeout, and the next step runs."""
    hang = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    hang += "; ".join(ROW.format(i) for i in range(3)) + "; print('measured 3', flush=True); time.sleep(120)"
    steps = [
        {"name": "hangs", "limit_s": 20, "argv": _py(hang), "files": ["rows.csv"]},
        {"name": "after", "limit_s": 20, "argv": _py("print('next step')")},
    ]
    start = time.monotonic()
    result, out = _run(tmp_path, _plan(tmp_path, steps), "--limit", "hangs=7")  # a shortened limit
    assert time.monotonic() - start < 40
    assert "TIMEOUT" in result.stdout, result.stdout
    assert (out / "rows.csv").read_text() == "0\n1\n2\n"
    summary = (out / "summary.txt").read_text()
    assert re.search(r"hangs\s+timeout", summary) and re.search(r"after\s+ok", summary)
    assert "next step" in (out / "log.txt").read_text()


def test_a_shortened_budget_leaves_the_later_steps_unstarted(tmp_path):
    steps = [
        {
            "name": "slow",
            "limit_s": 20,
            "argv": _py(ROW.format(7) + "; import time; time.sleep(30)"),
            "files": ["rows.csv"],
        },
        {"name": "later", "limit_s": 20, "argv": _py("print('ran')")},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps), "--budget", "22")
    summary = (out / "summary.txt").read_text()
    assert re.search(r"slow\s+timeout", summary) and re.search(r"later\s+no time", summary), summary
    assert (out / "rows.csv").read_text() == "7\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


def test_no_child_outlives_its_step(tmp_path):
    pid_file = tmp_path / "child.pid"
    leave = f"import subprocess; p = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(p.pid))"
    steps = [
        {"name": "leaves-a-child", "limit_s": 20, "argv": _py(leave)},
        {"name": "after", "limit_s": 20, "argv": _py("print('after')")},
    ]
    result, _ = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 0, result.stdout
    assert "stopped the processes leaves-a-child left running" in result.stdout
    deadline = time.monotonic() + 5
    while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid_file.read_text()))


def test_a_broken_prerequisite_stops_the_visit_with_one_line(tmp_path):
    marker = tmp_path / "ran"
    steps = [
        {
            "name": "environment",
            "limit_s": 20,
            "argv": _py("import sys; print('environment: import torchvision failed: no module'); sys.exit(1)"),
            "prerequisite": True,
        },
        {"name": "bench", "limit_s": 20, "argv": _py(f"open({str(marker)!r}, 'w')")},
    ]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 1 and not marker.exists()
    assert "environment: import torchvision failed: no module" in result.stdout
    summary = (out / "summary.txt").read_text()
    assert "stopped: prerequisite environment failed" in summary and re.search(r"bench\s+pending", summary)


def test_an_interrupted_runner_stops_its_step_and_writes_the_summary(tmp_path):
    steps = [{"name": "long", "limit_s": 50, "argv": _py(ROW.format(5) + "; import time; time.sleep(60)"),
              "files": ["rows.csv"]}]  # fmt: skip
    plan = _plan(tmp_path, steps)
    proc = subprocess.Popen(_command(tmp_path, plan), cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    rows = tmp_path / "out" / "rows.csv"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not rows.exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, output
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "interrupted by SIGTERM" in summary and re.search(r"long\s+interrupted", summary)
    assert rows.read_text() == "5\n"


def test_a_visit_refuses_a_folder_holding_a_visits_results(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.txt").write_text("an earlier visit")
    steps = [{"name": "a", "limit_s": 20, "argv": _py("pass")}]
    result, out = _run(tmp_path, _plan(tmp_path, steps))
    assert result.returncode == 2 and "already holds summary.txt" in result.stderr
    assert (out / "summary.txt").read_text() == "an earlier visit"


# ---------------------------------------------------------------------------------------------------------------
# the real first visit, rehearsed on the CPU (tiny shapes)
# ---------------------------------------------------------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _visit(out: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen:
    command = ["bash", str(SCRIPT), "--cpu", "visit1", str(out), *extra]
    # its own session, as the device runs a command: killing the session is the device's kill at its limit
    return subprocess.Popen(command, cwd=REPO, env=env | {"PYTHON": PY}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def test_a_visit_killed_mid_step_keeps_every_row_measured_before(tmp_path):
    """The first visit's CPU rehearsal under a shortened budget, killed (SIGKILL to every process of its session,
    as the device ends a command at its limit) while the loss step is measuring: the rows written before the kill,
    the environment record and the summary of the steps before are all in OUT_DIR, and nothing of it runs on."""
    out = tmp_path / "out"
    proc = _visit(out, "--budget", "120", "--steps", "loss-headline,launch-sweep", env=_env(tmp_path))
    rows, summary = out / "loss.csv", out / "summary.txt"
    deadline, before = time.monotonic() + 120, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if rows.exists() and summary.exists() and "running loss-headline" in summary.read_text():
                before = len(_rows(rows))
                if before >= 2:
                    break
            time.sleep(0.05)
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert before >= 2, proc.stdout.read()[-3000:]
    deadline = time.monotonic() + 5
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_pids(proc.pid)
    got = _rows(rows)
    assert len(got) >= before and all(r["run_id"].startswith("cpu-visit1-") and r["median_ms"] for r in got)
    text = summary.read_text()
    assert "running " in text and re.search(r"environment\s+ok", text) and re.search(r"launch-sweep\s+pending", text)
    assert json.loads((out / "environment.json").read_text())["device"]["copy_gbps"] > 0
    assert {p.name for p in out.iterdir()} <= set(suite.VISITS["visit1"].files)


def test_the_first_visits_rehearsal_runs_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _visit(out, env=_env(tmp_path))
    output, _ = proc.communicate(timeout=400)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + output[-3000:]
    assert "all steps ok" in summary
    files = {p.name for p in out.iterdir()}
    assert files == set(suite.VISITS["visit1"].files), files  # exactly the planned files, all of them
    assert "loss mde_head shared" in summary and "train all-on" in summary and "sweep mde" in summary
