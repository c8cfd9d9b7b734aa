"""MDE's loss head as torch.library ops around the Triton kernels, and its dispatch.

    loss, terms = mde_head(logits, target, attention_logits, options=MDEHeadOptions(), kd_weight=None)

computes :func:`okdfast.ops.reference.mde_head_reference` (the spec and the test oracle): the FFM attention softmax,
the auxiliaries' target(s) and the leader's mean, every CE and KL term, and the per-sample prediction-space CD term,
- where the Triton kernels run (CUDA; the CPU only in Triton's interpreter, ``okdfast.ops.dispatch``), as one
  forward pass (the row kernel of ``okdfast.kernels.online_kd`` with the attention logits as its teacher, then the
  batch reduction) and one backward pass that returns the gradients of the logits and of the attention logits;
- elsewhere, the reference under autograd: the CPU path is the spec itself.

The ops ``okdfast::mde_head_fwd`` / ``okdfast::mde_head_bwd`` take the :class:`MDEHeadOptions` fields as trailing
arguments (the schema is generated from the dataclass), have fake implementations and are traced by
``torch.compile(fullgraph=True)``. No host synchronisation (the label range is checked on the CPU only, as for the
online-KD op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.ops.dispatch import check_once_differentiable, use_triton
from okdfast.ops.mde_head_options import MDEHeadOptions, MDEHeadTerms, attention_layout, validate_mde_head_inputs
from okdfast.ops.online_kd import should_check_target_values, stats_width
from okdfast.ops.online_kd_options import check_target_values
from okdfast.ops.reference import mde_head_reference

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


MDE_EXTRA_STATS = 2  # per branch: the mean of its non-target probabilities and r_i (kernels/online_kd.py)


def mde_stats_shape(batch: int, num_branches: int) -> tuple[int, int, int]:
    """(B, 7 + 2 + BLOCK_K, BLOCK_K): the online-KD statistics, the CD's per-branch statistics and its coefficient
    matrix A (BLOCK_K x BLOCK_K), what the backward reads instead of a second pass over C."""
    width = stats_width(num_branches)
    return batch, 7 + MDE_EXTRA_STATS + width, width


def _acc(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_kernel("okdfast::mde_head_fwd", ("cpu", "cuda"))
def _fwd(logits, target, attention_logits, kd_weight, *options):
    """(loss, summary (5,): mean ce / target_ce / kd / cd and the number of valid rows, stats for the backward)."""
    from okdfast.kernels.online_kd import mde_head_forward

    return mde_head_forward(logits, target, attention_logits, kd_weight, MDEHeadOptions.from_args(options))


@torch.library.register_fake("okdfast::mde_head_fwd")
def _(logits, target, attention_logits, kd_weight, *options):
    opts = MDEHeadOptions.from_args(options)
    batch, num_branches, _ = logits.shape
    acc = _acc(logits, attention_logits)
    loss = logits.new_empty((batch,) if opts.reduction == "none" else (), dtype=acc)
    stats = logits.new_empty(mde_stats_shape(batch, num_branches), dtype=acc)
    return loss, logits.new_empty(5, dtype=acc), stats


@torch.library.register_kernel("okdfast::mde_head_bwd", ("cpu", "cuda"))
def _bwd(grad_loss, logits, target, attention_logits, kd_weight, summary, stats, need_z, need_a, *options):
    from okdfast.kernels.online_kd import mde_head_backward

    opts = MDEHeadOptions.from_args(options)
    gz, ga = mde_head_backward(
        grad_loss, logits, target, attention_logits, kd_weight, summary, stats, opts, (need_z, need_a)
    )
    return (logits.new_empty(0) if gz is None else gz), (logits.new_empty(0) if ga is None else ga)


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
    kernel: bool | None = None,
) -> tuple[Tensor, MDEHeadTerms]:
    """The loss (see :func:`okdfast.functional.mde_head_loss`) and its unweighted terms averaged over the valid rows
    (detached; from the same pass). ``kernel``: None runs the Triton kernels where they run and the reference
    elsewhere; False the reference; True the kernels (an error where they cannot run)."""
    validate_mde_head_inputs(logits, target, attention_logits, kd_weight, options)
    if should_check_target_values(target):
        check_target_values(target, logits.shape[-1], options.ignore_index)
    if kd_weight is not None:
        kd_weight = kd_weight.detach().reshape(()).to(torch.float32)
    runs_here = use_triton(logits, float64=True)
    if kernel is None:
        kernel = runs_here
    if kernel and not runs_here:
        raise ValueError(
            f"the fused MDE head kernels were asked for (fused_loss='on' / kernel=True) but do not run on "
            f"{logits.device} {logits.dtype} tensors: they need CUDA (or TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1 "
            "on the CPU); use fused_loss='auto' (the kernels where they run, the reference elsewhere) or 'off'"
        )
    if not kernel:
        return mde_head_reference(logits, target, attention_logits, options, kd_weight)
    attention_layout(attention_logits, logits.shape[0], logits.shape[1] - 1)
    loss, summary, _ = torch.ops.okdfast.mde_head_fwd(logits, target, attention_logits, kd_weight, *options.as_args())
    return loss, MDEHeadTerms(summary[0], summary[1], summary[2], summary[3])
