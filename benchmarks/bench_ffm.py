"""Benchmark of the fused FFM attention op (okdfast.ops.ffm.ffm_attention) against its PyTorch reference, eager
and under torch.compile, at the last-block shapes of every architecture.

Claim to check on a GPU (issue #4): fwd+bwd >= 2x eager and >= 1.2x torch.compile at ResNet-32 shapes, batch 128,
K = 4. On a CPU only the reference runs (eager vs compile); the Triton op needs a GPU and is skipped with a note.

Measured: forward (inputs requiring grad, so what a training step pays), backward alone (the forward is rerun
untimed before every sample) and forward + backward; ``torch.autograd.grad`` w.r.t. features, logits and the five
parameters (gradients are returned, not accumulated into ``.grad``). Training-mode BatchNorm with running
statistics, channels-last features stacked as MultiBranchNet stacks them (``--layout contiguous`` for the other).
Timing by the shared harness (CUDA events after warm-up, which also absorbs compilation and autotuning): median
with p20 / p80 and peak memory. GB/s use the bytes a fused implementation must move (``bytes`` column):
forward F + z + a + t + parameters, backward dt + z + dz + dL/ds (B x D: the features' gradient is a broadcast
of it) + parameter gradients. Rows go to ``benchmarks/results/ffm.csv``, the plot to ``results/ffm_<device>.png``.

    python benchmarks/bench_ffm.py --quick                  # ResNet-32 and VGG-16 shapes, batch 128
    python benchmarks/bench_ffm.py                          # every shape, batch 128 and 512
    python benchmarks/bench_ffm.py --dtype bf16 --impls triton compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS_DIR, append_rows, default_device, machine_columns, time_fn  # noqa: E402
from okdfast.ops.ffm import ffm_attention, triton_available  # noqa: E402
from okdfast.ops.reference import ffm_attention_reference  # noqa: E402

# (D, H, W) of the branches' last-block features (METHOD.md section 1); R = max(D // 4, 32) as in the module
ARCH_SHAPES = {
    "resnet32": (64, 8, 8),
    "wrn20_8": (512, 8, 8),
    "vgg16": (512, 2, 2),
    "densenet40_12": (456, 8, 8),
}
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(batch: int, branches: int, arch: str, classes: int, dtype: torch.dtype, layout: str, device):
    channels, height, width = ARCH_SHAPES[arch]
    hidden = max(channels // 4, 32)
    per_branch = [torch.randn(batch, channels, height, width, device=device).relu() for _ in range(branches)]
    if layout == "channels_last":
        per_branch = [f.contiguous(memory_format=torch.channels_last) for f in per_branch]
    features = torch.stack(per_branch, dim=1).to(dtype).requires_grad_()
    logits = torch.randn(batch, branches, classes, device=device, dtype=dtype, requires_grad=True)
    params = [
        torch.randn(hidden, channels, device=device) / channels**0.5,
        torch.ones(hidden, device=device),
        torch.zeros(hidden, device=device),
        torch.randn(branches, hidden, device=device) / hidden**0.5,
        torch.zeros(branches, device=device),
    ]
    params = [p.requires_grad_() for p in params]
    running = [torch.zeros(hidden, device=device), torch.ones(hidden, device=device)]
    return features, logits, params, running


def bytes_moved(features, logits, params, mode: str) -> int:
    batch, branches, channels = features.shape[:3]
    classes = logits.shape[2]
    param_bytes = sum(p.numel() * 4 for p in params)
    fwd = features.numel() * features.element_size() + logits.numel() * logits.element_size()
    fwd += batch * (branches + classes) * 4 + param_bytes
    bwd = batch * (branches + classes) * 4 + 2 * logits.numel() * logits.element_size() + batch * channels * 4
    bwd += param_bytes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def make_fns(impl: str, features, logits, params, running):
    """(forward, backward-from-outputs) closures for one implementation."""
    if impl == "triton":
        forward = ffm_attention
    elif impl == "compile":
        forward = torch.compile(ffm_attention_reference, dynamic=False)
    else:
        forward = ffm_attention_reference
    inputs = [features, logits, *params]

    def run_forward():
        return forward(features, logits, *params, *running, training=True, momentum=0.1, eps=1e-5)

    def run_backward(outputs):
        attention, teacher = outputs
        grads = (torch.ones_like(attention) / attention.shape[1], torch.ones_like(teacher))
        return torch.autograd.grad((attention, teacher), inputs, grads)

    return run_forward, run_backward


def validate(impl: str, inputs) -> None:
    """Before anything is timed: ``impl``'s outputs and gradients equal eager's (fp32 tolerance scaled to each
    tensor's magnitude; bf16 gradients of bf16 inputs carry bf16 rounding)."""
    results = []
    for name in ("eager", impl):
        features, logits, params, running = inputs
        run_forward, run_backward = make_fns(name, features, logits, params, [r.clone() for r in running])
        outputs = run_forward()
        results.append([*outputs, *run_backward(outputs)])
    tol = 1e-4 if inputs[0].dtype == torch.float32 else 2e-2
    for i, (got, want) in enumerate(zip(*results)):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol, msg=f"{impl} output {i}")


def bench_one(impl: str, mode: str, inputs, device, warmup: int, repeats: int):
    run_forward, run_backward = make_fns(impl, *inputs)
    if mode == "fwd":
        return time_fn(run_forward, device, warmup=warmup, repeats=repeats)
    if mode == "fwd+bwd":
        return time_fn(lambda: run_backward(run_forward()), device, warmup=warmup, repeats=repeats)
    state: dict[str, Any] = {}

    def setup():
        state["out"] = run_forward()

    return time_fn(lambda: run_backward(state["out"]), device, warmup=warmup, repeats=repeats, setup=setup)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = sorted({r["impl"] for r in rows}, key=["eager", "compile", "triton"].index)
    cases = sorted({(r["arch"], r["batch"]) for r in rows}, key=lambda c: (list(ARCH_SHAPES).index(c[0]), c[1]))
    fig, axes = plt.subplots(1, len(MODES), figsize=(5.5 * len(MODES), 4.8), squeeze=False)
    width = 0.8 / len(impls)
    for ax, mode in zip(axes[0], MODES):
        for i, impl in enumerate(impls):
            med, lo, hi = [], [], []
            for arch, batch in cases:
                match = [r for r in rows if (r["arch"], r["batch"], r["mode"], r["impl"]) == (arch, batch, mode, impl)]
                r = match[0] if match else None
                med.append(r["median_ms"] if r else 0.0)
                lo.append(r["median_ms"] - r["p20_ms"] if r else 0.0)
                hi.append(r["p80_ms"] - r["median_ms"] if r else 0.0)
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, med, width, yerr=[lo, hi], label=impl, capsize=2)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{a} B={b}" for a, b in cases], fontsize=8, rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, p20-p80)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"FFM attention, K={first['branches']}, {first['dtype']}, {first['layout']} - {first['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-32 and VGG-16 shapes, batch 128, fewer repeats")
    parser.add_argument("--archs", nargs="+", default=None, choices=list(ARCH_SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument(
        "--impls", nargs="+", default=["eager", "compile", "triton"], choices=["eager", "compile", "triton"]
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (on a shared machine 1 avoids OpenMP barrier thrash)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only; no CSV row, no plot")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.archs or (["resnet32", "vgg16"] if args.quick else list(ARCH_SHAPES))
    batches = args.batches or ([128] if args.quick else [128, 512])
    repeats = args.repeats or (20 if args.quick else 30)
    warmup = 2 if args.quick else 5
    impls = list(args.impls)
    if "triton" in impls and (device.type != "cuda" or not triton_available()):
        impls.remove("triton")
        print(f"note: the Triton op needs a CUDA GPU (device here: {device}); running {', '.join(impls)} only")
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = 64  # one compilation per shape
    else:  # pragma: no cover - older torch
        dynamo_config.cache_size_limit = 64
    torch.manual_seed(0)

    rows: list[dict[str, Any]] = []
    columns = ("median ms", "p20", "p80", "GB/s", "x eager", "MB")
    print(f"{'arch':>14} {'B':>4} {'mode':>8} {'impl':>8} " + " ".join(f"{c:>8}" for c in columns))
    for arch in archs:
        for batch in batches:
            inputs = make_inputs(batch, args.branches, arch, args.classes, DTYPES[args.dtype], args.layout, device)
            channels, height, width = ARCH_SHAPES[arch]
            for impl in impls:
                if impl != "eager":
                    validate(impl, inputs)
            for mode in args.modes:
                eager_ms = None
                for impl in impls:
                    timing = bench_one(impl, mode, inputs, device, warmup, repeats)
                    nbytes = bytes_moved(inputs[0], inputs[1], inputs[2], mode)
                    if impl == "eager":
                        eager_ms = timing.median_ms
                    speedup = eager_ms / timing.median_ms if eager_ms else float("nan")
                    gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
                    row = {
                        **machine_columns("ffm", device),
                        "arch": arch,
                        "batch": batch,
                        "branches": args.branches,
                        "channels": channels,
                        "height": height,
                        "width": width,
                        "classes": args.classes,
                        "hidden": max(channels // 4, 32),
                        "dtype": args.dtype,
                        "layout": args.layout,
                        "mode": mode,
                        "impl": impl,
                        "threads": torch.get_num_threads() if device.type == "cpu" else "",
                        **timing.as_row(),
                        "bytes": nbytes,
                        "gbps": round(gbps, 3),
                        "speedup_vs_eager": round(speedup, 3),
                    }
                    rows.append(row)
                    print(
                        f"{arch:>14} {batch:>4} {mode:>8} {impl:>8} {timing.median_ms:>8.3f} {timing.p20_ms:>8.3f} "
                        f"{timing.p80_ms:>8.3f} {gbps:>8.2f} {speedup:>8.2f} {timing.peak_mem_mb:>8.1f}"
                    )
    if args.no_save or not rows:
        return
    csv_path = append_rows("ffm", rows)
    png_path = RESULTS_DIR / f"ffm_{device.type}.png"
    plot(rows, png_path)
    print(f"rows appended to {csv_path}; plot {png_path}")


if __name__ == "__main__":
    main()
