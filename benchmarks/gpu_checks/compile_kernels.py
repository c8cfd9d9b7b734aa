"""Compile the loss kernels for a GPU architecture without a GPU, and report registers and spills (ptxas -v).

    python benchmarks/gpu_checks/compile_kernels.py            # every specialisation at the default launch configs
    python benchmarks/gpu_checks/compile_kernels.py --arch 80  # A100

The Triton interpreter (how the CPU tests run the kernels) does not type-check or lower anything; this does: it
runs Triton's full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX) for ``--arch`` and assembles the PTX with the ptxas
that ships with triton, which prints each kernel's register count and spill bytes. A spill means the launch
heuristics (``launch_config``) give a thread too many tile elements. Needs no CUDA device or driver.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import triton.language as tl

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from okdfast.kernels import classifier_diversity as cd_kernels  # noqa: E402
from okdfast.kernels import online_kd as kd_kernels  # noqa: E402

from benchmarks.gpu_checks.ptx import PTXAS, registers_and_spills  # noqa: E402

TL_DTYPES = {"fp32": tl.float32, "fp64": tl.float64}
FLOAT_ARGS = {"temperature", "label_smoothing", "ce_weight", "kd_weight", "teacher_ce_weight", "eps"}
SPILL_LIMIT = 64  # bytes per thread; a few bytes (ptxas' choice at <= 64 registers) cost nothing measurable


def _compile(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int, arch: int) -> dict | None:
    """Compile ``kernel`` (a JITFunction); pointers named in ``pointer_types``, other runtime args i32/fp32."""
    if not PTXAS.exists():
        return None
    report = registers_and_spills(
        kernel,
        pointers=pointer_types,
        scalar_type=lambda name: "fp32" if name in FLOAT_ARGS else "i32",
        constexprs=constexprs,
        num_warps=num_warps,
        arch=arch,
    )
    return report | {"num_warps": num_warps}


def compile_online_kd(
    num_branches: int,
    num_classes: int,
    teacher: str = "shared",
    peer: bool = False,
    detach: bool = True,
    dtype: str = "bf16",
    teacher_ce: bool = True,
    arch: int = 90,
) -> dict | None:
    """Compile ``_online_kd_fwd_kernel`` at the launch config of (K, C); teacher 'none' | 'shared' | 'branch'."""
    mode = {"none": 0, "shared": 1, "branch": 2}[teacher]
    block_k, block_c, num_warps = kd_kernels.launch_config(num_branches, num_classes, per_branch_teacher=mode == 2)
    acc = "fp64" if dtype == "fp64" else "fp32"
    pointers = {"z_ptr": dtype, "y_ptr": "i64", "t_ptr": dtype, "n_valid_ptr": "fp32", "kd_scale_ptr": "fp32"}
    pointers |= {"loss_ptr": acc, "terms_ptr": acc, "gz_ptr": dtype, "gt_ptr": dtype}
    constexprs = dict(
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        TB=block_k if mode == 2 else 1,
        TEACHER_MODE=mode,
        PEER=peer,
        DETACH=detach,
        HAS_TCE=teacher_ce,
        HAS_KD=True,
        HAS_KD_SCALE=True,
        MEAN_T_GRAD=mode == 0 and (teacher_ce or (not peer and not detach)),
        MEAN=True,
        WRITE_GZ=True,
        WRITE_GT=mode != 0,
        ACC=TL_DTYPES[acc],
    )
    report = _compile(kd_kernels._online_kd_fwd_kernel, pointers, constexprs, num_warps, arch)
    if report is not None:
        report |= {"BLOCK_K": block_k, "BLOCK_C": block_c}
    return report


def compile_classifier_diversity(num_branches: int, dim: int, dtype: str = "fp32", arch: int = 90) -> dict | None:
    block_k, block_d, num_warps = cd_kernels.launch_config(num_branches, dim)
    acc = "fp64" if dtype == "fp64" else "fp32"
    pointers = {"w_ptr": dtype, "part_ptr": acc, "gw_ptr": dtype}
    constexprs = dict(BLOCK_K=block_k, BLOCK_D=block_d, WRITE_GRAD=True, ACC=TL_DTYPES[acc])
    report = _compile(cd_kernels._cd_fwd_kernel, pointers, constexprs, num_warps, arch)
    if report is not None:
        report |= {"BLOCK_K": block_k, "BLOCK_D": block_d}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="only the largest tile of each BLOCK_K")
    args = parser.parse_args(argv)
    if not PTXAS.exists():
        print(f"no ptxas at {PTXAS}; nothing to check")
        return 0
    failures = 0
    print("kernel           K      C teacher peer  detach dtype | BLOCK  warps regs spill")
    shapes, seen = [], set()  # one (K, C) per distinct launch config
    for k, c in itertools.product((2, 3, 4, 5, 8), (32768,) if args.quick else (10, 100, 1000, 32768)):
        if kd_kernels.launch_config(k, c) not in seen:
            seen.add(kd_kernels.launch_config(k, c))
            shapes.append((k, c))
    for (k, c), teacher, peer, detach in itertools.product(
        shapes, ("none", "shared", "branch"), (False, True), (True, False)
    ):
        r = compile_online_kd(k, c, teacher, peer, detach, "bf16", arch=args.arch)
        failures += r["spill_bytes"] > SPILL_LIMIT
        print(
            f"online_kd   {k:5d} {c:6d} {teacher:7s} {peer!s:5s} {detach!s:6s} bf16  | "
            f"{r['BLOCK_K']}x{r['BLOCK_C']:<5d} {r['num_warps']:5d} {r['registers']:4d} {r['spill_bytes']:5d}"
        )
    for k, d, dtype in itertools.product((2, 4, 8), (64, 512) if args.quick else (64, 128, 512, 640), ("fp32",)):
        r = compile_classifier_diversity(k, d, dtype, arch=args.arch)
        failures += r["spill_bytes"] > SPILL_LIMIT
        print(
            f"cd          {k:5d} D={d:5d}                    {dtype:5s} | "
            f"{r['BLOCK_K']}x{r['BLOCK_D']:<5d} {r['num_warps']:5d} {r['registers']:4d} {r['spill_bytes']:5d}"
        )
    print(f"{failures} specialisation(s) spill more than {SPILL_LIMIT} bytes" if failures else "no significant spills")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
