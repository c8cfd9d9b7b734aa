"""Compile one Triton kernel specialisation for a GPU architecture without a GPU and read ptxas' register report.

Shared by the ``compile_*.py`` checks: Triton's full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX) for ``arch``,
then the PTX assembled by the ptxas that ships with triton (``-v``: registers, spill bytes). Needs no CUDA device.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def registers_and_spills(
    kernel,
    *,
    pointers: dict[str, str],
    scalar_type: Callable[[str], str],
    constexprs: dict,
    num_warps: int,
    arch: int,
) -> dict:
    """``{"registers", "spill_bytes"}`` of ``kernel`` (a JITFunction). Arguments named in ``constexprs`` are
    specialised, those in ``pointers`` are pointers to that element type, every other one is ``scalar_type(name)``.
    """
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = scalar_type(name)
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
    return {"registers": registers, "spill_bytes": spills}
