"""Loader throughput: images/s of every ``--loader`` (gpu, dali, ffcv, torch) at CIFAR-100 and CINIC-10 shapes.

Claim to check: on CUDA the gpu loader (the uint8 data set resident on the device, one fused Triton launch per
batch) keeps a GPU fed many times faster than the DataLoader reference, and DALI / FFCV sit in between; on the CPU
the numbers say which loader ``--loader auto`` should pick there (``okdfast.data.factory.CPU_AUTO``).

What is timed: whole training epochs of each loader's train split (shuffled, random crop + flip, normalised,
delivered on the device in fp32, channels-last on CUDA), iterated with nothing else running in the process;
``--warmup`` epochs first (they absorb DALI's pipeline build, FFCV's numba compile and Triton's JIT), then
``--epochs`` timed epochs, each ended by a device sync; median with p20 / p80. The ``.beton`` writing of FFCV is
a one-time cost, reported separately (``setup_s``). Data: the real data set when ``load_dataset`` finds it, else
seeded random uint8 arrays of its size (``data`` column): CIFAR-100 50k, CINIC-10 90k (train) and 180k
(train + valid) 32x32 images; the loaders do the same work on either. ``vs_torch`` is the ratio to the torch
loader measured in the same run (it is measured first). ``gb_per_s`` counts the bytes a loader must move per image
(the uint8 image read once, the normalised fp32 batch written once) and ``pct_copy_bw`` divides that by the copy
bandwidth measured on this device (benchmarks/harness.py). The run starts with a header (device, cores, load,
where the rows go); every row carries the harness' load columns (the load average at its start and end, the cores
other processes kept busy, ``load_warning``), and a row measured on a busy machine is warned on screen too: on a
shared machine such a row is suspect and is better rerun. Ctrl-C stops with a line naming the rows written.

    python -m benchmarks.bench_loader                     # all loaders, cifar100 + cinic10 + cinic10-valid shapes
    python -m benchmarks.bench_loader --quick             # cifar100 + cinic10 at 1/5 size, 2 timed epochs
    python -m benchmarks.bench_loader --loaders gpu torch --datasets cifar100 --batch-size 512

    python -m benchmarks.bench_loader --train             # end to end: mde/resnet8 trained with each loader
    python -m benchmarks.bench_loader --kernel            # one batch: fused Triton kernel vs the PyTorch path
Rows go to ``<results>/loader.csv`` the moment each is measured (``loader_train.csv`` for ``--train``,
``augment.csv`` for ``--kernel``), the chart to ``<results>/loader_<device>.png``; ``<results>`` is the untracked
``runs/bench/`` unless ``--results-dir`` / ``--commit-results`` (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    LoadWatch,
    add_output_arguments,
    append_row,
    copy_bandwidth_gbps,
    default_device,
    machine_columns,
    print_header,
    results_dir,
    run_cli,
)
from okdfast.data import ArrayDataset, DatasetNotFoundError, DatasetSplits, build_data_loaders, load_dataset  # noqa: E402
from okdfast.data.factory import install_hint  # noqa: E402
from okdfast.data.stats import STATS  # noqa: E402

# name -> (registered data set, load_dataset options, training images, test images, classes)
SHAPES = {
    "cifar100": ("cifar100", {}, 50_000, 10_000, 100),
    "cinic10": ("cinic10", {}, 90_000, 90_000, 10),
    "cinic10-valid": ("cinic10", {"include_valid": True}, 180_000, 90_000, 10),
}
LOADER_ORDER = ("gpu", "dali", "ffcv", "torch")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    # the distributions' versions (ffcv's module still says 0.0.3rc1 in its 1.0.2 release)
    for column, dist in (("dali", "nvidia-dali-cuda130"), ("ffcv", "ffcv"), ("numba", "numba")):
        try:
            out[column] = version(dist)
        except PackageNotFoundError:
            out[column] = ""
    return out


def load_shape(shape: str, scale: float, data_dir: str | None) -> tuple[DatasetSplits, str]:
    """The real data set when present (subset to ``scale``), else random uint8 arrays of the same size."""
    name, options, n_train, n_test, classes = SHAPES[shape]
    n_train, n_test = int(n_train * scale), int(n_test * scale)
    try:
        splits = load_dataset(name, data_dir, **options)
        if scale < 1:
            splits = splits.subset(n_train, seed=0)
        return splits, "real"
    except DatasetNotFoundError:
        pass
    rng = np.random.default_rng(0)
    train = ArrayDataset(rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), np.arange(n_train) % classes)
    test = ArrayDataset(rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), np.arange(n_test) % classes)
    stats = STATS[name]
    # the name says what it stands for; the .beton cache keys on the contents anyway
    return DatasetSplits(train, test, classes, stats.mean, stats.std, f"bench-{shape}", "random uint8"), "synthetic"


def quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[int(round(q * 100)) - 1]


def time_loader(loader: Any, device: torch.device, warmup: int, epochs: int) -> list[float]:
    """Seconds of each timed epoch (after ``warmup`` epochs), a device sync closing each."""
    seconds = []
    for e in range(warmup + epochs):
        loader.set_epoch(e)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        n = 0
        for _batch in loader:
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if e >= warmup:
            seconds.append(time.perf_counter() - start)
        assert n == len(loader), (n, len(loader))
    return seconds


def _as_launched_from_a_shell() -> None:
    # A spawned child inherits "spawn" as its default start method: its DataLoader workers would then re-import
    # everything and receive the arrays by pickle (measured: +40 s per training run). Fork, as in a shell.
    multiprocessing.set_start_method("fork", force=True)


def measure(args: argparse.Namespace, device_name: str, shape: str, name: str) -> dict[str, Any]:
    """One loader on one data set shape; runs in a fresh process (see :func:`bench`)."""
    _as_launched_from_a_shell()
    device = torch.device(device_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits, data = load_shape(shape, args.scale, args.data_dir)
    cache_dir = Path(args.cache_dir or Path(tempfile.gettempdir()) / "okdfast-bench-ffcv")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train, _ = build_data_loaders(
        splits,
        loader=name,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=0,
        channels_last=device.type == "cuda",
        cache_dir=cache_dir,
        verbose=False,
    )
    setup = time.perf_counter() - t0
    seconds = time_loader(train, device, args.warmup, args.epochs)
    median = statistics.median(seconds)
    n = len(splits.train)
    return {
        "loader": name,
        "dataset": shape,
        "data": data,
        "images": n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "dtype": "fp32",
        "channels_last": device.type == "cuda",
        "warmup_epochs": args.warmup,
        "epochs": args.epochs,
        "setup_s": round(setup, 3),
        "median_s": round(median, 4),
        "p20_s": round(quantile(seconds, 0.2), 4),
        "p80_s": round(quantile(seconds, 0.8), 4),
        "images_per_s": round(n / median, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


IMAGE_BYTES = 32 * 32 * 3 * (1 + 4)  # a uint8 image read, its normalised fp32 copy written


def bench(args: argparse.Namespace, device: torch.device, watch: LoadWatch) -> list[dict[str, Any]]:
    """Every (data set, loader) in its own spawned process: no loader inherits another's threads, worker processes
    or page cache state, and no DataLoader forks a process that DALI's or numba's threads already run in. The torch
    loader (the reference) goes first, so each row can carry its ratio when it is written."""
    base = machine_columns("loader", device) | package_versions()
    copy_gbps = copy_bandwidth_gbps(device)
    folder = results_dir(args.results_dir, args.commit_results)
    spawn = multiprocessing.get_context("spawn")
    order = sorted(args.loaders, key=lambda name: name != "torch")
    rows = []
    for shape in args.datasets:
        reference = None
        for name in order:
            hint = install_hint(name)
            if hint is not None:
                print(f"{shape:14s} {name:6s} skipped: {hint}")
                continue
            watch.begin()
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                row = base | pool.submit(measure, args, str(device), shape, name).result()
            row |= watch.columns(f"{shape} {name}")
            reference = row if name == "torch" else reference
            row["vs_torch"] = round(row["images_per_s"] / reference["images_per_s"], 3) if reference else ""
            row["gb_per_s"] = round(row["images_per_s"] * IMAGE_BYTES / 1e9, 3)
            row["copy_gbps"] = round(copy_gbps, 1)
            row["pct_copy_bw"] = round(100 * row["gb_per_s"] / copy_gbps, 2)
            append_row("loader", row, folder)
            rows.append(row)
            print(
                f"{shape:14s} {name:6s} {row['images_per_s']:>11,.0f} img/s  epoch {row['median_s']:.3f} s "
                f"(p20 {row['p20_s']:.3f}, p80 {row['p80_s']:.3f})  {row['gb_per_s']:.2f} GB/s "
                f"({row['pct_copy_bw']:.2f}% of copy)  setup {row['setup_s']:.1f} s  "
                f"load {row['load_before']:.1f} -> {row['load_after']:.1f}",
                flush=True,
            )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["dataset"] for r in rows))
    loaders = [name for name in LOADER_ORDER if any(r["loader"] == name for r in rows)]
    width = 0.8 / max(len(loaders), 1)
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(shapes), 4.2))
    for i, name in enumerate(loaders):
        xs, ys, labels = [], [], []
        for j, shape in enumerate(shapes):
            match = [r for r in rows if r["loader"] == name and r["dataset"] == shape]
            if match:
                xs.append(j + (i - (len(loaders) - 1) / 2) * width)
                ys.append(match[0]["images_per_s"])
                ratio = match[0].get("vs_torch")
                labels.append(f"{ratio:.2g}x" if ratio not in ("", None) else "")
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{s}\n({next(r['images'] for r in rows if r['dataset'] == s):,} img)" for s in shapes])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (training epoch, median)")
    first = rows[0]
    ax.set_title(
        f"okdfast loaders on {first['device_name']} ({first['cpu_count']} cores), batch {first['batch_size']}; "
        "label: ratio to torch",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# --train: the same training run with every loader
# ---------------------------------------------------------------------------------------------------------------
def train_one(args: argparse.Namespace, device_name: str, name: str) -> dict[str, Any]:
    """One training run with loader ``name``; runs in a fresh process (see :func:`bench`)."""
    _as_launched_from_a_shell()
    from okdfast.config import TrainConfig
    from okdfast.train import run

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            method="mde",
            arch="resnet8",
            dataset="synthetic",
            subset=args.train_subset,
            epochs=args.train_epochs,
            batch_size=64,
            workers=args.workers,
            loader=name,
            seed=0,
            progress="off",
            device=device_name,
            out=str(Path(tmp) / name),
        )
        config.validate()
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        summary = run(config)
        wall = time.perf_counter() - start
    last = summary["last"]
    return {
        "loader": name,
        "method": "mde",
        "arch": "resnet8",
        "dataset": f"synthetic[subset={args.train_subset}]",
        "epochs": args.train_epochs,
        "batch_size": 64,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "steps": summary["global_step"],
        "images_per_s_median": round(summary.get("images_per_sec_median", float("nan")), 1),
        "wall_s": round(wall, 1),
        "acc_branch_mean": round(last["acc_branch_mean"], 3),
        "acc_ensemble": round(last["acc_ensemble"], 3),
        "acc_ffm": round(last.get("acc_ffm", float("nan")), 3),
        "test_ce_ensemble": round(last["test_ce_ensemble"], 5),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def train_rows(args: argparse.Namespace, device: torch.device, watch: LoadWatch) -> list[dict[str, Any]]:
    """The same mde/resnet8 training run with every loader, each in its own spawned process (torch first)."""
    base = machine_columns("loader_train", device) | package_versions()
    folder = results_dir(args.results_dir, args.commit_results)
    spawn = multiprocessing.get_context("spawn")
    rows = []
    reference = None
    for name in sorted(args.loaders, key=lambda name: name != "torch"):
        hint = install_hint(name)
        if hint is not None:
            print(f"{name:6s} skipped: {hint}")
            continue
        watch.begin()
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            row = base | pool.submit(train_one, args, str(device), name).result()
        row |= watch.columns(f"train {name}")
        reference = row if name == "torch" else reference
        row["vs_torch"] = round(row["images_per_s_median"] / reference["images_per_s_median"], 3) if reference else ""
        append_row("loader_train", row, folder)
        rows.append(row)
        print(
            f"{name:6s} {row['images_per_s_median']:8.1f} img/s train  wall {row['wall_s']:6.1f} s  branch-mean "
            f"{row['acc_branch_mean']:.2f}%  ensemble {row['acc_ensemble']:.2f}%  ffm {row['acc_ffm']:.2f}%  "
            f"load {row['load_before']:.1f} -> {row['load_after']:.1f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# --kernel: the fused augmentation kernel against the PyTorch path it replaces
# ---------------------------------------------------------------------------------------------------------------
def kernel_rows(args: argparse.Namespace, device: torch.device, watch: LoadWatch) -> list[dict[str, Any]]:
    """One batch of crop/flip/normalise (fp32 out, channels-last on CUDA): ``fused`` (Triton, CUDA only) and
    ``torch`` (okdfast.data.transforms.crop_flip_normalize); each validated against the other before timing.
    GB/s counts the bytes a fused pass must move (uint8 in, the batch out)."""
    from okdfast.kernels.augment import bytes_moved

    from benchmarks.harness import time_fn
    from okdfast.data.transforms import crop_flip_normalize, normalize_lut, sample_crop_flip
    from okdfast.ops.dispatch import triton_runs_on

    base = machine_columns("augment", device)
    copy_gbps = copy_bandwidth_gbps(device)
    folder = results_dir(args.results_dir, args.commit_results)
    mean, std = STATS["cifar100"].mean, STATS["cifar100"].std
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50_000, 32, 32, 3), generator=g, dtype=torch.uint8).to(device)
    cl = device.type == "cuda"
    rows = []
    for batch in args.kernel_batches:
        index = torch.randperm(50_000, generator=g)[:batch].to(device)
        top, left, flip = (t.to(device) for t in sample_crop_flip(batch, g))
        args_ = (images, index, top, left, flip)
        impls = {"torch": partial(crop_flip_normalize, *args_, mean, std, channels_last=cl)}
        if triton_runs_on(device):
            from okdfast.kernels.augment import crop_flip_normalize as fused

            impls["fused"] = partial(fused, *args_, normalize_lut(mean, std, torch.float32, device), channels_last=cl)
        outputs = {name: fn() for name, fn in impls.items()}
        for name, out in outputs.items():
            assert torch.equal(out, outputs["torch"]), f"{name} differs from the torch path"
        for name, fn in impls.items():
            watch.begin()
            timing = time_fn(fn, device, warmup=5, repeats=args.epochs * 10, inner=10)
            moved = bytes_moved(batch, (32, 32, 3), torch.float32)
            row = base | watch.columns(f"augment {name} {batch}")
            row |= {"impl": name, "batch": batch, "bytes": moved, **timing.as_row()}
            row["gb_per_s"] = round(moved / (timing.median_ms * 1e-3) / 1e9, 2)
            row["copy_gbps"] = round(copy_gbps, 1)
            row["pct_copy_bw"] = round(100 * row["gb_per_s"] / copy_gbps, 2)
            row["images_per_s"] = round(batch / (timing.median_ms * 1e-3), 1)
            append_row("augment", row, folder)
            rows.append(row)
            print(
                f"augment {name:6s} batch {batch:5d} {timing.median_ms * 1e3:9.1f} us  {row['gb_per_s']:8.2f} GB/s "
                f"({row['pct_copy_bw']:.1f}% of copy)"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cifar100 + cinic10 at 1/5 size, 2 timed epochs")
    parser.add_argument("--loaders", nargs="+", default=list(LOADER_ORDER), choices=LOADER_ORDER)
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(SHAPES), help="default: all")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--batch-size", type=int, default=128, help="the paper's 128")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="torch / DALI / FFCV")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the measuring process (CPU default: 1)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs (median reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each data set's size")
    parser.add_argument("--data-dir", default=None, help="where real data sets are looked for (load_dataset)")
    parser.add_argument("--cache-dir", default=None, help="where FFCV .beton files go (default: a temp folder)")
    parser.add_argument("--train", action="store_true", help="train mde/resnet8 on synthetic with each loader")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=1600)
    parser.add_argument("--kernel", action="store_true", help="time the fused augmentation kernel vs torch")
    parser.add_argument("--kernel-batches", type=int, nargs="+", default=[128, 512, 2048])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.epochs = min(args.scale, 0.2), min(args.epochs, 2)
    if args.datasets is None:
        args.datasets = ["cifar100", "cinic10"] if args.quick else list(SHAPES)
    device = torch.device(args.device) if args.device else default_device()
    if args.threads is None and device.type == "cpu":
        # The loaders' per-batch work is small: split over threads it waits for time slices of busy cores (on the
        # shared 2-core machine, 2 threads made the gpu loader 70x slower than 1); the torch loader's workers
        # run single-threaded too.
        args.threads = 1

    folder = results_dir(args.results_dir, args.commit_results)
    if args.kernel:
        if args.threads:
            torch.set_num_threads(args.threads)
        watch = print_header("bench_loader --kernel", device, folder / "augment.csv")
        kernel_rows(args, device, watch)
        print("\n".join(filter(None, [watch.summary(), f"rows in {folder / 'augment.csv'}"])))
        return
    if args.train:
        watch = print_header("bench_loader --train", device, folder / "loader_train.csv", f"workers {args.workers}")
        train_rows(args, device, watch)
        print("\n".join(filter(None, [watch.summary(), f"rows in {folder / 'loader_train.csv'}"])))
        return
    details = f"batch {args.batch_size}, workers {args.workers}, {args.warmup} warm-up + {args.epochs} timed epochs"
    watch = print_header("bench_loader", device, folder / "loader.csv", details)
    rows = bench(args, device, watch)
    if watch.summary():
        print(watch.summary(), flush=True)
    if rows:
        png = folder / f"loader_{device.type}.png"
        plot(rows, png)
        print(f"rows in {folder / 'loader.csv'}; chart: {png}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
