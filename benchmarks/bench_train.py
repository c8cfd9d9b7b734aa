"""End-to-end training speed: MDE on ResNet-32 with K = 4 (3 auxiliaries + leader) at CIFAR-100 shapes, batch 128,
images/s and seconds per epoch.

Claim under test (benchmarks/GPU.md): okdfast with every speed feature on trains >= 10x faster than the eager
reference trainer researchers use today (benchmarks/reference_trainer.py: fp32, NCHW, a DataLoader of per-image
transforms, a Python loss loop over branches, every okdfast default off), and each feature earns its place. Rows:

    reference        the eager reference trainer (same network, same DataLoader worker count as okdfast's torch
                     loader, ``branch_impl='loop'``, ``fused_loss='off'``: nothing fast enters through 'auto')
    all-on           every feature that applies on this device
    all-but-X        all-on minus feature X (leave-one-out): what X is worth when everything else is on;
                     ``all-but-fused`` is "compiled without the fused ops", the question the fused kernels answer
    okdfast-base     every feature off (fp32, NCHW, eager, reference loss, torch loader, loop branches)
    base+X           okdfast-base plus feature X (add-one)
Features: compile (torch.compile 'default' of forward + loss), fused (the fused loss kernels, CUDA only),
cuda_graphs (okdfast's step graph, CUDA only), fast_loader (the gpu loader), amp (bf16 autocast), channels_last,
grouped (the K branches as one grouped network, okdfast/models/grouped.py, where MethodConfig has ``branch_impl``).

Rows are measured in priority order (reference, all-on, the leave-one-out rows, base, the add-one rows; ``--only``
gives its rows in its own order) and each is written to ``<results>/train.csv`` the moment it is measured.
``--time-budget``: a row starts only when its estimated time fits in what is left (a compiled row: its first
compile, ``COMPILE_GUESS_S`` until this run has measured one, then the slowest warm-up measured; an eager row
``EAGER_GUESS_S``); a row that would not fit is skipped and named, and a cheaper later row may still run, so a GPU
visit's step always ends with the most important rows that fit. ``warmup_seconds`` in every row is the build and
the warm-up steps (compiles, graph capture): what a training run pays before its first timed step.
``--without FEATURE``: those features are never on (a CPU rehearsal without compiling).
Timing: ``--warmup`` steps first (compilation, autotuning, graph capture), then ``--repeats`` windows of
``--steps`` optimizer steps, each timed with a device sync at its ends; the median window gives images/s, with
p20 / p80. Data: synthetic uint8 arrays of CIFAR-100's shape (100 classes, 32x32); the loaders do the same work on
them as on CIFAR. Seconds per epoch = 50,000 / images/s.

    python -m benchmarks.bench_train                       # every row (GPU: a few minutes, most of it compiling)
    python -m benchmarks.bench_train --only reference all-on all-but-fused --time-budget 180   # a GPU visit's step
    python -m benchmarks.bench_train --quick               # CPU: a few steps per row, ratios only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import TimeBudget, add_output_arguments, append_row, machine_columns, results_dir
from benchmarks.reference_trainer import KLLoss, reference_loader, reference_method, reference_step
from okdfast.config import TrainConfig
from okdfast.data import build_data_loaders, load_dataset
from okdfast.run.assemble import build_method, build_training, method_config
from okdfast.run.precision import resolve_amp
from okdfast.utils.distributed import DistInfo

CIFAR_TRAIN_IMAGES = 50_000
COMPILE_GUESS_S = 75.0  # a cold compile of the step (forward + loss + backward) on a GPU machine: an estimate
EAGER_GUESS_S = 20.0  # an eager row: data, build, warm-up and the timed windows


@dataclasses.dataclass(frozen=True)
class Features:
    compile: bool = False
    fused: bool = False
    cuda_graphs: bool = False
    fast_loader: bool = False
    amp: bool = False
    channels_last: bool = False
    grouped: bool = False


def features_for(device: torch.device) -> list[str]:
    """The features that apply here, in leave-one-out priority order."""
    names = ["compile", "fused", "cuda_graphs", "fast_loader", "amp", "channels_last", "grouped"]
    if device.type != "cuda":  # the fused kernels and CUDA graphs need a GPU (the op's CPU path is the reference)
        names.remove("cuda_graphs")
        names.remove("fused")
    return names


def rows_to_run(device: torch.device, without: tuple[str, ...] = ()) -> list[tuple[str, Features | None]]:
    """(name, features) in measuring order; None is the reference trainer. ``without``: features never on."""
    names = [n for n in features_for(device) if n not in without]
    all_on = Features(**{n: True for n in names})
    base = Features()
    return (
        [("reference", None), ("all-on", all_on)]
        + [(f"all-but-{n}", dataclasses.replace(all_on, **{n: False})) for n in names]
        + [("okdfast-base", base)]
        + [(f"base+{n}", dataclasses.replace(base, **{n: True})) for n in names]
    )


def table_order(names: list[str]) -> list[str]:
    """reference, base, base+X, all-on, all-but-X: how the table reads."""
    rank = {"reference": 0, "okdfast-base": 1, "all-on": 3}
    return sorted(names, key=lambda n: (rank.get(n, 2 if n.startswith("base+") else 4), names.index(n)))


def endless(loader: Any) -> Iterator:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(
    step_fn: Any, batches: Iterator, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> tuple[list[float], float]:
    """(seconds of each window of ``steps`` steps, seconds of the ``warmup`` steps before them)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step_fn(*next(batches))
    sync(device)
    warmup_seconds = time.perf_counter() - start
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step_fn(*next(batches))
        sync(device)
        windows.append(time.perf_counter() - start)
    return windows, warmup_seconds


def build_okdfast(features: Features, splits: Any, args: argparse.Namespace, device: torch.device):
    """okdfast's MDE step with ``features``, built by the functions ``python -m okdfast.train`` builds it with
    (okdfast.run.assemble: the method on its device and memory format, SGD and its schedule, the scaler, the step),
    from a TrainConfig at the paper's optimisation defaults."""
    amp = ("auto" if device.type == "cuda" else "bf16") if features.amp else "off"  # auto: bf16, else fp16
    config = TrainConfig(
        method="mde",
        arch=args.arch,
        branches=args.branches,
        batch_size=args.batch_size,
        fused_loss="on" if features.fused else "off",
        branch_impl="grouped" if features.grouped else "loop",
        compile="default" if features.compile else "off",
        cuda_graphs=features.cuda_graphs,
        channels_last=features.channels_last,
        amp=amp,
        device=str(device),
    )
    config.validate()
    amp_dtype = resolve_amp(amp, device)
    torch.manual_seed(0)
    method, model = build_method(config, method_config(config), splits.num_classes, DistInfo(), device)
    _, _, _, step = build_training(config, method, model, amp_dtype, DistInfo(), device)
    train_loader, _ = build_data_loaders(
        splits,
        loader="gpu" if features.fast_loader else "torch",
        device=device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=0,
        drop_last=True,
        channels_last=features.channels_last,
        verbose=False,
    )
    kd_weight = torch.tensor(1.0, device=device)

    def step_fn(images: torch.Tensor, labels: torch.Tensor) -> None:  # the loader delivers on device, in layout
        step(images, labels, kd_weight)

    return step_fn, endless(train_loader)


def build_reference(splits: Any, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    method = reference_method(args.arch, splits.num_classes, args.branches).to(device)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion, criterion_t = torch.nn.CrossEntropyLoss(), KLLoss(method.config.temperature)
    train = splits.train
    loader = reference_loader(train.images, train.labels, splits.mean, splits.std, args.batch_size, args.workers)

    def step_fn(images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        reference_step(method, optimizer, images, labels, 1.0, criterion, criterion_t)

    return step_fn, endless(loader)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--branches", type=int, default=4, help="K (MDE: K-1 auxiliaries + the leader)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per row")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, graph capture)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="DataLoader workers of the reference trainer and of okdfast's torch loader alike",
    )
    parser.add_argument("--train-images", type=int, default=CIFAR_TRAIN_IMAGES)
    parser.add_argument("--quick", action="store_true", help="few steps: for the CPU (ratios only)")
    parser.add_argument("--only", nargs="*", help="run only these rows, in this order (names as in the table)")
    parser.add_argument("--without", nargs="*", default=[], help="features never on (e.g. compile on a CPU)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no row starts that would not fit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-plot", action="store_true")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup, args.workers = 4, 3, 2, min(args.workers, 2)
        args.train_images = min(args.train_images, 4_000)
    device = torch.device(args.device)
    folder = results_dir(args.results_dir, args.commit_results)
    budget = TimeBudget(args.time_budget)

    splits = load_dataset("synthetic", num_classes=100, train_size=args.train_images, test_size=100)
    machine = machine_columns("train", device)
    available = dict(rows_to_run(device, tuple(args.without)))
    unknown = [n for n in args.only or [] if n not in available]
    if unknown:
        print(f"rows not on this device or not known: {', '.join(unknown)} (known: {', '.join(available)})")
    plan = [(n, available[n]) for n in (args.only or available) if n in available]
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    measured: dict[str, float] = {}
    warmups: dict[bool, float] = {}  # compiled or not -> the slowest warm-up measured
    for name, features in plan:
        compiled = features is not None and features.compile
        need = warmups.get(compiled, COMPILE_GUESS_S if compiled else EAGER_GUESS_S) + 10.0
        if args.time_budget is not None and budget.seconds - budget.elapsed() < need:
            left = budget.seconds - budget.elapsed()
            print(f"time budget: skipped row {name} (needs ~{need:.0f} s, {left:.0f} s left)", flush=True)
            continue
        start = time.perf_counter()
        try:
            step_fn, batches = (
                build_reference(splits, args, device)
                if features is None
                else build_okdfast(features, splits, args, device)
            )
            windows, _ = time_windows(
                step_fn, batches, device, warmup=args.warmup, steps=args.steps, repeats=args.repeats
            )
            warmup_seconds = time.perf_counter() - start - sum(windows)  # the build and the warm-up steps
            warmups[compiled] = max(warmups.get(compiled, 0.0), warmup_seconds)
        except Exception as error:  # one broken row must not cost the others (a GPU visit is one shot)
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}"[:500]
            append_row("train", machine | {"row": name, "error": message}, folder)
            print(f"{name:>16}: FAILED ({message})", flush=True)
            failed.append(name)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        per_window = [args.steps * args.batch_size / w for w in windows]
        median = sorted(per_window)[len(per_window) // 2]
        measured[name] = median
        row = machine | {
            "row": name,
            "arch": args.arch,
            "branches": args.branches,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "steps_per_window": args.steps,
            "windows": args.repeats,
            "warmup_steps": args.warmup,
            "images_per_sec": round(median, 2),
            "images_per_sec_p20": round(percentile(per_window, 0.2), 2),
            "images_per_sec_p80": round(percentile(per_window, 0.8), 2),
            "seconds_per_epoch": round(CIFAR_TRAIN_IMAGES / median, 2),
            "speedup_vs_reference": round(median / measured["reference"], 3) if "reference" in measured else "",
            "vs_all_on": round(median / measured["all-on"], 3) if "all-on" in measured else "",
            "features": "reference"
            if features is None
            else ",".join(k for k, v in dataclasses.asdict(features).items() if v) or "none",
            "warmup_seconds": round(warmup_seconds, 1),
            "row_seconds": round(time.perf_counter() - start, 1),
        }
        append_row("train", row, folder)
        rows.append(row)
        ratio = f"x{row['speedup_vs_reference']:.2f} vs reference" if row["speedup_vs_reference"] != "" else ""
        print(
            f"{name:>16}: {median:9.1f} img/s ({CIFAR_TRAIN_IMAGES / median:7.1f} s/epoch) {ratio}  "
            f"[{row['row_seconds']:.0f} s with warm-up]",
            flush=True,
        )
        del step_fn, batches
    if rows:
        print("measured in this run (table order):")
        by_name = {r["row"]: r for r in rows}
        for name in table_order(list(by_name)):
            r = by_name[name]
            ratio = f"x{r['speedup_vs_reference']:.2f} vs reference" if r["speedup_vs_reference"] != "" else ""
            print(f"{name:>16}: {r['images_per_sec']:9.1f} img/s  {ratio}")
        if not args.no_plot:
            plot([by_name[n] for n in table_order(list(by_name))], folder / f"train_{device.type}.png")
        print(f"rows in {folder / 'train.csv'}")
    if failed:
        print(f"failed rows: {', '.join(failed)} (the error column of train.csv)")
        raise SystemExit(1)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 4))
    names = [r["row"] for r in rows]
    values = [r["images_per_sec"] for r in rows]
    errors = [
        [v - r["images_per_sec_p20"] for v, r in zip(values, rows)],
        [r["images_per_sec_p80"] - v for v, r in zip(values, rows)],
    ]
    colours = {"reference": "grey", "all-on": "tab:green", "okdfast-base": "tab:orange"}
    colour = [colours.get(n, "tab:blue" if n.startswith("base+") else "tab:red") for n in names]
    ax.bar(names, values, yerr=errors, color=colour)
    ax.set_ylabel("images / s (median, p20-p80)")
    first = rows[0]
    ax.set_title(
        f"mde {first['arch']} K={first['branches']} batch {first['batch_size']} on {first['device_name']}, "
        f"run {first['run_id']}",
        fontsize=9,
    )
    ax.tick_params(axis="x", rotation=40)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
