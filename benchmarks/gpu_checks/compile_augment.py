"""Compile the fused augmentation kernel (kernels/augment.py) for a GPU architecture without a GPU; report registers.

    python benchmarks/gpu_checks/compile_augment.py            # sm_90 (H100/H200)
    python benchmarks/gpu_checks/compile_augment.py --arch 80  # A100

The CPU tests run the kernel in Triton's interpreter, which neither type-checks nor lowers anything; this runs
Triton's full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX) for every specialisation the loaders launch (output dtype
x layout x train/eval) and assembles the PTX with the ptxas that ships with triton (``-v``: registers, spills).
Needs no CUDA device or driver. Exit status 1 on a compile error or any spill.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from okdfast.kernels import augment as k  # noqa: E402

from benchmarks.gpu_checks.ptx import PTXAS, registers_and_spills  # noqa: E402


def compile_one(out_dtype: str, channels_last: bool, augment: bool, arch: int) -> dict:
    kernel = k._crop_flip_lut_kernel
    pointers = {
        "images_ptr": "u8",
        "index_ptr": "i64",
        "top_ptr": "i64",
        "left_ptr": "i64",
        "flip_ptr": "u8",
        "lut_ptr": out_dtype,
        "out_ptr": out_dtype,
    }
    constexprs = dict(H=32, W=32, C=3, PAD=4, AUGMENT=augment, CHANNELS_LAST=channels_last, BLOCK_SIZE=k.BLOCK)
    return registers_and_spills(
        kernel,
        pointers=pointers,
        scalar_type=lambda name: "i64",  # the output strides
        constexprs=constexprs,
        num_warps=k.NUM_WARPS,
        arch=arch,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = parser.parse_args(argv)
    if not PTXAS.exists():
        print(f"no ptxas at {PTXAS}; nothing to check")
        return 0
    failed = False
    print(f"{'dtype':6s} {'layout':14s} {'mode':6s} registers spill_bytes   (sm_{args.arch})")
    for dtype in ("fp32", "bf16", "fp16"):
        for channels_last in (True, False):
            for augment in (True, False):
                try:
                    r = compile_one(dtype, channels_last, augment, args.arch)
                except Exception as error:  # report every specialisation, then fail
                    print(f"{dtype:6s} cl={channels_last!s:11s} aug={augment!s:5s} COMPILE ERROR: {error}")
                    failed = True
                    continue
                layout = "channels_last" if channels_last else "contiguous"
                mode = "train" if augment else "eval"
                print(f"{dtype:6s} {layout:14s} {mode:6s} {r['registers']:9d} {r['spill_bytes']:11d}")
                failed |= r["spill_bytes"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
