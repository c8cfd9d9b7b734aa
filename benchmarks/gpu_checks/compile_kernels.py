"""Compile the Triton kernels for a GPU architecture without a GPU, exactly as the benchmarked launches compile them,
and report registers and spills (ptxas -v).

    python benchmarks/gpu_checks/compile_kernels.py                  # the shapes gpu_suite.sh benchmarks, sm_90
    python benchmarks/gpu_checks/compile_kernels.py --quick          # the two headline shapes only
    python benchmarks/gpu_checks/compile_kernels.py --arch 80 --csv out.csv

Each case runs the real op (``okdfast.ops.online_kd.online_kd``, forward and backward) and the real loader launcher
(``okdfast.kernels.augment.crop_flip_normalize``) on CPU tensors of the benchmarked shapes, with the kernels
replaced by recorders (``ptx.LaunchRecorder``): every recorded launch has the arguments, strides, constexprs and
num_warps a CUDA launch of that shape gets. Triton's own binder then specialises them as it does at a launch
(integers equal to 1 become constants: the unit strides; integers divisible by 16 and 16-byte-aligned pointers get
alignment hints) before the full pipeline runs for ``--arch`` and ptxas reports. The Triton interpreter (how the
CPU tests run the kernels) type-checks and lowers nothing; this does. A spill means the launch heuristics
(``launch_config``) give a thread too many tile elements. Needs no CUDA device or driver; on a GPU,
``kernels_vs_reference.py`` reports the same numbers from the kernels real launches compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from okdfast.kernels import augment as augment_kernels  # noqa: E402
from okdfast.kernels import online_kd as kd_kernels  # noqa: E402

from benchmarks import bench_loss  # noqa: E402
from benchmarks.gpu_checks.ptx import PTXAS, LaunchRecorder, compile_launch  # noqa: E402
from okdfast.ops import dispatch  # noqa: E402
from okdfast.ops.online_kd import online_kd  # noqa: E402

SPILL_LIMIT = 64  # bytes per thread; a few bytes (ptxas' choice at <= 64 registers) cost nothing measurable
QUICK_CASES = [(form, "bf16", shape) for shape in bench_loss.HEADLINE_SHAPES for form in bench_loss.DEFAULT_FORMS]


def default_cases() -> list[tuple[str, str, tuple[int, int, int]]]:
    """(form, dtype, shape): what ``bench_loss --preset suite`` benchmarks (bf16), plus fp32 and DML's peer mode at
    the CIFAR headline shape."""
    preset = bench_loss.PRESETS["suite"]
    cases = [(c.form, dtype, c.shape) for dtype in preset.dtypes for c in preset.combos if c.subject == "online_kd"]
    return cases + [("mde", "fp32", (128, 4, 100)), ("dml", "fp32", (128, 4, 100)), ("dml", "bf16", (128, 5, 100))]


def kernels_run_here():
    """The recorders stand in for the kernels on CPU tensors, so the op's "do the kernels run here" is yes."""
    return mock.patch.object(dispatch, "use_triton", lambda tensor, float64=False: True)


def record_online_kd(form: str, dtype: str, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The forward, reduce and backward launches of one op call (with the method's options) at ``shape``."""
    logits, target, teacher, weights, kd_weight = bench_loss.make_inputs(
        shape, bench_loss.DTYPES[dtype], form, torch.device("cpu"), values=False
    )
    options = bench_loss.form_options(form, shape[1])
    with LaunchRecorder(kd_kernels) as launches, kernels_run_here():
        loss, _ = online_kd(logits, target, teacher, weights, options, kd_weight, kernel=True)
        loss.backward()
    return launches


def record_mde_head(dtype: str, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The launches of one call of MDE's one-pass head (attention, targets, CE/KL and the CD) at ``shape``."""
    from okdfast.ops.mde_head import mde_head

    logits, target, attention, kd_weight = bench_loss.mde_head_inputs(shape, bench_loss.DTYPES[dtype], "shared",
                                                                      torch.device("cpu"))  # fmt: skip
    with LaunchRecorder(kd_kernels) as launches, kernels_run_here():
        loss, _ = mde_head(logits, target, attention, bench_loss.MDE_HEAD_OPTIONS, kd_weight, kernel=True)
        loss.backward()
    return launches


def forced_rows_per_program(rows: int | None):
    """A patch of the launch heuristics that sets every row kernel's rows per program (None: the heuristics')."""
    if rows is None:
        return contextlib.nullcontext()
    real = kd_kernels.launch_config
    return mock.patch.object(kd_kernels, "launch_config", lambda *a, **k: real(*a[:6], rows_per_program=rows))


def record_augment(dtype: str, channels_last: bool, augment: bool, batch: int = 128) -> list[dict[str, Any]]:
    from okdfast.data.transforms import normalize_lut, sample_crop_flip

    images = torch.empty(50_000, 32, 32, 3, dtype=torch.uint8)
    index = torch.randperm(50_000)[:batch]
    top, left, flip = sample_crop_flip(batch, torch.Generator().manual_seed(0)) if augment else (None, None, None)
    lut = normalize_lut((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), bench_loss.DTYPES[dtype], torch.device("cpu"))
    with LaunchRecorder(augment_kernels) as launches:
        augment_kernels.crop_flip_normalize(images, index, top, left, flip, lut, channels_last=channels_last)
    return launches


def compile_online_kd(form: str, dtype: str, shape: tuple[int, int, int], arch: int = 90) -> list[dict[str, Any]]:
    """Reports (registers, spill_bytes, num_warps, specialization, block sizes) of every kernel one op call at
    ``shape`` launches, compiled for sm_``arch``; [] when triton ships no ptxas."""
    if not PTXAS.exists():
        return []
    reports = []
    for launch in record_online_kd(form, dtype, shape):
        blocks = {k: launch["kwargs"][k] for k in ("BLOCK_K", "TB", "BLOCK_C", "BLOCK_B") if k in launch["kwargs"]}
        reports.append(compile_launch(launch, arch) | blocks)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="the headline shapes in bf16 only")
    parser.add_argument("--csv", type=Path, default=None, help="also write one row per compiled launch here")
    parser.add_argument(
        "--rows-per-program", type=int, default=None, help="every row kernel at this many rows per program"
    )
    args = parser.parse_args(argv)
    if not PTXAS.exists():
        print(f"no ptxas at {PTXAS}; nothing to check")
        return 0
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    writer = None
    handle = args.csv.open("w", newline="") if args.csv else None
    print(f"sm_{args.arch}: kernel, case, blocks, warps, registers, spill bytes, specialisation")
    cases = [("online_kd", case) for case in (QUICK_CASES if args.quick else default_cases())]
    cases += [("mde_head", ("mde_head", "bf16", shape)) for shape in bench_loss.HEADLINE_SHAPES]
    cases += [("augment", (d, cl, aug)) for d in ("fp32", "bf16") for cl in (True, False) for aug in (True, False)]
    failures = 0
    for family, case in cases:
        with forced_rows_per_program(args.rows_per_program):
            if family == "online_kd":
                launches = record_online_kd(*case)
            elif family == "mde_head":
                launches = record_mde_head(*case[1:])
            else:
                launches = record_augment(*case)
        for launch in launches:
            report = compile_launch(launch, args.arch)
            key = (
                f"{report['kernel']}|{report['pointers']}|{report['specialization']}|{sorted(launch['kwargs'].items())}"
            )
            if key in seen:  # the same specialisation as an earlier case: compiled once
                continue
            seen.add(key)
            blocks = "x".join(str(launch["kwargs"][k]) for k in ("BLOCK_K", "TB", "BLOCK_C") if k in launch["kwargs"])
            if launch["kwargs"].get("ROWS_PER_PROGRAM", 1) != 1:
                blocks += f"/r{launch['kwargs']['ROWS_PER_PROGRAM']}"
            label = (
                "-".join(map(str, case[:2])) + "-" + "x".join(map(str, case[2]))
                if family in ("online_kd", "mde_head")
                else (f"{case[0]}-{'cl' if case[1] else 'nchw'}-{'train' if case[2] else 'eval'}")
            )
            row = {"arch": args.arch, "family": family, "case": label, "blocks": blocks} | report
            rows.append(row)
            failures += report["spill_bytes"] > SPILL_LIMIT
            print(
                f"{report['kernel']:26s} {label:28s} {blocks:10s} {report['num_warps']:3d} {report['registers']:4d} "
                f"{report['spill_bytes']:5d}  {report['specialization']}",
                flush=True,
            )
            if handle is not None:
                if writer is None:
                    writer = csv.DictWriter(handle, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                handle.flush()
    if handle is not None:
        handle.close()
    print(f"{failures} launch(es) spill more than {SPILL_LIMIT} bytes" if failures else "no significant spills")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
