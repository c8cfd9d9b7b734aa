"""The hostile battery of issue 22: what a crafted file, a second process, a hand-edited checkpoint or a surprising
YAML file does to okdfast, and the exact outcome of each. Nothing runs that should not (pickles, YAML tags), nothing
is lost or mixed (the run folder's lock, foreign folders, links, the data's full hash, the checkpoint's state, a
signal to the whole process group), and every bad input is one line with exit status 2 before any work, leaving no
run folder. Classes, in file order:

    escape     code in CIFAR pickles; names and links that would write outside the run folder
    folder     the lock of a run folder (a second process, a kill -9, a folder changed meanwhile); foreign folders
    data       the full hash of the data on resume; npz / JPEG files that used to crash
    ckpt       a checkpoint's state and history validated before use
    signal     SIGTERM to the whole process group with loader workers
    oneline    the tracebacks that became one line (seed, temperature, fused loss, WORLD_SIZE, disk, plot, reproduce)
    yaml       encodings, nesting, aliases, duplicate keys, YAML 1.1 readings, typos, a run's own config.yaml
    cli        flags that do nothing for the method, --help groups and the program's name
    records    what environment.json says about the CPU

Training runs are tiny (synthetic, resnet8, 20 images, batch 10, deterministic, one thread); most cases stop
before training, and a few call the checking functions directly where that tests the same thing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from okdfast.config import HELP_GROUPS, MDE_FIELDS, TrainConfig, build_parser, load_yaml, parse_config
from okdfast.errors import RunFolderError, UserError
from okdfast.evaluate import main as evaluate_main
from okdfast.run.checkpoint_file import atomic_save, safe_load
from okdfast.run.folder import LOCK, RunFolder
from okdfast.run.resume import plan_start
from okdfast.train import main, run
from okdfast.utils import atomic_files

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--arch", "resnet8", "--method", "one", "--subset", "20", "--batch-size", "10",
        "--epochs", "2", "--eval-batch-size", "100", "--workers", "0", "--progress", "off", "--deterministic",
        "--seed", "1", "--device", "cpu"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def cli(argv: list[str], capsys, entry=main) -> tuple[int, str]:
    """(exit status, stderr) of an in-process CLI call."""
    capsys.readouterr()
    try:
        entry(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    return code, capsys.readouterr().err


def refused(argv, message, capsys, entry=main) -> str:
    """The call exits with status 2 and one message holding ``message``: no traceback, no page of text."""
    code, err = cli(argv, capsys, entry)
    assert code == 2, err
    assert message in err, err
    lines = [line for line in err.splitlines() if not line.startswith("(all flags:")]
    assert "Traceback" not in err and len(lines) == 1 and len(lines[0]) < 700, err
    return err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    main([*TINY, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """The tiny run stopped after 3 of its 4 steps (inside epoch 1)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    main([*TINY, "--out", str(out), "--max-steps", "3"])
    return out


def copy_run(source: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


HARNESS = textwrap.dedent(
    """
    import os, signal, sys, time
    mode = os.environ["OKD_TEST_MODE"]
    from okdfast.run import step as step_module
    real_call, steps = step_module.TrainStep.__call__, {"n": 0}

    def call(self, *args):
        out = real_call(self, *args)
        steps["n"] += 1
        if mode.startswith("killpg@") and steps["n"] == int(mode[7:]):  # as timeout, SLURM and docker stop do
            os.killpg(os.getpgid(0), signal.SIGTERM)
        if mode == "hold" and steps["n"] == 1:  # hold the run folder (and its lock) until killed
            print("holding", flush=True)
            time.sleep(300)
        return out

    step_module.TrainStep.__call__ = call
    from okdfast.train import main
    main(sys.argv[1:])
    """
)


def harness(argv: list[str], mode: str, **options) -> subprocess.Popen:
    """okdfast.train in a subprocess of its own process group (a signal to the group misses pytest)."""
    env = dict(os.environ, OKD_TEST_MODE=mode, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, "-c", HARNESS, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **options)  # fmt: skip


class _Payload:
    """Runs a command when unpickled (the classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cifar10_pickles(folder: Path, payload: object | None = None, images: int = 4) -> Path:
    """A cifar-10-batches-py folder laid out as the official one (protocol-2 dicts with bytes keys), with ``payload``
    in every batch when given."""
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        batch = {b"batch_label": b"training batch", b"labels": [int(v) for v in rng.integers(0, 10, images)],
                 b"data": rng.integers(0, 256, (images, 3072), dtype=np.uint8),
                 b"filenames": [b"x.png"] * images}  # fmt: skip
        if payload is not None:
            batch[b"data"] = payload
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder.parent


# ---------------------------------------------------------------------------------------------------------------
# escape: nothing in a data file runs, and no name or link writes outside the run folder
# ---------------------------------------------------------------------------------------------------------------
CODE_REFUSED = "it is refused because loading it could run code"


def test_escape_cifar_pickle_with_a_payload_as_data_dir(capsys, tmp_path):
    marker = tmp_path / "pwned"
    data = cifar10_pickles(tmp_path / "data", _Payload(marker))
    out = tmp_path / "run"
    err = refused(["--dataset", "cifar10", "--data-dir", str(data), "--out", str(out)], CODE_REFUSED, capsys)
    assert "posix.system" in err and not marker.exists() and not out.exists()


def test_escape_cifar_pickle_with_a_payload_found_in_dot_data(capsys, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    cifar10_pickles(tmp_path / "data", _Payload(marker))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OKDFAST_DATA", raising=False)
    refused(["--dataset", "cifar10", "--out", str(tmp_path / "run")], CODE_REFUSED, capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_escape_cifar_pickle_with_a_payload_through_evaluate(reference_run, capsys, tmp_path):
    """A checkpoint that passes weights_only, whose config names a folder of crafted pickles."""
    marker = tmp_path / "pwned"
    data = cifar10_pickles(tmp_path / "data", _Payload(marker))
    payload = safe_load(reference_run / "last.pt")
    payload["config"] |= {"dataset": "cifar10", "data_dir": str(data), "subset": None}
    atomic_save(payload, tmp_path / "crafted.pt")
    refused([str(tmp_path / "crafted.pt")], CODE_REFUSED, capsys, entry=evaluate_main)
    assert not marker.exists()


def test_escape_the_official_pickle_layout_still_reads(tmp_path):
    from okdfast.data import load_dataset

    splits = load_dataset("cifar10", cifar10_pickles(tmp_path / "data"))
    assert (len(splits.train), len(splits.test)) == (20, 4) and splits.train.images.dtype == np.uint8


@pytest.mark.parametrize(
    ("batch", "message"),
    [({b"data": np.array([object()], dtype=object), b"labels": [0]}, "which the official CIFAR files never hold"),
     ([1, 2, 3], "is a pickled list, not the dict of a CIFAR batch")],
    ids=["object array", "a list"],
)  # fmt: skip
def test_escape_cifar_pickle_of_other_values(batch, message, tmp_path):
    from okdfast.data.cifar import _unpickle

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises((ValueError, pickle.UnpicklingError), match=message):
        _unpickle(path)


TABLES = """
schedules:
  short: {description: one epoch, train: {epochs: 1}}
datasets:
  synthetic: {train_images: 5000, test_images: 1000, num_classes: 10}
variants:
  VARIANT: {method: one, train: {}}
tables:
  TABLE:
    title: escapes
    dataset: synthetic
    methods: [VARIANT]
    archs: [resnet8]
    default_schedule: short
    paper: {}
"""


@pytest.mark.parametrize(
    ("table", "variant", "flag", "message"),
    [("t", "../../escaped_variant", [], "method '../../escaped_variant': not usable in a file name"),
     ("../../../escaped_table", "one-variant", [], "table '../../../escaped_table': not usable in a file name"),
     ("t", "/tmp/absolute_variant", ["--out", "OUT"], "method '/tmp/absolute_variant': not usable in a file name")],
    ids=["variant ..", "table ..", "absolute variant"],
)  # fmt: skip
def test_escape_reproduce_names_that_leave_out(table, variant, flag, message, capsys, tmp_path, monkeypatch):
    from okdfast.reproduce.cli import main as reproduce_main

    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    data_file = tmp_path / "tables.yaml"
    data_file.write_text(TABLES.replace("TABLE", json.dumps(table)).replace("VARIANT", json.dumps(variant)))
    flags = [str(work / "out") if f == "OUT" else f for f in flag]
    argv = ["--data-file", str(data_file), "--table", table, "--seeds", "1", "--dry-run", "--probe", "none", *flags]
    refused(argv, message, capsys, entry=reproduce_main)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c", "tables.yaml"]  # nothing written


def test_escape_symlinked_train_log_is_refused_on_resume(stopped_run, capsys, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's own file\n")
    (run_dir / "train.log").unlink()
    (run_dir / "train.log").symlink_to(outside)
    refused(["--out", str(run_dir), "--resume", "auto"], "train.log is a symbolic link", capsys)
    assert outside.read_text() == "the user's own file\n"


def test_escape_appending_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("kept\n")
    (tmp_path / "train.log").symlink_to(outside)
    with pytest.raises(atomic_files.RunFolderWriteError, match="symbolic link"):
        atomic_files.append_text(tmp_path / "train.log", "a line\n")
    assert outside.read_text() == "kept\n"


@pytest.mark.parametrize("out", ["/", "HOME"])
def test_escape_out_of_a_folder_of_other_files(out, capsys, tmp_path):
    """--out / (and any folder of the user's own files): refused, nothing written there."""
    if out == "HOME":
        out = tmp_path / "mine"
        out.mkdir()
        for name in ("metrics.csv", "summary.json", "notes.txt"):  # names okdfast writes, beside one it does not
            (out / name).write_text(f"the user's {name}\n")
    before = sorted(os.listdir(out))
    refused([*TINY, "--out", str(out)], "is not empty and not an okdfast run folder", capsys)
    assert sorted(os.listdir(out)) == before and LOCK not in before
    if out != "/":
        assert (out / "metrics.csv").read_text() == "the user's metrics.csv\n"


def test_escape_an_empty_folder_and_out_empty_string(capsys, tmp_path):
    refused([*TINY, "--out", ""], "--out '': an empty path", capsys, entry=parse_config)
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = run(TrainConfig(**{**parse_config(TINY)[0].to_dict(), "out": str(empty), "epochs": 1}))
    assert summary["finished"] and (empty / LOCK).is_file()


# ---------------------------------------------------------------------------------------------------------------
# folder: one training process per run folder
# ---------------------------------------------------------------------------------------------------------------
def hold_lock(folder: Path, pid: int = 424242) -> int:
    """Lock ``folder`` as a training process would (another open file description: flock conflicts with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"pid {pid} on testhost since 2026-01-01T00:00:00+00:00\n".encode())
    return fd


def test_folder_a_held_lock_refuses_a_new_run_and_a_resume(stopped_run, capsys, tmp_path):
    fresh = tmp_path / "fresh"
    fd = hold_lock(fresh)
    try:
        err = refused([*TINY, "--out", str(fresh)], "is in use: process 424242 on testhost", capsys)
        assert "kill 424242" in err and sorted(os.listdir(fresh)) == [LOCK]
        resumed = copy_run(stopped_run, tmp_path, "resumed")
        fd2 = hold_lock(resumed, 777)
        try:
            refused(["--out", str(resumed), "--resume", "auto"], "process 777", capsys)
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
    summary = run(TrainConfig(**{**parse_config(TINY)[0].to_dict(), "out": str(resumed), "resume": "auto"}))
    assert summary["finished"]  # free once the holder let go


def test_folder_two_starts_at_once_the_second_is_refused_when_it_locks(tmp_path):
    """Both starts plan a new run in a folder that does not exist yet; the one that locks second is refused (it
    would write the same files), and so is one that locks after the first has finished (the folder changed under
    it). The first start is another process here (hold_lock): within one process a later run takes the lock over."""
    config = TrainConfig(**{**parse_config(TINY)[0].to_dict(), "out": str(tmp_path / "run")})
    second, third = plan_start(config), plan_start(config)
    fd = hold_lock(tmp_path / "run", 31337)  # the first start, which locked first
    try:
        with pytest.raises(RunFolderError, match="is in use: process 31337 on testhost"):
            second.folder.lock()
    finally:
        os.close(fd)
    (tmp_path / "run" / "config.yaml").write_text("{}\n")  # what the first start's run wrote before it ended
    with pytest.raises(RunFolderError, match="changed while this process was starting"):
        third.folder.lock()
    fresh = plan_start(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "other")}))
    (tmp_path / "other").mkdir()
    fresh.folder.lock()
    assert (tmp_path / "other" / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    fresh.folder.release()


def test_folder_the_lock_goes_with_a_process_killed_with_9(capsys, tmp_path):
    """A trainer with loader workers, killed with SIGKILL while it trains: the lock is free at once (its workers,
    which live on for a few seconds, do not hold it), and while it lived the refusal named its pid."""
    run_dir = tmp_path / "run"
    argv = [*TINY, "--subset", "40", "--workers", "2", "--loader", "torch", "--out", str(run_dir)]
    proc = harness(argv, "hold")
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] not in ("holding\n", "") and len(lines) < 20:  # the log's header first, then the harness
            lines.append(proc.stdout.readline())
        assert lines[-1] == "holding\n", lines
        err = refused(["--out", str(run_dir), "--resume", "auto"], f"process {proc.pid} on", capsys)
        assert f"kill {proc.pid}" in err
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    folder = RunFolder(run_dir)
    folder.check_not_in_use()
    folder.lock()  # at once: no stale lock
    folder.release()
    os.killpg(proc.pid, signal.SIGKILL)  # the orphaned workers


# ---------------------------------------------------------------------------------------------------------------
# data: the run's data is checked whole on resume; files that used to crash are one line
# ---------------------------------------------------------------------------------------------------------------
def _npz(path: Path, train: int = 130, test: int = 26, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, train),
        "x_test": rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, test),
    } | overrides
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_data_one_changed_pixel_is_refused_on_resume(capsys, tmp_path):
    """130 images: the sampled digest of earlier checkpoints reads every 2nd image; the full sha256 reads all."""
    data = _npz(tmp_path / "data.npz")
    run_dir = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data-dir", str(data), "--arch", "resnet8", "--method", "one", "--batch-size",
            "65", "--epochs", "1", "--workers", "0", "--progress", "off", "--out", str(run_dir)]  # fmt: skip
    main([*argv, "--max-steps", "1"])
    with np.load(data) as z:
        arrays = dict(z)
    arrays["x_train"][1, 0, 0, 0] ^= 1  # an image the sampled digest skips
    np.savez(data, **arrays)
    err = refused(["--out", str(run_dir), "--resume", "auto"], "the data set read now is not the one", capsys)
    assert "sha256" in err and "digest" not in err


def test_data_an_earlier_checkpoint_is_checked_on_its_sampled_digest(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    payload = safe_load(run_dir / "last.pt")
    del payload["data"]["sha256"]
    atomic_save(payload, run_dir / "last.pt")
    assert run(TrainConfig(**{**parse_config(TINY)[0].to_dict(), "out": str(run_dir), "resume": "auto"}))["finished"]


def _jpeg_npz(path: Path, *, bomb: bool = False, float_offsets: bool = False) -> Path:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buffer, "JPEG")
    good = bytearray(buffer.getvalue())
    first = bytearray(good)
    if bomb:  # the frame header claims 30000 x 30000 pixels
        at = first.find(b"\xff\xc0")
        first[at + 5 : at + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    blob = np.frombuffer(bytes(first) + bytes(good) * 2, np.uint8)
    offsets = np.array([0, len(first), len(first) + len(good), len(first) + 2 * len(good)])
    test = np.frombuffer(bytes(good), np.uint8)
    np.savez(path, jpeg_train=blob, offsets_train=offsets.astype(float) if float_offsets else offsets,
             y_train=np.array([0, 1, 2]), jpeg_test=test, offsets_test=np.array([0, len(good)]),
             y_test=np.array([3]))  # fmt: skip
    return path


DATA_FILES = {
    "0 train images": (lambda p: _npz(p, train=0), "holds 0 training and 26 test images"),
    "0 test images": (lambda p: _npz(p, test=0), "holds 130 training and 0 test images"),
    "1 training image": (lambda p: _npz(p, train=1), "a run needs at least 2 training images (BatchNorm"),
    "a .npy renamed .npz": (lambda p: np.save(open(p, "wb"), np.zeros((3, 32, 32, 3), np.uint8)), "is one .npy array"),
    "a JPEG of 30000x30000": (lambda p: _jpeg_npz(p, bomb=True), "image 0 cannot be read as a 32x32 JPEG"),
    "float offsets": (lambda p: _jpeg_npz(p, float_offsets=True), "offsets must be integers"),
}


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_data_files_that_crashed_are_one_line(case, capsys, tmp_path):
    make, message = DATA_FILES[case]
    data = tmp_path / "data.npz"
    make(data)
    out = tmp_path / "run"
    refused(["--dataset", "cifar10", "--data-dir", str(data), "--workers", "0", "--out", str(out)], message, capsys)
    assert not out.exists()


def test_data_a_good_jpeg_npz_still_reads(tmp_path):
    from okdfast.data.cifar import read_npz

    splits = read_npz(_jpeg_npz(tmp_path / "data.npz"), 10)
    assert splits["train"].images.shape == (3, 32, 32, 3) and len(splits["test"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# ckpt: a checkpoint's state is validated before anything uses it
# ---------------------------------------------------------------------------------------------------------------
CKPT_STATES = {
    "epoch 99 of 2": (lambda p: p["state"].update(epoch=99), "its state says epoch 99, outside the run's 0..2 epochs"),
    "epoch as text": (lambda p: p["state"].update(epoch="1"), "its state 'epoch' is the str '1', not an integer"),
    "negative step": (lambda p: p["state"].update(step_in_epoch=-3), "its state says step -3 of epoch 1"),
    "best epoch ahead": (lambda p: p["state"].update(best_epoch=5), "its best epoch 5 is not one of the 1 epochs"),
    "unknown state key": (lambda p: p["state"].update(owner="me"), "its state has keys okdfast does not write"),
    "history as text": (lambda p: p.update(history="abc"), "its metrics history is the str 'abc', not a list"),
    "history of 3 epochs": (
        lambda p: p.update(history=[{"epoch": e} for e in range(3)]),
        "its metrics history has rows of epochs [0, 1, 2], not of the 1 epochs done",
    ),
    "history of tensors": (
        lambda p: p.update(history=[{"epoch": 0, "acc": torch.zeros(2)}]),
        "its metrics history holds values that are not plain",
    ),
    "partial sums as text": (lambda p: p["state"].update(partial_sums="x"), "its partial-epoch sums are the str"),
}


@pytest.mark.parametrize("case", list(CKPT_STATES))
def test_ckpt_a_hand_edited_state_is_refused(case, stopped_run, capsys, tmp_path):
    edit, message = CKPT_STATES[case]
    run_dir = copy_run(stopped_run, tmp_path)
    payload = safe_load(run_dir / "last.pt")
    edit(payload)
    atomic_save(payload, run_dir / "last.pt")
    before = (run_dir / "metrics.jsonl").read_bytes()
    refused(["--out", str(run_dir), "--resume", "auto"], message, capsys)
    assert (run_dir / "metrics.jsonl").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# signal: SIGTERM to the whole process group, loader workers included
# ---------------------------------------------------------------------------------------------------------------
def test_signal_sigterm_to_the_process_group_with_workers(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--subset", "40", "--workers", "2", "--loader", "torch", "--out", str(run_dir)]
    proc = harness(argv, "killpg@2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    assert stdout.count(f"stopped by signal {signal.SIGTERM}") == 1, stdout
    assert safe_load(run_dir / "last.pt")["state"]["global_step"] == 2
    config = TrainConfig(**{**parse_config(argv)[0].to_dict(), "resume": "auto", "workers": 0})
    assert run(config)["finished"]  # the folder it left resumes


# ---------------------------------------------------------------------------------------------------------------
# oneline: what used to end in a traceback is one line, exit 2, before any work, with no run folder left
# ---------------------------------------------------------------------------------------------------------------
PARSE_CASES = [
    (["--seed", str(2**63)], "--seed 9223372036854775808: must be below 2^63"),
    (["--seed", "9" * 40], "must be below 2^63"),
    (["--data-seed", str(2**64)], "--data-seed 18446744073709551616: must be below 2^63"),
    (["--temperature", "1e300"], "--temperature 1e+300: must be a number in"),
    (["--temperature", "1e-300"], "--temperature 1e-300: must be a number in"),
    (["--out", ""], "--out '': an empty path"),
    (["--data-dir", ""], "--data-dir '': an empty path"),
    (["--seed", "1" * 5000], "invalid int value"),
]


@pytest.mark.parametrize(("argv", "message"), PARSE_CASES, ids=[" ".join(a)[:30] for a, _ in PARSE_CASES])
def test_oneline_values_refused_when_parsed(argv, message, capsys, tmp_path):
    refused([*TINY, *argv], message, capsys, entry=parse_config)


def test_oneline_the_largest_seed_trains(tmp_path):
    config = TrainConfig(**{**parse_config(TINY)[0].to_dict(), "out": str(tmp_path / "run"), "epochs": 1,
                            "seed": 2**63 - 1, "data_seed": 2**63 - 1})  # fmt: skip
    assert run(config)["finished"]


def test_oneline_fused_loss_on_where_the_kernels_cannot_run(capsys, tmp_path):
    out = tmp_path / "run"
    refused([*TINY, "--fused-loss", "on", "--out", str(out)], "--fused-loss on: the Triton kernels cannot run", capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [({"WORLD_SIZE": "2"}, "$RANK is not set"), ({"WORLD_SIZE": "two"}, "$WORLD_SIZE is 'two'"),
     ({"WORLD_SIZE": "2", "RANK": "5"}, "$RANK is '5'")],
    ids=["no RANK", "WORLD_SIZE=two", "RANK >= WORLD_SIZE"],
)  # fmt: skip
def test_oneline_torchrun_variables_set_by_hand(env, message, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    refused([*TINY, "--out", str(out)], message, capsys)
    assert not out.exists()


def test_oneline_read_only_out(capsys, tmp_path, monkeypatch):
    """A folder that cannot be written (as root a chmod does not stop writes: the OS's EROFS is injected)."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    refused([*TINY, "--out", str(out)], f"could not write {out / LOCK}: Read-only file system", capsys)


def test_oneline_out_of_inodes_in_mkstemp(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_mkstemp = tempfile.mkstemp

    def no_inodes(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(out)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", no_inodes)
    refused([*TINY, "--out", str(out)], f"could not write {out / 'config.yaml'}: No space left on device", capsys)
    assert not atomic_files.orphaned_temps(out)


def test_oneline_plot_of_a_cut_summary(reference_run, capsys, tmp_path):
    from okdfast.plot import main as plot_main

    run_dir = copy_run(reference_run, tmp_path)
    text = (run_dir / "summary.json").read_text()
    (run_dir / "summary.json").write_text(text[: len(text) // 2])
    refused([str(run_dir)], f"{run_dir / 'summary.json'}: cannot be read as JSON", capsys, entry=plot_main)


@pytest.mark.parametrize(
    ("text", "message"),
    [("tables: [\n", "not valid YAML (line 2"), ("- 1\n- 2\n", "got a list"),
     ("tables: !!python/object/apply:os.system ['touch PWNED']\n", "!!python/object/apply:os.system is refused"),
     ("schedules: {}\ntables: 3\n", "no 'tables' mapping"), ("schedules: {}\ntables: {t: 5}\n", "not laid out as")],
    ids=["invalid YAML", "a list", "a python tag", "tables not a mapping", "a table not a mapping"],
)  # fmt: skip
def test_oneline_reproduce_data_files(text, message, capsys, tmp_path, monkeypatch):
    from okdfast.reproduce.cli import main as reproduce_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tables.yaml").write_text(text)
    refused(["--data-file", str(tmp_path / "tables.yaml"), "--list-tables"], message, capsys, entry=reproduce_main)
    assert not (tmp_path / "PWNED").exists()


def test_oneline_reproduce_names_a_cut_summary(capsys, tmp_path):
    from okdfast.reproduce.cli import main as reproduce_main
    from okdfast.reproduce.plan import build_plan
    from okdfast.reproduce.tables import load_catalog

    catalog = load_catalog()
    table = catalog.table("synthetic-smoke")
    runs = build_plan(catalog, table, catalog.schedule("short"), seeds=[0], out=tmp_path)
    runs[0].run_dir.mkdir()
    (runs[0].run_dir / "config.yaml").write_text("{}\n")
    (runs[0].run_dir / "summary.json").write_text('{"finished": tr')
    argv = ["--table", "synthetic-smoke", "--schedule", "short", "--seeds", "1", "--out", str(tmp_path), "--dry-run"]
    refused(argv, f"{runs[0].run_dir / 'summary.json'}: cannot be read as JSON", capsys, entry=reproduce_main)


# ---------------------------------------------------------------------------------------------------------------
# yaml: what a config file may hold, and how a surprise is said
# ---------------------------------------------------------------------------------------------------------------
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi")
) + "lr: *i\n"  # fmt: skip

YAML_CASES = [
    (LAUGHS, "its aliases expand to more than 100,000 values"),
    ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
    ("milestones: &m [0.5, *m]\n", "an alias refers to the value that holds it"),
    ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "key 'lr' appears twice (lines 1 and 3): keep one"),
    ("batch-size: 10\nbatch_size: 20\n", "sets batch_size twice (as batch-size and batch_size): keep one"),
    ("lr: 1e-3\n", "--lr 1e-3: must be a number (YAML 1.1 reads 1e-3 as a string, not a number: write 1.0e-3)"),
    ("weight_decay: 5E-4\n", "write 5.0E-4"),
    ("nan_check_every: 1e3\n", "--nan-check-every 1e3: must be an integer (YAML 1.1 reads 1e3 as a string, not a "
     "number: write 1000)"),
    ("epochs: 010\n", "YAML 1.1 reads a number with a leading 0 as octal (010 is 8): write 10"),
    ("epochs: 1:30\n", "YAML 1.1 reads 1:30 as the base-60 number 90"),
    ("epochs: 1_000\n", "YAML 1.1 reads 1_000 as 1000 and YAML 1.2 as a string: write 1000"),
    ("temprature: 4\nepoch: 3\n", "unknown keys ['temprature', 'epoch'] (temprature: did you mean temperature?; "
     "epoch: did you mean epochs?)"),
    ("lr: !!python/object/apply:os.system ['touch PWNED']\n", "!!python/object/apply:os.system is refused"),
    ("seed: " + "1" * 5000 + "\n", "a value cannot be read"),
    ("loader: " + "x" * 10000 + "\n", "more characters"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), YAML_CASES, ids=lambda x: x.strip()[:30] if isinstance(x, str) else "")
def test_yaml_refused_in_one_line_quickly(text, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    began = time.perf_counter()
    err = refused([*TINY, "--config", str(path)], message, capsys, entry=parse_config)
    assert time.perf_counter() - began < 5.0 and len(err) < 700  # no expansion, no value printed whole
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [(os.urandom(64) + b"\x00", "is not text (it holds NUL bytes)"),
     ("lr: 0.1  # café\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 14"),
     ("lr: 0.1\n".encode("utf-16"), "is UTF-16 text")],
    ids=["random bytes", "Latin-1", "UTF-16"],
)  # fmt: skip
def test_yaml_not_utf8_text(data, message, capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    refused([*TINY, "--config", str(path)], f"--config {path}: {message}", capsys, entry=parse_config)


def test_yaml_what_reads_as_written(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("\ufefflr: 1.0e-3\nepochs: 10\nffm: off\nout: '010'\ndata_dir: 1e5\n".encode())
    assert load_yaml(path) == {"lr": 0.001, "epochs": 10, "ffm": "off", "out": "010", "data_dir": "1e5"}


def test_yaml_a_runs_own_config_starts_a_new_run_with_its_recipe(reference_run, tmp_path):
    stored = yaml.safe_load((reference_run / "config.yaml").read_text())
    config, args = parse_config(["--config", str(reference_run / "config.yaml"), "--out", str(tmp_path / "new")])
    assert config.out == str(tmp_path / "new") and config.resume is None and config.max_steps is None
    for name in ("method", "arch", "dataset", "subset", "epochs", "lr", "seed", "branches", "milestones"):
        assert getattr(config, name) == stored[name], name
    assert not {"data_file", "num_classes", "data_source"} & args.explicit


def test_yaml_a_stored_config_with_an_alias_bomb_is_refused(stopped_run, capsys, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    (run_dir / "config.yaml").write_text(LAUGHS)
    refused(["--out", str(run_dir), "--resume", "auto"], "config.yaml (line", capsys)


# ---------------------------------------------------------------------------------------------------------------
# cli: flags that do nothing, --help, the program's name
# ---------------------------------------------------------------------------------------------------------------
def test_cli_flags_that_do_nothing_for_the_method_are_warned(capsys):
    capsys.readouterr()
    parse_config(["--method", "one", "--cd-weight", "5", "--ffm", "off", "--target-ce", "3"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: --cd-weight, --ffm, --target-ce do nothing for --method one" in err
    parse_config(["--method", "baseline", "--temperature", "4"])
    assert "--temperature does nothing for --method baseline" in capsys.readouterr().err
    parse_config(["--method", "mde", "--cd-weight", "5", "--temperature", "4"])
    assert capsys.readouterr().err == ""


def test_cli_only_mde_reads_the_mde_fields():
    """The table ignored_flags reads (okdfast.config.MDE_FIELDS) agrees with the methods' code."""
    for path in (REPO / "okdfast" / "methods").glob("*.py"):
        text = path.read_text()
        for name in MDE_FIELDS:
            if path.name not in ("mde.py", "base.py"):
                assert f"config.{name}" not in text, (path.name, name)


def test_cli_unknown_flag_suggests_the_nearest(capsys):
    refused(["--temprature", "4"], "--temprature: did you mean --temperature?", capsys, entry=parse_config)


def test_cli_help_in_groups_with_the_programs_name(monkeypatch):
    names = [name for group in HELP_GROUPS.values() for name in group]
    assert sorted(names) == sorted(f.name for f in __import__("dataclasses").fields(TrainConfig))  # each once
    text = build_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in HELP_GROUPS]
    assert positions == sorted(positions) and "\nother:\n" not in text
    assert text.index("--lr-schedule") > text.index("\noptimisation:\n") > text.index("--ffm-targets")
    assert build_parser().prog == "python -m okdfast.train"
    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).parent / "okdfast-train"), "--help"])
    assert build_parser().prog == "okdfast-train" and build_parser().format_usage().startswith("usage: okdfast-train")


# ---------------------------------------------------------------------------------------------------------------
# records: what environment.json says about the machine
# ---------------------------------------------------------------------------------------------------------------
def test_records_cpu_model_and_capability(reference_run):
    environment = json.loads((reference_run / "environment.json").read_text())
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["cpu_model"] and "cpu_model" in json.loads((reference_run / "sessions.jsonl").read_text())[
        "environment"
    ]  # fmt: skip
    assert "Bit-exact reproduction needs the same instruction set" in (REPO / "README.md").read_text()


def test_user_errors_stay_user_errors():
    assert issubclass(RunFolderError, UserError) and issubclass(atomic_files.RunFolderWriteError, UserError)
