"""Where the fused kernels are the default (okdfast.ops.fused_default): the verdict rule of a benchmark comparison,
the verdicts a GPU visit's rows give (benchmarks/fused_verdicts.py), the committed file against the committed rows,
and the choice ``kernel=None`` makes from them, eager and under torch.compile. The MDE head following them on the
kernel path runs in Triton's interpreter (tests/test_mde_head.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from benchmarks import fused_verdicts
from benchmarks.harness import Timing, verdict
from okdfast.ops import fused_default
from okdfast.ops.fused_default import Verdict, kernel_by_default, load_verdicts

REPO = Path(__file__).resolve().parents[1]


def timing(p20: float, p80: float) -> Timing:
    return Timing((p20 + p80) / 2, p20, p80, 0.0, 20)


@pytest.mark.parametrize(
    "this, other, want",
    [
        ((1.0, 1.2), (1.3, 1.5), "wins"),  # its 80th percentile below the other's 20th
        ((1.3, 1.5), (1.0, 1.2), "loses"),
        ((1.0, 1.3), (1.2, 1.5), "cannot tell apart"),  # the ranges overlap
        ((1.0, 1.2), (1.2, 1.4), "cannot tell apart"),  # touching is not beyond the spread
    ],
)
def test_verdict_is_beyond_one_runs_spread(this, other, want):
    assert verdict(timing(*this), timing(*other)) == want


def row(impl, p20, p80, run_id="visit1-a", date="2026-12-01T00:00:00+00:00", **change):
    base = dict(
        date=date, run_id=run_id, device="cuda", device_arch="sm_90", subject="mde_head", dtype="bf16", form="shared",
        shape="128x4x100", impl=impl, phase="fwd+bwd", timing="stream", median_ms=(p20 + p80) / 2, p20_ms=p20,
        p80_ms=p80, samples=20, error="",
    )  # fmt: skip
    return {k: str(v) for k, v in (base | change).items()}


def visit(run_id="visit1-a", date="2026-12-01T00:00:00+00:00", fused=(0.10, 0.12), **change):
    """One shape of one run: the eager reference, torch.compile of it and the kernel."""
    return [
        row("reference", 1.0, 1.1, run_id, date, **change),
        row("compiled", 0.05, 0.06, run_id, date, **change),
        row("fused", *fused, run_id, date, **change),
    ]


def test_rows_give_one_verdict_per_measured_shape_the_newest_run_kept():
    rows = visit() + visit("visit1-b", "2026-12-02T00:00:00+00:00", fused=(0.04, 0.045))
    rows += visit(shape="4096x4x32768")
    rows += [row("fused", 0.1, 0.2, phase="fwd"), row("op", 0.1, 0.2)]  # neither a verdict nor in the way
    got = fused_verdicts.verdicts_from_rows(rows)
    assert got == (
        Verdict("mde_head", "sm_90", "bf16", "shared", (128, 4, 100), "wins", "wins", "visit1-b"),
        Verdict("mde_head", "sm_90", "bf16", "shared", (4096, 4, 32768), "wins", "loses", "visit1-a"),
    )


def test_against_the_compiled_reference_the_kernel_inside_compile_counts_where_timed():
    rows = visit() + [row("fused-compiled", 0.02, 0.03)]  # faster than compiled (0.05-0.06): its checks traced away
    (found,) = fused_verdicts.verdicts_from_rows(rows)
    assert (found.vs_reference, found.vs_compiled) == ("wins", "wins")
    (found,) = fused_verdicts.verdicts_from_rows(visit())
    assert found.vs_compiled == "loses"  # the eager kernel row (0.10-0.12) against compiled


@pytest.mark.parametrize(
    "change",
    [dict(device="cpu", device_arch=""), dict(subject="online_kd"), dict(timing="cuda-graph"), dict(error="boom")],
)
def test_rows_that_give_no_verdict(change):
    assert fused_verdicts.verdicts_from_rows(visit(**change)) == ()


def test_a_kernel_without_both_comparisons_gives_no_verdict():
    assert fused_verdicts.verdicts_from_rows([r for r in visit() if r["impl"] != "compiled"]) == ()


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_command_writes_the_file_okdfast_loads_and_checks_it(tmp_path, capsys):
    rows = write_csv(tmp_path / "loss.csv", visit() + visit(dtype="fp32", fused=(2.0, 2.2)))
    out = tmp_path / "verdicts.json"
    assert fused_verdicts.main([str(rows), "--out", str(out)]) == 0
    loaded = load_verdicts(out)
    assert [(v.dtype, v.vs_reference, v.vs_compiled) for v in loaded] == [
        ("bf16", "wins", "loses"),
        ("fp32", "loses", "loses"),
    ]
    assert fused_verdicts.main([str(rows), "--out", str(out), "--check"]) == 0
    write_csv(rows, visit())
    assert fused_verdicts.main([str(rows), "--out", str(out), "--check"]) == 1
    assert "differs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        fused_verdicts.main([str(tmp_path / "missing.csv")])
    assert "loss_csv: no such file" in capsys.readouterr().err


def test_the_committed_verdicts_are_what_the_committed_gpu_rows_give():
    """okdfast/ops/fused_verdicts.json is derived: from every committed GPU visit's loss.csv, by the command. No
    visit has measured the kernels yet, so it holds none (and kernel=None runs them wherever they run)."""
    paths = sorted((REPO / "benchmarks" / "results" / "gpu").glob("*/loss.csv"))
    rows = [r for path in paths for r in fused_verdicts.read_rows(path)]
    assert load_verdicts() == fused_verdicts.verdicts_from_rows(rows) == fused_default.VERDICTS


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not a fused-verdicts file"),
        ('{"verdicts": [{"op": "mde_head"}]}', "verdict 0"),
        ('{"verdicts": [{"op": "x", "arch": "sm_90", "dtype": "bf16", "layout": "shared", "shape": [1, 2, 3], '
         '"vs_reference": "faster", "vs_compiled": "wins", "run_id": "r"}]}', "verdict 0"),
    ],
)  # fmt: skip
def test_a_bad_verdicts_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "verdicts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_verdicts(path)
    assert str(path) in str(error.value) and "benchmarks.fused_verdicts" in str(error.value)


# the choice on the CPU (device_arch 'cpu'): the rule is the same for every architecture
MEASURED = (
    Verdict("mde_head", "cpu", "fp32", "shared", (128, 4, 100), "loses", "wins", "r1"),
    Verdict("mde_head", "cpu", "fp32", "shared", (4096, 4, 32768), "wins", "loses", "r1"),
    Verdict("mde_head", "cpu", "fp32", "per-aux", (128, 4, 100), "cannot tell apart", "loses", "r1"),
)


@pytest.mark.parametrize(
    "shape, dtype, layout, want",
    [
        ((100, 4, 90), torch.float32, "shared", False),  # nearest 128x4x100, which lost to the eager reference
        ((2048, 4, 30000), torch.float32, "shared", True),  # nearest 4096x4x32768, which won
        ((1024, 4, 100), torch.float32, "shared", False),  # 3 from 128x4x100, 8.4 from 4096x4x32768
        ((100, 4, 90), torch.float32, "per-aux", True),  # a tie keeps the kernel
        ((100, 4, 90), torch.bfloat16, "shared", True),  # nothing measured in bf16: the kernel
    ],
)
def test_kernel_by_default_follows_the_nearest_measured_shape(shape, dtype, layout, want):
    logits = torch.empty(shape, dtype=dtype)
    assert kernel_by_default("mde_head", logits, layout, MEASURED) is want
    assert kernel_by_default("mde_head", logits, layout, ()) is True  # nothing measured at all: the kernel
    assert kernel_by_default("online_kd", logits, layout, MEASURED) is True  # none of these verdicts is its


def test_under_torch_compile_the_alternative_is_the_compiled_reference(monkeypatch):
    """Traced by torch.compile(fullgraph=True) the choice reads vs_compiled (the module's verdicts, as the op does)."""
    monkeypatch.setattr(fused_default, "VERDICTS", MEASURED)

    def choice(x):
        return x + 1 if kernel_by_default("mde_head", x, "shared") else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(choice, fullgraph=True, backend="eager")
    small, large = torch.zeros(100, 4, 90), torch.zeros(2048, 4, 300)
    assert float(choice(small).mean()) == -1 and float(compiled(small).mean()) == 1  # lost eager, won compiled
    assert float(choice(large).mean()) == -1  # nearest 128x4x100 (log2 distance 4 + 1.6, against 1 + 6.8)
    torch._dynamo.reset()


def test_the_committed_file_is_plain_json():
    """No file okdfast reads can run code: the verdicts are JSON, loaded with json.loads."""
    data = json.loads(fused_default.VERDICTS_FILE.read_text())
    assert set(data) == {"generated_by", "sources", "verdicts"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_head_follows_a_verdict_for_its_architecture_eager_and_compiled(monkeypatch):
    """The same choice as the interpreter test of tests/test_mde_head.py, on the GPU's own architecture key, eager
    and traced by torch.compile(fullgraph=True) (the device query folds to a constant there)."""
    from okdfast.kernels import online_kd as kernels

    from okdfast.ops import MDEHeadOptions, mde_head
    from okdfast.ops.fused_default import device_arch
    from okdfast.ops.reference import mde_head_reference

    launched, runnable = [], kernels._runnable
    monkeypatch.setattr(kernels, "_runnable", lambda k, d: launched.append(k.__name__) or runnable(k, d))
    device = torch.device("cuda")
    logits, energy = torch.randn(6, 4, 20, device=device), torch.randn(6, 3, device=device)
    target, options = torch.randint(0, 20, (6,), device=device), MDEHeadOptions(cd_weight=1.0)
    head = lambda z, e: mde_head(z, target, e, options)[0]
    want = mde_head_reference(logits, target, energy, options)[0]
    for vs_reference, vs_compiled, compiled, want_launches in (
        ("loses", "wins", False, 0), ("wins", "loses", False, 2), ("wins", "loses", True, 0), ("loses", "wins", True, 2)
    ):  # fmt: skip
        arch = device_arch(device)
        measured = Verdict("mde_head", arch, "fp32", "shared", (8, 4, 16), vs_reference, vs_compiled, "r")
        monkeypatch.setattr(fused_default, "VERDICTS", (measured,))
        torch._dynamo.reset()
        fn = torch.compile(head, fullgraph=True, backend="eager") if compiled else head
        launched.clear()
        torch.testing.assert_close(fn(logits, energy), want, rtol=1e-5, atol=1e-6)
        assert len(launched) == want_launches, (vs_reference, vs_compiled, compiled, launched)
    torch._dynamo.reset()


def test_the_runs_log_line_counts_the_verdicts_of_its_architecture(monkeypatch):
    monkeypatch.setattr(fused_default, "VERDICTS", MEASURED)
    assert fused_default.measured_here("mde_head", "cpu") == 3
    assert fused_default.measured_here("online_kd", "cpu") == 0
    monkeypatch.setattr(fused_default, "VERDICTS", ())
    assert fused_default.measured_here("mde_head", "cpu") == 0
