"""The multi-branch online-KD loss as torch.library ops around the Triton kernels, and its dispatch.

    loss, terms = online_kd(logits, target, teacher=None, teacher_weights=None, options=OnlineKDOptions())

computes :func:`okdfast.ops.reference.online_kd_reference` (the spec and the test oracle):
- where the Triton kernels run (CUDA; the CPU only in Triton's interpreter, ``okdfast.ops.dispatch``), through the
  ops ``okdfast::online_kd_fwd`` (2 launches: rows, then the batch reduction) and ``okdfast::online_kd_bwd``
  (1 launch, registered as its autograd formula; ``grad_output`` is read on the device);
- elsewhere, the reference itself under autograd: the CPU path is the spec, not a copy of it.

Both ops take the :class:`OnlineKDOptions` fields as their trailing arguments (the schema is generated from the
dataclass), have fake implementations, and are traced by ``torch.compile(fullgraph=True)``; ``opcheck`` passes.
No host synchronisation: the number of valid rows and the kd weight stay on the device, and the label range is
checked on CUDA only with ``OKDFAST_CHECK_TARGETS=1`` (an unchecked out-of-range label makes its row NaN).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from okdfast.ops.dispatch import check_once_differentiable, resolve_kernel
from okdfast.ops.online_kd_options import (
    OnlineKDOptions,
    OnlineKDTerms,
    check_target_values,
    teacher_weight_layout,
    validate_online_kd_inputs,
)
from okdfast.ops.reference import online_kd_reference

_OPTIONS = OnlineKDOptions.schema()
_NUM_OPTIONS = _OPTIONS.count(",") + 1
torch.library.define(
    "okdfast::online_kd_fwd",
    "(Tensor logits, Tensor target, Tensor? teacher, Tensor? teacher_weights, Tensor? kd_weight_tensor, "
    "int weight_rows, "
    f"{_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "okdfast::online_kd_bwd",
    "(Tensor grad_loss, Tensor logits, Tensor target, Tensor? teacher, Tensor? teacher_weights, "
    "Tensor? kd_weight_tensor, "
    "Tensor summary, Tensor stats, int weight_rows, bool need_logits, bool need_teacher, bool need_weights, "
    f"{_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)


def stats_width(num_branches: int) -> int:
    """BLOCK_K of the kernels: the statistics tensor is (B, 7, BLOCK_K)."""
    return 1 << (num_branches - 1).bit_length()


def _acc(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_kernel("okdfast::online_kd_fwd", ("cpu", "cuda"))
def _fwd(logits, target, teacher, teacher_weights, kd_weight, weight_rows, *options):
    """(loss, summary (4,): mean ce / teacher_ce / kd and the number of valid rows, stats for the backward)."""
    from okdfast.kernels.online_kd import online_kd_forward

    opts = OnlineKDOptions.from_args(options)
    return online_kd_forward(logits, target, teacher, teacher_weights, kd_weight, opts, weight_rows)


@torch.library.register_fake("okdfast::online_kd_fwd")
def _(logits, target, teacher, teacher_weights, kd_weight, weight_rows, *options):
    opts = OnlineKDOptions.from_args(options)
    batch, num_branches, _ = logits.shape
    acc = _acc(logits, teacher, teacher_weights)
    loss = logits.new_empty((batch,) if opts.reduction == "none" else (), dtype=acc)
    summary = logits.new_empty(4, dtype=acc)
    return loss, summary, logits.new_empty(batch, 7, stats_width(num_branches), dtype=acc)


@torch.library.register_kernel("okdfast::online_kd_bwd", ("cpu", "cuda"))
def _bwd(grad_loss, logits, target, teacher, teacher_weights, kd_weight, summary, stats, weight_rows, *rest):
    """(d logits, d teacher, d teacher_weights); an empty tensor for each gradient not asked for."""
    from okdfast.kernels.online_kd import online_kd_backward

    needs, opts = tuple(rest[:3]), OnlineKDOptions.from_args(rest[3:])
    grads = online_kd_backward(
        grad_loss, logits, target, teacher, teacher_weights, kd_weight, summary, stats, opts, weight_rows, needs
    )
    return tuple(logits.new_empty(0) if g is None else g for g in grads)


@torch.library.register_fake("okdfast::online_kd_bwd")
def _(grad_loss, logits, target, teacher, teacher_weights, kd_weight, summary, stats, weight_rows, *rest):
    need_z, need_t, need_w = rest[:3]
    gz = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_z else logits.new_empty(0)
    gt = torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if need_t else logits.new_empty(0)
    gw = torch.empty_like(teacher_weights, memory_format=torch.contiguous_format) if need_w else logits.new_empty(0)
    return gz, gt, gw


def _setup_context(ctx, inputs, output) -> None:
    logits, target, teacher, teacher_weights, kd_weight, weight_rows = inputs[:6]
    _, summary, stats = output
    ctx.weight_rows = weight_rows
    ctx.options = inputs[6:]
    ctx.save_for_backward(logits, target, teacher, teacher_weights, kd_weight, summary, stats)
    ctx.mark_non_differentiable(summary, stats)


def _backward(ctx, grad_loss, _grad_summary, _grad_stats):
    check_once_differentiable()
    logits, target, teacher, teacher_weights, kd_weight, summary, stats = ctx.saved_tensors
    need_z, _, need_t, need_w = ctx.needs_input_grad[:4]
    if grad_loss is None or not (need_z or need_t or need_w):
        return (None,) * (6 + _NUM_OPTIONS)
    gz, gt, gw = torch.ops.okdfast.online_kd_bwd(
        grad_loss,
        logits,
        target,
        teacher,
        teacher_weights,
        kd_weight,
        summary,
        stats,
        ctx.weight_rows,
        need_z,
        need_t,
        need_w,
        *ctx.options,
    )
    grads = (gz if need_z else None, None, gt if need_t else None, gw if need_w else None)
    return grads + (None,) * (2 + _NUM_OPTIONS)


torch.library.register_autograd("okdfast::online_kd_fwd", _backward, setup_context=_setup_context)


def should_check_target_values(target: Tensor) -> bool:
    if torch.compiler.is_compiling() or target.numel() == 0:
        return False
    if target.device.type == "cpu":
        return True
    return os.environ.get("OKDFAST_CHECK_TARGETS") == "1" and not torch.cuda.is_current_stream_capturing()


def teacher_is_trained(options: OnlineKDOptions, has_kd: bool, teacher_rows: int) -> bool:
    """Whether any term back-propagates into the teacher: its CE, or an undetached KL target."""
    kl_trained = options.mode == "ensemble" and has_kd and options.detach_mask(teacher_rows) != (1 << teacher_rows) - 1
    return options.teacher_ce_weight != 0.0 or kl_trained


def online_kd(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    teacher_weights: Tensor | None = None,
    options: OnlineKDOptions = OnlineKDOptions(),
    kd_weight: Tensor | None = None,
    *,
    kernel: bool | None = None,
) -> tuple[Tensor, OnlineKDTerms]:
    """The loss (see :func:`okdfast.functional.online_kd_loss`) and its unweighted terms averaged over the valid
    rows (detached; from the same pass at no extra cost).

    ``kd_weight``: an optional one-element float tensor on the logits' device multiplying ``options.kd_weight`` (a
    ramp-up that changes every epoch: no recompile, no host sync). ``kernel``: None runs the Triton kernels where
    they run and the reference elsewhere; False the reference; True the kernels (an error where they cannot run).
    """
    validate_online_kd_inputs(logits, target, teacher, teacher_weights, kd_weight, options)
    if should_check_target_values(target):
        check_target_values(target, logits.shape[-1], options.ignore_index)
    if kd_weight is not None:
        kd_weight = kd_weight.detach().reshape(()).to(torch.float32)
    kernel = resolve_kernel(kernel, logits, "online-KD")
    if not kernel:
        return online_kd_reference(logits, target, teacher, teacher_weights, options, kd_weight)

    has_kd = options.kd_weight != 0.0 or kd_weight is not None
    weight_rows = 0
    if teacher_weights is not None:
        weight_rows, _ = teacher_weight_layout(teacher_weights, logits.shape[0], logits.shape[1])
    rows = weight_rows or (logits.shape[1] if teacher is not None and teacher.dim() == 3 else 1)
    if not teacher_is_trained(options, has_kd, rows):
        teacher = None if teacher is None else teacher.detach()
        teacher_weights = None if teacher_weights is None else teacher_weights.detach()
    loss, summary, _ = torch.ops.okdfast.online_kd_fwd(
        logits, target, teacher, teacher_weights, kd_weight, weight_rows, *options.as_args()
    )
    return loss, OnlineKDTerms(summary[0], summary[1], summary[2])
