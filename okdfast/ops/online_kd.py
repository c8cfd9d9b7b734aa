"""``okdfast::online_kd_loss``: the multi-branch online-KD loss as one fused op, values and gradients in one pass.

    loss, rows = online_kd_loss_and_terms(logits, target, teacher, mode=..., temperature=..., ...)

computes exactly :func:`okdfast.ops.reference.online_kd_loss_reference` (the spec and the test oracle) and the
detached per-row terms of :func:`okdfast.ops.reference.online_kd_rows_reference`, from one read of the logits.

Dispatch (``okdfast.ops.dispatch``): CUDA tensors run the Triton kernel of ``okdfast.kernels.online_kd`` (one
launch; it writes the loss, the per-row terms and the gradients); CPU tensors run the reference (its values, and its
gradients in closed form: :func:`_reference_grads`), unless ``OKDFAST_FORCE_TRITON=1`` and ``TRITON_INTERPRET=1``
(the same kernel in Triton's CPU interpreter). The op is a ``torch.library.custom_op`` with a fake implementation
and a registered autograd formula (backward = saved gradient * grad_output, ``okdfast::scale_saved_grad``), so
``torch.compile(fullgraph=True)`` traces a train step through it and ``torch.library.opcheck`` passes. Gradients are
computed in the forward only for the inputs that need them (nothing under ``torch.no_grad()``).

Validation happens here, before any launch. The label range check (every label in [0, C) or ``ignore_index``)
needs the labels' values: on CUDA it costs one host synchronisation per call (set ``OKDFAST_CHECK_TARGETS=0`` to
skip it), and it is skipped while ``torch.compile`` traces; an unchecked out-of-range label never reads out of
bounds: the kernel makes that row's loss and gradients NaN.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor

from okdfast.ops.dispatch import check_once_differentiable, scale_saved_grad, use_triton
from okdfast.ops.reference import (
    KD_MODES,
    REDUCTIONS,
    OnlineKDRows,
    online_kd_rows_reference,
    reduce_rows,
    upcast,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")


def validate_online_kd_args(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None,
    *,
    mode: str,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    teacher_ce_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
) -> None:
    """Raise a ValueError naming the argument and the fix for anything the kernel must never see."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a (B, K, C) tensor of branch logits, got {shape}; stack the K branches")
    batch, num_branches, num_classes = logits.shape
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits: dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    if num_branches < 2:
        raise ValueError(f"logits: K={num_branches} branches; online KD needs K >= 2 (use F.cross_entropy for one)")
    if num_classes < 1:
        raise ValueError("logits: C=0 classes; every row needs at least one class")
    if not isinstance(target, Tensor) or target.shape != (batch,):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target: expected shape ({batch},) (one class id per row of logits), got {shape}")
    if target.dtype != torch.int64:
        raise ValueError(f"target: dtype {target.dtype}; class ids must be int64 (use target.long())")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}; move them to one device")
    if teacher is not None:
        if not isinstance(teacher, Tensor) or teacher.shape not in ((batch, num_classes), logits.shape):
            shape = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
            raise ValueError(
                f"teacher: expected ({batch}, {num_classes}) (shared) or {tuple(logits.shape)} (one per branch), "
                f"got {shape}; pass None to use the mean of the branch logits"
            )
        if teacher.dtype not in FLOAT_DTYPES:
            raise ValueError(f"teacher: dtype {teacher.dtype} is not supported; use float32, bfloat16 or float16")
        if teacher.device != logits.device:
            raise ValueError(f"teacher is on {teacher.device} but logits on {logits.device}; move them to one device")
    if mode not in KD_MODES:
        raise ValueError(f"mode={mode!r}: use 'ensemble' (distil from the teacher) or 'peer' (DML)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
    _check_finite("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (T = 1 is plain softmax)")
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("teacher_ce_weight", teacher_ce_weight)):
        _check_finite(name, value)
    _check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 1]")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index={ignore_index!r}: must be an int")
    if _should_check_target_values(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(
                f"target: class id {value} is outside [0, {num_classes}) and is not ignore_index={ignore_index}; "
                "fix the labels or the number of classes"
            )


def _should_check_target_values(target: Tensor) -> bool:
    if torch.compiler.is_compiling() or target.numel() == 0:
        return False
    if target.device.type == "cuda":
        if os.environ.get("OKDFAST_CHECK_TARGETS", "1") == "0" or torch.cuda.is_current_stream_capturing():
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------------------------


def _reference_grads(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None,
    mode: str,
    temperature: float,
    ce_weight: float,
    kd_weight: float | Tensor,
    has_kd: bool,
    teacher_ce_weight: float,
    detach_teacher: bool,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
) -> tuple[Tensor, Tensor | None]:
    """d loss / d logits and d loss / d teacher (None without a teacher) of the reference loss for grad_output = 1,
    in closed form: the kernel's pass 2 (kernels/online_kd.py has the derivation) written with torch ops, in the
    reference's compute dtype. (A custom op runs below the autograd dispatch key, so the CPU path cannot simply call
    autograd on the reference; tests check these formulas against autograd of the reference.)"""
    z = upcast(logits)
    batch, num_branches, num_classes = z.shape
    valid = target != ignore_index
    label = torch.where(valid, target, torch.zeros_like(target))
    eps, temp = label_smoothing, temperature
    # label-smoothed target distribution: 1 - eps + eps/C at the label, eps/C elsewhere
    smooth = torch.full((batch, num_classes), eps / num_classes, dtype=z.dtype, device=z.device)
    smooth.scatter_(1, label.unsqueeze(1), 1.0 - eps + eps / num_classes)
    t = z.mean(dim=1) if teacher is None else upcast(teacher)
    t3 = t if t.dim() == 3 else t.unsqueeze(1)  # (B, 1 or K, C)

    gz = ce_weight * (torch.softmax(z, dim=-1) - smooth.unsqueeze(1))
    gt = torch.zeros_like(t3)
    if teacher_ce_weight != 0.0:
        gt = gt + teacher_ce_weight * (torch.softmax(t3, dim=-1) - smooth.unsqueeze(1))
    if has_kd:
        log_p = torch.log_softmax(z / temp, dim=-1)
        p = log_p.exp()
        if mode == "peer":
            coef = kd_weight * temp / (num_branches - 1)
            gz = gz + coef * (num_branches * p - p.sum(dim=1, keepdim=True))
            if not detach_teacher:
                spread = num_branches * log_p - log_p.sum(dim=1, keepdim=True)  # K log p_k - sum_j log p_j
                r = (p * spread).sum(dim=-1, keepdim=True)  # R_k = sum_{j != k} KL(p_k || p_j)
                gz = gz + coef * p * (spread - r)
        else:
            log_q = torch.log_softmax(t3 / temp, dim=-1)
            q = log_q.exp()
            gz = gz + kd_weight * temp * (p - q)
            if not detach_teacher:
                kl = (q * (log_q - log_p)).sum(dim=-1, keepdim=True)
                g_kl = kd_weight * temp * q * (log_q - log_p - kl)  # (B, K, C)
                gt = gt + (g_kl if t.dim() == 3 else g_kl.sum(dim=1, keepdim=True))
    if teacher is None:  # t = mean_k z_k: whatever t received flows into every branch with weight 1/K
        gz = gz + gt / num_branches
    row_scale = valid.to(z.dtype)
    if reduction == "mean":
        row_scale = torch.where(valid, 1.0 / valid.sum().to(z.dtype), torch.zeros((), dtype=z.dtype))
    gz = (gz * row_scale.view(-1, 1, 1)).to(logits.dtype)
    if teacher is None:
        return gz, None
    return gz, (gt * row_scale.view(-1, 1, 1)).reshape(teacher.shape).to(teacher.dtype)


def _reference_forward(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None,
    kd_scale: Tensor | None,
    mode: str,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    teacher_ce_weight: float,
    detach_teacher: bool,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    grad_logits: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The CPU path, with the outputs of the kernel's launcher: the reference's values (the spec, as
    :func:`online_kd_loss_reference` composes them) and the closed-form gradients."""
    has_kd = kd_weight != 0.0 or kd_scale is not None
    if kd_scale is not None:
        kd_weight = kd_weight * kd_scale.reshape(()).to(upcast(logits).dtype)
    rows = online_kd_rows_reference(
        logits,
        target,
        teacher,
        mode=mode,
        temperature=temperature,
        detach_teacher=detach_teacher,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )
    loss = reduce_rows(rows.weighted(ce_weight, teacher_ce_weight, kd_weight, with_kd=has_kd), rows.valid, reduction)
    terms = torch.stack([rows.ce, rows.teacher_ce, rows.kd], dim=1)
    terms = torch.where(rows.valid.unsqueeze(1), terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    gz = logits.new_empty(0)
    gt = logits.new_empty(0) if teacher is None else teacher.new_empty(0)
    if grad_logits or grad_teacher:
        grads = _reference_grads(
            logits,
            target,
            teacher,
            mode,
            temperature,
            ce_weight,
            kd_weight,
            has_kd,
            teacher_ce_weight,
            detach_teacher,
            label_smoothing,
            ignore_index,
            reduction,
        )
        if grad_logits:
            gz = grads[0].contiguous()
        if grad_teacher and teacher is not None:
            gt = grads[1].contiguous()
    return loss, terms, gz, gt


@torch.library.custom_op("okdfast::online_kd_loss", mutates_args=())
def online_kd_op(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None,
    kd_scale: Tensor | None,
    mode: str,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    teacher_ce_weight: float,
    detach_teacher: bool,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    grad_logits: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, terms (B, 3): ce / teacher_ce / kd per row, d loss / d logits, d loss / d teacher); the gradients are
    for grad_output = 1 and empty when not requested. Arguments must be validated (:func:`online_kd_loss_and_terms`).
    """
    args = (
        logits,
        target,
        teacher,
        kd_scale,
        mode,
        temperature,
        ce_weight,
        kd_weight,
        teacher_ce_weight,
        detach_teacher,
        label_smoothing,
        ignore_index,
        reduction,
        grad_logits,
        grad_teacher,
    )
    if use_triton(logits, float64=True):
        from okdfast.kernels.online_kd import online_kd_forward

        names = ("mode", "temperature", "ce_weight", "kd_weight", "teacher_ce_weight", "detach_teacher")
        names += ("label_smoothing", "ignore_index", "reduction", "grad_logits", "grad_teacher")
        return online_kd_forward(logits, target, teacher, kd_scale=kd_scale, **dict(zip(names, args[4:])))
    return _reference_forward(*args)


@online_kd_op.register_fake
def _(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None,
    kd_scale: Tensor | None,
    mode: str,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    teacher_ce_weight: float,
    detach_teacher: bool,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    grad_logits: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch = logits.shape[0]
    acc = torch.float64 if torch.float64 in (logits.dtype, getattr(teacher, "dtype", None)) else torch.float32
    loss = logits.new_empty((batch,) if reduction == "none" else (), dtype=acc)
    terms = logits.new_empty((batch, 3), dtype=acc)
    gz = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_logits else logits.new_empty(0)
    if grad_teacher and teacher is not None:
        gt = torch.empty_like(teacher, memory_format=torch.contiguous_format)
    else:
        gt = logits.new_empty(0) if teacher is None else teacher.new_empty(0)
    return loss, terms, gz, gt


def _setup_context(ctx, inputs, output) -> None:
    grad_logits, grad_teacher = inputs[-2:]
    _, terms, gz, gt = output
    ctx.grad_logits = grad_logits
    ctx.grad_teacher = grad_teacher and inputs[2] is not None
    ctx.save_for_backward(gz, gt)
    ctx.mark_non_differentiable(terms, gz, gt)


def _backward(ctx, grad_loss, grad_terms, grad_gz, grad_gt):
    check_once_differentiable()
    gz, gt = ctx.saved_tensors
    d_logits = scale_saved_grad(grad_loss, gz) if ctx.grad_logits and grad_loss is not None else None
    d_teacher = scale_saved_grad(grad_loss, gt) if ctx.grad_teacher and grad_loss is not None else None
    return (d_logits, None, d_teacher) + (None,) * 12


online_kd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------------------------


def online_kd_loss_and_terms(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    *,
    mode: str = "ensemble",
    temperature: float = 3.0,
    ce_weight: float = 1.0,
    kd_weight: float | Tensor = 1.0,
    teacher_ce_weight: float = 0.0,
    detach_teacher: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor, OnlineKDRows]:
    """The fused loss (see :func:`okdfast.functional.online_kd_loss` for the equations and arguments) and its
    detached, unweighted per-row terms ``OnlineKDRows(ce, teacher_ce, kd, valid)``, (B,) each, zero at ignored
    rows; the logging terms come from the same pass, at no extra cost.

    ``kd_weight`` may be a one-element tensor on the logits' device (a ramp-up w(e) that changes every epoch): the
    kernel reads it on the device, so it costs no host sync and no recompilation under torch.compile. It is a
    constant to the op (no gradient flows into it) and, being on the device, it is not checked for finiteness.
    """
    kd_scale = None
    if isinstance(kd_weight, Tensor):
        if kd_weight.numel() != 1 or not kd_weight.is_floating_point() or kd_weight.device != logits.device:
            raise ValueError(
                f"kd_weight: a tensor weight must be a one-element float tensor on {logits.device}, got shape "
                f"{tuple(kd_weight.shape)}, {kd_weight.dtype} on {kd_weight.device}; or pass a Python float"
            )
        kd_scale, kd_weight = kd_weight.detach().reshape(()).to(torch.float32), 1.0
    validate_online_kd_args(
        logits,
        target,
        teacher,
        mode=mode,
        temperature=temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        teacher_ce_weight=teacher_ce_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    grad_enabled = torch.is_grad_enabled()
    if teacher is not None:
        # the teacher gets a gradient from its CE term, and from the KL target when that is not detached
        has_kd = kd_weight != 0.0 or kd_scale is not None
        teacher_trained = teacher_ce_weight != 0.0 or (mode == "ensemble" and not detach_teacher and has_kd)
        if not teacher_trained:
            teacher = teacher.detach()
    grad_teacher = grad_enabled and teacher is not None and teacher.requires_grad
    loss, terms, _, _ = torch.ops.okdfast.online_kd_loss(
        logits,
        target,
        teacher,
        kd_scale,
        mode,
        float(temperature),
        float(ce_weight),
        float(kd_weight),
        float(teacher_ce_weight),
        bool(detach_teacher),
        float(label_smoothing),
        int(ignore_index),
        reduction,
        grad_enabled and logits.requires_grad,
        grad_teacher,
    )
    return loss, OnlineKDRows(terms[:, 0], terms[:, 1], terms[:, 2], target != ignore_index)
