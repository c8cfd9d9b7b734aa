"""Benchmark of the fused multi-branch online-KD loss (``okdfast.ops.online_kd``: the op a training step calls)
against its PyTorch reference, eager and under torch.compile, for the teacher forms the methods really use, from
CIFAR shapes (B=128, K=3..5, C=10/100) up to B=4096, K=4, C=32768.

Claim under test (benchmarks/GPU.md): fused forward + backward >= 1.5x torch.compile of the reference at
128x4x100 with both under CUDA graphs, and >= 80% of the measured copy bandwidth at 4096x4x32768 bf16.

Teacher forms (``--forms``), each with the options its method passes (okdfast/methods/*.py):
    mean      t = mean of the K branches, detached (the op's defaults)
    explicit  a (B, C) teacher head trained by its own CE and the KL (``detach_teacher=False``)
    one       ONE: gate weights (B, K), one shared teacher, teacher CE, KL target trained
    mde       MDE: (B, K, K) weights (rows 0..K-2 the FFM target, row K-1 the leader's mean of the auxiliaries),
              teacher CE on row 0 only, the leader's row detached (teacher_ce_rows=(0,), detached_teacher_rows=(K-1,))
    okddip    OKDDip: (B, K, K) attention + leader row, KL targets trained
    cl_ilr    CL-ILR: a constant (K, K) matrix (the mean of the other branches)
    dml       DML: peer mode, peers detached
Every call gets ``kd_weight`` as a one-element device tensor, as the training loop passes the ramp-up.

Implementations (``--impls``): ``reference`` (eager ``okdfast.ops.reference.online_kd_reference``), ``compiled``
(``torch.compile(reference, fullgraph=True, dynamic=False)``), ``fused`` (the Triton op, what an eager step
runs; no host sync, as in training) and ``fused-compiled`` (the op inside torch.compile, what a ``--compile`` step
runs). The CPU runs ``reference``, ``op`` (the public op as a user calls it: its input checks, then the reference
under autograd, the CPU path) and ``compiled``. Every implementation is
validated against the eager reference (loss and every gradient) before it is timed.

Phases: ``fwd+bwd`` is the headline (``headline`` column): the loss and the gradients of every input that is
trained, what a step pays. ``fwd`` (inputs requiring grad: the fused forward also saves the statistics its backward
reads) and ``bwd`` (the forward rerun untimed before each sample) are timed apart and labelled as such; the split
differs between implementations (the reference saves activations, the op statistics), so compare fwd+bwd.
``timing``: ``stream`` (CUDA events around back-to-back calls) and, for shapes up to ``--graph-max-elements``
logits, ``cuda-graph`` (the calls captured in a CUDA graph and replayed: no launch overhead, as under
``--cuda-graphs``). GB/s: ``bytes_min`` is what any implementation must move (inputs read once, gradients written
once); ``kernel_bytes`` what the fused kernels move (logits read by the forward and again by the backward, the
gradient written); ``pct_copy_bw`` divides by the copy bandwidth measured on this machine (benchmarks/harness.py).

Rows are written to ``<results>/loss.csv`` as they are measured (untracked ``runs/bench/`` unless
``--results-dir`` / ``--commit-results``), the plot to ``loss_<device>.png``.

    python -m benchmarks.bench_loss --quick                       # three shapes, form mde
    python -m benchmarks.bench_loss                               # every default shape, forms mean explicit one mde
    python -m benchmarks.bench_loss --preset suite --time-budget 140   # what gpu_suite.sh's kernels stage runs
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    TimeBudget,
    add_output_arguments,
    append_row,
    copy_bandwidth_gbps,
    default_device,
    machine_columns,
    results_dir,
    time_cuda_graph,
    time_fn,
)
from okdfast.compat import raise_recompile_limit  # noqa: E402
from okdfast.ops.dispatch import triton_runs_on  # noqa: E402
from okdfast.ops.online_kd import online_kd  # noqa: E402
from okdfast.ops.online_kd_options import OnlineKDOptions  # noqa: E402
from okdfast.ops.reference import online_kd_reference  # noqa: E402

CIFAR_SHAPES = [(128, k, c) for c in (10, 100) for k in (3, 4, 5)]
SHAPES = CIFAR_SHAPES + [(1024, 4, 1000), (4096, 4, 1000), (4096, 4, 32768)]  # (B, K, C)
CPU_SHAPES = CIFAR_SHAPES + [(1024, 4, 1000)]  # the larger ones take minutes per row on a CPU
QUICK_SHAPES = [(128, 4, 10), (128, 4, 100), (1024, 4, 1000)]
HEADLINE_SHAPES = [(128, 4, 100), (4096, 4, 32768)]
FORMS = ("mean", "explicit", "one", "mde", "okddip", "cl_ilr", "dml")
DEFAULT_FORMS = ["mean", "explicit", "one", "mde"]
PRESETS = {  # gpu_suite.sh's kernels stage: the headline shapes for every form first, then the others
    "suite": dict(
        combos=[(f, s) for s in HEADLINE_SHAPES for f in ("mde", "one", "explicit", "mean")]
        + [(f, s) for s in ((128, 4, 10), (1024, 4, 1000), (4096, 4, 1000)) for f in ("mde", "one")],
        dtypes=["bf16"],
    )
}
PHASES = ("fwd+bwd", "fwd", "bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_IMPLS = ["reference", "compiled", "fused", "fused-compiled"]
CPU_IMPLS = ["reference", "op", "compiled"]


# ---------------------------------------------------------------------------------------------------------------
# inputs: the teacher forms of the methods
# ---------------------------------------------------------------------------------------------------------------


def form_options(form: str, num_branches: int) -> OnlineKDOptions:
    """The options each method passes to the op (okdfast/methods/<method>.py); kd_weight comes as a tensor."""
    if form == "mean":
        return OnlineKDOptions()
    if form in ("explicit", "one"):
        return OnlineKDOptions(teacher_ce_weight=1.0, detach_teacher=False)
    if form == "mde":
        return OnlineKDOptions(
            teacher_ce_weight=1.0,
            teacher_ce_rows=(0,),
            detach_teacher=False,
            detached_teacher_rows=(num_branches - 1,),
        )
    if form in ("okddip", "cl_ilr"):
        return OnlineKDOptions(detach_teacher=False)
    if form == "dml":
        return OnlineKDOptions(mode="peer", detach_teacher=True)
    raise ValueError(f"form {form!r}: use one of {', '.join(FORMS)}")


def _two_level(aux_rows: torch.Tensor) -> torch.Tensor:
    """(B, K-1, K-1) auxiliary rows -> (B, K, K): a zero leader column, then the leader's uniform row (as
    okdfast.methods.two_level.TwoLevelMethod.teacher_weights builds it)."""
    batch, aux, _ = aux_rows.shape
    leader = F.pad(torch.full((batch, 1, aux), 1.0 / aux, device=aux_rows.device), (0, 1))
    return torch.cat([F.pad(aux_rows, (0, 1)), leader], dim=1)


def make_inputs(
    shape: tuple[int, int, int], dtype: torch.dtype, form: str, device: torch.device, seed: int = 0, values: bool = True
):
    """``(logits, target, teacher, teacher_weights, kd_weight)`` of one call; the trained ones require grad.
    ``values=False``: the logits and teacher uninitialised (only shapes, strides and dtypes matter: compile checks)."""
    batch, branches, classes = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device)

    def logits_like(*size: int) -> torch.Tensor:
        if not values:
            return torch.empty(*size, dtype=dtype, device=device).requires_grad_()
        return (randn(*size) * 3).to(dtype).requires_grad_()

    logits = logits_like(batch, branches, classes)
    target = torch.randint(0, classes, (batch,), generator=gen, device=device)
    teacher = weights = None
    if form == "explicit":
        teacher = logits_like(batch, classes)
    elif form == "one":
        weights = torch.softmax(randn(batch, branches), dim=-1).requires_grad_()
    elif form == "mde":
        attention = torch.softmax(randn(batch, 1, branches - 1), dim=-1).expand(-1, branches - 1, -1)
        weights = _two_level(attention).requires_grad_()
    elif form == "okddip":
        weights = _two_level(torch.softmax(randn(batch, branches - 1, branches - 1), dim=-1)).requires_grad_()
    elif form == "cl_ilr":
        weights = ((1.0 - torch.eye(branches, device=device)) / (branches - 1)).unsqueeze(0)  # (1, K, K) buffer
    kd_weight = torch.tensor([0.5], device=device)  # a ramp-up value on the device, as the training loop passes it
    return logits, target, teacher, weights, kd_weight


def trained_inputs(logits, teacher, weights) -> list[torch.Tensor]:
    return [x for x in (logits, teacher, weights) if x is not None and x.requires_grad]


def loss_fns(options: OnlineKDOptions) -> dict[str, Any]:
    def reference(logits, target, teacher, weights, kd_weight):
        return online_kd_reference(logits, target, teacher, weights, options, kd_weight.reshape(()))[0]

    def fused(logits, target, teacher, weights, kd_weight):
        return online_kd(logits, target, teacher, weights, options, kd_weight, kernel=True)[0]

    def op(logits, target, teacher, weights, kd_weight):  # the public op as a user calls it: checks, then dispatch
        return online_kd(logits, target, teacher, weights, options, kd_weight)[0]

    return {"reference": reference, "fused": fused, "op": op}


def make_impl(impl: str, options: OnlineKDOptions, backend: str):
    fns = loss_fns(options)
    if impl == "reference":
        return fns["reference"]
    if impl in ("fused", "op"):
        return fns[impl]
    # a fresh torch.compile per (form, dtype, shape): dynamic=False specialises each shape, as a training run does
    base = fns["reference"] if impl == "compiled" else fns["fused"]
    return torch.compile(base, fullgraph=True, dynamic=False, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# bytes, validation, phases
# ---------------------------------------------------------------------------------------------------------------


def bytes_moved(shape, dtype: torch.dtype, form: str) -> dict[str, int]:
    """Bytes per phase: ``min`` (inputs read once, gradients of the trained inputs written once) and ``kernel``
    (the fused kernels: the forward reads the inputs, the backward reads them again and writes the gradients)."""
    batch, branches, classes = shape
    size = torch.finfo(dtype).bits // 8
    logits = batch * branches * classes * size
    teacher = batch * classes * size if form == "explicit" else 0
    weights = batch * branches * branches * 4 if form in ("mde", "okddip") else batch * branches * 4 * (form == "one")
    reads = logits + teacher + weights + batch * 8  # + int64 labels
    writes = logits + teacher + weights  # the gradients (a detached mean has none besides the logits')
    return {
        "min": {"fwd": reads, "bwd": writes, "fwd+bwd": reads + writes},
        "kernel": {"fwd": reads, "bwd": reads + writes, "fwd+bwd": 2 * reads + writes},
    }


def estimated_reference_peak(shape) -> int:
    batch, branches, classes = shape
    return 16 * batch * branches * classes * 4  # ~a dozen fp32 (B, K, C) temporaries of the eager fwd + bwd


def validate(fn, reference, inputs: tuple) -> float:
    """Max error of fn's loss and gradients relative to the largest reference value (raises when too large)."""
    logits, _, teacher, weights, _ = inputs
    wrt = trained_inputs(logits, teacher, weights)
    got = [fn(*inputs)]
    got += torch.autograd.grad(got[0], wrt)
    expected = [reference(*inputs)]
    expected += torch.autograd.grad(expected[0], wrt)
    worst = 0.0
    for a, b in zip(got, expected):
        scale = b.float().abs().max().clamp_min(1e-12)
        worst = max(worst, ((a.float() - b.float()).abs().max() / scale).item())
    tol = 1e-4 if logits.dtype == torch.float32 else 2e-2
    if not worst <= tol:
        raise AssertionError(f"validation failed: relative error {worst:.2e} > {tol}")
    return worst


def phase_calls(fn, inputs: tuple) -> dict[str, tuple]:
    """{phase: (timed call, untimed setup before each sample)}; gradients by autograd.grad (nothing accumulates)."""
    logits, _, teacher, weights, _ = inputs
    wrt = trained_inputs(logits, teacher, weights)
    state: dict[str, torch.Tensor] = {}

    def forward():
        state["loss"] = fn(*inputs)

    def backward():
        torch.autograd.grad(state["loss"], wrt)

    def both():
        torch.autograd.grad(fn(*inputs), wrt)

    return {"fwd+bwd": (both, None), "fwd": (forward, None), "bwd": (backward, forward)}


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace, on_gpu: bool) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(form, dtype, shape) in the order they are measured (the headline ones first)."""
    if args.preset:
        preset = PRESETS[args.preset]
        dtypes = args.dtype or preset["dtypes"]
        return [(form, d, shape) for d in dtypes for form, shape in preset["combos"]]
    shapes = QUICK_SHAPES if args.quick else (SHAPES if on_gpu else CPU_SHAPES)
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    forms = args.forms or (["mde"] if args.quick else DEFAULT_FORMS)
    dtypes = args.dtype or (["bf16", "fp32"] if on_gpu else ["fp32"])
    return [(form, d, shape) for d in dtypes for shape in shapes for form in forms]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    impls = args.impls or (GPU_IMPLS if on_gpu else CPU_IMPLS)
    if any(i.startswith("fused") for i in impls) and not (on_gpu and triton_runs_on(device)):
        print("fused (Triton): needs a CUDA GPU; skipped here (on a CPU the op is the reference itself)")
        impls = [i for i in impls if not i.startswith("fused")]
    combos = plan(args, on_gpu)
    # one function compiled for every (form, dtype, shape): raise the recompile limit, and fail rather than fall
    # back to eager silently when it is reached (a 'compiled' row must be compiled)
    raise_recompile_limit(4 * len(combos) + 16)
    memory = torch.cuda.get_device_properties(device).total_memory if on_gpu else 24 * 2**30
    copy_gbps = copy_bandwidth_gbps(device)
    base = machine_columns("loss", device) | {"torch_threads": torch.get_num_threads(), "copy_gbps": round(copy_gbps)}
    folder = results_dir(args.results_dir, args.commit_results)
    budget = TimeBudget(args.time_budget)
    print(f"device {base['device_name']}: measured copy bandwidth {copy_gbps:.0f} GB/s; rows -> {folder}/loss.csv")
    rows: list[dict[str, Any]] = []
    args.failures = 0
    for n, (form, dtype_name, shape) in enumerate(combos):
        if budget.skip(f"{len(combos) - n} (form, dtype, shape) combination(s) from {form} {dtype_name} {shape} on"):
            break
        if estimated_reference_peak(shape) > 0.8 * memory:
            print(f"{form} {dtype_name} {shape}: skipped, the eager reference would need more memory")
            continue
        rows += run_combo(args, device, impls, form, dtype_name, shape, base, folder, copy_gbps)
    if args.failures:
        print(f"{args.failures} implementation(s) failed: see the error column of {folder}/loss.csv")
    return rows


def measure(args, device, fn, reference, inputs, graphed: bool) -> tuple[float, list[tuple[str, str, Any]]]:
    """Validate ``fn`` against the eager reference, then time its phases: (max error, [(phase, timing, Timing)])."""
    error = validate(fn, reference, inputs)
    calls = phase_calls(fn, inputs)
    timings = []
    for phase, (call, setup) in calls.items():
        if phase in args.phases:
            timing = time_fn(call, device, warmup=args.warmup, repeats=args.repeats, setup=setup)
            timings.append((phase, "stream", timing))
    if graphed and "fwd+bwd" in args.phases:
        timings.append(("fwd+bwd", "cuda-graph", time_cuda_graph(calls["fwd+bwd"][0], device, repeats=args.repeats)))
    return error, timings


def run_combo(args, device, impls, form, dtype_name, shape, base, folder, copy_gbps) -> list[dict[str, Any]]:
    dtype = DTYPES[dtype_name]
    options = form_options(form, shape[1])
    inputs = make_inputs(shape, dtype, form, device)
    moved = bytes_moved(shape, dtype, form)
    reference = loss_fns(options)["reference"]
    graphed = device.type == "cuda" and shape[0] * shape[1] * shape[2] <= args.graph_max_elements
    medians: dict[tuple[str, str, str], float] = {}
    rows = []
    where = {"form": form, "shape": "x".join(map(str, shape)), "batch": shape[0], "branches": shape[1]}
    where |= {"classes": shape[2], "dtype": dtype_name}
    for impl in impls:
        try:
            error, timings = measure(
                args, device, make_impl(impl, options, args.compile_backend), reference, inputs, graphed
            )
        except Exception as failure:  # a failed validation or a crash costs this implementation, not the run
            if type(failure).__name__ == "FailOnRecompileLimitHit":  # a flaw of this benchmark, not of a kernel
                raise
            traceback.print_exc()
            message = f"{type(failure).__name__}: {failure}"[:500]
            append_row("loss", base | where | {"impl": impl, "error": message}, folder)
            print(f"{form} {dtype_name} {where['shape']} {impl}: FAILED ({message})", flush=True)
            args.failures += 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for phase, timing_mode, timing in timings:
            medians[(impl, phase, timing_mode)] = timing.median_ms
            seconds = timing.median_ms * 1e-3
            fused = impl.startswith("fused")
            row = (
                base
                | where
                | {
                    "impl": impl,
                    "phase": phase,
                    "timing": timing_mode,
                    "headline": phase == "fwd+bwd",
                    **timing.as_row(),
                    "bytes_min": moved["min"][phase],
                    "gbps": round(moved["min"][phase] / seconds / 1e9, 2),
                    "pct_copy_bw": round(100 * moved["min"][phase] / seconds / 1e9 / copy_gbps, 1),
                    "kernel_bytes": moved["kernel"][phase] if fused else "",
                    "kernel_pct_copy_bw": round(100 * moved["kernel"][phase] / seconds / 1e9 / copy_gbps, 1)
                    if fused
                    else "",
                    "max_rel_error": error,
                    "compile_backend": args.compile_backend if "compiled" in impl else "",
                }
            )
            for other in ("reference", "compiled"):
                key = (other, phase, timing_mode)
                row[f"speedup_vs_{other}"] = round(medians[key] / timing.median_ms, 3) if key in medians else ""
            append_row("loss", row, folder)
            rows.append(row)
            ratios = [
                f"x{row[f'speedup_vs_{other}']:.2f} vs {other}"
                for other in ("reference", "compiled")
                if other != impl and row[f"speedup_vs_{other}"] != ""
            ]
            print(
                f"{form:8s} {dtype_name:4s} {row['shape']:>14s} {impl:14s} {phase:7s} {timing_mode:10s} "
                f"{timing.median_ms:9.4f} ms [{timing.p20_ms:.4f}, {timing.p80_ms:.4f}] {row['gbps']:8.1f} GB/s "
                f"({row['pct_copy_bw']:5.1f}% copy)  " + "  ".join(ratios),
                flush=True,
            )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """fwd+bwd medians (stream timing) per shape, one panel per (form, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["phase"] == "fwd+bwd" and r["timing"] == "stream"]
    keys = sorted({(r["form"], r["dtype"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3.2 * max(len(keys), 1)), squeeze=False)
    for ax, (form, dtype) in zip(axes[:, 0], keys):
        sel = [r for r in rows if (r["form"], r["dtype"]) == (form, dtype)]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        width = 0.8 / max(len(impls), 1)
        for n, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for s, shape in enumerate(shapes):
                match = [r for r in sel if r["impl"] == impl and r["shape"] == shape]
                if match:
                    r = match[0]
                    xs.append(s + (n - (len(impls) - 1) / 2) * width)
                    ys.append(r["median_ms"])
                    lo.append(r["median_ms"] - r["p20_ms"])
                    hi.append(r["p80_ms"] - r["median_ms"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=impl, capsize=2)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms (median, p20-p80)")
        ax.set_title(f"{form} {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    first = rows[0] if rows else {}
    fig.suptitle(
        f"online-KD loss (B x K x C) on {first.get('device_name', '')}, torch {torch.__version__}, "
        f"run {first.get('run_id', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark the fused online-KD loss against its reference.")
    parser.add_argument("--quick", action="store_true", help="three shapes, form mde")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a fixed plan (gpu_suite.sh)")
    parser.add_argument("--shapes", nargs="+", default=None, help="BxKxC shapes, e.g. 128x4x100 4096x4x32768")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=None, help="default: mean explicit one mde")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--impls", nargs="+", choices=GPU_IMPLS + ["op"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="default: all three")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graph-max-elements", type=int, default=2**21, help="largest B*K*C timed under CUDA graphs")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; stop before the next combination")
    parser.add_argument("--no-plot", action="store_true")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if rows and not args.no_plot:
        png = results_dir(args.results_dir, args.commit_results) / f"loss_{rows[0]['device']}.png"
        plot(rows, png)
        print(f"{len(rows)} rows; plot {png}")
    return 1 if args.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
