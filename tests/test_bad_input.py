"""The bad-input battery: what a new user and a hostile tester do to okdfast, and the exact outcome of each.

Every case asserts one of two outcomes: the clear message (what, where, the fix; exit status 2 and no traceback
for the CLIs; nothing half-written, no run folder from a failed start), or a result equal to a reference (the
weights of an uninterrupted run, the loss reference on contiguous copies). Classes, in file order:

    cli        flag values of the wrong type or range                        (main(argv), parse only)
    yaml       the same through --config                                     (parse_config)
    data       missing, damaged and foreign data files                       (main(argv), fails before training)
    ckpt       empty / random / folder / truncated / foreign / malicious / NaN checkpoints (train and evaluate)
    resume     a resumed run keeps its config; what is refused, what may change, what a crash left behind
    signal     SIGINT / SIGTERM at a given step, twice in a row              (subprocesses)
    disk       a full disk (a fake ENOSPC at every kind of write; a real RLIMIT_FSIZE limit in a subprocess)
    kill       kill -9 during every file write, then --resume auto           (subprocesses; all points: -m slow)
    tail       batch sizes and data sizes that leave a batch of one image; lr milestones for every epoch count
    usability  --amp on a CPU without bf16, progress lines without a terminal, --help, the order of loss terms
    ops        the loss API's arguments: strided / offset / expanded tensors, NaN/inf, empty batch, all rows
               ignored, wrong dtype / device / shape (CPU path here; the Triton kernels in the interpreter in
               ``test_ops_cases_in_the_triton_interpreter``)

Training runs are tiny (synthetic, resnet8, 20 images, batch 10, 2 epochs, deterministic, one thread).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from okdfast.config import TrainConfig, build_parser, parse_config
from okdfast.errors import UserError
from okdfast.evaluate import main as evaluate_main
from okdfast.functional import classifier_diversity_loss, online_kd_loss
from okdfast.ops.online_kd_options import OnlineKDOptions
from okdfast.ops.reference import classifier_diversity_reference, online_kd_reference
from okdfast.run.checkpoint_file import atomic_save, safe_load
from okdfast.run.epoch import merge_sums
from okdfast.train import main, run
from okdfast.utils import atomic_files
from okdfast.utils.metrics_log import read_rows

REPO = Path(__file__).resolve().parents[1]
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("OKDFAST_FORCE_TRITON") == "1"

TINY = ["--dataset", "synthetic", "--arch", "resnet8", "--method", "one", "--subset", "20", "--batch-size", "10",
        "--epochs", "2", "--eval-batch-size", "100", "--workers", "0", "--progress", "off", "--deterministic",
        "--seed", "1", "--device", "cpu"]  # fmt: skip
RUN_FILES = ("config.yaml", "environment.json", "sessions.jsonl", "train.log", "metrics.jsonl", "metrics.csv",
             "last.pt", "best.pt", "summary.json")  # fmt: skip

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


def assert_user_error(argv, message, capsys, entry=main) -> str:
    code, err = cli(argv, capsys, entry)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") <= 14, err  # one message (a data set's lists its paths)
    return err


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safe_load(Path(run_dir) / "last.pt")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def snapshot(folder: Path) -> dict[str, str]:
    """File name -> sha1 of every file in a folder (to assert that a refusal changed nothing)."""
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def assert_consistent(run_dir: Path, epochs: int = 2) -> None:
    """A finished run folder as it must be after any crash and resume: one row per epoch, a best that is the best
    of all rows, best.pt being the best epoch's, no temporary files, every file readable."""
    rows = read_rows(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(epochs)) and not any(r["partial"] for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == epochs
    best = max(rows, key=lambda r: r["acc_branch_mean"])  # the first of equal values, as the loop keeps it
    assert summary["best"]["acc_branch_mean"]["value"] == best["acc_branch_mean"]
    assert safe_load(run_dir / "best.pt")["state"]["best_epoch"] == best["epoch"]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert (
        header[:4] == ["epoch", "lr", "kd_weight", "partial"]
        and len((run_dir / "metrics.csv").read_text().splitlines()) == epochs + 1
    )
    yaml.safe_load((run_dir / "config.yaml").read_text())
    json.loads((run_dir / "environment.json").read_text())
    assert not atomic_files.orphaned_temps(run_dir), list(run_dir.iterdir())


def assert_same_rows(run_dir: Path, reference: Path) -> None:
    """The metrics rows of the uninterrupted run: test metrics equal, the epoch's mean loss terms and their shares
    to float rounding (an epoch split over two processes adds its two parts' sums in another order), times aside."""
    rows, expected = read_rows(run_dir / "metrics.jsonl"), read_rows(reference / "metrics.jsonl")
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert list(row) == list(ref)  # the same columns in the same order
        for key, value in ref.items():
            if key.startswith(("train_", "share_")):  # a share is a ratio of the epoch's train_ sums
                assert row[key] == pytest.approx(value, rel=1e-6), key
            elif "sec" not in key:
                assert row[key] == value, key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The tiny run, uninterrupted: the weights every crash-and-resume case must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    main([*TINY, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """The tiny run stopped after 3 of its 4 steps (inside epoch 1), as a signal or --max-steps leaves it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    main([*TINY, "--out", str(out), "--max-steps", "3"])
    return out


def copy_run(source: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# cli: every flag value is checked for type and range before anything is built, and nothing is created
# ---------------------------------------------------------------------------------------------------------------
CLI_CASES = [
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--batch-size", "1"], "--batch-size 1: must be >= 2 (BatchNorm trains on batch statistics"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 2"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0: must be >= 1"),
    (["--label-smoothing", "2"], "--label-smoothing 2.0: must be in [0, 1]"),
    (["--label-smoothing", "-0.1"], "--label-smoothing -0.1: must be in [0, 1]"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--momentum", "1"], "--momentum 1.0: must be in [0, 1)"),
    (["--weight-decay", "-0.0001"], "--weight-decay -0.0001: must be >= 0"),
    (["--lr-gamma", "0"], "--lr-gamma 0.0: must be > 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be a number in [0.01, 100]"),
    (["--alpha", "-1"], "--alpha -1.0: must be >= 0"),
    (["--rampup-epochs", "-5"], "--rampup-epochs -5.0: must be >= 0"),
    (["--target-ce", "-1"], "--target-ce -1.0: must be >= 0"),
    (["--cd-weight", "-1"], "--cd-weight -1.0: must be >= 0"),
    (["--milestones", "0.75", "0.5"], "--milestones 0.75 0.5: must increase"),
    (["--milestones", "0"], "--milestones 0.0: each is a fraction of --epochs in (0, 1) or an epoch number >= 1"),
    (["--milestones", "1.5"], "--milestones 1.5: each is a fraction"),
    (["--subset", "4"], "--subset 4: must be >= 5"),
    (["--best-metric", "bogus"], "--best-metric bogus: best.pt keeps the epoch of the highest test accuracy"),
    (["--device", "gpu"], "--device gpu: use auto, cpu, cuda or cuda:N"),
    (["--amp", "fp8"], "--amp fp8: use off, bf16, fp16, auto"),
    (["--compile", "fast"], "--compile fast: use off, default, max-autotune, reduce-overhead"),
    (["--progress", "maybe"], "--progress maybe: use auto, on, off"),
    (["--loader", "nope"], "--loader nope: use auto, gpu, dali, ffcv, torch"),
    (["--ffm", "maybe"], "--ffm maybe: use on, off"),
    (["--cd-form", "l2"], "--cd-form l2: use nontarget_corr, frobenius, abscos, cos2"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--nan-check-every", "0"], "--nan-check-every 0: must be >= 1"),
    (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--data-seed", "-1"], "--data-seed -1: must be >= 0"),
    (["--log-every", "-1"], "--log-every -1.0: must be >= 0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--resume", " "], "--resume ' ': use auto"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_cli_bad_values_are_refused_before_anything_is_built(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert_user_error([*argv, "--out", str(out)], message, capsys, entry=lambda a: parse_config(a))
    assert not out.exists()


def test_cli_out_naming_a_file_is_refused(capsys, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    assert_user_error([*TINY, "--out", str(target)], f"--out {target}: is a file", capsys)
    assert target.read_text() == "not a folder"


def test_cli_best_metric_of_another_method_is_refused_before_the_first_epoch(capsys, tmp_path):
    out = tmp_path / "run"  # acc_leader is an okddip/mde head; `one` has acc_gate
    err = assert_user_error(
        [*TINY, "--best-metric", "acc_leader", "--out", str(out)], "--best-metric acc_leader:", capsys
    )
    assert "acc_gate" in err and not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: CUDA is not available on this machine; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
        (["--cuda-graphs"], "--cuda-graphs needs a CUDA device (this run is on cpu); drop the flag"),
    ],
)
def test_cli_device_settings_this_machine_cannot_run(flags, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert_user_error([*TINY, *flags, "--out", str(out)], message, capsys)
    assert not out.exists()


def test_cli_out_that_cannot_be_created(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"  # a folder inside a file: mkdir fails for root too
    assert_user_error([*TINY, "--out", str(out)], f"--out {out}: cannot be created", capsys)


def test_cli_a_diverged_run_stops_with_the_step_and_the_advice(capsys, tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--lr", "1e30", "--nan-check-every", "1", "--epochs", "1", "--out", str(out)]
    err = assert_user_error(argv, "non-finite loss at optimizer step 1 (terms: loss", capsys)
    assert "Try a lower --lr" in err and not (out / "last.pt").exists()  # nothing written after it


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(epochs="3"), "--epochs 3: must be an integer"),
        (dict(nesterov="no"), "--nesterov no: must be true or"),
        (dict(milestones=[0.5, float("nan")]), "--milestones 0.5 nan: must be a list of finite numbers"),
    ],  # fmt: skip
)
def test_cli_library_callers_config_is_checked_the_same(values, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run(TrainConfig(**values, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# yaml: the same checks for --config values, naming the file
# ---------------------------------------------------------------------------------------------------------------
YAML_CASES = [
    ("epochs: 1.5\n", "--epochs 1.5: must be an integer (got a float)"),
    ('nesterov: "no"\n', "--nesterov no: must be true or false (a string is not a boolean)"),
    ('channels_last: "off"\n', "--channels-last off: must be true or false"),
    ('lr: "0.1"\n', "--lr 0.1: must be a number"),
    ("batch_size: true\n", "--batch-size True: must be an integer"),
    ("subset: 1e3\n", "--subset 1e3: must be an integer"),
    ("milestones: 0.5\n", "--milestones 0.5: must be a list of finite numbers"),
    ("milestones: [0.5, x]\n", "--milestones 0.5 x: must be a list of finite numbers"),
    ("lr: .nan\n", "--lr nan: must be a finite number"),
    ("label-smoothing: 2\n", "--label-smoothing 2: must be in [0, 1]"),
    ("method: 3\n", "--method 3: must be a string (got a int)"),
    ("not_a_key: 1\n", "unknown keys ['not_a_key']"),
    ("- epochs\n- 3\n", "expected a mapping of config keys, got list"),
    ("lr: [0.1\n", "not valid YAML (line 2, column 1)"),
]


@pytest.mark.parametrize(("text", "message"), YAML_CASES, ids=[t.strip() for t, _ in YAML_CASES])
def test_yaml_bad_values_are_refused_with_the_file_named(text, message, capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    err = assert_user_error(["--config", str(path)], message, capsys, entry=lambda a: parse_config(a))
    assert str(path) in err


def test_yaml_missing_file(capsys, tmp_path):
    assert_user_error(["--config", str(tmp_path / "nope.yaml")], "cannot be read (No such file or directory)", capsys,
                      entry=lambda a: parse_config(a))  # fmt: skip


def test_yaml_words_and_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ffm: off\nprogress: off\namp: off\nlr: 1\nepochs: 7\n")  # YAML 1.1 reads off as false
    config, args = parse_config(["--config", str(path), "--epochs", "3"])
    assert (config.ffm, config.progress, config.amp, config.lr, config.epochs) == ("off", "off", "off", 1, 3)
    assert args.explicit == {"ffm", "progress", "amp", "lr", "epochs"}
    path.write_text("")  # an empty file: the defaults
    assert parse_config(["--config", str(path)])[0] == parse_config([])[0]


# ---------------------------------------------------------------------------------------------------------------
# data: missing and damaged files fail within seconds, with the path and the fix, and leave no run folder
# ---------------------------------------------------------------------------------------------------------------
def _npz(path: Path, **overrides) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 30),
        "x_test": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 10),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


DATA_CASES = {
    "missing folder": (None, "data set 'cifar10' not found."),
    "garbage npz": ("garbage", "its files could not be read"),
    "image shape": (dict(x_train=np.zeros((30, 28, 28, 3), np.uint8)), "expected images (N, 32, 32, 3)"),
    "float images": (
        dict(x_train=np.zeros((30, 32, 32, 3), np.float32)),
        "expected uint8 images (0..255), got float32",
    ),
    "no test split": (dict(x_test=None, y_test=None), "no test arrays; expected keys x_test, y_test"),
    "labels out of range": (dict(y_train=np.full(30, 12)), "labels: values must lie in [0, 10), got [12, 12]"),
    "pickle folder": ("pickle", "its files could not be read"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_problems_are_one_message(case, capsys, tmp_path):
    content, message = DATA_CASES[case]
    data = tmp_path / "data"
    if content is not None:
        data.mkdir()
        if content == "garbage":
            (data / "cifar10.npz").write_bytes(os.urandom(500))
        elif content == "pickle":
            folder = data / "cifar-10-batches-py"
            folder.mkdir()
            for name in ("data_batch_1", "test_batch"):
                (folder / name).write_bytes(b"\x80\x04not a pickle")
        else:
            _npz(data / "cifar10.npz", **content)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data-dir", str(data), "--out", str(out), "--workers", "0"]
    err = assert_user_error(argv, message, capsys)
    assert not out.exists(), "a failed start left a run folder"
    if content is not None:
        assert str(data) in err


def test_data_subset_larger_than_the_data(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--subset", "6000", "--out", str(out)]
    assert_user_error(argv, "--subset 6000: exceeds the 5000 training images of synthetic; use at most 5000", capsys)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# ckpt: every bad checkpoint is named for what it is, for --resume and for okdfast.evaluate alike
# ---------------------------------------------------------------------------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _bad_checkpoint(kind: str, tmp_path: Path, good: Path) -> tuple[Path, str]:
    path = tmp_path / "bad.pt"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty (0 bytes), not a checkpoint"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
        return path, "is not a PyTorch file (4096 bytes)"
    if kind == "folder":
        path = good.parent
        return path, f"is a folder, not a checkpoint file; it holds last.pt and best.pt: pass {path / 'last.pt'}"
    if kind == "missing":
        return tmp_path / "nope.pt", "does not exist (expected a last.pt or best.pt written by okdfast.train)"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "is truncated"
    if kind == "state dict":
        torch.save({"weight": torch.zeros(3)}, path)
        return path, "is a PyTorch file but not an okdfast checkpoint (it holds a dict with keys ['weight'])"
    if kind == "plain pickle":
        path.write_bytes(pickle.dumps({"model": 1}))
        return path, "is a plain pickle (not a torch.save zip archive)"
    if kind == "malicious":
        torch.save({"format": 2, "model": {}, "payload": _Exploit()}, path)
        return path, "it is refused because loading it could run code"
    if kind == "format":
        payload = safe_load(good)
        payload["format"] = 99
        torch.save(payload, path)
        return path, "has checkpoint format 99; this okdfast reads formats 1, 2"
    if kind == "nan weights":
        payload = safe_load(good)
        name = next(k for k, v in payload["model"].items() if v.is_floating_point())
        payload["model"][name] = payload["model"][name].clone().fill_(float("nan"))
        torch.save(payload, path)
        return path, f"the weights hold NaN or inf in 1 tensor(s) (first: {name})"
    if kind == "missing weight":
        payload = safe_load(good)
        payload["model"].pop(next(iter(payload["model"])))
        torch.save(payload, path)
        return path, "the weights do not fit the network its config builds"
    if kind == "old layout":
        payload = safe_load(good)
        payload["layout_version"] = 0
        torch.save(payload, path)
        return path, "written by layout 0 of method 'one'"
    raise AssertionError(kind)


CKPT_KINDS = ["empty", "random", "folder", "missing", "truncated", "state dict", "plain pickle", "malicious",
              "format", "nan weights", "missing weight", "old layout"]  # fmt: skip


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_ckpt_resume_refuses_bad_files(kind, reference_run, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, message = _bad_checkpoint(kind, tmp_path, reference_run / "last.pt")
    out = tmp_path / "run"
    err = assert_user_error([*TINY, "--out", str(out), "--resume", str(path)], message, capsys)
    assert f"--resume {path}" in err and "weights_only" not in err
    assert not out.exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_ckpt_evaluate_refuses_bad_files(kind, reference_run, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, message = _bad_checkpoint(kind, tmp_path, reference_run / "last.pt")
    err = assert_user_error([str(path), "--device", "cpu"], message, capsys, entry=evaluate_main)
    assert f"okdfast.evaluate {path}" in err and "--resume" not in err and "weights_only" not in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("flags", "difference"),
    [
        (["--method", "mde"], "--method mde (the run: one)"),
        (["--arch", "resnet20"], "--arch resnet20 (the run: resnet8)"),
        (["--branches", "4"], "--branches 4 (the run: 3)"),
        (["--dataset", "synthetic100"], "--dataset synthetic100 (the run: synthetic)"),
    ],
)
def test_ckpt_of_another_method_arch_k_dataset(flags, difference, reference_run, capsys, tmp_path):
    out = tmp_path / "new"
    argv = [*TINY, *flags, "--out", str(out), "--resume", str(reference_run / "last.pt")]
    err = assert_user_error(argv, difference, capsys)
    assert "A resumed run keeps its own config" in err and not out.exists()


def test_ckpt_of_another_run_than_the_folder(reference_run, capsys, tmp_path):
    other = tmp_path / "other"
    main([*TINY, "--subset", "30", "--epochs", "1", "--out", str(other)])
    before = snapshot(other)
    argv = ["--out", str(other), "--resume", str(reference_run / "last.pt")]
    assert_user_error(argv, "this checkpoint is of another run than the one in", capsys)
    assert snapshot(other) == before


def test_ckpt_written_by_another_version(reference_run, capsys, tmp_path):
    payload = safe_load(reference_run / "last.pt")
    payload["config"]["future_flag"] = 1
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    message = "the stored config has keys this okdfast does not know (future_flag): it was written by another"
    assert_user_error(["--out", str(tmp_path / "r"), "--resume", str(path)], message, capsys)
    assert_user_error([str(path)], message, capsys, entry=evaluate_main)


def test_ckpt_resume_on_other_data_is_refused(capsys, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    _npz(first / "cifar10.npz")
    _npz(second / "cifar10.npz", y_train=np.arange(30) % 10)  # the same sizes, other labels
    run_dir = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--arch", "resnet8", "--method", "one", "--batch-size", "10", "--epochs", "2",
            "--workers", "0", "--progress", "off", "--device", "cpu", "--out", str(run_dir)]  # fmt: skip
    main([*argv, "--data-dir", str(first), "--max-steps", "2"])
    before = snapshot(run_dir)
    message = "the data set read now is not the one the run was trained on (digest"
    assert_user_error(["--out", str(run_dir), "--resume", "auto", "--data-dir", str(second)], message, capsys)
    assert snapshot(run_dir) == before


def test_ckpt_evaluate_rebuilds_the_run_from_the_checkpoint(reference_run, capsys):
    metrics = evaluate_main([str(reference_run / "best.pt"), "--device", "cpu"])
    summary = json.loads((reference_run / "summary.json").read_text())
    best_epoch = summary["best"]["acc_branch_mean"]["epoch"]
    assert metrics["acc_branch_mean"] == read_rows(reference_run / "metrics.jsonl")[best_epoch]["acc_branch_mean"]
    assert_user_error([str(reference_run / "last.pt"), "--batch-size", "0"], "--batch-size 0: must be an integer >= 1",
                      capsys, entry=evaluate_main)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# resume: the run's own config; refusals change nothing; what a crash left behind is rebuilt
# ---------------------------------------------------------------------------------------------------------------
def test_resume_auto_with_no_flags_continues_the_runs_recipe(stopped_run, reference_run, tmp_path, capsys):
    run_dir = copy_run(stopped_run, tmp_path)
    config_before = (run_dir / "config.yaml").read_bytes()
    main(["--out", str(run_dir), "--resume", "auto"])  # the README's command: no --subset, no --epochs, no --method
    assert (run_dir / "config.yaml").read_bytes() == config_before  # never rewritten
    assert_same_weights(run_dir, reference_run)
    assert_consistent(run_dir)
    log = (run_dir / "train.log").read_text()
    assert log.count("20 train / 4 test") == 2 and "resumed from" in log  # the same data in both sessions
    sessions = read_rows(run_dir / "sessions.jsonl")
    assert [s["session"] for s in sessions] == [1, 2] and sessions[1]["resumed_from"]["step_in_epoch"] == 1
    assert sessions[1]["changed"] == {}


RESUME_REFUSED = [
    (["--lr", "0.05"], "--lr 0.05 (the run: 0.1)"),
    (["--temperature", "4"], "--temperature 4.0 (the run: 3.0)"),
    (["--epochs", "5"], "Extending a run to more epochs is not supported"),
    (["--subset", "40"], "--subset 40 (the run: 20)"),
    (["--seed", "2"], "--seed 2 (the run: 1)"),
    (["--no-nesterov"], "--nesterov False (the run: True)"),
    (["--label-smoothing", "0.1"], "--label-smoothing 0.1 (the run: 0.0)"),
    (["--amp", "bf16"], "--amp bf16 (the run: off)"),
    (["--best-metric", "acc_ensemble"], "--best-metric acc_ensemble (the run: acc_branch_mean)"),
    (["--milestones", "0.3"], "--milestones 0.3 (the run: 0.5 0.75)"),
]


@pytest.fixture(scope="module")
def refused_folder(stopped_run, tmp_path_factory) -> Path:
    return copy_run(stopped_run, tmp_path_factory.mktemp("refused"))


@pytest.mark.parametrize(("flags", "message"), RESUME_REFUSED, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_resume_refuses_flags_that_contradict_the_run(flags, message, refused_folder, capsys):
    before = snapshot(refused_folder)
    err = assert_user_error(["--out", str(refused_folder), "--resume", "auto", *flags], message, capsys)
    assert "drop these flags to continue it, or pass --out NEW" in err
    assert snapshot(refused_folder) == before  # nothing written, not even a log line


def test_resume_refuses_a_yaml_key_that_contradicts_the_run(refused_folder, capsys, tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("weight_decay: 0.001\n")
    before = snapshot(refused_folder)
    argv = ["--config", str(path), "--out", str(refused_folder), "--resume", "auto"]
    assert_user_error(argv, "--weight-decay 0.001 (the run: 0.0005)", capsys)
    assert snapshot(refused_folder) == before


def global_step(run: Path) -> int:
    return safe_load(run / "last.pt")["state"]["global_step"]


def other_format_steps_bound(before: dict[str, torch.Tensor], steps: int, batch: int, side: int = 32) -> float:
    """How far ``steps`` fp32 SGD steps of the tiny run may move the weights, relative to the largest change those
    steps made to a tensor, when they run in another memory format (NCHW instead of channels-last: other kernels,
    other blockings, other ISAs sum in other orders).

    A sum of n products taken in another order moves by at most gamma_n = n u sum|terms| (u = 2^-24; Higham,
    Accuracy and Stability, eq. 3.5). One step's gradient of a weight comes down a path of L weighted layers (the
    trunk, one branch, the gate), each doing at most 4 such sums (conv: forward, input and weight gradients; BN:
    mean and variance forward, two sums backward) of at most n_max = batch x side^2 terms (a first-stage weight
    gradient, or its BN statistics); to first order the relative errors add: 4 L n_max u per step, and the steps
    add. The largest change of a tensor stands for the size of its terms (an SGD update is lr (1 + momentum) times
    the gradient, plus the momentum and decay both runs share). Wrong batches, a lost momentum or another lr move a
    tensor by O(1) of its change, 10x or more above this bound."""
    on_path = [name for name in before if name.endswith(".weight") and ".branches." not in name]
    on_path += [name for name in before if name.startswith("net.branches.0.") and name.endswith(".weight")]
    return steps * 4 * len(on_path) * batch * side**2 * 2.0**-24


def test_resume_may_change_speed_settings_and_records_them(stopped_run, reference_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    main(["--out", str(run_dir), "--resume", "auto", "--workers", "1", "--no-channels-last"])
    assert_consistent(run_dir)
    changed = read_rows(run_dir / "sessions.jsonl")[-1]["changed"]
    assert changed == {"channels_last": {"run": True, "now": False}, "workers": {"run": 0, "now": 1}}
    assert "--workers 1 for this session (the run started with 0" in (run_dir / "train.log").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["workers"] == 0  # config.yaml: what it started with
    # Another memory format for the steps after the resume: equal to the float rounding of those steps only.
    before, after = weights(stopped_run), weights(run_dir)
    steps = global_step(reference_run) - global_step(stopped_run)
    bound = other_format_steps_bound(before, steps, batch=int(TINY[TINY.index("--batch-size") + 1]))
    assert steps == 1 and bound < 0.1  # the tiny run: one step, a bound that still tells rounding from a bug
    for name, value in weights(reference_run).items():
        if not value.is_floating_point():
            assert torch.equal(after[name], value), name  # BatchNorm's step counters
            continue
        change = (value - before[name]).abs().max().item()
        if name.endswith(("running_mean", "running_var")):  # 0.1 of a batch statistic the format rounded
            change += 0.1 * before[name].abs().max().item()
        # rtol: the ulps of the update's own last roundings (momentum buffer, then the weight)
        torch.testing.assert_close(after[name], value, rtol=4 * 2.0**-24, atol=bound * change, msg=name)


def test_resume_needs_resume_for_a_folder_that_holds_a_run(refused_folder, capsys):
    before = snapshot(refused_folder)
    assert_user_error([*TINY, "--out", str(refused_folder)], "already holds a run (its last.pt): pass --resume auto",
                      capsys)  # fmt: skip
    assert snapshot(refused_folder) == before


def test_resume_auto_before_the_first_checkpoint_restarts_with_the_folders_config(reference_run, tmp_path, capsys):
    run_dir = copy_run(reference_run, tmp_path)  # as a kill -9 in epoch 0 leaves it: config.yaml, no checkpoint
    for name in ("last.pt", "best.pt", "summary.json", "metrics.csv"):
        (run_dir / name).unlink()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0, "partial": false, "acc_br')  # cut by the kill
    main(["--out", str(run_dir), "--resume", "auto"])  # no flags: the folder's recipe, not the defaults
    assert_same_weights(run_dir, reference_run)
    assert_consistent(run_dir)


@pytest.mark.parametrize("damage", ["truncated last line", "deleted", "extra rows", "only the last row"])
def test_resume_rebuilds_the_metrics_a_crash_cut(damage, stopped_run, reference_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    jsonl = run_dir / "metrics.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    if damage == "truncated last line":
        jsonl.write_text("".join(lines[:-1]) + lines[-1][:25])
    elif damage == "deleted":
        jsonl.unlink()
    elif damage == "extra rows":
        jsonl.write_text("".join(lines) + lines[0].replace('"epoch": 0', '"epoch": 7'))
    else:
        jsonl.write_text(lines[-1])
    main(["--out", str(run_dir), "--resume", "auto"])
    assert_consistent(run_dir)
    assert_same_rows(run_dir, reference_run)


def test_resume_of_a_format_1_checkpoint_keeps_the_rows_of_its_epochs(stopped_run, reference_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path)
    payload = safe_load(run_dir / "last.pt")
    for key in ("history", "data"):  # what format 1 did not carry
        del payload[key]
    payload["format"] = 1
    atomic_save(payload, run_dir / "last.pt")
    main(["--out", str(run_dir), "--resume", "auto"])
    assert_same_rows(run_dir, reference_run)
    assert_consistent(run_dir)


def test_resume_removes_orphaned_temp_files(reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run_dir / ".metrics.csv.x1y2.tmp").write_text("epoch,lr\n")
    (run_dir / ".my_notes.txt.keep.tmp").write_text("not ours")  # not a file the run writes: kept
    main(["--out", str(run_dir), "--resume", "auto"])
    assert "removed 2 temporary file(s) of writes a kill cut short" in (run_dir / "train.log").read_text()
    assert (run_dir / ".my_notes.txt.keep.tmp").read_text() == "not ours"
    (run_dir / ".my_notes.txt.keep.tmp").unlink()
    assert_consistent(run_dir)


def test_resume_relinks_best_when_a_kill_fell_between_last_and_best(tmp_path):
    from okdfast.run.folder import RunFolder

    folder = RunFolder(tmp_path)
    folder.created = True
    folder.save_checkpoint({"state": {"epoch": 3, "step_in_epoch": 0, "best_epoch": 2}})  # best.pt not linked yet
    assert not folder.best.exists()
    assert folder.repair_best(folder.last, {"epoch": 3, "step_in_epoch": 0, "best_epoch": 2})
    assert os.path.samefile(folder.best, folder.last)
    assert not folder.repair_best(folder.last, {"epoch": 3, "step_in_epoch": 0, "best_epoch": 2})  # already right
    assert not folder.repair_best(folder.last, {"epoch": 4, "step_in_epoch": 0, "best_epoch": 2})  # best is older
    assert not folder.repair_best(folder.last, {"epoch": 3, "step_in_epoch": 5, "best_epoch": 2})  # mid-epoch


def test_resume_nan_advice_names_the_weights_not_the_lr(reference_run, tmp_path, monkeypatch):
    """A loss that is non-finite at the first step of a process points at its weights or data."""
    from okdfast.utils.nan_guard import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard(torch.device("cpu"), first_step=7)
    guard.record(7, {"loss": torch.tensor(float("nan")), "ce": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLossError, match="first step of this process") as error:
        guard.check()
    assert "Try a lower --lr" not in str(error.value) and "no --lr fixes" in str(error.value)
    guard = NonFiniteGuard(torch.device("cpu"), first_step=0)
    guard.record(0, {"loss": torch.tensor(1.0)})
    guard.record(5, {"loss": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteLossError, match="optimizer step 5 .terms: loss.*Try a lower --lr"):
        guard.check()


# ---------------------------------------------------------------------------------------------------------------
# subprocess harness: cut a write short and SIGKILL, or send signals at a given step
# ---------------------------------------------------------------------------------------------------------------
HARNESS = textwrap.dedent(
    """
    import os, signal, sys
    from okdfast.utils import atomic_files
    from okdfast.run import step as step_module
    mode = os.environ.get("OKD_TEST_MODE", "")
    if mode.startswith("kill:"):  # kill:NAME:N:how -- the N-th write of NAME, cut mid-write or before the rename
        _, name, nth, how = mode.split(":")
        seen = {"n": 0}
        real_write, real_replace = atomic_files._write_all, os.replace

        def write(handle, data, path):
            if path.name == name:
                seen["n"] += 1
                if seen["n"] == int(nth) and how == "mid":
                    handle.write(data[: len(data) // 2]); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)
            real_write(handle, data, path)

        class Os:
            def __getattr__(self, attr):
                return getattr(os, attr)

            def replace(self, src, dst):
                if os.path.basename(dst) == name and how == "rename":
                    seen["n"] += 1
                    if seen["n"] == int(nth):
                        os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst)

        atomic_files._write_all, atomic_files.os = write, Os()
    elif mode.startswith("signal:"):  # signal:SIGINT@3,SIGINT@3 -- after optimizer step 3
        plan = [(getattr(signal, s.split("@")[0]), int(s.split("@")[1])) for s in mode[7:].split(",")]
        real_call, steps = step_module.TrainStep.__call__, {"n": 0}

        def call(self, *args):
            out = real_call(self, *args)
            steps["n"] += 1
            for signum, at in plan:
                if at == steps["n"]:
                    os.kill(os.getpid(), signum)
            return out

        step_module.TrainStep.__call__ = call
    from okdfast.train import main
    main(sys.argv[1:])
    """
)


def harness(argv: list[str], mode: str, *, limit_bytes: int | None = None, timeout: float = 180):
    env = dict(os.environ, OKD_TEST_MODE=mode, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)

    def limit() -> None:
        if limit_bytes is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-c", HARNESS, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# signal
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("signame", "at"), [("SIGINT", 3), ("SIGTERM", 2)])  # inside epoch 1; at epoch 0's end
def test_signal_checkpoints_exactly(signame, at, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    result = harness([*TINY, "--out", str(run_dir)], f"signal:{signame}@{at}")
    signum = getattr(signal, signame)
    assert result.returncode == 128 + signum, result.stderr
    assert f"stopped by signal {signum}" in result.stdout and "Traceback" not in result.stderr
    state = safe_load(run_dir / "last.pt")["state"]
    assert state["global_step"] == at
    run(TrainConfig(**{**parse_config(TINY)[0].to_dict(), "out": str(run_dir), "resume": "auto"}))
    assert_same_weights(run_dir, reference_run)
    assert_consistent(run_dir)


def test_signal_twice_stops_at_once_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    result = harness([*TINY, "--out", str(run_dir)], "signal:SIGINT@3,SIGINT@3")
    assert result.returncode == 130, result.stderr
    assert "stopped at once (a second signal" in result.stderr and "Traceback" not in result.stderr
    assert safe_load(run_dir / "last.pt")["state"]["global_step"] == 2  # the last epoch-end checkpoint, intact


# ---------------------------------------------------------------------------------------------------------------
# disk: a full disk names the file and the reason, keeps the last good files, and the run resumes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "nth"), [("last.pt", 2), ("metrics.jsonl", 1), ("config.yaml", 1),
                                           ("summary.json", 1), ("train.log", 3)])  # fmt: skip
def test_disk_full_names_the_file_and_resumes(name, nth, reference_run, capsys, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real, seen = atomic_files._write_all, {"n": 0}

    def full(handle, data, path):
        if path.name == name:
            seen["n"] += 1
            if seen["n"] == nth:
                handle.write(data[: len(data) // 3])
                raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data, path)

    monkeypatch.setattr(atomic_files, "_write_all", full)
    err = assert_user_error([*TINY, "--out", str(run_dir)], f"could not write {run_dir / name}: No space left on "
                            "device (errno 28); free space on that disk", capsys)  # fmt: skip
    assert "inline_container" not in err
    assert not atomic_files.orphaned_temps(run_dir)  # the failed atomic write removed its temporary file
    if name == "last.pt":
        assert safe_load(run_dir / "last.pt")["state"]["epoch"] == 1  # the previous one, untouched
    monkeypatch.undo()
    resume = ["--resume", "auto"] if (run_dir / "config.yaml").exists() else []
    main([*TINY, "--out", str(run_dir), *resume])
    assert_same_weights(run_dir, reference_run)
    assert_consistent(run_dir)


def test_disk_full_for_real_file_size_limit(tmp_path):
    """The kernel's own error (RLIMIT_FSIZE: EFBIG) while torch's checkpoint is written: one line, not the
    inline_container.cc enforce that torch.save raises when it writes the file itself."""
    run_dir = tmp_path / "run"
    result = harness([*TINY, "--out", str(run_dir)], "", limit_bytes=600_000)  # a checkpoint is ~1.6 MB
    assert result.returncode == 2, result.stderr
    assert f"could not write {run_dir / 'last.pt'}: File too large (errno 27)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "inline_container" not in result.stderr
    assert not atomic_files.orphaned_temps(run_dir) and not (run_dir / "last.pt").exists()


# ---------------------------------------------------------------------------------------------------------------
# kill: kill -9 during every file write, then --resume auto: the uninterrupted run's weights and a sound folder
# ---------------------------------------------------------------------------------------------------------------
KILL_POINTS = [
    ("config.yaml", 1, "mid"),
    ("environment.json", 1, "mid"),
    ("sessions.jsonl", 1, "mid"),
    ("train.log", 2, "mid"),
    ("metrics.jsonl", 1, "mid"),
    ("metrics.jsonl", 2, "mid"),
    ("metrics.csv", 1, "mid"),
    ("metrics.csv", 2, "rename"),
    ("last.pt", 1, "mid"),
    ("last.pt", 2, "rename"),
    ("best.pt", 1, "rename"),
    ("summary.json", 1, "mid"),
]
DEFAULT_TIER_KILLS = {("config.yaml", 1, "mid"), ("metrics.jsonl", 2, "mid"), ("last.pt", 1, "mid"),
                      ("best.pt", 1, "rename"), ("summary.json", 1, "mid")}  # fmt: skip


@pytest.mark.parametrize(
    "point",
    [p if p in DEFAULT_TIER_KILLS else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS],
    ids=lambda p: f"{p[0]}#{p[1]}-{p[2]}",
)
def test_kill_during_a_write_then_resume(point, reference_run, tmp_path):
    name, nth, how = point
    run_dir = tmp_path / "run"
    result = harness([*TINY, "--out", str(run_dir)], f"kill:{name}:{nth}:{how}")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    # What the kill left is readable: whole files or none (a cut jsonl line is dropped by its readers).
    for path in (run_dir / "config.yaml", run_dir / "summary.json", run_dir / "environment.json"):
        if path.exists():
            (yaml.safe_load if path.suffix == ".yaml" else json.loads)(path.read_text())
    if (run_dir / "last.pt").exists():
        safe_load(run_dir / "last.pt")
    resume = ["--resume", "auto"] if (run_dir / "config.yaml").exists() else []
    main([*TINY, "--out", str(run_dir), *resume])
    assert_same_weights(run_dir, reference_run)
    assert_consistent(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.5, 3.0, 4.5])
def test_kill_at_a_random_moment_then_resume(delay, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "okdfast.train", *TINY, "--out", str(run_dir)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    resume = ["--resume", "auto"] if (run_dir / "config.yaml").exists() else []
    main([*TINY, "--out", str(run_dir), *resume])
    assert_same_weights(run_dir, reference_run)
    assert_consistent(run_dir)


# ---------------------------------------------------------------------------------------------------------------
# tail and milestones: no batch size or data size crashes a run; the lr decays where it should
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "subset", "batch", "steps"),
    [("one", 21, 10, 2), ("mde", 21, 10, 2), ("one", 20, 19, 1), ("one", 7, 64, 1)],
    ids=["one: 21 = 2x10+1", "mde: 21 = 2x10+1", "one: 20 = 19+1", "one: batch > data"],
)
def test_tail_of_one_image_is_dropped_and_logged(method, subset, batch, steps, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--method", method, "--subset", str(subset), "--batch-size", str(batch), "--epochs", "1"]
    summary = run(parse_config([*argv, "--out", str(run_dir)])[0])
    assert summary["finished"] and summary["global_step"] == steps
    log = (run_dir / "train.log").read_text()
    assert ("would hold 1 image" in log) == (subset % batch == 1 and subset > batch), log


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 7, 10, 30, 299, 300])
def test_milestones_are_sane_for_every_epoch_count(epochs):
    config = TrainConfig(epochs=epochs)
    resolved = config.resolved_milestones()
    assert resolved == sorted(set(resolved)) and all(1 <= m <= epochs - 1 for m in resolved)
    assert resolved == {1: [], 2: [1], 3: [2], 300: [150, 225]}.get(epochs, resolved)
    assert bool(config.milestone_notes()) == (len(resolved) < 2)
    cosine = TrainConfig(epochs=epochs, lr_schedule="cosine")
    assert cosine.milestone_notes() == []


def test_milestones_lr_per_epoch_in_a_run(tmp_path):
    run_dir = tmp_path / "run"
    run(parse_config([*TINY, "--epochs", "3", "--subset", "10", "--out", str(run_dir)])[0])
    assert [round(r["lr"], 6) for r in read_rows(run_dir / "metrics.jsonl")] == [0.1, 0.1, 0.01]
    run_dir = tmp_path / "one"
    run(parse_config([*TINY, "--epochs", "1", "--subset", "10", "--out", str(run_dir)])[0])
    assert [r["lr"] for r in read_rows(run_dir / "metrics.jsonl")] == [0.1]  # no decay before the first step
    assert "lr never decays" in (run_dir / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------------------
# pooling: okdfast.plot and okdfast.reproduce pool runs as seeds only when they differ in nothing but the seed
# ---------------------------------------------------------------------------------------------------------------
def _fake_run(run_dir: Path, seed: int, acc: float, **config) -> Path:
    run_dir.mkdir(parents=True)
    values = parse_config(TINY)[0].to_dict() | {"seed": seed, "branches": 3, "out": str(run_dir)} | config
    (run_dir / "config.yaml").write_text(yaml.safe_dump(values))
    row = {"epoch": 0, "lr": 0.1, "partial": False, "acc_branch_mean": acc, "acc_ensemble": acc + 1.0}
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"finished": True, "epochs_done": 1, "last": row}))
    return run_dir


def test_pooling_plot_pools_only_runs_equal_but_for_the_seed(tmp_path):
    pytest.importorskip("matplotlib")
    from okdfast.plot import comparison_groups, load_run

    dirs = [
        _fake_run(tmp_path / "a", 0, 50.0, subset=200, epochs=1),
        _fake_run(tmp_path / "b", 0, 60.0, subset=400, epochs=3),  # another recipe, the same seed
        _fake_run(tmp_path / "c", 1, 52.0, subset=200, epochs=1, workers=4),  # a seed of a (workers: not maths)
    ]
    groups = comparison_groups([load_run(d) for d in dirs])
    assert sorted(groups) == [
        "one\nresnet8\nsynthetic\nepochs=1 subset=200",
        "one\nresnet8\nsynthetic\nepochs=3 subset=400",
    ]
    assert groups["one\nresnet8\nsynthetic\nepochs=1 subset=200"]["branch mean"] == [50.0, 48.0]  # n = 2
    assert groups["one\nresnet8\nsynthetic\nepochs=3 subset=400"]["branch mean"] == [40.0]  # n = 1


def test_pooling_reproduce_keeps_only_the_seeds_of_one_recipe(tmp_path):
    from okdfast.reproduce.results import CellResult, RunResult, _pool_equal_configs

    class Planned:  # the two fields results.py reads of a planned run
        def __init__(self, index, seed, run_dir):
            self.index, self.seed, self.run_dir, self.status = index, seed, run_dir, "finished"

    runs = [Planned(1, 0, _fake_run(tmp_path / "s0", 0, 50.0)), Planned(2, 1, _fake_run(tmp_path / "s1", 1, 51.0)),
            Planned(3, 2, _fake_run(tmp_path / "s2", 2, 70.0, lr=0.2))]  # fmt: skip
    result = CellResult(cell=None, planned=runs, finished=[RunResult(r, {}) for r in runs])
    _pool_equal_configs(result)
    assert [r.run.seed for r in result.finished] == [0, 1]
    assert [(r.run.seed, fields) for r, fields in result.unpooled] == [(2, ["lr"])]
    assert result.status() == "s2 not pooled: its config differs from the other seeds' in lr"


# ---------------------------------------------------------------------------------------------------------------
# usability
# ---------------------------------------------------------------------------------------------------------------
def test_usability_amp_on_a_cpu_without_native_bf16(monkeypatch):
    from okdfast.run import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_amp("auto", cpu) is None and "training in fp32" in precision.amp_notes("auto", cpu)[0]
    assert precision.resolve_amp("bf16", cpu) is torch.bfloat16
    assert "--amp off is faster here" in precision.amp_notes("bf16", cpu)[0]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_amp("auto", cpu) is torch.bfloat16 and precision.amp_notes("auto", cpu) == []


def test_usability_progress_lines_without_a_terminal(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--progress", "auto", "--log-every", "0.000001", "--out", str(run_dir)]
    run(parse_config(argv)[0])  # pytest's stderr is not a terminal
    lines = [line for line in (run_dir / "train.log").read_text().splitlines() if " step " in line]
    assert [line.split(" |")[0] for line in lines] == ["epoch 0 step 1/2", "epoch 0 step 2/2"]
    assert all("img/s" in line and "loss " in line and "lr " in line for line in lines)


def test_usability_help_explains_every_flag():
    parser = build_parser()
    thin = [a.dest for a in parser._actions if a.dest != "help" and (not a.help or a.help == a.dest.replace("_", " "))]
    assert thin == []
    text = " ".join(parser.format_help().split())
    assert "synthetic100" in text and "(default: None)" not in text
    out_help = next(a.help for a in parser._actions if a.dest == "out")
    assert "runs/<method>_<arch>_<dataset>_k<K>_s<seed>" in out_help


def test_usability_loss_terms_keep_their_order_in_every_process():
    assert list(merge_sums({"loss": 1.0, "ce": 2.0}, {"loss": 1.0, "ce": 1.0, "kd": 3.0})) == ["loss", "ce", "kd"]
    terms = "['loss', 'ce', 'teacher_ce', 'kd', 'cd']"
    code = f"from okdfast.run.epoch import merge_sums; print(list(merge_sums({{}}, dict.fromkeys({terms}, 1.0))))"
    orders = {
        subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONHASHSEED=str(seed)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for seed in (1, 2, 3)
    }
    assert orders == {terms + "\n"}


# ---------------------------------------------------------------------------------------------------------------
# ops: the loss API's arguments (CPU path; the kernels in the interpreter below)
# ---------------------------------------------------------------------------------------------------------------
B, K, C = 6, 3, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, C, generator=g) * 3
    target = torch.randint(0, C, (B,), generator=g)
    return logits, target


def _check(logits, target, teacher=None, weights_=None, **options):
    """online_kd_loss on the given (strided, offset, expanded) tensors vs the reference on contiguous copies:
    every row of the loss (reduction 'none') and the gradient of every float input, for a non-uniform upstream."""
    given = {"logits": logits, "teacher": teacher, "weights": weights_}
    leaves = {k: v.detach().requires_grad_(True) for k, v in given.items() if v is not None}  # strides kept
    copies = {k: v.detach().contiguous().clone().requires_grad_(True) for k, v in leaves.items()}
    got = online_kd_loss(leaves["logits"], target, leaves.get("teacher"), teacher_weights=leaves.get("weights"),
                         reduction="none", **options)  # fmt: skip
    expected, _ = online_kd_reference(copies["logits"], target.contiguous(), copies.get("teacher"),
                                      copies.get("weights"), OnlineKDOptions(reduction="none", **options))  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    if torch.isfinite(expected).all() and got.numel():
        upstream = torch.linspace(0.5, 1.5, got.numel())
        names = list(leaves)
        grads = torch.autograd.grad((got * upstream).sum(), [leaves[n] for n in names], allow_unused=True)
        wanted = torch.autograd.grad((expected * upstream).sum(), [copies[n] for n in names], allow_unused=True)
        for name, a, b in zip(names, grads, wanted):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"d loss / d {name}")
    return got, expected


def _strided(shape, dims):
    """A tensor of ``shape`` whose memory is laid out in the order ``dims`` (a permuted view: not contiguous)."""
    base = torch.randn(*[shape[d] for d in dims], generator=torch.Generator().manual_seed(1))
    inverse = [dims.index(i) for i in range(len(shape))]
    return base.permute(*inverse)


def _op_case(name: str):
    logits, target = _inputs()
    teacher = torch.randn(B, C, generator=torch.Generator().manual_seed(2))
    w_shared = torch.softmax(torch.randn(B, K, generator=torch.Generator().manual_seed(3)), -1)
    w_branch = torch.softmax(torch.randn(B, K, K, generator=torch.Generator().manual_seed(4)), -1)
    opts: dict = {}
    if name == "strided logits":
        logits = _strided((B, K, C), [1, 2, 0])
    elif name == "offset logits":
        logits = torch.randn(B + 1, K, C)[1:]
    elif name == "class-strided logits":
        logits = torch.randn(B, K, 2 * C)[:, :, ::2]
    elif name == "expanded logits":
        logits = torch.randn(1, K, C).expand(B, K, C)
    elif name == "strided target":
        target = torch.randint(0, C, (2 * B,))[::2]
    elif name == "offset target":
        target = torch.randint(0, C, (B + 3,))[3:]
    elif name == "expanded target":
        target = torch.tensor(4).expand(B)
    elif name == "strided teacher":
        teacher = _strided((B, C), [1, 0])
    elif name == "expanded teacher":
        teacher = torch.randn(1, C).expand(B, C)
    elif name == "per-branch strided teacher":
        teacher = _strided((B, K, C), [2, 0, 1])
    elif name == "strided shared weights":
        w_shared = torch.softmax(torch.randn(K, B), dim=0).t()  # (B, K) rows summing to 1, column-major
    elif name == "expanded constant weights":
        w_branch = torch.softmax(torch.randn(1, K, K), -1).expand(B, K, K)
    elif name == "permuted branch weights":
        w_branch = torch.softmax(torch.randn(K, K, B), dim=0).permute(2, 1, 0)  # w[b, r, j], rows sum to 1
    elif name == "label smoothing, peer mode":
        opts = {"label_smoothing": 0.1, "mode": "peer", "teacher_ce_weight": 0.0}
        logits = _strided((B, K, C), [2, 1, 0])
    else:
        raise AssertionError(name)
    uses = {"teacher": "teacher" in name, "w_shared": "shared weights" in name, "w_branch": "branch weights" in name
            or "constant weights" in name}  # fmt: skip
    return logits, target, teacher if uses["teacher"] else None, w_shared if uses["w_shared"] else (
        w_branch if uses["w_branch"] else None), opts  # fmt: skip


OP_CASES = ["strided logits", "offset logits", "class-strided logits", "expanded logits", "strided target",
            "offset target", "expanded target", "strided teacher", "expanded teacher", "per-branch strided teacher",
            "strided shared weights", "expanded constant weights", "permuted branch weights",
            "label smoothing, peer mode"]  # fmt: skip


@pytest.mark.triton
@pytest.mark.parametrize("name", OP_CASES)
def test_ops_strided_offset_expanded_inputs_equal_the_reference(name):
    logits, target, teacher, weights_, opts = _op_case(name)
    plain = [
        t for t in (logits, target, teacher, weights_) if t is not None and t.is_contiguous() and not t.storage_offset()
    ]
    assert len(plain) < sum(t is not None for t in (logits, target, teacher, weights_))  # one input is not plain
    _check(logits, target, teacher, weights_, teacher_ce_weight=opts.pop("teacher_ce_weight", 0.5), **opts)


@pytest.mark.triton
@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("logits", float("nan")),
        ("logits", float("inf")),
        ("logits", -float("inf")),
        ("teacher", float("nan")),
        ("teacher", float("inf")),
        ("weights", float("nan")),
    ],  # fmt: skip
)
def test_ops_nan_and_inf_propagate_where_the_reference_does(where, value):
    logits, target = _inputs()
    teacher = torch.randn(B, C) if where == "teacher" else None
    weights_ = torch.softmax(torch.randn(B, K, K), -1) if where == "weights" else None
    poisoned = {"logits": logits, "teacher": teacher, "weights": weights_}[where]
    poisoned[2].view(-1)[1] = value  # one entry of row 2
    got, expected = _check(logits, target, teacher, weights_, teacher_ce_weight=0.5)
    assert not torch.isfinite(expected[2]) and torch.isfinite(expected[[0, 1, 3, 4, 5]]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)) and torch.equal(torch.isinf(got), torch.isinf(expected))
    for reduction in ("mean", "sum"):
        assert not torch.isfinite(
            online_kd_loss(logits, target, teacher, teacher_weights=weights_, reduction=reduction)
        )


@pytest.mark.triton
def test_ops_empty_batch_and_all_rows_ignored():
    empty = torch.randn(0, K, C, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64)
    assert online_kd_loss(empty, labels).isnan() and online_kd_loss(empty, labels, reduction="sum") == 0
    assert online_kd_loss(empty, labels, reduction="none").shape == (0,)
    logits, _ = _inputs()
    logits.requires_grad_(True)
    ignored = torch.full((B,), -100)
    loss = online_kd_loss(logits, ignored)
    assert loss.isnan()  # like F.cross_entropy: 0 / 0
    summed = online_kd_loss(logits, ignored, reduction="sum")
    summed.backward()
    assert summed == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


OP_ERRORS = [
    (dict(logits=torch.randint(0, 3, (B, K, C))), "logits: dtype torch.int64 is not supported"),
    (dict(logits=torch.randn(B, C)), "logits: expected a (B, K, C) tensor of branch logits, got (6, 7)"),
    (dict(logits=torch.randn(B, 1, C)), "logits: K=1 branches; online KD needs K >= 2"),
    (dict(target=torch.zeros(B, dtype=torch.int32)), "target: dtype torch.int32; class ids must be int64"),
    (dict(target=torch.zeros(B)), "target: dtype torch.float32; class ids must be int64"),
    (dict(target=torch.zeros(B + 1, dtype=torch.int64)), "target: expected shape (6,)"),
    (dict(target=torch.full((B,), C)), "target: class id 7 is outside [0, 7)"),
    (dict(target=torch.zeros(B, dtype=torch.int64, device="meta")), "target is on meta but logits on cpu"),
    (dict(teacher=torch.randn(B, C + 1)), "teacher: expected (6, 7) (shared) or (6, 3, 7) (one per branch)"),
    (dict(teacher=torch.zeros(B, C, dtype=torch.int64)), "teacher: dtype torch.int64 is not supported"),
    (dict(teacher_weights=torch.randn(B, K + 1)), "teacher_weights: expected (B, K) = (6, 3)"),
    (dict(teacher=torch.randn(B, C), teacher_weights=torch.randn(B, K)), "pass one of them"),
    (dict(kd_weight=torch.ones(2)), "kd_weight: a tensor weight must be a one-element float tensor"),
    (dict(temperature=0.0), "temperature=0.0: must be a number in [0.01, 100]"),
    (dict(temperature=float("nan")), "temperature=nan: must be a finite number"),
    (dict(label_smoothing=2.0), "label_smoothing=2.0: must be in [0, 1]"),
    (dict(reduction="avg"), "reduction='avg': use 'mean', 'sum' or 'none'"),
    (dict(mode="mutual"), "mode='mutual': use 'ensemble'"),
]


@pytest.mark.parametrize(
    ("kwargs", "message"), OP_ERRORS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(OP_ERRORS)]
)
def test_ops_bad_arguments_name_the_argument(kwargs, message):
    logits, target = _inputs()
    args = {"logits": logits, "target": target} | kwargs
    with pytest.raises(ValueError) as error:
        online_kd_loss(args.pop("logits"), args.pop("target"), args.pop("teacher", None), **args)
    assert message in str(error.value)


@pytest.mark.triton
def test_ops_half_precision_strided_logits():
    for dtype in (torch.bfloat16, torch.float16):
        logits = _strided((B, K, C), [2, 0, 1]).to(dtype)
        _, target = _inputs()
        got = online_kd_loss(logits, target, reduction="none")
        expected, _ = online_kd_reference(logits.contiguous(), target, options=OnlineKDOptions(reduction="none"))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


CD_CASES = [
    ("strided", lambda: _strided((3, 5, 4), [2, 1, 0]), None),
    ("offset", lambda: torch.randn(4, 5, 4)[1:], None),
    ("expanded", lambda: torch.randn(1, 5, 4).expand(3, 5, 4), None),
    ("nan", lambda: torch.randn(3, 5, 4).index_fill_(0, torch.tensor([1]), float("nan")), None),
    ("one classifier", lambda: torch.randn(1, 5, 4), "M=1; the diversity of classifiers needs M >= 2"),
    ("2-D", lambda: torch.randn(5, 4), "weights: expected (M, C, D)"),
    ("int", lambda: torch.zeros(3, 5, 4, dtype=torch.int64), "weights: dtype torch.int64 is not supported"),
]


@pytest.mark.parametrize(("name", "make", "message"), CD_CASES, ids=[c[0] for c in CD_CASES])
@pytest.mark.parametrize("form", ["frobenius", "cos2"])
def test_ops_classifier_diversity_arguments(name, make, message, form):
    weights_ = make()
    if message is not None:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            classifier_diversity_loss(weights_, form)
        return
    got = classifier_diversity_loss(weights_, form)
    expected = classifier_diversity_reference(weights_.contiguous(), form)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert got.isnan() == (name == "nan")


def test_ops_classifier_diversity_bad_form_and_eps():
    with pytest.raises(ValueError, match="form='l2': use one of frobenius, abscos, cos2"):
        classifier_diversity_loss(torch.randn(3, 5, 4), "l2")
    with pytest.raises(ValueError, match="eps=0: must be a finite number > 0"):
        classifier_diversity_loss(torch.randn(3, 5, 4), "cos2", eps=0)


@pytest.mark.skipif(IN_INTERPRETER, reason="this process already runs the interpreter")
def test_ops_cases_in_the_triton_interpreter():
    """Every ``triton`` case above again, in a process where CPU tensors run the Triton kernels (the interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton and not slow", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "deselected" in last, last


@pytest.mark.triton
def test_ops_dispatch_in_this_process():
    from okdfast.ops.dispatch import use_triton

    assert use_triton(torch.zeros(1)) == IN_INTERPRETER  # the interpreter cases really ran the kernel there


def test_user_errors_are_user_errors():
    """Every error class the CLIs turn into one line derives from UserError (and the built-in a caller caught)."""
    from okdfast.data import DatasetNotFoundError
    from okdfast.errors import CheckpointError, ConfigError, DataError, RunFolderError
    from okdfast.utils.nan_guard import NonFiniteLossError

    for cls, builtin in [(ConfigError, ValueError), (CheckpointError, ValueError), (DataError, ValueError),
                         (RunFolderError, FileExistsError), (DatasetNotFoundError, FileNotFoundError),
                         (NonFiniteLossError, RuntimeError), (atomic_files.RunFolderWriteError, OSError)]:  # fmt: skip
        assert issubclass(cls, UserError) and issubclass(cls, builtin)
    assert atomic_save  # the writer every checkpoint goes through
