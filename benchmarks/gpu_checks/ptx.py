"""Compile a Triton kernel exactly as a real launch would, for a GPU architecture, without a GPU; read ptxas' report.

Shared by the ``compile_*.py`` checks. :class:`LaunchRecorder` runs a kernel module's own host launcher on CPU
tensors of the real shapes and records each launch (arguments, constexprs, num_warps) instead of running it;
:func:`compile_launch` then specialises the recorded arguments with Triton's own JIT binder
(``okdfast.compat.launch_specialization``: integers equal to 1 become constants, integers divisible by 16 and
16-byte-aligned pointers get the alignment hints a CUDA launch gets), runs Triton's full pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX) for ``arch`` and assembles the PTX with the ptxas that ships with triton (``-v``: registers, spill
bytes). Needs no CUDA device. On a GPU, ``okdfast.compat.compiled_kernels`` reads the same numbers from the
kernels real launches compiled (benchmarks/gpu_checks/kernels_vs_reference.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton

from okdfast.compat import launch_specialization

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def assemble(ptx: str, arch: int) -> dict[str, int]:
    """``{"registers", "spill_bytes"}`` of the one kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run(
            [str(PTXAS), "-v", f"--gpu-name={gpu_name}", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return {"registers": registers, "spill_bytes": spills}


def describe_specialization(src: Any) -> str:
    """Which runtime arguments the launch specialised: 'const name=1, ...; div16 name, ...'."""
    names = src.fn.arg_names
    constexpr_names = {p.name for p in src.fn.params if p.is_constexpr}
    consts = [
        f"{names[key[0]]}={value}"
        for key, value in sorted(src.constants.items())
        if len(key) == 1 and names[key[0]] not in constexpr_names
    ]
    div16 = [names[key[0]] for key, value in sorted(src.attrs.items()) if len(key) == 1 and value]
    return f"const {', '.join(consts) or '-'}; div16 {', '.join(div16) or '-'}"


def compile_launch(launch: dict[str, Any], arch: int) -> dict[str, Any]:
    """Registers and spills of one recorded launch compiled for sm_``arch`` with its real specialisation."""
    src, options, target = launch_specialization(launch["kernel"], launch["args"], launch["kwargs"], arch)
    compiled = triton.compile(src, target=target, options=options)
    return assemble(compiled.asm["ptx"], arch) | {
        "kernel": launch["kernel"].__name__,
        "pointers": ",".join(v.lstrip("*") for v in src.signature.values() if v.startswith("*")),
        "num_warps": options.get("num_warps"),
        "specialization": describe_specialization(src),
    }


class _Recording:
    def __init__(self, kernel: Any, log: list[dict[str, Any]]) -> None:
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid: Any):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.log.append({"kernel": self.kernel, "grid": grid, "args": args, "kwargs": kwargs})

        return launch


class LaunchRecorder:
    """``with LaunchRecorder(module) as launches: module.host_launcher(cpu tensors ...)``: every ``@triton.jit``
    kernel of ``module`` is replaced by a recorder for the duration (and the module's ``_runnable`` device check,
    if it has one, by the identity), so the host code runs unchanged and ``launches`` lists what it would launch.
    The outputs it allocates stay uninitialised."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.launches: list[dict[str, Any]] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> list[dict[str, Any]]:
        kernel_types: tuple[type, ...] = (triton.runtime.jit.JITFunction,)
        try:  # under TRITON_INTERPRET=1 the module's kernels are interpreted functions
            from triton.runtime.interpreter import InterpretedFunction

            kernel_types += (InterpretedFunction,)
        except ImportError:
            pass
        for name, value in vars(self.module).items():
            if isinstance(value, kernel_types):
                self._saved[name] = value
        for name, value in self._saved.items():
            setattr(self.module, name, _Recording(value, self.launches))
        if hasattr(self.module, "_runnable"):
            self._saved["_runnable"] = self.module._runnable
            self.module._runnable = lambda kernel, device: kernel
        return self.launches

    def __exit__(self, *exc: Any) -> None:
        for name, value in self._saved.items():
            setattr(self.module, name, value)
