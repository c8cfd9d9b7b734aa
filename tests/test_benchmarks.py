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


# MDE trains through its own loss head (okdfast.ops.mde_head, a bench_loss subject of its own); bench_loss's "mde"
# form stays the two-level (B, K, K) teacher weights with MDE's options, the form OKDDip's layout passes the op
@pytest.mark.parametrize("method_name", ["one", "okddip", "cl_ilr", "dml"])
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
    call = bench_loss.online_kd_call("mde", (8, 4, 10), torch.float32, torch.device("cpu"))
    reference = call.fns["reference"]
    assert bench_loss.validate(reference, reference, call) == 0.0
    with pytest.raises(AssertionError, match="validation failed"):
        bench_loss.validate(lambda *a: reference(*a) * 1.01, reference, call)


def test_bench_loss_plans_are_data_headline_first_and_quick_runs_every_form():
    """The presets are lists of (subject, form, shape): the headline preset is the targets' two shapes with the
    implementations they compare; --quick (README: "every teacher form") has every form; a subject is registered."""
    headline = bench_loss.PRESETS["headline"].combos
    first = [(c.subject, c.form, c.shape) for c in headline[:2]]
    assert first == [("mde_head", "shared", shape) for shape in bench_loss.HEADLINE_SHAPES]  # what MDE trains with
    assert all({"reference", "compiled", "fused"} <= set(c.impls) for c in headline)
    head = {(c.shape, d) for name in ("headline", "mde-head", "mde-head-fp32") for d in bench_loss.PRESETS[name].dtypes
            for c in bench_loss.PRESETS[name].combos if c.form == "shared"}  # fmt: skip
    assert head == {(s, d) for s in bench_loss.MDE_HEAD_SHAPES for d in ("bf16", "fp32")}  # issue 20's grid
    assert {c.form for c in bench_loss.QUICK} == set(bench_loss.FORMS)
    args = bench_loss.build_parser().parse_args(["--quick"])
    assert {combo.form for combo, _ in bench_loss.plan(args, on_gpu=True)} == set(bench_loss.FORMS)
    forms = bench_loss.PRESETS["forms"].combos
    assert {c.form for c in forms if c.shape in bench_loss.HEADLINE_SHAPES} == set(bench_loss.FORMS)
    for preset in bench_loss.PRESETS.values():
        for combo in preset.combos:
            assert combo.subject in bench_loss.SUBJECTS and combo.form in bench_loss.SUBJECTS[combo.subject].forms
    tiny = bench_loss.plan(bench_loss.build_parser().parse_args(["--preset", "headline", "--tiny"]), on_gpu=False)
    assert all(combo.shape[0] <= 8 and combo.shape[2] <= 40 for combo, _ in tiny)
    argv = ["--preset", "mde-head", "mde-head-fp32", "--shapes", "128x4x10", "1024x4x100"]  # the CPU's rows
    kept = bench_loss.plan(bench_loss.build_parser().parse_args(argv), on_gpu=False)
    assert {(c.shape, d) for c, d in kept} == {(s, d) for s in ((128, 4, 10), (1024, 4, 100)) for d in ("bf16", "fp32")}


def test_bench_loss_time_budget_counts_first_compiles():
    combo = bench_loss.Combo("online_kd", "mde", (128, 4, 100))
    cold = bench_loss.estimate_s(combo, ["reference", "compiled", "fused"], 0, on_gpu=True)
    warm = bench_loss.estimate_s(combo, ["reference", "compiled", "fused"], 1, on_gpu=True)
    assert cold >= bench_loss.COLD_COMPILE_S > warm - bench_loss.WARM_COMPILE_S
    assert bench_loss.estimate_s(combo, ["reference"], 0, on_gpu=True) < bench_loss.WARM_COMPILE_S


def test_sweep_starts_at_the_heuristics_choice_and_covers_the_grid():
    case = bench_loss.SWEEPS["headline"][0]
    assert len(case.rows_per_program) > 1  # the small headline shape sweeps rows per program too
    order = bench_loss.sweep_order((128, 4, 1), case)
    assert order[0] == (128, 4, 1) and len(order) == len(set(order))
    grid = {(c, w, r) for c in case.block_c for w in case.num_warps for r in case.rows_per_program}
    assert set(order) == grid | {(128, 4, 1)}
    distances = [abs(c.bit_length() - 8) + abs(w.bit_length() - 3) + r.bit_length() - 1 for c, w, r in order]
    assert distances == sorted(distances)  # nearest neighbours first: a cut sweep still brackets the default


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="starts its own interpreter process")
def test_sweep_rows_validate_every_config_in_the_interpreter(tmp_path):
    """--sweep --tiny through the real launchers (Triton's interpreter on the CPU): a row per config and phase, the
    heuristic's config first and marked, every config validated against the reference."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "benchmarks.bench_loss", "--sweep", "headline", "--tiny", "--device", "cpu"]
    command += ["--repeats", "1", "--warmup", "0", "--results-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    every = _rows(tmp_path / "loss.csv")
    assert [r["subject"] for r in every[:1]] == ["mde_head"]  # the head first: what --method mde trains through
    for case in bench_loss.TINY_SWEEP:  # MDE's head (its attention mode), then the online-KD op's MDE form
        rows = [r for r in every if (r["subject"], r["form"]) == (case.subject, case.form)]
        configs = list(dict.fromkeys((r["block_c"], r["num_warps"], r["rows_per_program"]) for r in rows))
        grid = {(str(c), str(w), str(r)) for c in case.block_c for w in case.num_warps for r in case.rows_per_program}
        assert len(configs) == len(grid | {configs[0]}) and {r for _, _, r in configs} == {"1", "3"}
        assert rows[0]["default_config"] == "True" and all(r["default_config"] == "False" for r in rows[3:])
        assert {r["phase"] for r in rows} == {"fwd+bwd", "fwd", "bwd"}
        assert all(r["impl"] == "fused-sweep" and float(r["max_rel_error"]) <= 2e-2 and r["median_ms"] for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# bench_train and its reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cd_form", [None, "frobenius", "nontarget_corr"])
def test_reference_trainer_is_eager_and_trains_the_methods_own_loss(cd_form):
    torch.manual_seed(0)
    method = reference_method("resnet8", 10, 4, cd_form)
    assert method.config.fused_loss == "off" and getattr(method.config, "branch_impl", "loop") == "loop"
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    expected = method.loss(method(images), labels, torch.tensor(1.0)).total
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)
    got = reference_step(method, optimizer, images, labels, 1.0, torch.nn.CrossEntropyLoss(), KLLoss(3.0))
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_bench_train_only_keeps_its_order_and_the_budget_skips_what_cannot_finish(tmp_path, monkeypatch, capsys):
    """--only measures its rows in its own order; under --time-budget a compiled row that cannot finish its first
    compile in the time left is skipped by name, and a cheaper row after it still runs."""
    timed: list[str] = []

    def fake_build(features, splits, args, device):
        timed.append(",".join(k for k, v in vars(features).items() if v))
        return (lambda images, labels: None), iter(lambda: (torch.zeros(1), torch.zeros(1)), None)

    monkeypatch.setattr(bench_train, "build_okdfast", fake_build)
    monkeypatch.setattr(bench_train, "COMPILE_GUESS_S", 1e6)
    argv = ["--device", "cpu", "--arch", "resnet8", "--train-images", "64", "--steps", "1", "--repeats", "1"]
    argv += ["--warmup", "0", "--no-plot", "--results-dir", str(tmp_path), "--time-budget", "100"]
    rows = bench_train.main(argv + ["--only", "base+amp", "all-on", "okdfast-base"])
    assert [r["row"] for r in rows] == ["base+amp", "okdfast-base"]
    assert "skipped row all-on" in capsys.readouterr().out
    assert all(float(r["warmup_seconds"]) >= 0 for r in rows)
    assert not dict(bench_train.rows_to_run(torch.device("cpu"), ("compile",)))["all-on"].compile


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


# ---------------------------------------------------------------------------------------------------------------
# the full-size run's data: a decoded data set keeps its provenance
# ---------------------------------------------------------------------------------------------------------------


def _jpeg_npz(path: Path, train: int = 6, test: int = 3) -> Path:
    from io import BytesIO

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        blobs = []
        for _ in range(n):
            buffer = BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            blobs.append(buffer.getvalue())
        arrays[f"jpeg_{split}"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"offsets_{split}"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"y_{split}"] = np.arange(n) % 10
    np.savez(path, **arrays)
    return path


def test_a_decoded_data_set_keeps_its_provenance_in_every_run_record(tmp_path):
    """full_run decodes the JPEG archive into a pixel npz: loading that file must still say lossy, partial (fewer
    images than the official splits) and which file it came from, in the provenance every run record carries."""
    from benchmarks import full_run
    from okdfast.data import load_dataset
    from okdfast.data.provenance import sha256_of
    from okdfast.run.assemble import data_record

    source = _jpeg_npz(tmp_path / "my-jpegs.npz")
    decoded = full_run.decode(tmp_path / "data", source, limit=4)
    splits = load_dataset("cifar10", tmp_path / "data")
    provenance = splits.provenance
    assert decoded == tmp_path / "data" / "cifar10.npz" and len(splits.train) == 4 and len(splits.test) == 3
    assert provenance.lossy and provenance.partial and not provenance.official
    assert provenance.derived_from == "my-jpegs.npz" and provenance.source_sha256 == sha256_of(source)
    assert "decoded from my-jpegs.npz" in provenance.label and "lossy" in provenance.label
    record = data_record(splits)  # what summary.json 'data' and config.yaml 'data_file' hold
    assert record["lossy"] and record["partial"] and record["derived_from"] == "my-jpegs.npz"


def test_a_pixel_npz_without_a_record_is_described_as_before(tmp_path):
    import numpy as np

    from okdfast.data.provenance import describe, embedded

    path = tmp_path / "plain.npz"
    np.savez(path, x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.zeros(2, np.int64))
    assert embedded(path) is None
    provenance = describe(path, "cifar10", 50000, 10000)
    assert provenance.official and provenance.derived_from is None and provenance.label == "CIFAR-10"


# ---------------------------------------------------------------------------------------------------------------
# the GPU test tier's plugin: compile-heavy tests last, a row per test as it finishes
# ---------------------------------------------------------------------------------------------------------------


def test_gpu_tier_plugin_orders_compile_heavy_last_and_writes_each_result(tmp_path):
    tests = tmp_path / "test_tier.py"
    tests.write_text(
        "import pytest\n"
        "def test_compile_the_step(): pass\n"
        "def test_kernel_a(): pass\n"
        "def test_cuda_graph_replay(): assert False\n"
        "def test_kernel_b(): pytest.skip('no device')\n"
    )
    env = dict(os.environ, OKDFAST_RESULTS_DIR=str(tmp_path / "out"), OKDFAST_RUN_ID="visit2-x")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "benchmarks.gpu_checks.pytest_rows", str(tests), "--rootdir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout  # the one failing test
    rows = _rows(tmp_path / "out" / "gpu_tests.csv")
    names = [r["test"].rpartition("::")[2] for r in rows]
    assert names == ["test_kernel_a", "test_kernel_b", "test_compile_the_step", "test_cuda_graph_replay"]
    assert [r["outcome"] for r in rows] == ["passed", "skipped", "passed", "failed"]
    assert rows[1]["message"].endswith("no device") and all(r["run_id"] == "visit2-x" for r in rows)
    assert [r["compile_heavy"] for r in rows] == ["False", "False", "True", "True"]
