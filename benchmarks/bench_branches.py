"""Loop vs grouped branches (``--branch-impl``, okdfast/models/grouped.py): one training step's forward + backward of
the K-branch network, per architecture, K and trunk (shared: ONE-style; dml: K whole networks).

The claim tested: running the K branches as one network (one conv with groups=K per layer, one BN over K * C
channels, one batched classifier) is faster than running them one after another, and by how much, per
(device, arch, K). ``--branch-impl auto`` (okdfast.models.grouped.AUTO_GROUPED) follows these rows.

A step is what training does to the network: forward in train mode (BN batch statistics) on a (B, 3, 32, 32)
batch in the training memory format (channels-last by default) under the training dtype (bf16 autocast on CUDA,
fp32 on the CPU, by default), a loss reading the (B, K, C) logits and the (B, K, D) pooled features, backward;
gradients are zeroed untimed before every sample. Both impls start from the same seed (the same weights) and are
checked to give the same fp32 eval logits before either is timed. Timing by the shared harness
(benchmarks/harness.py: CUDA events after the warm-up, perf_counter on the CPU), median with p20 / p80, images/s
and peak memory; the grouped row carries ``speedup`` = loop median / grouped median.

Rows are written as they are measured, most important first (ResNet-32 K=4, the GPU plan's target, then one K=4
row per family, then the other K and DML), to the harness' folder (runs/bench/ unless ``--results-dir`` or
``--commit-results``); ``--time-budget`` stops before a row that would start after it. Every row carries the load
columns of the harness (a row measured on a busy machine is warned on screen and in its ``load_warning``); Ctrl-C
stops with a line naming the rows written.

    python -m benchmarks.bench_branches --threads 1 --commit-results   # the CPU rows in benchmarks/results (all)
    python -m benchmarks.bench_branches --quick --device cpu           # a minute: K=4 of four archs, one DML row
    python -m benchmarks.bench_branches --quick                        # on CUDA: the GPU plan's step (bf16, B=128)
    python -m benchmarks.bench_branches --archs resnet32 wrn20_8 --branches 2 4 8 --batch-size 128 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from okdfast.models import MultiBranchNet, list_models  # noqa: E402

FAMILIES = ["resnet32", "wrn20_8", "vgg16", "densenet40_12", "resnet110"]  # one K=4 row each, right after resnet32
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_QUICK_DML = ("resnet32",)
# --quick on the CPU: K=4 with a shared trunk for these (a ResNet, the DenseNet-BC, the VGG with the MLP head, the
# deepest ResNet), DML for CPU_QUICK_DML, and no row starts after QUICK_CPU_BUDGET_S: about a minute on 2 idle cores
CPU_QUICK_ARCHS = ("resnet32", "densenet40_12_bc", "vgg16_mlp", "resnet110")
QUICK_CUDA_BUDGET_S = 40.0  # --quick on CUDA: no row starts after this (the GPU plan's step has 60 s, imports included)
QUICK_CPU_BUDGET_S = 45.0
Case = tuple[str, int, str]  # (arch, K, trunk)


def plan(args: argparse.Namespace) -> list[Case]:
    """The (arch, K, trunk) rows, most important first: resnet32 K=4 shared (the GPU plan's target), one K=4 shared
    row per family, every arch at K=4, then the other K, then DML in the same order. ``--quick`` on the CPU keeps
    K=4 and DML to CPU_QUICK_DML (eight CPU VGG-16s or WRN-20-8s take minutes a step)."""
    archs = args.archs
    cases = [(a, k, t) for a in archs for k in args.branches for t in args.trunks]
    if args.quick and not args.device.startswith("cuda"):
        cases = [(a, k, t) for a, k, t in cases if k == 4 and (t == "shared" or a in CPU_QUICK_DML)]

    def priority(case: Case) -> tuple:
        arch, k, trunk = case
        family = FAMILIES.index(arch) if arch in FAMILIES else len(FAMILIES)
        return (trunk != "shared", k != 4, family, archs.index(arch), k)

    return sorted(cases, key=priority)


def build(arch: str, k: int, trunk: str, impl: str, device: torch.device, channels_last: bool) -> MultiBranchNet:
    torch.manual_seed(0)  # the same weights under both impls
    net = MultiBranchNet(arch, 100, k, shared_trunk=trunk == "shared", branch_impl=impl).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def check_equal(nets: dict[str, MultiBranchNet], images: torch.Tensor) -> float:
    """Max |grouped - loop| of the fp32 eval logits relative to their scale; raises if they differ (wrong results
    are not timed). The equality itself is tests/test_grouped_branches.py's; this guards the benchmark's setup."""
    with torch.no_grad():
        out = {impl: net.eval()(images).logits.float() for impl, net in nets.items()}
    for net in nets.values():
        net.train()
    scale = out["loop"].abs().max().clamp_min(1e-6)
    error = ((out["grouped"] - out["loop"]).abs().max() / scale).item()
    if not error <= 1e-3:
        raise AssertionError(f"grouped differs from loop by {error:.2e} (relative): not timing a wrong result")
    return error


def step_fn(net: torch.nn.Module, images: torch.Tensor, amp: torch.dtype | None):
    def autocast():
        return torch.autocast(images.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step() -> None:
        with autocast():
            out = net(images)
            loss = out.logits.float().logsumexp(-1).mean() + out.pooled.float().square().mean()
        loss.backward()

    return step


def measure(
    case: Case, args: argparse.Namespace, device: torch.device, base: dict[str, Any], folder: Path, watch: Any
) -> list[dict[str, Any]]:
    """The loop row, then the grouped row (with its speedup), of one (arch, K, trunk), each written as measured."""
    arch, k, trunk = case
    amp = AMP_DTYPES[args.amp]
    rows: list[dict[str, Any]] = []
    torch.manual_seed(1)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    nets = {impl: build(arch, k, trunk, impl, device, args.channels_last) for impl in ("loop", "grouped")}
    error = check_equal(nets, images)
    medians: dict[str, float] = {}
    for impl, net in nets.items():
        model = torch.compile(net) if args.compile else net
        watch.begin()
        timing = harness.time_fn(
            step_fn(model, images, amp),
            device,
            warmup=args.warmup,
            repeats=args.repeats,
            setup=lambda net=net: net.zero_grad(set_to_none=True),
        )
        medians[impl] = timing.median_ms
        grouped = impl == "grouped"
        row = {
            **base,
            **watch.columns(f"{arch} K={k} {trunk} {impl}"),
            "arch": arch,
            "branches": k,
            "trunk": trunk,
            "impl": impl,
            "batch_size": args.batch_size,
            "channels_last": args.channels_last,
            "amp": args.amp,
            "compile": args.compile,
            "threads": torch.get_num_threads() if device.type == "cpu" else "",
            **timing.as_row(),
            "images_per_s": args.batch_size / (timing.median_ms / 1e3),
            "speedup": medians["loop"] / timing.median_ms if grouped else "",
            "max_rel_error": error if grouped else "",
        }
        harness.append_row("branches", row, folder)
        rows.append(row)
        speed = f"  grouped/loop {row['speedup']:.2f}x" if grouped else ""
        print(
            f"{arch:22s} K={k} {trunk:6s} {impl:7s} {timing.median_ms:9.2f} ms "
            f"[{timing.p20_ms:.2f}, {timing.p80_ms:.2f}]{speed}",
            flush=True,
        )
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path, list[str]]:
    """Every planned row: the rows measured, the CSV's path, and the cases that failed (each an ``error`` row)."""
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does (okdfast.utils.seeding) unless --deterministic
    folder = harness.results_dir(args.results_dir, args.commit_results)
    budget = harness.TimeBudget(args.time_budget)
    base = harness.machine_columns("branches", device)
    cases = plan(args)
    details = f"{len(cases)} cases, batch {args.batch_size}, amp {args.amp}" + (
        f", no row starts after {args.time_budget:.0f} s" if args.time_budget else ""
    )
    watch = harness.print_header("bench_branches", device, folder / "branches.csv", details)
    failed: list[str] = []
    rows: list[dict[str, Any]] = []
    for index, (arch, k, trunk) in enumerate(cases):
        if budget.skip(", ".join(f"{a} K={kk} {t}" for a, kk, t in cases[index:])):
            break
        try:
            rows += measure((arch, k, trunk), args, device, base, folder, watch)
        except Exception as error:  # one broken row must not cost the others (a GPU visit is one shot)
            message = f"{type(error).__name__}: {error}"[:500]
            print(f"{arch} K={k} {trunk}: FAILED {message}", flush=True)
            harness.append_row(
                "branches", {**base, "arch": arch, "branches": k, "trunk": trunk, "error": message}, folder
            )
            failed.append(f"{arch} K={k} {trunk}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if watch.summary():
        print(watch.summary(), flush=True)
    return rows, folder / "branches.csv", failed


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """grouped/loop speedup per arch, one bar per K, a panel per trunk (matplotlib; skipped with a line if absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return
    rows = [r for r in rows if r["impl"] == "grouped"]
    trunks = list(dict.fromkeys(r["trunk"] for r in rows))
    fig, axes = plt.subplots(len(trunks), 1, figsize=(10, 3.4 * len(trunks)), squeeze=False)
    for ax, trunk in zip(axes[:, 0], trunks):
        sel = [r for r in rows if r["trunk"] == trunk]
        archs = sorted({r["arch"] for r in sel})
        ks = sorted({r["branches"] for r in sel})
        width = 0.8 / len(ks)
        for n, k in enumerate(ks):
            points = [(archs.index(r["arch"]), r["speedup"]) for r in sel if r["branches"] == k]
            ax.bar(
                [x + (n - (len(ks) - 1) / 2) * width for x, _ in points], [y for _, y in points], width, label=f"K={k}"
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(archs)))
        ax.set_xticklabels(archs, rotation=20, fontsize=7)
        ax.set_ylabel("loop ms / grouped ms")
        ax.set_title(f"{trunk} trunk", fontsize=9)
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(
        f"grouped vs loop branches, fwd+bwd: {first['device_name']}, batch {first['batch_size']}, amp {first['amp']}"
        f", threads {first['threads'] or '-'}, torch {first['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=str(harness.default_device()))
    parser.add_argument("--archs", nargs="+", default=None, help="default: every registered arch (--quick: fewer)")
    parser.add_argument("--branches", nargs="+", type=int, default=[2, 4, 8], help="values of K")
    parser.add_argument("--trunks", nargs="+", choices=["shared", "dml"], default=None, help="default: both")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on the CPU")
    parser.add_argument("--amp", choices=["auto", *AMP_DTYPES], default="auto", help="auto: bf16 on CUDA, else off")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile each network (compiles in the warm-up)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA, 1 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 30 CUDA, 3 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CUDA: {', '.join(FAMILIES)}; CPU: K=4 of {', '.join(CPU_QUICK_ARCHS)}, DML only for "
        f"{' and '.join(CPU_QUICK_DML)} (about a minute)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help=f"seconds: no row starts after them (default: none; --quick: {QUICK_CUDA_BUDGET_S:.0f} on CUDA, "
        f"{QUICK_CPU_BUDGET_S:.0f} on the CPU)",
    )
    harness.add_output_arguments(parser)
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.amp = ("bf16" if on_cuda else "off") if args.amp == "auto" else args.amp
    args.batch_size = args.batch_size or (128 if on_cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (30 if on_cuda else 3)
    if args.compile:
        args.warmup = max(args.warmup, 3)
    if args.quick and args.time_budget is None:
        args.time_budget = QUICK_CUDA_BUDGET_S if on_cuda else QUICK_CPU_BUDGET_S
    if args.trunks is None:
        args.trunks = ["shared", "dml"]
    if args.archs is None:
        args.archs = (FAMILIES if on_cuda else list(CPU_QUICK_ARCHS)) if args.quick else list_models()
    rows, path, failed = run(args)
    if any(r["impl"] == "grouped" for r in rows):
        plot(rows, path.parent / f"branches_{rows[0]['device']}.png")
    print(f"{len(rows)} rows in {path}")
    if failed:
        print(f"failed rows: {', '.join(failed)} (the error column of branches.csv)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(harness.run_cli(main))
