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
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from okdfast.kernels import classifier_diversity as cd_kernels  # noqa: E402
from okdfast.kernels import online_kd as kd_kernels  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TL_DTYPES = {"fp32": tl.float32, "fp64": tl.float64}
SPILL_LIMIT = 64  # bytes per thread; a few bytes (ptxas' choice at <= 64 registers) cost nothing measurable


def _compile(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int, arch: int) -> dict | None:
    """Compile ``kernel`` (a JITFunction); pointers named in ``pointer_types``, other runtime args i32/fp32."""
    if not PTXAS.exists():
        return None
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        elif name in ("temperature", "label_smoothing", "ce_weight", "kd_weight", "teacher_ce_weight", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()},
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run(
            [str(PTXAS), "-v", f"--gpu-name={gpu_name}", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return {"registers": registers, "spill_bytes": spills, "num_warps": num_warps}


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
