"""A new user's first hour (issue 23): how long a run will take and what it ended with, CIFAR fetched when it is
missing, benchmarks that say when their numbers cannot be trusted, an install that imports.

Training runs are tiny (synthetic, resnet8, a few dozen images, one thread)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from benchmarks import bench_branches, harness
from okdfast.config import parse_config
from okdfast.data import cifar, locate
from okdfast.evaluate import main as evaluate_main
from okdfast.run import progress
from okdfast.run.progress import EpochProgress, RunClock, end_line, format_duration
from okdfast.train import main, run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--arch", "resnet8", "--method", "one", "--subset", "40", "--batch-size", "10",
        "--epochs", "2", "--eval-batch-size", "100", "--workers", "0", "--progress", "off", "--seed", "1",
        "--device", "cpu"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class FakeClock:
    """time.perf_counter for okdfast.run.progress, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    return clock


# ---------------------------------------------------------------------------------------------------------------
# item 3: how long will it take, and what did it end with
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (45, "45 s"), (200, "3 min 20 s"), (5 * 3600 + 12 * 60 + 7, "5 h 12 min"),
     (2 * 86400 + 3 * 3600, "2 d 3 h")],
)  # fmt: skip
def test_durations_read_as_a_person_says_them(seconds, text):
    assert format_duration(seconds) == text


def test_run_eta_from_the_measured_epoch_and_each_epochs_wall_time(fake_time):
    # the README's main command on a CPU: 300 epochs of 391 steps at 115 img/s (1.11 s per step of 128)
    clock = RunClock(epochs=300, steps_per_epoch=391, global_step=0)
    step = 128 / 115
    assert "known after the first steps" in clock.eta(0, 0)
    assert clock.eta(10, 0, seconds_per_step=step).startswith("run 1 d 12 h left (about ")  # 117,290 steps: 36 h
    clock.begin_epoch()
    fake_time.now += 391 * step
    clock.end_training(391 * step, 391, full_epoch=True)
    fake_time.now += 20.0  # the test-set evaluation
    line = clock.epoch_line(0, global_step=391)
    assert line.startswith("took 7 min 35 s (train 7 min 15 s, test 20 s) | 1/300 epochs, ")
    left = 299 * 391 * step + 299 * 20.0  # the evaluation just timed stands for the 299 to come
    assert f"{format_duration(left)} left (about " in line
    clock.begin_epoch()  # the next epoch: the evaluation, log and checkpoint time is measured now
    fake_time.now += 100 * step
    assert clock.seconds_left(391 + 100, clock.evaluations_left(1, done=False)) == pytest.approx(
        (300 * 391 - 491) * step + 299 * 20.0
    )
    assert RunClock(epochs=3, steps_per_epoch=10, global_step=0, max_steps=15).evaluations_left(0, done=False) == 2


def test_progress_after_a_resume_counts_the_whole_epoch(fake_time):
    lines: list[str] = []
    clock = RunClock(epochs=2, steps_per_epoch=66, global_step=66 + 15)
    bar = EpochProgress(progress="on", log_every=0, is_main=True, log=lines.append, epoch=1, total=66, done=15)
    wrapped = bar.wrap(range(66 - 15))
    assert (bar.bar.n, bar.bar.total) == (15, 66)  # the bar starts at step 15 of 66, not 0 of 51
    for _ in wrapped:
        pass
    assert bar.bar.n == 66
    text = EpochProgress(progress="auto", log_every=1e-9, is_main=True, log=lines.append, epoch=1, total=66, done=15,
                         clock=clock, global_step=66 + 15)  # fmt: skip
    fake_time.now += 1.0
    text.update(4, torch.tensor(2.5), 0.1, 40, 4.0)
    assert lines[-1].startswith("epoch 1 step 19/66 | loss 2.5000 | lr 0.1 | 10 img/s | run ")
    assert "47 s left" in lines[-1]  # 66 - 19 steps at 1 s, no evaluation timed yet


class RecordingWriter:
    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float], int]] = []

    def log_steps(self, step: int, terms: dict[str, float], first_step: int = 0) -> None:
        self.points.append((step, terms, first_step))


def test_tensorboard_gets_the_loss_terms_every_n_steps_as_their_mean():
    writer = RecordingWriter()
    bar = EpochProgress(progress="off", log_every=0, is_main=True, log=print, epoch=0, total=100, tensorboard=writer,
                        global_step=5)  # fmt: skip
    for steps in range(1, 41):
        loss = torch.tensor(float(5 + steps))
        bar.update(steps, loss, 0.1, steps * 10, 1.0, {"loss": loss, "ce": loss / 2, "part_ce": loss})
    n = progress.TENSORBOARD_EVERY
    assert [step for step, _, _ in writer.points] == [20, 40]  # global steps 6..45: points at 20 and 40
    assert writer.points[0][1] == pytest.approx({"loss": sum(range(6, 21)) / 15, "ce": sum(range(6, 21)) / 30})
    assert writer.points[1][1]["loss"] == pytest.approx(sum(range(21, 41)) / n)
    assert {first for _, _, first in writer.points} == {5}
    quiet = RecordingWriter()  # another rank writes nothing
    other = EpochProgress(progress="off", log_every=0, is_main=False, log=print, epoch=0, total=100, tensorboard=quiet)
    other.update(20, torch.tensor(1.0), 0.1, 10, 1.0, {"loss": torch.tensor(1.0)})
    assert quiet.points == []


def test_end_line_names_the_time_the_reported_head_and_the_files():
    summary = {"finished": True, "interrupted": False, "epochs_done": 300, "global_step": 117300,
               "run_dir": "runs/mde", "last": {"epoch": 299, "acc_leader": 71.2, "acc_branch_mean": 70.0},
               "best": {"acc_leader": {"value": 71.9, "epoch": 287}}}  # fmt: skip
    line = end_line(summary, "leader", 6 * 3600 + 60, resumed=False)
    assert line == (
        "finished 300 epochs in 6 h 1 min | leader: best 71.90% (epoch 287), last 71.20% (epoch 299) | files in "
        "runs/mde: train.log, metrics.csv, summary.json, best.pt, last.pt (python -m okdfast.evaluate runs/mde/best.pt)"
    )
    stopped = end_line(summary | {"finished": False}, None, 5, resumed=True)
    assert stopped.startswith("stopped at step 117300 (--max-steps) after 5 s (this session) | files in runs/mde")


def train_log(run_dir: Path) -> list[str]:
    return (run_dir / "train.log").read_text().splitlines()


def test_a_run_logs_each_epochs_time_the_eta_and_ends_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    summary = run(parse_config([*TINY, "--out", str(run_dir)])[0])
    lines = train_log(run_dir)
    epochs = [line for line in lines if line.startswith("epoch   ")]
    assert len(epochs) == 2 and "| took " in epochs[0] and "1/2 epochs, " in epochs[0] and " left (about " in epochs[0]
    assert "2/2 epochs, the last of this run" in epochs[1]
    assert lines[-1].startswith("finished 2 epochs in ")
    best = summary["best"]["acc_gate"]
    last = summary["last"]["acc_gate"]
    assert f"gate: best {best['value']:.2f}% (epoch {best['epoch']}), last {last:.2f}%" in lines[-1]
    assert f"files in {run_dir}: train.log" in lines[-1]


def test_tensorboard_says_where_it_writes_and_gets_per_step_terms_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "runs" / "run"
    argv = [*TINY, "--subset", "200", "--tensorboard", "--out", str(run_dir)]  # 20 steps per epoch
    run(parse_config([*argv, "--max-steps", "25"])[0])  # a point at step 20, then stopped at 25
    main(["--out", str(run_dir), "--resume", "auto"])
    where = [line for line in train_log(run_dir) if line.startswith("TensorBoard: ")]
    assert len(where) == 2 and f"tensorboard --logdir {tmp_path / 'runs'}" in where[0]
    accumulator = EventAccumulator(str(run_dir / "tensorboard" / "steps"))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train_step/loss")]
    assert steps == [20, 40]  # each once: the resumed session's first window holds its 15 steps
    assert {"train_step/ce", "train_step/kd"} <= set(accumulator.Tags()["scalars"])
    assert "tensorboard/" in train_log(run_dir)[-1]


# ---------------------------------------------------------------------------------------------------------------
# item 4: the main command fetches a missing CIFAR (mocked network: a local archive served through torchvision's own
# downloader, its progress bar and its md5 checks); offline it fails at once with one message
# ---------------------------------------------------------------------------------------------------------------
CIFAR_RUN = ["--dataset", "cifar10", "--arch", "resnet8", "--method", "one", "--subset", "20", "--batch-size", "10",
             "--epochs", "1", "--eval-batch-size", "100", "--workers", "0", "--progress", "off",
             "--device", "cpu"]  # fmt: skip


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch) -> Path:
    """A user's home with no data anywhere, in an empty working directory; returns the cache folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.delenv(locate.NO_DOWNLOAD_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home" / ".cache" / "okdfast" / "data"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar10_archive(tmp_path: Path, per_batch: int = 10) -> tuple[Path, dict[str, str]]:
    """A tiny cifar-10-python.tar.gz in the official layout, and the md5 of each of its files."""
    folder = tmp_path / "archive" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, {path.name: md5(path) for path in folder.iterdir()}


class Response(io.BytesIO):
    """What urlopen returns for an HTTP GET: the body, its length, the final URL."""

    def __init__(self, body: bytes, url: str) -> None:
        super().__init__(body)
        self.length, self.url = len(body), url


@pytest.fixture
def served_cifar10(tmp_path, monkeypatch) -> Path:
    """The network, mocked at urlopen: the official URL serves a tiny archive, whose checksums torchvision's CIFAR10
    is told; the host probe passes. The archive is returned (to damage it)."""
    archive, sums = cifar10_archive(tmp_path)
    cls = torchvision.datasets.CIFAR10
    served: list[str] = []

    def urlopen(request, *args, **kwargs):
        served.append(request.full_url)
        assert request.full_url == cls.url  # https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
        return Response(archive.read_bytes(), request.full_url)

    monkeypatch.setattr(torchvision.datasets.utils.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(cls, "train_list", [[name, sums[name]] for name in sorted(sums) if name.startswith("data_")])
    monkeypatch.setattr(cls, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": sums["batches.meta"]})
    probed: list[str] = []
    monkeypatch.setattr(cifar, "check_host_reachable", lambda url, timeout=10.0: probed.append(url))
    return archive


def test_download_rules():
    assert locate.download_by_default("cifar100", None) and locate.download_by_default("CIFAR-10", None)
    assert not locate.download_by_default("cinic10", None)  # ~690 MB from another host: only with --download
    assert not locate.download_by_default("cifar10", "my/data")  # a named folder without it: a wrong path
    cache = Path(locate.CACHE_DIR).expanduser()
    assert locate.download_root(locate.search_roots(None)) == cache
    assert locate.download_root(locate.search_roots("elsewhere")) == Path("elsewhere")


def test_download_rules_follow_the_environment(monkeypatch):
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    for value, downloads in (("1", False), ("yes", False), ("0", True), ("", True)):
        monkeypatch.setenv(locate.NO_DOWNLOAD_ENV_VAR, value)
        assert locate.download_by_default("cifar10", None) is downloads, value
    monkeypatch.delenv(locate.NO_DOWNLOAD_ENV_VAR)
    monkeypatch.setenv(locate.ENV_VAR, "/srv/data")
    assert not locate.download_by_default("cifar10", None)
    assert locate.download_root(locate.search_roots(None)) == Path("/srv/data")


def test_the_main_command_downloads_a_missing_cifar_into_the_cache(fresh_machine, served_cifar10, capsys, tmp_path):
    main([*CIFAR_RUN, "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    searched = f"{tmp_path / 'data'}, {fresh_machine}"
    assert f"okdfast: data set 'cifar10' is in none of {searched}: downloading it into {fresh_machine} (" in out
    assert "100%" in err  # torchvision's progress bar
    assert (fresh_machine / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert not (tmp_path / "data").exists()  # ./data is searched, the download goes to the cache
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and str(fresh_machine) in summary["data"]["path"]
    main([*CIFAR_RUN, "--out", str(tmp_path / "again")])  # found in the cache: no second download
    assert "downloading" not in capsys.readouterr().out


def test_a_download_that_fails_its_checksum_is_one_message(fresh_machine, served_cifar10, capsys, tmp_path):
    served_cifar10.write_bytes(served_cifar10.read_bytes()[:-100])  # a cut download
    with pytest.raises(SystemExit) as exit_info:
        main([*CIFAR_RUN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "okdfast.train: error: data set 'cifar10' not found." in err
    assert "Download failed: RuntimeError: File not found or corrupted." in err  # the md5 of the archive
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["--no-download", "OKDFAST_NO_DOWNLOAD=1", "offline"])
def test_offline_or_told_not_to_it_fails_at_once_with_one_message(how, fresh_machine, capsys, tmp_path, monkeypatch):
    probed: list[str] = []

    def offline(url, timeout=10.0):  # what check_host_reachable raises on a machine without a network
        probed.append(url)
        raise OSError("cannot reach www.cs.toronto.edu:443: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "check_host_reachable", offline)
    argv = [*CIFAR_RUN, "--out", str(tmp_path / "run")]
    if how == "--no-download":
        argv.append(how)
    elif how.startswith("OKDFAST"):
        monkeypatch.setenv(locate.NO_DOWNLOAD_ENV_VAR, "1")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and not (tmp_path / "run").exists()
    assert err.startswith("okdfast.train: error: data set 'cifar10' not found.")
    assert "--dataset synthetic" in err and str(fresh_machine) in err
    if how == "offline":
        assert len(probed) == 1 and "Download failed: OSError: cannot reach www.cs.toronto.edu:443" in err
    else:
        assert probed == [] and "Download failed" not in err and "pass --download" in err


# ---------------------------------------------------------------------------------------------------------------
# item 5: benchmarks say when the machine was busy, --quick is quick, Ctrl-C ends cleanly
# ---------------------------------------------------------------------------------------------------------------
class Machine:
    """The load average and CPU counters harness.LoadWatch reads, set by hand."""

    def __init__(self, monkeypatch) -> None:
        self.load, self.busy, self.own, self.now = 0.1, 1000.0, 50.0, 100.0
        monkeypatch.setattr(harness.os, "getloadavg", lambda: (self.load, self.load, self.load))
        monkeypatch.setattr(harness, "_machine_busy_seconds", lambda: self.busy)
        monkeypatch.setattr(harness, "_own_busy_seconds", lambda: self.own)
        monkeypatch.setattr(harness.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(harness, "cpu_cores", lambda: 2)

    def run(self, seconds: float, own_cores: float, other_cores: float, load: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds
        self.load = load


def test_load_watch_warns_of_a_busy_machine_in_the_row_and_on_screen(monkeypatch, capsys):
    machine = Machine(monkeypatch)
    watch = harness.LoadWatch()
    watch.begin()
    machine.run(5, own_cores=1.0, other_cores=0.05, load=0.1 + 1.0 * (1 - math.exp(-5 / 60)))  # quiet
    quiet = watch.columns("quiet row")
    assert quiet["load_warning"] == "" and quiet["other_cores"] == pytest.approx(0.05)
    assert "WARNING" not in capsys.readouterr().out
    watch.begin()
    machine.run(5, own_cores=1.0, other_cores=1.5, load=2.6)
    busy = watch.columns("busy row")
    assert "load average 2.60 above the 2 cores" in busy["load_warning"]
    assert "other processes kept 1.5 of the 2 cores busy" in busy["load_warning"]
    assert "load average changed during the run: 0.10 at its start, 2.60 now" in busy["load_warning"]
    assert capsys.readouterr().out.startswith("WARNING busy row: load average 2.60 above the 2 cores")
    assert (busy["load_avg_1m"], busy["load_avg_1m_end"]) == (pytest.approx(0.17, abs=0.01), 2.6)
    assert watch.summary().startswith("WARNING: 1 of 2 rows ran on a busy machine")


def test_own_cpu_counts_the_benchmarks_child_processes():
    """A measuring process or a DataLoader worker is this benchmark's work, not another user's: alive (read from
    /proc) and after it was reaped (the parent's children time)."""
    before = harness._own_busy_seconds()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\ninput()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while harness._own_busy_seconds() - before < 0.7 and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = harness._own_busy_seconds() - before
    child.communicate("\n", timeout=30)
    assert alive >= 0.7 and child.returncode == 0
    assert harness._own_busy_seconds() - before >= 0.7  # reaped: now in this process's cutime


def test_run_cli_ends_ctrl_c_with_where_the_rows_are(tmp_path, capsys):
    def interrupted_main() -> int:
        harness.append_row("quickcheck", {"a": 1}, tmp_path)
        raise KeyboardInterrupt

    assert harness.run_cli(interrupted_main) == 130
    err = capsys.readouterr().err
    assert f"interrupted (Ctrl-C): rows written so far: 1 in {tmp_path / 'quickcheck.csv'}" in err


def test_bench_branches_quick_on_the_cpu_is_a_minutes_plan():
    args = bench_branches_args(["--quick", "--device", "cpu"])
    cases = bench_branches.plan(args)
    assert cases[0] == ("resnet32", 4, "shared") and {k for _, k, _ in cases} == {4}
    assert {a for a, _, t in cases if t == "dml"} == set(bench_branches.CPU_QUICK_DML)
    assert len(cases) == len(bench_branches.CPU_QUICK_ARCHS) + len(bench_branches.CPU_QUICK_DML)
    assert args.time_budget == bench_branches.QUICK_CPU_BUDGET_S <= 50


def bench_branches_args(argv: list[str]):
    """bench_branches' parsed and completed arguments, without running it."""
    captured = {}

    def fake_run(args):
        captured["args"] = args
        return [], Path("unused"), []

    original = bench_branches.run
    bench_branches.run = fake_run
    try:
        bench_branches.main(argv)
    finally:
        bench_branches.run = original
    return captured["args"]


def test_a_benchmark_prints_its_header_and_ctrl_c_ends_it_without_a_traceback(tmp_path):
    argv = [sys.executable, "-m", "benchmarks.bench_branches", "--device", "cpu", "--archs", "resnet8", "resnet20",
            "resnet32", "resnet56", "--branches", "2", "4", "--trunks", "shared", "--repeats", "30", "--threads", "1",
            "--results-dir", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    csv_path = tmp_path / "branches.csv"
    deadline = time.monotonic() + 120
    while not csv_path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert out.startswith("== bench_branches | ") and "rows -> " in out.splitlines()[0]
    assert "Traceback" not in err and "interrupted (Ctrl-C): rows written so far: " in err
    assert str(csv_path) in err
    rows = harness.read_rows(csv_path)
    assert rows and {"load_avg_1m", "load_avg_1m_end", "other_cores", "load_warning"} <= set(rows[0])


# ---------------------------------------------------------------------------------------------------------------
# item 6: install and import
# ---------------------------------------------------------------------------------------------------------------
def test_shadowing_message_names_both_folders(tmp_path):
    import okdfast

    installed = tmp_path / "installed" / "okdfast"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert okdfast.shadowing_message(okdfast.HERE, okdfast.HERE) is None  # the installed copy itself
    assert okdfast.shadowing_message(okdfast.HERE, tmp_path / "gone" / "okdfast") is None  # a copied virtualenv
    message = okdfast.shadowing_message(tmp_path / "other" / "okdfast", installed)
    assert f"imported from {tmp_path / 'other' / 'okdfast'}" in message and f"the installed {installed}" in message
    assert okdfast.installed_location() in (None, okdfast.HERE)  # this checkout is the installed one (or none is)


def python_in(folder: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` as a script in ``folder``, as a user runs one (the script's folder first on sys.path)."""
    script = folder / "script.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=120)


def test_another_copy_first_on_the_path_is_imported_with_a_warning_naming_it(tmp_path):
    import okdfast

    if okdfast.installed_location() != okdfast.HERE:
        pytest.skip("okdfast is not installed from this checkout")
    shutil.copytree(okdfast.HERE, tmp_path / "okdfast", ignore=shutil.ignore_patterns("__pycache__"))
    result = python_in(tmp_path, "import okdfast\nprint(okdfast.__file__)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "okdfast" / "__init__.py")
    assert f"ShadowingWarning: okdfast was imported from {tmp_path / 'okdfast'}" in result.stderr
    assert f"not from the installed {okdfast.HERE}" in result.stderr


def test_a_clone_folder_beside_a_script_is_the_namespace_the_readme_describes(tmp_path):
    clone = tmp_path / "okdfast"  # a clone's root: okdfast/okdfast/ is the package, okdfast/ has no __init__.py
    (clone / "okdfast").mkdir(parents=True)
    result = python_in(tmp_path, "import okdfast\nokdfast.functional\n")
    readme = " ".join((REPO / "README.md").read_text().split())
    if result.returncode == 0:
        pytest.skip("okdfast is installed so that a folder without __init__.py does not hide it")
    assert "AttributeError: module 'okdfast' has no attribute 'functional'" in result.stderr
    assert "AttributeError: module 'okdfast' has no attribute 'functional'" in readme
    assert "editable_mode=strict" in readme


def test_readme_gives_the_cpu_only_install_and_what_amp_does_on_a_cpu():
    readme = (REPO / "README.md").read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "fp32 otherwise, with a log line saying so" in readme
    assert "OKDFAST_NO_DOWNLOAD=1" in readme and "~/.cache/okdfast/data" in readme


# ---------------------------------------------------------------------------------------------------------------
# item 7 (this file's part): okdfast.evaluate prints a readable table with the data label; --json the machine form
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_prints_a_table_with_the_data_and_the_reported_head_first(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main([*TINY, "--out", str(run_dir)])
    capsys.readouterr()
    metrics = evaluate_main([str(run_dir / "best.pt"), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{run_dir / 'best.pt'}: one resnet8 K=3, after ")
    assert lines[1] == "test data: synthetic (generated, not a real data set), 8 images"
    rows = [line.split() for line in lines[4:]]
    assert rows[0][:2] == ["gate", "(the"] and rows[0][-1] == "acc_gate"  # the reported head first
    assert [row[-1] for row in rows[1:3]] == ["acc_branch_mean", "acc_ensemble"]
    assert float(rows[0][-2]) == pytest.approx(metrics["acc_gate"], abs=0.005)
    assert any(line.split()[-1] == "disagreement" for line in lines if line.strip())
    assert evaluate_main([str(run_dir / "best.pt"), "--device", "cpu", "--json"]) == metrics
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)
