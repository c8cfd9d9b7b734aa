"""The one place where okdfast meets the differences between the torch / triton versions it supports.

Supported (setup.py): torch 2.11-2.14 with triton 3.6-3.8; CI tests the pinned pair in constraints.txt (torch
2.14.1, triton 3.8.0), and a GPU machine's own stack may be the oldest (torch 2.11.0, triton 3.6.0). Code outside
this module asks here instead of testing versions itself. What differs, as found running the kernel tests on both
(benchmarks/GPU.md, "Compatibility"):

- Triton's CPU interpreter before 3.7 turns a scalar into an index with ``int(array)`` on a one-element array,
  which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel
  with a ``range`` over a runtime bound fails there. :func:`patch_triton_interpreter` applies triton 3.7's fix
  (``int(array.squeeze())``) to the older interpreter; nothing changes on triton >= 3.7 or on a GPU.
- torch.compile's recompile limit: ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` before it was
  renamed; both names exist in the supported range, the alias may go): :func:`raise_recompile_limit`.
- The JIT's launch specialisation (which integer arguments are 1 or divisible by 16, which pointers are 16-byte
  aligned) is internal to triton (``JITFunction`` binder, ``_pack_args``): :func:`launch_specialization` asks it
  the way a real launch does, so offline compile reports match real launches; :func:`compiled_kernels` reads
  what a real launch compiled (registers, spills).

Nothing here imports triton at module import: TRITON_INTERPRET must be in the environment before triton is first
imported (okdfast.ops.dispatch), so triton is imported inside the functions that need it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); pre-release and local tags are dropped."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def triton_version() -> tuple[int, ...] | None:
    """The installed triton's version, None when triton is missing (imports triton)."""
    try:
        import triton
    except ImportError:
        return None
    return version_tuple(triton.__version__)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


def _dynamo_limit_name() -> str:
    import torch._dynamo.config as config

    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"


def recompile_limit() -> int:
    import torch._dynamo.config as config

    return int(getattr(config, _dynamo_limit_name()))


def raise_recompile_limit(limit: int, *, fail_on_limit: bool = True) -> None:
    """Let one function compile for up to ``limit`` shapes / guard sets (a benchmark over many shapes); with
    ``fail_on_limit`` reaching it raises instead of silently running the function eagerly, so a row labelled
    'compiled' is never an eager one."""
    import torch._dynamo.config as config

    setattr(config, _dynamo_limit_name(), max(limit, recompile_limit()))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(limit, getattr(config, name)))
            break
    if fail_on_limit and hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


# ---------------------------------------------------------------------------------------------------------------
# Triton's CPU interpreter
# ---------------------------------------------------------------------------------------------------------------

_INTERPRETER_PATCHED = False


def patch_triton_interpreter() -> bool:
    """On triton < 3.7, make the CPU interpreter's scalar-to-index conversion work with numpy >= 2.4 (triton
    3.7's own fix). Idempotent; returns whether a patch was applied. Imports triton: call it only where the
    interpreter is about to run (TRITON_INTERPRET already set)."""
    global _INTERPRETER_PATCHED
    version = triton_version()
    if _INTERPRETER_PATCHED or version is None or version >= (3, 7):
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a layout this patch does not know: leave it alone
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _INTERPRETER_PATCHED = True
    return True


# ---------------------------------------------------------------------------------------------------------------
# what a real launch compiles
# ---------------------------------------------------------------------------------------------------------------


def launch_specialization(kernel: Any, args: tuple, kwargs: dict, arch: int = 90) -> tuple[Any, dict, Any]:
    """``(ASTSource, options dict, target)`` that a launch ``kernel[grid](*args, **kwargs)`` compiles on a CUDA
    device of compute capability ``arch``: the JIT's own binder decides which integers are specialised (equal to 1:
    a constant; divisible by 16: an alignment hint) and which pointers are 16-byte aligned, from the real argument
    values (tensors on any device: only their dtype and data_ptr are read). Needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launch_kwargs = {"debug": False, "instrumentation_mode": ""} | dict(kwargs)
    bound_args, specialization, options = binder(*args, **launch_kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch_kwargs, bound_args, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__, target


def compiled_kernels(kernel: Any) -> Iterator[Any]:
    """Every ``CompiledKernel`` a JIT function compiled in this process (real launches), on every device: each has
    ``n_regs``, ``n_spills`` and ``metadata`` (num_warps, ...)."""
    caches = getattr(kernel, "device_caches", None) or {}
    for entry in caches.values():
        kernel_cache = entry[0] if isinstance(entry, tuple) else entry
        yield from kernel_cache.values()
