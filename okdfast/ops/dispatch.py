"""What every fused op shares: when to run the Triton kernel, and the refusal of double backward.

When Triton runs (``use_triton``):
- CUDA tensors: the Triton kernel, whenever ``triton`` is importable.
- CPU tensors: the op's PyTorch path (the reference), unless ``OKDFAST_FORCE_TRITON=1`` and ``TRITON_INTERPRET=1``
  are both set; then the same kernel runs in Triton's CPU interpreter (how the tests exercise it without a GPU).
  TRITON_INTERPRET is read by ``@triton.jit`` and by ``import triton`` itself (its standard library, tl.sum and
  friends, is decorated at import), so it must be in the environment before anything in the process imports
  triton; setting it later leaves compiled-mode kernels that cannot run on CPU tensors (the launchers then raise).

``MethodConfig.fused_loss`` / ``--fused-loss`` (``kernel_argument``, the ops' ``kernel=``): 'on' always asks for the
kernels (the op raises where they cannot run), 'off' never (the reference), 'auto' leaves it to the op: the kernels
where the Triton kernel runs, except where a GPU benchmark measured the kernel slower (``okdfast.ops.fused_default``;
the MDE head only). ``fused_enabled``: whether the kernels can run for a mode on a device (the run's log line).

The fused ops are once-differentiable: their backward is a kernel, so differentiating it again (double backward)
raises a clear error instead of silently returning wrong second derivatives (:func:`check_once_differentiable`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

# Looked up once, without importing triton (importing it early would freeze TRITON_INTERPRET); a plain constant so
# that torch.compile traces ``triton_available`` without caching wrappers in the way.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether ``triton`` is installed (the kernels need it on any device)."""
    return _TRITON_INSTALLED


def interpreter_requested() -> bool:
    """True when CPU tensors should run the Triton kernels in the interpreter (both variables set to 1)."""
    return os.environ.get("OKDFAST_FORCE_TRITON") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on ``device`` (CUDA; CPU only in the interpreter)."""
    device = torch.device(device)
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_requested()


FUSED_MODES = ("auto", "on", "off")  # --fused-loss: where the fused op runs, always, never


def use_triton(tensor: Tensor, *, float64: bool = False) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel. ``float64``: whether the op's kernel accepts float64
    (the loss kernels do, so gradcheck covers them; ops whose kernels do not leave float64 to PyTorch)."""
    if tensor.dtype == torch.float64 and not float64:
        return False
    return triton_runs_on(tensor.device)


def kernel_argument(mode: str) -> bool | None:
    """A ``--fused-*`` mode as an op's ``kernel=`` argument: 'on' -> True, 'off' -> False, 'auto' -> None (the op's
    own default)."""
    if mode not in FUSED_MODES:
        raise ValueError(f"fused mode {mode!r}: use 'auto', 'on' or 'off'")
    return None if mode == "auto" else mode == "on"


def fused_enabled(mode: str, where: Tensor | torch.device | str) -> bool:
    """The ``--fused-*`` flags: 'on' -> True, 'off' -> False, 'auto' -> where the Triton kernel runs (for the
    tensor's or the given device)."""
    if mode not in FUSED_MODES:
        raise ValueError(f"fused mode {mode!r}: use 'auto', 'on' or 'off'")
    if mode == "auto":
        return triton_runs_on(where.device if isinstance(where, Tensor) else where)
    return mode == "on"


def resolve_kernel(kernel: bool | None, tensor: Tensor, what: str) -> bool:
    """An op's ``kernel=`` argument made concrete for ``tensor``: None -> the Triton kernels where they run, False ->
    the reference, True -> the kernels, or one clear error where they cannot run (``what`` names the op)."""
    runs_here = use_triton(tensor, float64=True)
    if kernel and not runs_here:
        raise ValueError(
            f"the fused {what} kernels were asked for (fused_loss='on' / kernel=True) but do not run on "
            f"{tensor.device} {tensor.dtype} tensors: they need CUDA (or TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1 "
            "on the CPU); use fused_loss='auto' (the kernels where they run, the reference elsewhere) or 'off'"
        )
    return runs_here if kernel is None else kernel


DOUBLE_BACKWARD_ERROR = (
    "okdfast's fused losses are once-differentiable: their backward is a Triton kernel, so a differentiable "
    "backward (create_graph=True, double backward) is not supported; use the references in okdfast.ops.reference "
    "(or MethodConfig(fused_loss='off')) for higher-order gradients"
)


def check_once_differentiable() -> None:
    """Called first in every fused op's backward: grad mode is on there only under create_graph=True."""
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
