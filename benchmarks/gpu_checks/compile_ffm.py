"""Compile the FFM kernels (kernels/ffm.py) for a GPU architecture without a GPU; report registers and spills.

    python benchmarks/gpu_checks/compile_ffm.py            # sm_90 (H100/H200), every architecture shape, K = 2..8
    python benchmarks/gpu_checks/compile_ffm.py --arch 80  # A100

The CPU tests run the kernels in Triton's interpreter, which neither type-checks nor lowers anything; this runs
Triton's full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX) at the launch configurations ``ffm_forward`` /
``ffm_backward`` would use, and assembles the PTX with the ptxas that ships with triton (``-v``: registers, spill
bytes). Needs no CUDA device or driver. Exit status 1 on a compile error or a spill above SPILL_LIMIT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import triton

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from okdfast.kernels import ffm as k  # noqa: E402

from benchmarks.gpu_checks.ptx import PTXAS, registers_and_spills  # noqa: E402

SPILL_LIMIT = 64  # bytes per thread
FLOAT_ARGS = {"inv_hw", "inv_b", "eps", "momentum", "unbias"}
# (D, H, W) of the last-block features, as in benchmarks/bench_ffm.py and the tests
ARCH_SHAPES = {
    "resnet32": (64, 8, 8),
    "wrn20_8": (512, 8, 8),
    "vgg16": (512, 2, 2),
    "densenet40_12": (456, 8, 8),
    "densenet40_12_bc": (132, 8, 8),
    "resnet110_bottleneck": (256, 8, 8),
}


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, arch: int) -> dict:
    return registers_and_spills(
        kernel,
        pointers=pointers,
        scalar_type=lambda name: "fp32" if name in FLOAT_ARGS else "i32",
        constexprs=constexprs,
        num_warps=num_warps,
        arch=arch,
    )


def configs(channels: int, hw: int, branches: int, classes: int, dtype: str):
    """(kernel name, kernel, pointer dtypes, constexprs, num_warps) of one forward + backward at these sizes."""
    hidden = max(channels // 4, 32)
    f32 = "fp32"
    block_kc, block_d, block_hw, block_r = k.pool_blocks(branches, channels, hw, hidden)
    yield (
        "pool_project",
        k._ffm_pool_project_kernel,
        {"f_ptr": dtype, "w1_ptr": f32, "s_ptr": f32, "u_ptr": f32},
        dict(BLOCK_KC=block_kc, BLOCK_D=block_d, BLOCK_HW=block_hw, BLOCK_R=block_r),
        k.POOL_WARPS,
    )
    block_b, block_bs, block_k, block_r, block_c = k.head_blocks(branches, hidden, classes)
    head_ptrs = ["u_ptr", "gamma_ptr", "beta_ptr", "w2_ptr", "b2_ptr", "a_ptr", "t_ptr", "mean_ptr", "var_ptr"]
    for batch_stats in (True, False):
        yield (
            f"head_fwd{'' if batch_stats else '(eval)'}",
            k._ffm_head_fwd_kernel,
            {**dict.fromkeys(head_ptrs + ["rm_ptr", "rv_ptr"], f32), "z_ptr": dtype},
            dict(
                USE_BATCH_STATS=batch_stats,
                BLOCK_B=block_b,
                BLOCK_BS=block_bs,
                BLOCK_K=block_k,
                BLOCK_R=block_r,
                BLOCK_C=block_c,
            ),
            k.NUM_WARPS,
        )
    yield (
        "running_stats",
        k._ffm_running_stats_kernel,
        dict.fromkeys(["rm_ptr", "rv_ptr", "mean_ptr", "var_ptr"], f32),
        dict(BLOCK_R=min(k._pow2(hidden), 1024)),
        4,
    )
    bwd_ptrs = ["a_ptr", "u_ptr", "mean_ptr", "var_ptr", "gamma_ptr", "beta_ptr", "w2_ptr", "dy_ptr", "part_ptr"]
    yield (
        "head_bwd",
        k._ffm_head_bwd_kernel,
        {**dict.fromkeys(bwd_ptrs + ["da_ptr", "dt_ptr"], f32), "z_ptr": dtype, "dz_ptr": dtype},
        dict(HAS_DA=True, HAS_DT=True, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_C=block_c),
        k.NUM_WARPS,
    )
    groups = triton.cdiv(512, block_b)
    width = branches * hidden + branches + 2 * hidden
    block_g = min(k._pow2(groups), 64)
    ptrs = ["dy_ptr", "u_ptr", "mean_ptr", "var_ptr", "gamma_ptr", "s_ptr", "w1_ptr", "part_ptr", "ds_ptr"]
    ptrs += ["dw1_ptr", "dw2_ptr", "db2_ptr", "dgamma_ptr", "dbeta_ptr"]
    yield (
        "param_input_bwd",
        k._ffm_param_input_bwd_kernel,
        dict.fromkeys(ptrs, f32),
        dict(
            USE_BATCH_STATS=True,
            BLOCK=k.DOT_BLOCK,
            BLOCK_G=block_g,
            BLOCK_P=max(min(k._pow2(width), k.HEAD_TILE // block_g), 1),
        ),
        k.NUM_WARPS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    if not PTXAS.exists():
        print(f"no ptxas at {PTXAS}; nothing to check")
        return 0
    failures, seen = 0, set()
    print(f"{'kernel':<18} {'arch shape':<22} {'K':>2} {'dtype':>5} | regs spill")
    for name_shape, (channels, height, width) in ARCH_SHAPES.items():
        for branches in (2, 3, 4, 8):
            for dtype in args.dtypes:
                for name, kernel, pointers, constexprs, num_warps in configs(
                    channels, height * width, branches, args.classes, dtype
                ):
                    key = (name, tuple(sorted(pointers.items())), tuple(sorted(constexprs.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        report = compile_kernel(kernel, pointers, constexprs, num_warps, args.arch)
                    except Exception as error:  # noqa: BLE001 - report every failing specialisation
                        failures += 1
                        print(f"{name:<18} {name_shape:<22} {branches:>2} {dtype:>5} | FAILED: {error}")
                        continue
                    bad = report["spill_bytes"] > SPILL_LIMIT
                    failures += bad
                    print(
                        f"{name:<18} {name_shape:<22} {branches:>2} {dtype:>5} | {report['registers']:>4} "
                        f"{report['spill_bytes']:>5}{'  <- spills' if bad else ''}"
                    )
    print(f"{len(seen)} specialisations, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
