"""The headline numbers of a visit, read back from the rows in its folder: what ``summary.txt`` shows after every
step, each line next to its target (benchmarks/GPU.md, "The targets"). Standard library only (the runner uses it).

Every function takes the folder and returns lines; a missing file gives no line, a missing row says so.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

HEADLINE_SMALL, HEADLINE_LARGE = "128x4x100", "4096x4x32768"


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def device_lines(folder: Path) -> list[str]:
    path = folder / "environment.json"
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return ["environment.json: being written"]
    facts, manifest = record.get("device") or {}, record.get("manifest") or {}
    if "error" in facts:
        return [f"device: {facts['error']}"]
    return [
        f"device {facts.get('name', '?')} (capability {facts.get('capability', '-')}, {facts.get('sms', '-')} SMs, "
        f"{facts.get('memory_gib', '-')} GiB): copy {facts.get('copy_gbps', '?')} GB/s, "
        f"{facts.get('matmul_dtype', '')} matmul {facts.get('matmul_tflops', '?')} TFLOP/s; torch "
        f"{manifest.get('torch', '?')}, triton {manifest.get('triton', '?')}, CUDA {manifest.get('cuda', '-')}"
    ]


def check_lines(folder: Path) -> list[str]:
    rows = [r for r in _rows(folder / "check_kernels.csv") if r.get("family") != "launch"]
    if not rows:
        return []
    bad = [r["case"] for r in rows if r.get("ok") != "True"]
    launches = [r for r in _rows(folder / "check_kernels.csv") if r.get("family") == "launch"]
    spills = [int(r["spills"]) for r in launches if (r.get("spills") or "").isdigit()]
    regs = [int(r["registers"]) for r in launches if (r.get("registers") or "").isdigit()]
    line = f"kernels vs reference: {len(rows) - len(bad)} of {len(rows)} cases match"
    if regs:
        line += f"; {len(launches)} kernel variants, {min(regs)}-{max(regs)} registers, max spill {max(spills or [0])}"
    return [line] + ([f"  MISMATCH: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}"] if bad else [])


def loss_lines(folder: Path) -> list[str]:
    rows = [r for r in _rows(folder / "loss.csv") if r.get("median_ms") and r.get("impl") != "fused-sweep"]
    lines = []
    keys = dict.fromkeys((r.get("subject", "online_kd"), r["form"], r["shape"], r["dtype"]) for r in rows)
    headline = [k for k in keys if k[2] in (HEADLINE_SMALL, HEADLINE_LARGE)]
    for subject, form, shape, dtype in headline or list(keys)[:4]:  # a rehearsal's tiny shapes: the first few
        sel = [r for r in rows if (r.get("subject", "online_kd"), r["form"], r["shape"], r["dtype"]) ==
               (subject, form, shape, dtype) and r["phase"] == "fwd+bwd"]  # fmt: skip
        graphed = any(r["timing"] == "cuda-graph" for r in sel)
        timing = "cuda-graph" if shape == HEADLINE_SMALL or (graphed and shape != HEADLINE_LARGE) else "stream"
        by_impl = {r["impl"]: r for r in sel if r["timing"] == timing}
        fused = by_impl.get("fused") or by_impl.get("op")  # op: the public op where the kernels do not run
        what = f"loss {subject} {form} {shape} {dtype} fwd+bwd ({timing})"
        if fused is None:
            failed = [r for r in _rows(folder / "loss.csv") if r.get("error") and r.get("shape") == shape]
            lines.append(f"{what}: no fused row" + (f" ({failed[0]['error'][:120]})" if failed else ""))
            continue
        parts = [f"{fused['impl']} {float(fused['median_ms']):.4f} ms"]
        if "compiled" in by_impl:
            ratio = float(by_impl["compiled"]["median_ms"]) / float(fused["median_ms"])
            said = fused.get("verdict_vs_compiled")  # wins / loses / cannot tell apart (rows before 2026-12-08: none)
            parts.append(f"compiled {float(by_impl['compiled']['median_ms']):.4f} ms: x{ratio:.2f} (target >= 1.5"
                         + (f"; {fused['impl']} {said}" if said else "") + ")")  # fmt: skip
        if "composed" in by_impl:
            ratio = float(by_impl["composed"]["median_ms"]) / float(fused["median_ms"])
            parts.append(f"composed {float(by_impl['composed']['median_ms']):.4f} ms: x{ratio:.2f}")
        counts = [f"{i} {by_impl[i]['launches_per_call']}" for i in ("fused", "composed", "compiled", "reference")
                  if (by_impl.get(i) or {}).get("launches_per_call")]  # fmt: skip
        if counts:
            parts.append("launches per call: " + ", ".join(counts))
        if shape == HEADLINE_LARGE and fused.get("kernel_pct_copy_bw"):
            parts.append(f"{fused['kernel_pct_copy_bw']}% of copy bandwidth (kernel bytes; target >= 80)")
        lines.append(f"{what}: " + ", ".join(parts))
    return lines + sweep_lines(folder)


def _config(row: dict[str, str]) -> str:
    """A sweep row's launch configuration (rows written before rows_per_program was swept have one row each)."""
    rows = row.get("rows_per_program") or "1"
    return f"block_c={row['block_c']} num_warps={row['num_warps']} rows_per_program={rows}"


def sweep_lines(folder: Path) -> list[str]:
    rows = [r for r in _rows(folder / "loss.csv") if r.get("impl") == "fused-sweep" and r.get("median_ms")]
    lines = []
    what = lambda r: (r.get("subject") or "online_kd", r["form"], r["shape"], r["phase"], r["timing"])  # noqa: E731
    for key in dict.fromkeys(what(r) for r in rows):
        sel = [r for r in rows if what(r) == key]
        best = min(sel, key=lambda r: float(r["median_ms"]))
        default = next((r for r in sel if r.get("default_config") == "True"), None)
        line = (
            f"sweep {key[0]} {key[1]} {key[2]} {key[3]} ({key[4]}), {len(sel)} configs: best {_config(best)} "
            f"{float(best['median_ms']):.4f} ms"
        )
        if default is not None:
            line += (
                f" vs default {_config(default)} "
                f"{float(default['median_ms']):.4f} ms (x{float(default['median_ms']) / float(best['median_ms']):.2f})"
            )
        lines.append(line)
    return lines


def train_lines(folder: Path) -> list[str]:
    lines = []
    for r in _rows(folder / "train.csv"):
        if r.get("error"):
            lines.append(f"train {r['row']}: FAILED {r['error'][:120]}")
            continue
        ratio = f", x{r['speedup_vs_reference']} vs reference" if r.get("speedup_vs_reference") else ""
        ratio += f", {r['vs_all_on']} of all-on" if r.get("vs_all_on") and r["row"] != "all-on" else ""
        lines.append(f"train {r['row']}: {r['images_per_sec']} img/s ({r['seconds_per_epoch']} s/epoch){ratio}")
    if lines:
        lines.append("  targets: all-on >= 10x the reference; every all-but-X below all-on")
    return lines


def branches_lines(folder: Path) -> list[str]:
    rows = [r for r in _rows(folder / "branches.csv") if r.get("impl") == "grouped" and r.get("speedup")]
    return [f"branches {r['arch']} K={r['branches']} {r['trunk']}: grouped x{float(r['speedup']):.2f} vs loop"
            for r in rows[:6]]  # fmt: skip


def augment_lines(folder: Path) -> list[str]:
    rows = [r for r in _rows(folder / "augment.csv") if r.get("impl") == "fused"]
    return [f"loader kernel batch {r['batch']}: {r['gb_per_s']} GB/s, {r['pct_copy_bw']}% of copy" for r in rows]


def loader_lines(folder: Path) -> list[str]:
    rows = [r for r in _rows(folder / "loader.csv") if r.get("images_per_s") or r.get("images_per_sec")]
    return [
        f"loader {r.get('loader', '?')} {r.get('dataset', '')}: {r.get('images_per_s') or r.get('images_per_sec')} "
        "img/s"
        for r in rows
    ]


def test_lines(folder: Path) -> list[str]:
    rows = _rows(folder / "gpu_tests.csv")
    if not rows:
        return []
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    failed = [r["test"] for r in rows if r["outcome"] in ("failed", "error")]
    line = "gpu tests: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    return [line] + ([f"  FAILED: {', '.join(failed[:6])}"] if failed else [])


def full_run_lines(folder: Path) -> list[str]:
    rows = _rows(folder / "full_run.csv")
    if not rows:
        return []
    summary = [r for r in rows if r.get("kind") == "summary"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    last = summary[-1] if summary else epochs[-1]
    heads = ("acc_branch_mean", "acc_ensemble", "acc_leader", "acc_target")
    accs = ", ".join(f"{k[4:]} {float(last[k]):.2f}%" for k in heads if last.get(k))
    done = last.get("epochs_done") or len(epochs)
    data = last.get("data_label") or last.get("dataset", "")
    return [f"full run ({data}): {done} of {last.get('epochs_planned', '?')} epochs; last {accs}"]


READERS: tuple[Callable[[Path], list[str]], ...] = (
    device_lines,
    check_lines,
    loss_lines,
    train_lines,
    branches_lines,
    augment_lines,
    loader_lines,
    test_lines,
    full_run_lines,
)


def headline_lines(folder: Path) -> list[str]:
    lines: list[str] = []
    for reader in READERS:
        try:
            lines += reader(folder)
        except Exception as error:  # a half-written or unexpected file must not cost the summary
            lines.append(f"({reader.__name__}: {type(error).__name__}: {error})")
    return lines or ["(no rows yet)"]
