"""MDE's loss head and its dispatch.

    loss, terms = mde_head(logits, target, attention_logits, options=MDEHeadOptions(), kd_weight=None)

computes :func:`okdfast.ops.reference.mde_head_reference` (the spec and the test oracle): the FFM attention softmax,
the auxiliaries' target(s) and the leader's mean, every CE and KL term, and the per-sample prediction-space CD term.
- Where the Triton kernels run (CUDA; the CPU only in Triton's interpreter, ``okdfast.ops.dispatch``): the CE + KL
  part is the fused online-KD op (``okdfast.ops.online_kd``: the teachers formed in its kernel from the (B, K, K)
  weights, their gradient returned by its backward), the attention softmax, the weights and the CD rows are small
  PyTorch ops around it (fused by Inductor under ``--compile``). The one-pass kernel of the whole head (the attention
  logits and the CD inside the online-KD kernel) is not built yet: docs/METHOD.md section 3 and issue 20.
- Elsewhere, the reference under autograd: the CPU path is the spec itself.

Traceable by ``torch.compile(fullgraph=True)``; no host synchronisation (the label range is checked on the CPU
only, as for the online-KD op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.ops.dispatch import resolve_kernel
from okdfast.ops.mde_head_options import MDEHeadOptions, MDEHeadTerms, attention_layout, validate_mde_head_inputs
from okdfast.ops.online_kd import online_kd, should_check_target_values
from okdfast.ops.online_kd_options import OnlineKDOptions, check_target_values
from okdfast.ops.reference import (
    mde_head_reference,
    mde_teacher_weights,
    nontarget_correlation_rows,
    reduce_rows,
    upcast,
)


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
    kernel = resolve_kernel(kernel, logits, "MDE head")
    if not kernel:
        return mde_head_reference(logits, target, attention_logits, options, kd_weight)
    num_branches = logits.shape[1]
    shared = attention_layout(attention_logits, logits.shape[0], num_branches - 1) == 1
    attention = torch.softmax(upcast(attention_logits) / options.attention_temperature, dim=-1)
    weights = mde_teacher_weights(attention, num_branches)
    leader = (num_branches - 1,) if options.detach_leader_target else None
    kd_options = OnlineKDOptions(
        temperature=options.temperature,
        kd_weight=options.kd_weight,
        teacher_ce_weight=options.target_ce_weight / (1 if shared else num_branches - 1),
        teacher_ce_rows=(0,) if shared else tuple(range(num_branches - 1)),
        detach_teacher=options.detach_target,
        detached_teacher_rows=None if options.detach_target else leader,
        label_smoothing=options.label_smoothing,
        ignore_index=options.ignore_index,
        reduction=options.reduction,
    )
    loss, parts = online_kd(logits, target, None, weights, kd_options, kd_weight, kernel=True)
    valid = target != options.ignore_index
    label = torch.where(valid, target, torch.zeros_like(target))
    cd_rows = nontarget_correlation_rows(logits[:, :-1], label, options.temperature)
    if options.cd_weight != 0.0:
        loss = loss + options.cd_weight * reduce_rows(cd_rows, valid, options.reduction).to(loss.dtype)
    target_ce = parts.teacher_ce if shared else parts.teacher_ce / (num_branches - 1)
    return loss, MDEHeadTerms(parts.ce, target_ce, parts.kd, reduce_rows(cd_rows.detach(), valid, "mean"))
