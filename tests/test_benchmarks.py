"""The benchmarks on the CPU: they measure what users run (the methods' own loss options, an eager reference that
trains the same loss), they write each row the moment it is measured and to an untracked folder by default, bench_loss
compiles every default shape without hitting torch.compile's recompile limit, and the compile report sees the
specialisations real launches get."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_loss, bench_train, harness
from benchmarks.reference_trainer import KLLoss, reference_method, reference_step
from okdfast.methods import MethodConfig, create_method

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------------
# where rows go, and when
# ---------------------------------------------------------------------------------------------------------------


def test_results_go_to_an_untracked_folder_unless_asked(monkeypatch):
    monkeypatch.delenv("OKDFAST_RESULTS_DIR", raising=False)
    default = harness.results_dir()
    assert default == REPO / "runs" / "bench" and "runs/" in (REPO / ".gitignore").read_text()
    assert harness.results_dir(commit=True) == REPO / "benchmarks" / "results"
    monkeypatch.setenv("OKDFAST_RESULTS_DIR", "/somewhere")
    assert harness.results_dir() == Path("/somewhere")
    assert harness.results_dir("/explicit", commit=True) == Path("/explicit")


def test_append_row_writes_each_row_at_once_and_widens_the_header(tmp_path):
    harness.append_row("t", {"a": 1, "b": 2}, tmp_path)
    harness.append_row("t", {"a": 3, "b": 4}, tmp_path)
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2\n3,4\n"
    harness.append_row("t", {"a": 5, "c": 6}, tmp_path)
    assert _rows(tmp_path / "t.csv") == [
        {"a": "1", "b": "2", "c": ""},
        {"a": "3", "b": "4", "c": ""},
        {"a": "5", "b": "", "c": "6"},
    ]


def test_every_row_names_device_versions_commit_and_run(monkeypatch):
    monkeypatch.setenv("OKDFAST_GIT_COMMIT", "abc123")  # a checkout without .git (a GPU machine's copy)
    row = harness.machine_columns("x", torch.device("cpu"))
    for column in harness.COMMON_COLUMNS:
        assert column in row
    assert row["git_commit"] == "abc123" and row["torch"] == torch.__version__ and row["run_id"]


def test_bench_loss_rows_are_kept_when_it_is_killed_midway(tmp_path):
    shapes = [f"64x{k}x{c}" for k in (2, 3, 4, 5) for c in (10, 20, 30, 40, 50)]
    command = [sys.executable, "-m", "benchmarks.bench_loss", "--device", "cpu", "--impls", "reference"]
    command += ["--forms", "mean", "--repeats", "2", "--warmup", "0", "--no-plot", "--results-dir", str(tmp_path)]
    proc = subprocess.Popen(
        command + ["--shapes", *shapes], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    path = tmp_path / "loss.csv"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and (not path.exists() or len(_rows(path)) < 4):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    rows = _rows(path)
    assert 4 <= len(rows) < 3 * len(shapes), "killed midway, the rows measured so far are on disk"
    assert all(r["median_ms"] and r["run_id"] and r["impl"] == "reference" for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# bench_loss: what it measures
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["one", "mde", "okddip", "cl_ilr", "dml"])
def test_bench_loss_forms_pass_the_options_and_teacher_shapes_the_methods_pass(monkeypatch, method_name):
    import okdfast.methods.base as base

    seen = {}

    def spy(logits, target, teacher, teacher_weights, options, kd_weight, *, kernel=None):
        seen.update(options=options, weights=teacher_weights, teacher=teacher)
        return original(logits, target, teacher, teacher_weights, options, kd_weight, kernel=kernel)

    original = base.online_kd
    monkeypatch.setattr(base, "online_kd", spy)
    method = create_method(method_name, "resnet8", 10, MethodConfig(num_branches=4))
    method.loss(method(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]), torch.tensor(0.5))
    form = method_name
    assert seen["options"] == bench_loss.form_options(form, 4)
    logits, _, teacher, weights, _ = bench_loss.make_inputs((2, 4, 10), torch.float32, form, torch.device("cpu"))
    assert (teacher is None) == (seen["teacher"] is None)
    if seen["weights"] is None:
        assert weights is None
    else:
        assert weights.dim() == seen["weights"].dim() and weights.shape[-1] == seen["weights"].shape[-1]


def test_bench_loss_runs_every_default_cpu_shape_without_a_recompile_error(tmp_path):
    """Every default form and CPU shape through one compiled function (a fresh torch.compile per combination
    shares the code object's cache): reaching the recompile limit raises in bench_loss, so a missing row would
    fail here. The eager backend keeps the test fast; dynamo's guards and recompiles are the same."""
    command = [sys.executable, "-m", "benchmarks.bench_loss", "--device", "cpu", "--compile-backend", "eager"]
    command += ["--repeats", "1", "--warmup", "0", "--phases", "fwd+bwd", "--no-plot", "--results-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _rows(tmp_path / "loss.csv")
    got = {(r["form"], r["shape"], r["impl"], r["phase"]) for r in rows}
    for form in bench_loss.DEFAULT_FORMS:
        for shape in bench_loss.CPU_SHAPES:
            for impl in ("reference", "compiled"):
                assert (form, "x".join(map(str, shape)), impl, "fwd+bwd") in got
    assert all(r["headline"] == "True" for r in rows)
    assert "recompile" not in result.stderr.lower()


def test_bench_loss_validates_before_it_times():
    options = bench_loss.form_options("mde", 4)
    inputs = bench_loss.make_inputs((8, 4, 10), torch.float32, "mde", torch.device("cpu"))
    reference = bench_loss.loss_fns(options)["reference"]
    assert bench_loss.validate(reference, reference, inputs) == 0.0
    with pytest.raises(AssertionError, match="validation failed"):
        bench_loss.validate(lambda *a: reference(*a) * 1.01, reference, inputs)


# ---------------------------------------------------------------------------------------------------------------
# bench_train and its reference
# ---------------------------------------------------------------------------------------------------------------


def test_reference_trainer_is_eager_and_trains_the_methods_own_loss():
    torch.manual_seed(0)
    method = reference_method("resnet8", 10, 4)
    assert method.config.fused_loss == "off" and getattr(method.config, "branch_impl", "loop") == "loop"
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    expected = method.loss(method(images), labels, torch.tensor(1.0)).total
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)
    got = reference_step(method, optimizer, images, labels, 1.0, torch.nn.CrossEntropyLoss(), KLLoss(3.0))
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_bench_train_rows_leave_each_feature_out_and_add_each_in():
    rows = dict(bench_train.rows_to_run(torch.device("cuda")))
    names = bench_train.features_for(torch.device("cuda"))
    assert {"compile", "fused", "cuda_graphs", "fast_loader", "amp", "channels_last"} <= set(names)
    assert rows["reference"] is None and list(rows)[:2] == ["reference", "all-on"]
    assert all(getattr(rows["all-on"], n) for n in names)
    compiled_unfused = rows["all-but-fused"]  # the question the fused kernels answer
    assert compiled_unfused.compile and not compiled_unfused.fused
    for n in names:
        assert not getattr(rows[f"all-but-{n}"], n) and getattr(rows[f"base+{n}"], n)
        assert sum(vars(rows[f"base+{n}"]).values()) == 1
    cpu = bench_train.features_for(torch.device("cpu"))
    assert "cuda_graphs" not in cpu and "fused" not in cpu


# ---------------------------------------------------------------------------------------------------------------
# the compile report compiles what a launch compiles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU, not the interpreter")
def test_compile_report_uses_the_specialisation_of_a_real_launch():
    pytest.importorskip("triton")
    from benchmarks.gpu_checks import compile_kernels

    reports = compile_kernels.compile_online_kd("mde", "bf16", (128, 4, 100), arch=90)
    if not reports:
        pytest.skip("no ptxas in this triton install")
    assert [r["kernel"] for r in reports] == [
        "_online_kd_fwd_kernel",
        "_online_kd_reduce_kernel",
        "_online_kd_bwd_kernel",
    ]
    forward = reports[0]
    assert "stride_zc=1" in forward["specialization"]  # the unit stride is a constant, as at a CUDA launch
    assert "z_ptr" in forward["specialization"].split("div16")[1]  # 16-byte aligned logits
    assert forward["pointers"].startswith("bf16") and forward["spill_bytes"] <= compile_kernels.SPILL_LIMIT
