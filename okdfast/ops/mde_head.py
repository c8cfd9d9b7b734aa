"""MDE's loss head as torch.library ops around the one-pass Triton kernel, and its dispatch.

    loss, terms = mde_head(logits, target, attention_logits, options=MDEHeadOptions(), kd_weight=None)

computes :func:`okdfast.ops.reference.mde_head_reference` (the spec and the test oracle): the FFM attention softmax,
the auxiliaries' target(s) and the leader's mean, every CE and KL term, and the per-sample prediction-space CD term.
- Where the Triton kernels run (CUDA; the CPU only in Triton's interpreter, ``okdfast.ops.dispatch``): the ops
  ``okdfast::mde_head_fwd`` (2 launches: the rows, then the batch reduction) and ``okdfast::mde_head_bwd`` (1
  launch, its autograd formula). They are the online-KD kernels (``okdfast/kernels/online_kd.py``) in their
  attention mode: the attention softmax, the (B, K, K) teacher weights, every CE and KL term and the CD's
  non-target co-moments in one pass over the logits; the backward returns the logits' and the attention logits'
  gradients. ``kernel='composed'`` runs the earlier composition (the fused online-KD op with the weights from a
  PyTorch softmax and the CD rows in PyTorch around it): the benchmark's third implementation.
- Elsewhere, the reference under autograd: the CPU path is the spec itself. ``kernel=None`` also takes the reference
  where a GPU visit measured the kernel slower than it at the nearest measured shape (``okdfast.ops.fused_default``:
  the eager reference for an eager call, the compiled one inside torch.compile).

Traceable by ``torch.compile(fullgraph=True)``; no host synchronisation (the label range is checked on the CPU
only, as for the online-KD op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.ops.dispatch import check_once_differentiable, resolve_kernel
from okdfast.ops.fused_default import kernel_by_default
from okdfast.ops.mde_head_options import (
    MDEHeadOptions,
    MDEHeadTerms,
    attention_layout,
    head_kd_options,
    layout_name,
    validate_mde_head_inputs,
)
from okdfast.ops.online_kd import online_kd, should_check_target_values, stats_width
from okdfast.ops.online_kd_options import check_target_values
from okdfast.ops.reference import (
    mde_head_reference,
    mde_teacher_weights,
    nontarget_correlation_rows,
    reduce_rows,
    upcast,
)

_OPTIONS = MDEHeadOptions.schema()
_NUM_OPTIONS = _OPTIONS.count(",") + 1
torch.library.define(
    "okdfast::mde_head_fwd",
    f"(Tensor logits, Tensor target, Tensor attention_logits, Tensor? kd_weight_tensor, {_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "okdfast::mde_head_bwd",
    "(Tensor grad_loss, Tensor logits, Tensor target, Tensor attention_logits, Tensor? kd_weight_tensor, "
    f"Tensor summary, Tensor stats, bool need_logits, bool need_attention, {_OPTIONS}) -> (Tensor, Tensor)",
)


def _acc(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def head_kernel_options(logits: Tensor, attention_logits: Tensor, head: MDEHeadOptions):
    """The online-KD options the kernels' attention mode runs the head with (the launchers' ``options``)."""
    num_branches = logits.shape[1]
    return head_kd_options(head, num_branches, attention_layout(attention_logits, logits.shape[0], num_branches - 1))


@torch.library.register_kernel("okdfast::mde_head_fwd", ("cpu", "cuda"))
def _fwd(logits, target, attention_logits, kd_weight, *options):
    """(loss, summary (5,): mean ce / target_ce rows / kd / cd and the number of valid rows, stats)."""
    from okdfast.kernels.online_kd import online_kd_forward

    head = MDEHeadOptions.from_args(options)
    kd_options = head_kernel_options(logits, attention_logits, head)
    return online_kd_forward(logits, target, None, attention_logits, kd_weight, kd_options, logits.shape[1], head=head)


@torch.library.register_fake("okdfast::mde_head_fwd")
def _(logits, target, attention_logits, kd_weight, *options):
    from okdfast.kernels.online_kd import stat_slots

    head = MDEHeadOptions.from_args(options)
    batch, num_branches, _ = logits.shape
    acc = _acc(logits, attention_logits)
    loss = logits.new_empty((batch,) if head.reduction == "none" else (), dtype=acc)
    width = stats_width(num_branches)
    return loss, logits.new_empty(5, dtype=acc), logits.new_empty(batch, stat_slots(width, True), width, dtype=acc)


@torch.library.register_kernel("okdfast::mde_head_bwd", ("cpu", "cuda"))
def _bwd(grad_loss, logits, target, attention_logits, kd_weight, summary, stats, need_z, need_a, *options):
    """(d logits, d attention_logits); an empty tensor for a gradient not asked for."""
    from okdfast.kernels.online_kd import online_kd_backward

    head = MDEHeadOptions.from_args(options)
    kd_options = head_kernel_options(logits, attention_logits, head)
    gz, _, ga = online_kd_backward(
        grad_loss, logits, target, None, attention_logits, kd_weight, summary, stats, kd_options, logits.shape[1],
        (need_z, False, need_a), head=head,
    )  # fmt: skip
    return tuple(logits.new_empty(0) if g is None else g for g in (gz, ga))


@torch.library.register_fake("okdfast::mde_head_bwd")
def _(grad_loss, logits, target, attention_logits, kd_weight, summary, stats, need_z, need_a, *options):
    gz = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_z else logits.new_empty(0)
    ga = (
        torch.empty(attention_logits.shape, dtype=attention_logits.dtype, device=attention_logits.device)
        if need_a
        else logits.new_empty(0)
    )
    return gz, ga


def _setup_context(ctx, inputs, output) -> None:
    logits, target, attention_logits, kd_weight = inputs[:4]
    _, summary, stats = output
    ctx.options = inputs[4:]
    ctx.save_for_backward(logits, target, attention_logits, kd_weight, summary, stats)
    ctx.mark_non_differentiable(summary, stats)


def _backward(ctx, grad_loss, _grad_summary, _grad_stats):
    check_once_differentiable()
    logits, target, attention_logits, kd_weight, summary, stats = ctx.saved_tensors
    need_z, _, need_a = ctx.needs_input_grad[:3]
    if grad_loss is None or not (need_z or need_a):
        return (None,) * (4 + _NUM_OPTIONS)
    gz, ga = torch.ops.okdfast.mde_head_bwd(
        grad_loss, logits, target, attention_logits, kd_weight, summary, stats, need_z, need_a, *ctx.options
    )
    return (gz if need_z else None, None, ga if need_a else None) + (None,) * (1 + _NUM_OPTIONS)


torch.library.register_autograd("okdfast::mde_head_fwd", _backward, setup_context=_setup_context)


def mde_head(
    logits: Tensor,
    target: Tensor,
    attention_logits: Tensor,
    options: MDEHeadOptions = MDEHeadOptions(),
    kd_weight: Tensor | None = None,
    *,
    kernel: bool | str | None = None,
) -> tuple[Tensor, MDEHeadTerms]:
    """The loss (see :func:`okdfast.functional.mde_head_loss`) and its unweighted terms averaged over the valid rows
    (detached; from the same pass). ``kernel``: None runs the one-pass kernel where the Triton kernels run and a GPU
    benchmark did not measure it slower than the reference it replaces (``okdfast.ops.fused_default``), the
    reference elsewhere; False the reference; True the one-pass kernel (an error where it cannot run); 'composed'
    the fused online-KD op with the attention and the CD around it in PyTorch."""
    validate_mde_head_inputs(logits, target, attention_logits, kd_weight, options)
    if should_check_target_values(target):
        check_target_values(target, logits.shape[-1], options.ignore_index)
    if kd_weight is not None:
        kd_weight = kd_weight.detach().reshape(()).to(torch.float32)
    composed = kernel == "composed"
    if kernel not in (None, True, False, "composed"):
        raise ValueError(f"kernel={kernel!r}: use None (auto), True, False or 'composed'")
    num_branches = logits.shape[1]
    shared = attention_layout(attention_logits, logits.shape[0], num_branches - 1) == 1
    runs = resolve_kernel(True if composed else kernel, logits, "MDE head")
    if not runs or (kernel is None and not kernel_by_default("mde_head", logits, layout_name(shared))):
        return mde_head_reference(logits, target, attention_logits, options, kd_weight)
    if composed:
        return _composed(logits, target, attention_logits, options, kd_weight, shared)
    loss, summary, _ = torch.ops.okdfast.mde_head_fwd(logits, target, attention_logits, kd_weight, *options.as_args())
    target_ce = summary[1] if shared else summary[1] / (num_branches - 1)
    return loss, MDEHeadTerms(summary[0], target_ce, summary[2], summary[3])


def _composed(logits, target, attention_logits, options, kd_weight, shared) -> tuple[Tensor, MDEHeadTerms]:
    """The head as the fused online-KD op with the attention softmax, the weights and the CD rows in PyTorch."""
    num_branches = logits.shape[1]
    attention = torch.softmax(upcast(attention_logits) / options.attention_temperature, dim=-1)
    weights = mde_teacher_weights(attention, num_branches)
    kd_options = head_kd_options(options, num_branches, 1 if shared else num_branches - 1)
    loss, parts = online_kd(logits, target, None, weights, kd_options, kd_weight, kernel=True)
    valid = target != options.ignore_index
    label = torch.where(valid, target, torch.zeros_like(target))
    cd_rows = nontarget_correlation_rows(logits[:, :-1], label, options.temperature)
    if options.cd_weight != 0.0:
        loss = loss + options.cd_weight * reduce_rows(cd_rows, valid, options.reduction).to(loss.dtype)
    target_ce = parts.teacher_ce if shared else parts.teacher_ce / (num_branches - 1)
    return loss, MDEHeadTerms(parts.ce, target_ce, parts.kd, reduce_rows(cd_rows.detach(), valid, "mean"))
