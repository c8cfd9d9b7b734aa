"""A full-size training run for the GPU suite: the whole (JPEG) CIFAR-10, MDE on ResNet-32 with K = 4, for as many
epochs as fit in a given time, with every epoch's time and accuracy recorded as it finishes.

    python -m benchmarks.full_run decode --out DATA_DIR                  # -> DATA_DIR/cifar10.npz
    python -m benchmarks.full_run train --data DATA_DIR --seconds 225 --run-dir RUN_DIR [-- TRAIN FLAGS]

``decode`` finds ``cifar10-jpeg.npz`` (60,000 JPEG files of CIFAR-10 in official order with the official labels;
a lossy re-encode, so accuracies compare methods with each other, not with papers) in ``$OKDFAST_JPEG_NPZ``, the
checkout's ``shared/data/`` or ``../shared/data/`` and decodes it on every core into the standard npz layout
``okdfast.data`` reads, with the source's provenance embedded (``okdfast.data.provenance.embed``): every run record
of the decoded file says lossy, names cifar10-jpeg and says partial after ``--limit``. Without the archive it says
so in one line and exits 0 (the run step then skips too).

``train`` runs ``python -m okdfast.train --method mde --arch resnet32 --branches 4 --dataset cifar10`` with the CUDA
defaults (compile, bf16, channels-last, fused loss, gpu loader, grouped branches), a cosine schedule over the
planned epochs, and ``--epochs`` sized to ``--seconds``: from the images/s and the warm-up seconds bench_train
measured earlier in the same visit for the defaults (its ``all-but-cuda_graphs`` row; ``all-on`` runs CUDA graphs,
which the defaults do not), with ``STARTUP_S`` plus ``COMPILES`` times that warm-up for the start: the train step's
compile, the last partial batch's recompile and the evaluation's compile all fall in the first epoch. Without such
a row, ``GUESS_EPOCHS``. At ``--seconds`` the run is stopped (SIGTERM: it checkpoints and exits); the epochs
finished by then are the result. Each finished epoch becomes a row of ``<results>/full_run.csv`` the moment
``metrics.jsonl`` shows it; a last ``summary`` row gives the wall time, epochs planned and done, the data's label
and the final accuracies; the run's ``config.yaml`` and ``summary.json`` are copied beside it
(``full_run_config.yaml``, ``full_run_summary.json``). The training process stays in this process's group, so
whoever stops this step stops it too (the GPU visit's runner stops the whole group at the step's limit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import append_row, read_rows, results_dir  # noqa: E402
from benchmarks.suite import NPZ_NAME, find_npz  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
STARTUP_S = 20.0  # process start, data on the device, the first checkpoint (a guess)
COMPILES = 2.0  # the first epoch's compiles (train step, partial batch, evaluation) in units of the step's warm-up
GUESS_EPOCHS = 10  # without a bench_train row of the defaults


def _decode(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(BytesIO(b)).convert("RGB")) for b in blobs])


def decode_split(data: Any, name: str, workers: int | None, limit: int | None = None) -> np.ndarray:
    buf, off = data[f"jpeg_{name}"], data[f"offsets_{name}"]
    count = len(off) - 1 if limit is None else min(limit, len(off) - 1)
    blobs = [buf[off[i] : off[i + 1]].tobytes() for i in range(count)]
    chunks = [blobs[i : i + 2500] for i in range(0, len(blobs), 2500)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_decode, chunks)))


def decode(out: Path, npz: Path | None = None, limit: int | None = None) -> Path | None:
    """``out/cifar10.npz`` (x_train (50000, 32, 32, 3) uint8, y_train, x_test, y_test) from the JPEG archive."""
    npz = npz or find_npz()
    if npz is None:
        print(
            f"decode-data: skipped, no {NPZ_NAME} in $OKDFAST_JPEG_NPZ, shared/data/ or ../shared/data/ "
            "(copy it into the checkout's shared/data/ to run the full-size training step)"
        )
        return None
    from okdfast.data.provenance import describe, embed

    start = time.perf_counter()
    data = np.load(npz, allow_pickle=False)
    arrays = {}
    for name in ("train", "test"):
        arrays[f"x_{name}"] = decode_split(data, name, None, limit)
        arrays[f"y_{name}"] = data[f"y_{name}"][: len(arrays[f"x_{name}"])]
    source = describe(npz, "cifar10", len(data["offsets_train"]) - 1, len(data["offsets_test"]) - 1, lossy=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "cifar10.tmp.npz"
    np.savez(tmp, **arrays, **embed(source))
    tmp.replace(out / "cifar10.npz")
    print(
        f"decoded {npz} in {time.perf_counter() - start:.1f} s -> {out / 'cifar10.npz'}: "
        f"train {arrays['x_train'].shape}, test {arrays['x_test'].shape}; provenance kept: {source.label}"
    )
    return out / "cifar10.npz"


def defaults_from_bench(folder: Path) -> tuple[float, float, str] | None:
    """(images/s, warm-up seconds, row name) of okdfast's defaults as bench_train measured them in this visit."""
    path = folder / "train.csv"
    if not path.exists():
        return None
    rows = read_rows(path)
    for name in ("all-but-cuda_graphs", "all-on"):
        match = [r for r in rows if r.get("row") == name and r.get("images_per_sec")]
        if match:
            warmup = float(match[-1].get("warmup_seconds") or match[-1].get("row_seconds") or 60.0)
            return float(match[-1]["images_per_sec"]), warmup, name
    return None


def plan_epochs(seconds: float, images_per_sec: float | None, warmup_s: float = 60.0) -> int:
    """Epochs that fit: (seconds - start-up - the first epoch's compiles) / (train epoch + test pass), at least 1."""
    if not images_per_sec:
        return GUESS_EPOCHS
    epoch = TRAIN_IMAGES / images_per_sec + TEST_IMAGES / (3 * images_per_sec) + 1.0  # + eval, checkpoints
    return max(1, min(200, int((seconds - STARTUP_S - COMPILES * warmup_s) / epoch)))


class _Stop:
    """SIGTERM / SIGINT while the run trains: the run got the signal too (it is in this process group); collect
    what it finished and write the summary instead of dying with the rows unwritten."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum


def train(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not (data / "cifar10.npz").exists():
        print(f"full-run: skipped, no decoded CIFAR-10 in {data} (decode-data found no {NPZ_NAME})")
        return 0
    folder = results_dir(args.results_dir)
    measured = defaults_from_bench(folder)
    epochs = args.epochs or plan_epochs(args.seconds, *(measured[:2] if measured else (None,)))
    source = (
        f"{measured[2]} row of bench_train: {measured[0]:.0f} img/s, {measured[1]:.0f} s warm-up"
        if measured
        else f"no bench_train row of the defaults: {GUESS_EPOCHS} epochs guessed"
    )
    run_dir = Path(args.run_dir)
    command = [sys.executable, "-m", "okdfast.train", "--method", "mde", "--arch", "resnet32", "--branches", "4"]
    command += ["--dataset", "cifar10", "--data-dir", str(data), "--epochs", str(epochs), "--lr-schedule", "cosine"]
    command += ["--progress", "off", "--out", str(run_dir)] + list(args.train_args)
    print(f"full-run: {epochs} epochs planned in {args.seconds:.0f} s ({source}): {' '.join(command)}", flush=True)

    import torch

    from benchmarks.harness import machine_columns

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = machine_columns("full_run", device) | {
        "run": run_dir.name,
        "method": "mde",
        "arch": "resnet32",
        "branches": 4,
        "dataset": "cifar10-jpeg",
        "epochs_planned": epochs,
    }
    start = time.monotonic()
    stop = _Stop()
    proc = subprocess.Popen(command)  # same process group: stopped with this step, never orphaned
    seen = 0
    metrics = run_dir / "metrics.jsonl"
    stopped = False

    def collect() -> None:
        nonlocal seen
        if not metrics.exists():
            return
        lines = metrics.read_text().splitlines()
        for line in lines[seen:]:
            if not line.strip():
                continue
            row = json.loads(line)
            keep = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
            append_row("full_run", base | {"kind": "epoch"} | keep, folder)
            print(
                f"  epoch {row.get('epoch')}: {row.get('epoch_seconds', float('nan')):.1f} s, "
                f"{row.get('images_per_sec', float('nan')):.0f} img/s, branch mean {row.get('acc_branch_mean')}, "
                f"leader {row.get('acc_leader')}",
                flush=True,
            )
        seen = len(lines)

    while proc.poll() is None:
        collect()
        if stop.signum is not None:  # the run has the signal too: give it a moment to checkpoint, then report
            print(f"full-run: {signal.Signals(stop.signum).name}, collecting what the run finished", flush=True)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            stopped = True
            break
        if time.monotonic() - start > args.seconds and not stopped:
            print(f"full-run: {args.seconds:.0f} s reached, stopping the run (SIGTERM: it checkpoints)", flush=True)
            proc.send_signal(signal.SIGTERM)
            stopped = True
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(0.5)
    collect()
    wall = time.monotonic() - start
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    epochs_rows = [json.loads(line) for line in lines if line.strip()]
    last = epochs_rows[-1] if epochs_rows else {}
    summary = base | {
        "kind": "summary",
        "wall_s": round(wall, 1),
        "epochs_done": len(epochs_rows),
        "stopped_at_time": stopped,
        "returncode": proc.returncode,
    }
    summary |= {k: v for k, v in last.items() if k.startswith("acc_")}
    run_summary = run_dir / "summary.json"
    if run_summary.exists():
        data = json.loads(run_summary.read_text()).get("data") or {}
        summary |= {"data_label": data.get("label", ""), "data_lossy": data.get("lossy", "")}
        summary |= {"data_derived_from": data.get("derived_from", ""), "data_partial": data.get("partial", "")}
    append_row("full_run", summary, folder)
    for name in ("config.yaml", "summary.json"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, folder / f"full_run_{Path(name).stem}{Path(name).suffix}")
    print(f"full-run: {len(epochs_rows)} of {epochs} epochs in {wall:.0f} s; last: {last}")
    return 0 if epochs_rows and (proc.returncode == 0 or stopped) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_decode = sub.add_parser("decode", help=f"decode {NPZ_NAME} into OUT/cifar10.npz")
    p_decode.add_argument("--out", type=Path, required=True)
    p_decode.add_argument("--npz", type=Path, default=None, help=f"default: the first {NPZ_NAME} found")
    p_decode.add_argument("--limit", type=int, default=None, help="decode only the first N images of each split")
    p_train = sub.add_parser("train", help="train MDE ResNet-32 K=4 for --seconds")
    p_train.add_argument("--data", required=True, help="the folder holding cifar10.npz")
    p_train.add_argument("--seconds", type=float, default=225.0)
    p_train.add_argument("--epochs", type=int, default=None, help="default: sized to --seconds")
    p_train.add_argument("--run-dir", required=True)
    p_train.add_argument("--results-dir", type=Path, default=None)
    p_train.add_argument("train_args", nargs=argparse.REMAINDER, help="extra okdfast.train flags after --")
    args = parser.parse_args(argv)
    if args.command == "decode":
        decode(args.out, args.npz, args.limit)
        return 0
    args.train_args = [a for a in args.train_args if a != "--"]
    return train(args)


if __name__ == "__main__":
    raise SystemExit(main())
