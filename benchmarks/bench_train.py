"""End-to-end training speed: a 3-branch ResNet-32 (MDE) on CIFAR-100 shapes, images/s and seconds per epoch.

Claim measured: how much faster okdfast trains than the eager reference trainer researchers use today
(benchmarks/reference_trainer.py: fp32, NCHW, DataLoader of per-image transforms with workers, a Python loss loop
over branches), and what each speed feature contributes. Rows, all in one run, side by side:

    reference            the eager reference trainer
    okdfast-base         okdfast with every speed feature off (fp32, NCHW, eager, reference loss, torch loader)
    +channels_last, +amp, +compile, +fused, +fast_loader, +cuda_graphs
                         okdfast-base with that one feature on (fused = fused loss and fused FFM ops;
                         fast_loader = the gpu loader; cuda_graphs only on CUDA)
    all-on               every feature that applies on this device

Timing: ``--warmup`` steps first (they absorb compilation and autotuning), then ``--repeats`` windows of
``--steps`` optimizer steps, each timed with a device sync at its ends; the median window gives images/s, with
p20/p80. Data: synthetic uint8 arrays of CIFAR-100's shape (100 classes, 32x32); the loaders do the same work
on them as on CIFAR. Seconds per epoch = 50,000 / images/s.

    python -m benchmarks.bench_train              # full (GPU: a few hundred steps per row)
    python -m benchmarks.bench_train --quick      # CPU: a few dozen steps per row, ratios only
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS_DIR, append_rows, machine_columns
from benchmarks.reference_trainer import KLLoss, reference_loader, reference_step
from okdfast.data import build_data_loaders, load_dataset
from okdfast.methods import MethodConfig, create_method
from okdfast.step import TrainStep, build_optimizer

CIFAR_TRAIN_IMAGES = 50_000


@dataclasses.dataclass(frozen=True)
class Features:
    channels_last: bool = False
    amp: bool = False
    compile: bool = False
    fused: bool = False
    fast_loader: bool = False
    cuda_graphs: bool = False


def rows_to_run(device: torch.device) -> list[tuple[str, Features | None]]:
    base = Features()
    singles = ["channels_last", "amp", "compile", "fused", "fast_loader"] + (
        ["cuda_graphs"] if device.type == "cuda" else []
    )
    all_on = Features(**{name: True for name in singles})
    return (
        [("reference", None), ("okdfast-base", base)]
        + [(f"+{n}", dataclasses.replace(base, **{n: True})) for n in singles]
        + [("all-on", all_on)]
    )


def endless(loader: Any) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def endless_plain(loader: Any) -> Iterator:
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(
    step_fn: Any, batches: Iterator, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> list[float]:
    """Seconds of each window of ``steps`` steps, after ``warmup`` steps."""
    for _ in range(warmup):
        step_fn(*next(batches))
    sync(device)
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step_fn(*next(batches))
        sync(device)
        windows.append(time.perf_counter() - start)
    return windows


def build_okdfast(features: Features, splits: Any, args: argparse.Namespace, device: torch.device):
    amp_dtype = None
    if features.amp:
        amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    config = MethodConfig(num_branches=args.branches)
    fused = "on" if features.fused else "off"
    config = dataclasses.replace(config, fused_loss=fused)
    if hasattr(config, "fused_ffm"):
        config = dataclasses.replace(config, fused_ffm=fused)
    torch.manual_seed(0)
    method = create_method("mde", args.arch, splits.num_classes, config).to(device)
    if features.channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        method.parameters(),
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        implementation="auto",
        device=device,
        lr_as_tensor=features.cuda_graphs,
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step = TrainStep(
        method,
        method,
        optimizer,
        scaler,
        device=device,
        amp_dtype=amp_dtype,
        compile_mode="default" if features.compile else "off",
        cuda_graphs=features.cuda_graphs,
        full_batch=args.batch_size,
    )
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
    kd_scale = torch.tensor(1.0, device=device)

    def step_fn(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True)
        if features.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        step(images, labels.to(device, non_blocking=True), kd_scale)

    return step_fn, endless(train_loader)


def build_reference(splits: Any, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    method = create_method("mde", args.arch, splits.num_classes, MethodConfig(num_branches=args.branches)).to(device)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion, criterion_t = torch.nn.CrossEntropyLoss(), KLLoss(3.0)
    train = splits.train
    loader = reference_loader(train.images, train.labels, splits.mean, splits.std, args.batch_size, args.workers)

    def step_fn(images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        reference_step(method, optimizer, images, labels, 1.0, 1.0, criterion, criterion_t)

    return step_fn, endless_plain(loader)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per row")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (reference and torch loader)")
    parser.add_argument("--train-images", type=int, default=CIFAR_TRAIN_IMAGES)
    parser.add_argument("--quick", action="store_true", help="few steps: for the CPU (ratios only)")
    parser.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    parser.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS_DIR}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup, args.workers = 8, 3, 3, 2
        args.train_images = min(args.train_images, 10_000)
    device = torch.device(args.device)

    splits = load_dataset("synthetic", num_classes=100, train_size=args.train_images, test_size=100)
    machine = machine_columns("train", device)
    machine["load_avg_1m"] = round(__import__("os").getloadavg()[0], 2)
    rows: list[dict[str, Any]] = []
    for name, features in rows_to_run(device):
        if args.only and name not in args.only:
            continue
        step_fn, batches = (
            build_reference(splits, args, device) if features is None else build_okdfast(features, splits, args, device)
        )
        windows = time_windows(step_fn, batches, device, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
        per_window = [args.steps * args.batch_size / w for w in windows]
        median = sorted(per_window)[len(per_window) // 2]
        rows.append(
            machine
            | {
                "row": name,
                "arch": args.arch,
                "branches": args.branches,
                "batch_size": args.batch_size,
                "steps_per_window": args.steps,
                "windows": args.repeats,
                "warmup_steps": args.warmup,
                "images_per_sec": round(median, 2),
                "images_per_sec_p20": round(percentile(per_window, 0.2), 2),
                "images_per_sec_p80": round(percentile(per_window, 0.8), 2),
                "seconds_per_epoch": round(CIFAR_TRAIN_IMAGES / median, 2),
                "features": "reference"
                if features is None
                else ",".join(k for k, v in dataclasses.asdict(features).items() if v) or "none",
            }
        )
        print(f"{name:>16}: {median:9.1f} img/s  ({CIFAR_TRAIN_IMAGES / median:8.1f} s/epoch)", flush=True)
        del step_fn, batches
    reference = next((r["images_per_sec"] for r in rows if r["row"] == "reference"), None)
    for row in rows:
        row["speedup_vs_reference"] = round(row["images_per_sec"] / reference, 3) if reference else ""
    if reference:
        print("speed-up over the eager reference, measured in this run:")
        for row in rows:
            print(f"{row['row']:>16}: {row['speedup_vs_reference']:.2f}x")
    path = append_rows("train", rows, args.results_dir)
    plot(rows, path.with_name(f"train_{device.type}.png"))
    print(f"wrote {path}")
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["row"] for r in rows]
    values = [r["images_per_sec"] for r in rows]
    errors = [
        [v - r["images_per_sec_p20"] for v, r in zip(values, rows)],
        [r["images_per_sec_p80"] - v for v, r in zip(values, rows)],
    ]
    ax.bar(names, values, yerr=errors, color=["grey"] + ["tab:blue"] * (len(rows) - 2) + ["tab:green"])
    ax.set_ylabel("images / s (median, p20-p80)")
    first = rows[0]
    ax.set_title(f"{first['arch']} K={first['branches']} batch {first['batch_size']} on {first['device_name']}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
