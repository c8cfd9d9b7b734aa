"""``okdfast::classifier_diversity_loss``: MDE's CD loss on the branch classifiers' weights as one fused op.

    loss = classifier_diversity_loss(weights)        # weights (K, C, D) -> scalar

computes exactly :func:`okdfast.ops.reference.classifier_diversity_loss_reference`: the squared cosine similarity
of every two branches' class-c weight vectors, averaged over the K(K-1)/2 branch pairs and the C classes.
Dispatch as for every fused op (``okdfast.ops.dispatch``): CUDA -> the Triton kernel of
``okdfast.kernels.classifier_diversity`` (one launch, value and gradient); CPU -> the reference (its gradient in
closed form), or the kernel in Triton's interpreter with ``OKDFAST_FORCE_TRITON=1 TRITON_INTERPRET=1``.
A ``torch.library.custom_op`` with a fake implementation and a registered (once-differentiable) autograd formula.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from okdfast.ops.dispatch import check_once_differentiable, scale_saved_grad, use_triton
from okdfast.ops.reference import classifier_diversity_loss_reference, upcast

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def validate_classifier_diversity_args(weights: Tensor, eps: float) -> None:
    """Raise a ValueError naming the argument and the fix for anything the kernel must never see."""
    if not isinstance(weights, Tensor) or weights.dim() != 3:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"weights: expected (K, C, D), the K branch classifiers' weight matrices stacked, got {shape}; "
            "use torch.stack([fc.weight for fc in heads])"
        )
    num_branches, num_classes, dim = weights.shape
    if weights.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weights: dtype {weights.dtype} is not supported; use float32, bfloat16 or float16")
    if num_branches < 2:
        raise ValueError(f"weights: K={num_branches}; the diversity of classifiers needs K >= 2 branches")
    if num_classes < 1 or dim < 1:
        raise ValueError(f"weights: C={num_classes}, D={dim}; both must be >= 1")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps={eps!r}: must be a finite number > 0 (the smallest norm F.normalize divides by)")


@torch.library.custom_op("okdfast::classifier_diversity_loss", mutates_args=())
def classifier_diversity_op(weights: Tensor, eps: float, grad: bool) -> tuple[Tensor, Tensor]:
    """(L_CD, dL/dW for grad_output = 1, empty when ``grad`` is False). Arguments must be validated."""
    if use_triton(weights, float64=True):
        from okdfast.kernels.classifier_diversity import classifier_diversity_forward

        return classifier_diversity_forward(weights, eps=eps, grad=grad)
    loss = classifier_diversity_loss_reference(weights, eps=eps)
    return loss, _reference_grad(weights, eps).contiguous() if grad else weights.new_empty(0)


def _reference_grad(weights: Tensor, eps: float) -> Tensor:
    """dL_CD/dW of the reference in closed form (the kernel's pass 2; kernels/classifier_diversity.py has the
    derivation). A custom op runs below the autograd dispatch key, so the CPU path cannot call autograd on the
    reference; tests check this formula against autograd of the reference."""
    w = upcast(weights)
    num_branches, num_classes, _ = w.shape
    norm = w.norm(dim=-1, keepdim=True)  # (K, C, 1)
    norm_c = norm.clamp_min(eps)
    u = w / norm_c
    cos = (
        torch.einsum("kcd,lcd->klc", u, u) * (1.0 - torch.eye(num_branches, dtype=w.dtype, device=w.device))[..., None]
    )
    s2 = 4.0 / (num_branches * (num_branches - 1) * num_classes)  # 2 * the mean's 2 / (K (K-1) C)
    g = s2 * torch.einsum("klc,lcd->kcd", cos, u)  # dL/du
    proj = torch.where(norm > eps, s2 * cos.square().sum(dim=1).unsqueeze(-1), torch.zeros((), dtype=w.dtype))
    return ((g - proj * u) / norm_c).to(weights.dtype)


@classifier_diversity_op.register_fake
def _(weights: Tensor, eps: float, grad: bool) -> tuple[Tensor, Tensor]:
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    gw = torch.empty_like(weights, memory_format=torch.contiguous_format) if grad else weights.new_empty(0)
    return weights.new_empty((), dtype=acc), gw


def _setup_context(ctx, inputs, output) -> None:
    ctx.grad = inputs[2]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_gw):
    check_once_differentiable()
    (gw,) = ctx.saved_tensors
    return (scale_saved_grad(grad_loss, gw) if ctx.grad and grad_loss is not None else None), None, None


classifier_diversity_op.register_autograd(_backward, setup_context=_setup_context)


def classifier_diversity_loss(weights: Tensor, *, eps: float = 1e-8) -> Tensor:
    """L_CD = 2 / (K (K-1) C) * sum_{k<l} sum_c cos(w_kc, w_lc)^2 of the (K, C, D) branch classifier weights: a
    float32 scalar (float64 for float64 weights) in [0, 1]. ``eps``: norms below it are clamped (F.normalize)."""
    validate_classifier_diversity_args(weights, eps)
    grad = torch.is_grad_enabled() and weights.requires_grad
    loss, _ = torch.ops.okdfast.classifier_diversity_loss(weights, float(eps), grad)
    return loss
