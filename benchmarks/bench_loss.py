"""Benchmark of the fused multi-branch online-KD loss (okdfast::online_kd_loss) against its PyTorch reference, eager
and under torch.compile, from CIFAR shapes (B=128, K=3..5, C=10/100) up to B=4096, K=4, C=32768.

Measured: forward (inputs requiring grad: what a training step pays; the fused op writes its gradients here),
backward alone (the forward is rerun untimed before every sample) and forward + backward, with
``torch.autograd.grad`` w.r.t. the logits and the teacher. Loss configuration (``--config``): 'mde' (ONE / MDE: a
(B, C) gate/FFM teacher, teacher CE, KL target not detached: every gradient path), 'default' (the op's defaults:
teacher = mean of the branches, detached) or 'dml' (peer mode). Every implementation is validated against the eager
reference (loss and gradients) before it is timed.
Timing by the shared harness (CUDA events after a warm-up that absorbs compilation and autotuning; perf_counter on
the CPU): median with p20 / p80 and peak memory. GB/s use the bytes any implementation must move (``bytes``
column): forward reads the logits and the teacher (+ labels), backward writes their gradients; fwd+bwd both.
Rows go to ``benchmarks/results/loss.csv``, the plot to ``benchmarks/results/loss_<device>.png``.

On a CPU the Triton kernel cannot run (it needs a GPU): the CPU run times the eager reference, its torch.compile
(inductor, C++), and the op's CPU path ('op-cpu': the reference values with closed-form gradients, which is what
``--fused-loss on`` runs on a CPU), and says so.

    python benchmarks/bench_loss.py --quick           # three CIFAR / mid shapes
    python benchmarks/bench_loss.py                   # every shape (the largest only where memory allows)
    python benchmarks/bench_loss.py --config dml --dtype bf16 --impls fused compiled
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, append_rows, default_device, machine_columns, time_fn  # noqa: E402
from okdfast.ops.dispatch import triton_available  # noqa: E402
from okdfast.ops.online_kd import online_kd_loss_and_terms  # noqa: E402
from okdfast.ops.reference import online_kd_loss_reference  # noqa: E402

SHAPES = [  # (B, K, C)
    (128, 3, 10),
    (128, 4, 10),
    (128, 5, 10),
    (128, 3, 100),
    (128, 4, 100),
    (128, 5, 100),
    (1024, 4, 1000),
    (4096, 4, 1000),
    (4096, 4, 32768),
]
QUICK_SHAPES = [(128, 4, 10), (128, 4, 100), (1024, 4, 1000)]
CONFIGS = {
    "mde": dict(teacher="shared", kwargs=dict(teacher_ce_weight=1.0, detach_teacher=False)),
    "default": dict(teacher=None, kwargs={}),
    "dml": dict(teacher=None, kwargs=dict(mode="peer")),
}
PHASES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(shape, dtype, config, device, seed=0):
    batch, branches, classes = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(batch, branches, classes, generator=gen, device=device) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=gen, device=device)
    teacher = None
    if CONFIGS[config]["teacher"] == "shared":
        teacher = (torch.randn(batch, classes, generator=gen, device=device) * 3).to(dtype).requires_grad_()
    return logits, target, teacher


def loss_fns(config: str):
    kwargs = CONFIGS[config]["kwargs"]

    def reference(logits, target, teacher):
        return online_kd_loss_reference(logits, target, teacher, **kwargs)

    def op(logits, target, teacher):
        return online_kd_loss_and_terms(logits, target, teacher, **kwargs)[0]

    return reference, op


def bytes_moved(shape, dtype, has_teacher: bool) -> dict[str, int]:
    batch, branches, classes = shape
    size = torch.finfo(dtype).bits // 8
    inputs = batch * branches * classes * size + (batch * classes * size if has_teacher else 0)
    forward = inputs + batch * 8  # + int64 labels
    return {"fwd": forward, "bwd": inputs, "fwd+bwd": forward + inputs}


def estimated_reference_peak(shape) -> int:
    batch, branches, classes = shape
    return 16 * batch * branches * classes * 4  # ~a dozen fp32 (B, K, C) temporaries of the eager fwd + bwd


def validate(fn, reference, logits, target, teacher) -> float:
    """Max relative error of fn's loss and gradients against the eager reference (raises when too large)."""
    inputs = [x for x in (logits, teacher) if x is not None]
    got = [fn(logits, target, teacher)]
    got += torch.autograd.grad(got[0], inputs)
    expected = [reference(logits, target, teacher)]
    expected += torch.autograd.grad(expected[0], inputs)
    worst = 0.0
    for a, b in zip(got, expected):
        scale = b.float().abs().max().clamp_min(1e-12)
        worst = max(worst, ((a.float() - b.float()).abs().max() / scale).item())
    tol = 1e-4 if logits.dtype == torch.float32 else 2e-2
    if not worst <= tol:
        raise AssertionError(f"validation failed: relative error {worst:.2e} > {tol}")
    return worst


def phase_calls(fn, logits, target, teacher) -> dict[str, tuple]:
    """{phase: (timed call, untimed setup before each sample)}; gradients by autograd.grad (nothing accumulates)."""
    inputs = [x for x in (logits, teacher) if x is not None]
    state: dict[str, torch.Tensor] = {}

    def forward():
        state["loss"] = fn(logits, target, teacher)

    def backward():
        torch.autograd.grad(state["loss"], inputs)

    def both():
        torch.autograd.grad(fn(logits, target, teacher), inputs)

    return {"fwd": (forward, None), "bwd": (backward, forward), "fwd+bwd": (both, None)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    impls = args.impls or (["reference", "compiled", "fused"] if on_gpu else ["reference", "compiled", "op-cpu"])
    if "fused" in impls and not (on_gpu and triton_available()):
        print("fused (Triton): needs a CUDA GPU; skipped on this machine (the CPU rows are reference vs compile)")
        impls = [i for i in impls if i != "fused"]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    dtypes = args.dtype or (["bf16", "fp32"] if on_gpu else ["fp32"])
    if on_gpu:
        budget = torch.cuda.get_device_properties(device).total_memory * 0.8
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5
    base = machine_columns("loss", device)
    base["torch_threads"] = torch.get_num_threads()
    base["load_avg_1m"] = round(os.getloadavg()[0], 2)  # the CPU numbers mean little on a busy machine
    rows: list[dict[str, Any]] = []
    for config in args.config:
        reference, op = loss_fns(config)
        compiled = torch.compile(reference, fullgraph=True, dynamic=False)
        fns = {"reference": reference, "compiled": compiled, "fused": op, "op-cpu": op}
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for shape in shapes:
                if estimated_reference_peak(shape) > budget:
                    print(f"{config} {dtype_name} {shape}: skipped, the eager reference would need more memory")
                    continue
                if args.reset_compile:
                    torch._dynamo.reset()
                logits, target, teacher = make_inputs(shape, dtype, config, device)
                moved = bytes_moved(shape, dtype, teacher is not None)
                medians: dict[tuple[str, str], float] = {}
                for impl in impls:
                    fn = fns[impl]
                    error = validate(fn, reference, logits, target, teacher)
                    for phase, (call, setup) in phase_calls(fn, logits, target, teacher).items():
                        timing = time_fn(call, device, warmup=args.warmup, repeats=args.repeats, setup=setup)
                        medians[(impl, phase)] = timing.median_ms
                        row = dict(base)
                        row.update(
                            config=config,
                            batch=shape[0],
                            branches=shape[1],
                            classes=shape[2],
                            dtype=dtype_name,
                            impl=impl,
                            phase=phase,
                            **timing.as_row(),
                            bytes=moved[phase],
                            gbps=moved[phase] / (timing.median_ms * 1e-3) / 1e9,
                            speedup_vs_reference=medians[("reference", phase)] / timing.median_ms
                            if ("reference", phase) in medians
                            else "",
                            max_rel_error=error,
                        )
                        rows.append(row)
                        speedup = row["speedup_vs_reference"]
                        print(
                            f"{config:7s} {dtype_name:4s} B={shape[0]:5d} K={shape[1]} C={shape[2]:6d} {impl:9s} "
                            f"{phase:8s} {timing.median_ms:9.3f} ms [{timing.p20_ms:.3f}, {timing.p80_ms:.3f}] "
                            f"{row['gbps']:8.2f} GB/s  peak {timing.peak_mem_mb:7.1f} MB"
                            + (f"  x{speedup:.2f} vs eager" if speedup != "" else "")
                        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["config"], r["dtype"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(len(keys), len(PHASES), figsize=(5 * len(PHASES), 3.6 * len(keys)), squeeze=False)
    for i, (config, dtype) in enumerate(keys):
        for j, phase in enumerate(PHASES):
            ax = axes[i][j]
            sel = [r for r in rows if r["config"] == config and r["dtype"] == dtype and r["phase"] == phase]
            shapes = list(dict.fromkeys((r["batch"], r["branches"], r["classes"]) for r in sel))
            width = 0.8 / max(len(impls), 1)
            for n, impl in enumerate(impls):
                xs, ys, lo, hi = [], [], [], []
                for s, shape in enumerate(shapes):
                    match = [r for r in sel if r["impl"] == impl and (r["batch"], r["branches"], r["classes"]) == shape]
                    if match:
                        r = match[0]
                        xs.append(s + (n - (len(impls) - 1) / 2) * width)
                        ys.append(r["median_ms"])
                        lo.append(r["median_ms"] - r["p20_ms"])
                        hi.append(r["p80_ms"] - r["median_ms"])
                ax.bar(xs, ys, width, yerr=[lo, hi], label=impl, capsize=2)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{b}x{k}x{c}" for b, k, c in shapes], rotation=30, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms (median, p20-p80)")
            ax.set_title(f"{config} {dtype} {phase}", fontsize=9)
            ax.legend(fontsize=7)
    device = rows[0]["device_name"] if rows else ""
    note = "" if "fused" in impls else " - fused Triton kernel not measured (needs a GPU)"
    threads = rows[0].get("torch_threads", "") if rows else ""
    fig.suptitle(
        f"online-KD loss (B x K x C), {device}, {threads} torch threads, torch {torch.__version__}{note}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the fused online-KD loss.")
    parser.add_argument("--quick", action="store_true", help="three shapes only")
    parser.add_argument("--shapes", nargs="+", default=None, help="BxKxC shapes, e.g. 128x4x100 4096x4x32768")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["mde"])
    parser.add_argument("--impls", nargs="+", choices=["reference", "compiled", "fused", "op-cpu"], default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reset-compile", action="store_true", help="torch._dynamo.reset() between shapes")
    parser.add_argument("--no-save", action="store_true", help="print only: no CSV row, no plot")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if rows and not args.no_save:
        path = append_rows("loss", rows)
        device = rows[0]["device"]
        png = RESULTS_DIR / f"loss_{device}.png"
        plot(rows, png)
        print(f"wrote {len(rows)} rows to {path} and the plot to {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
