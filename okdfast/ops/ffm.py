"""``okdfast::ffm_fwd`` / ``okdfast::ffm_bwd``: the FFM attention of MDE as one fused op, forward and backward.

    attention, teacher = ffm_attention(features, logits, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias,
                                       running_mean, running_var, training=True, momentum=0.1, eps=1e-5)

computes exactly :func:`okdfast.ops.reference.ffm_attention_reference` (the spec and the test oracle):
s = GAP(sum_k F_k), a = softmax_k(W2 ReLU(BN(W1 s)) + b2), t = sum_k a_k z_k, with BatchNorm1d semantics
(batch statistics and an in-place running-statistics update when ``training``, running statistics otherwise).

Dispatch: CUDA tensors run the Triton kernels of ``okdfast.kernels.ffm`` (forward: 2 launches + 1 for the
running statistics in training; backward: 2); CPU
tensors run the PyTorch implementation below, unless ``OKDFAST_FORCE_TRITON=1`` and ``TRITON_INTERPRET=1`` (the
test path: the same kernels in Triton's CPU interpreter; okdfast/ops/dispatch.py). float64 always takes the
PyTorch path (gradcheck); the kernels compute in fp32.
Both ops are ``torch.library.custom_op``s with fake implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces through them and ``torch.library.opcheck`` passes.

The features' gradient is returned as a stride-0 broadcast of a (B, D) tensor: dF[b, k, d, h, w] = dL/ds[b, d] / HW
is the same for every branch and pixel (see kernels/ffm.py for why it is never materialised here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.ops.dispatch import check_once_differentiable, fused_enabled, triton_available, use_triton

__all__ = [
    "ffm_attention",
    "ffm_bwd",
    "ffm_fwd",
    "ffm_update_running_stats",
    "fused_enabled",
    "triton_available",
    "use_triton",
]

MAX_BRANCHES = 8

# ---------------------------------------------------------------------------------------------------------------
# dispatch (okdfast/ops/dispatch.py: CUDA -> Triton; CPU -> PyTorch unless OKDFAST_FORCE_TRITON=1 TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------


def _kernels():
    # Imported on first use: TRITON_INTERPRET is read when the @triton.jit decorators run.
    from okdfast.kernels import ffm as kernels

    return kernels


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# PyTorch implementations (CPU path; the same math as the kernels, intermediates included)
# ---------------------------------------------------------------------------------------------------------------


def _forward_torch(
    features: Tensor,
    logits: Tensor,
    fc1_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
) -> tuple[Tensor, ...]:
    dtype = _compute_dtype(features, logits)
    pooled = features.to(dtype).sum(dim=1).mean(dim=(-2, -1))  # (B, D)
    bn_input = pooled @ fc1_weight.to(dtype).t()  # (B, R)
    if use_batch_stats:
        mean, var = bn_input.mean(dim=0), bn_input.var(dim=0, unbiased=False)
    else:
        mean, var = running_mean.to(dtype, copy=True), running_var.to(dtype, copy=True)
    rstd = torch.rsqrt(var + eps)
    hidden = torch.relu((bn_input - mean) * (rstd * bn_weight.to(dtype)) + bn_bias.to(dtype))
    attention = torch.softmax(hidden @ fc2_weight.to(dtype).t() + fc2_bias.to(dtype), dim=-1)
    teacher = torch.einsum("bk,bkc->bc", attention, logits.to(dtype))
    return attention, teacher, pooled, bn_input, mean, var


def _backward_torch(
    grad_attention: Tensor | None,
    grad_teacher: Tensor | None,
    logits: Tensor,
    fc1_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc2_weight: Tensor,
    attention: Tensor,
    pooled: Tensor,
    bn_input: Tensor,
    mean: Tensor,
    var: Tensor,
    use_batch_stats: bool,
    eps: float,
    hw: int,
) -> tuple[Tensor, ...]:
    dtype = attention.dtype
    rstd = torch.rsqrt(var + eps)
    batch = attention.shape[0]
    a = attention
    da = torch.zeros_like(a) if grad_attention is None else grad_attention.to(dtype)
    if grad_teacher is not None:
        dt = grad_teacher.to(dtype)
        da = da + torch.einsum("bc,bkc->bk", dt, logits.to(dtype))  # d t / d a_k = z_k
        grad_logits = a.unsqueeze(-1) * dt.unsqueeze(1)  # d t / d z_k = a_k
    else:
        grad_logits = torch.zeros(logits.shape, dtype=dtype, device=a.device)
    dl = a * (da - (a * da).sum(dim=1, keepdim=True))  # softmax backward
    gamma = bn_weight.to(dtype)
    xhat = (bn_input - mean) * rstd
    y = xhat * gamma + bn_bias.to(dtype)
    grad_w2 = dl.t() @ torch.relu(y)
    grad_b2 = dl.sum(dim=0)
    dy = (dl @ fc2_weight.to(dtype)) * (y > 0)  # ReLU backward
    grad_gamma = (dy * xhat).sum(dim=0)
    grad_beta = dy.sum(dim=0)
    if use_batch_stats:
        du = gamma * rstd * (dy - grad_beta / batch - xhat * (grad_gamma / batch))
    else:
        du = gamma * rstd * dy
    grad_w1 = du.t() @ pooled
    grad_pixel = (du @ fc1_weight.to(dtype)) / hw
    return grad_pixel, grad_logits.to(logits.dtype), grad_w1, grad_gamma, grad_beta, grad_w2, grad_b2


# ---------------------------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("okdfast::ffm_fwd", mutates_args=())
def ffm_fwd(
    features: Tensor,
    logits: Tensor,
    fc1_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> attention (B, K), teacher (B, C), and for the backward and the running statistics: pooled s (B, D),
    BN input u (B, R), the mean and the biased variance BatchNorm used (R,). Functional: the running statistics
    are only read (when not ``use_batch_stats``); :func:`ffm_update_running_stats` updates them."""
    args = (features, logits, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias, running_mean, running_var)
    if use_triton(features) and use_triton(logits):
        return _kernels().ffm_forward(*args, use_batch_stats, eps)
    return _forward_torch(*args, use_batch_stats, eps)


@ffm_fwd.register_fake
def _(features, logits, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias, running_mean, running_var, *_):
    dtype = _compute_dtype(features, logits)
    batch, num_branches, channels = features.shape[:3]
    hidden = fc1_weight.shape[0]
    new = lambda *shape: features.new_empty(shape, dtype=dtype)  # noqa: E731
    attention, teacher = new(batch, num_branches), new(batch, logits.shape[2])
    return attention, teacher, new(batch, channels), new(batch, hidden), new(hidden), new(hidden)


@torch.library.custom_op("okdfast::ffm_bwd", mutates_args=())
def ffm_bwd(
    grad_attention: Tensor | None,
    grad_teacher: Tensor | None,
    logits: Tensor,
    fc1_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc2_weight: Tensor,
    attention: Tensor,
    pooled: Tensor,
    bn_input: Tensor,
    mean: Tensor,
    var: Tensor,
    use_batch_stats: bool,
    eps: float,
    hw: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dL/dF per pixel (B, D), dL/dlogits (B, K, C), dW1 (R, D), dgamma (R,), dbeta (R,), dW2 (K, R), db2 (K,)."""
    args = (grad_attention, grad_teacher, logits, fc1_weight, bn_weight, bn_bias, fc2_weight)
    saved = (attention, pooled, bn_input, mean, var)
    if use_triton(attention) and use_triton(logits):
        return _kernels().ffm_backward(*args, *saved, use_batch_stats, eps, hw)
    return _backward_torch(*args, *saved, use_batch_stats, eps, hw)


@ffm_bwd.register_fake
def _(grad_attention, grad_teacher, logits, fc1_weight, bn_weight, bn_bias, fc2_weight, attention, pooled, *_):
    dtype = attention.dtype
    hidden, channels = fc1_weight.shape
    new = lambda *shape: attention.new_empty(shape, dtype=dtype)  # noqa: E731
    return (
        new(attention.shape[0], channels),
        torch.empty_like(logits, memory_format=torch.contiguous_format),
        new(hidden, channels),
        new(hidden),
        new(hidden),
        new(attention.shape[1], hidden),
        new(attention.shape[1]),
    )


def _setup_context(ctx, inputs, output) -> None:
    features, logits, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias, _, _, use_batch_stats, eps = inputs
    attention, _, pooled, bn_input, mean, var = output
    ctx.save_for_backward(logits, fc1_weight, bn_weight, bn_bias, fc2_weight, attention, pooled, bn_input, mean, var)
    ctx.feature_shape = features.shape
    ctx.feature_dtype = features.dtype
    ctx.param_dtypes = (fc1_weight.dtype, bn_weight.dtype, bn_bias.dtype, fc2_weight.dtype, fc2_bias.dtype)
    ctx.use_batch_stats = use_batch_stats
    ctx.eps = eps


def _backward(ctx, grad_attention, grad_teacher, *_unused):
    check_once_differentiable()  # the backward op has no autograd formula: no silent wrong second derivatives
    logits, fc1_weight, bn_weight, bn_bias, fc2_weight, attention, pooled, bn_input, mean, var = ctx.saved_tensors
    batch, num_branches, channels, height, width = ctx.feature_shape
    grad_pixel, grad_logits, *grad_params = torch.ops.okdfast.ffm_bwd(
        grad_attention,
        grad_teacher,
        logits,
        fc1_weight,
        bn_weight,
        bn_bias,
        fc2_weight,
        attention,
        pooled,
        bn_input,
        mean,
        var,
        ctx.use_batch_stats,
        ctx.eps,
        height * width,
    )
    # dF[b, k, d, h, w] = grad_pixel[b, d]: a broadcast view, cast before expanding so nothing F-sized is written
    grad_features = grad_pixel.to(ctx.feature_dtype)[:, None, :, None, None].expand(ctx.feature_shape)
    grad_params = [g.to(dtype) for g, dtype in zip(grad_params, ctx.param_dtypes)]
    return (grad_features, grad_logits, *grad_params, None, None, None, None)


ffm_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("okdfast::ffm_update_running_stats", mutates_args=("running_mean", "running_var"))
def ffm_update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, batch: int
) -> None:
    """BatchNorm's running update: r <- (1 - momentum) r + momentum x, with the unbiased variance var B / (B - 1).

    A separate op because a torch.library op with an autograd formula may not mutate its inputs."""
    if use_triton(running_mean) and use_triton(mean):
        _kernels().update_running_stats(running_mean, running_var, mean, var, momentum, batch)
        return
    with torch.no_grad():
        unbiased = var * (batch / max(batch - 1, 1))
        running_mean.copy_((1.0 - momentum) * running_mean + momentum * mean.to(running_mean.dtype))
        running_var.copy_((1.0 - momentum) * running_var + momentum * unbiased.to(running_var.dtype))


@ffm_update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, batch) -> None:
    return None


# ---------------------------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------------------------


def _check_vector(name: str, tensor: Tensor | None, size: int, fix: str) -> None:
    if tensor is not None and tuple(tensor.shape) != (size,):
        raise ValueError(f"ffm_attention: {name} must have shape ({size},), got {tuple(tensor.shape)}; {fix}")


def _validate(
    features: Tensor,
    logits: Tensor,
    fc1_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
) -> None:
    if features.dim() != 5:
        raise ValueError(
            f"ffm_attention: features must be (B, K, D, H, W) (the branches' last-block features stacked on dim 1), "
            f"got shape {tuple(features.shape)}"
        )
    batch, num_branches, channels, height, width = features.shape
    if not 2 <= num_branches <= MAX_BRANCHES:
        raise ValueError(f"ffm_attention: features has K={num_branches} branches on dim 1; use 2..{MAX_BRANCHES}")
    if batch < 1 or channels < 1 or height * width < 1:
        raise ValueError(f"ffm_attention: features {tuple(features.shape)} is empty")
    if logits.dim() != 3 or logits.shape[0] != batch or logits.shape[1] != num_branches or logits.shape[2] < 1:
        raise ValueError(
            f"ffm_attention: logits must be (B, K, C) = ({batch}, {num_branches}, C) to match features, "
            f"got {tuple(logits.shape)}"
        )
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != channels:
        raise ValueError(
            f"ffm_attention: fc1_weight must be (R, D) with D = {channels} (features dim 2), "
            f"got {tuple(fc1_weight.shape)}"
        )
    hidden = fc1_weight.shape[0]
    _check_vector("bn_weight", bn_weight, hidden, "BatchNorm1d(R) with R = fc1_weight.shape[0]")
    _check_vector("bn_bias", bn_bias, hidden, "BatchNorm1d(R) with R = fc1_weight.shape[0]")
    if tuple(fc2_weight.shape) != (num_branches, hidden):
        raise ValueError(
            f"ffm_attention: fc2_weight must be (K, R) = ({num_branches}, {hidden}), got {tuple(fc2_weight.shape)}"
        )
    _check_vector("fc2_bias", fc2_bias, num_branches, "one bias per branch")
    if (running_mean is None) != (running_var is None):
        raise ValueError("ffm_attention: pass both running_mean and running_var, or neither")
    _check_vector("running_mean", running_mean, hidden, "BatchNorm1d(R) running statistics")
    _check_vector("running_var", running_var, hidden, "BatchNorm1d(R) running statistics")
    if not training and running_mean is None:
        raise ValueError("ffm_attention: training=False normalises with running_mean/running_var; pass them")
    if training and batch == 1:
        raise ValueError(
            "ffm_attention: training-mode BatchNorm needs more than 1 value per channel: use a batch of B >= 2 "
            "(or training=False with running statistics)"
        )
    tensors = {
        "features": features,
        "logits": logits,
        "fc1_weight": fc1_weight,
        "bn_weight": bn_weight,
        "bn_bias": bn_bias,
        "fc2_weight": fc2_weight,
        "fc2_bias": fc2_bias,
    }
    if running_mean is not None:
        tensors.update(running_mean=running_mean, running_var=running_var)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise TypeError(f"ffm_attention: {name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != features.device:
            raise ValueError(f"ffm_attention: {name} is on {tensor.device} but features is on {features.device}")


def ffm_attention(
    features: Tensor,
    logits: Tensor,
    fc1_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """FFM attention (B, K) and teacher (B, C), both float32 (float64 for float64 inputs).

    features (B, K, D, H, W) any float dtype, contiguous or channels-last stacked; logits (B, K, C); fc1_weight
    (R, D); bn_weight, bn_bias (R,); fc2_weight (K, R); fc2_bias (K,); running_mean, running_var (R,) or None.
    BatchNorm semantics as ``F.batch_norm(..., training, momentum, eps)``. See the module docstring.
    """
    _validate(
        features, logits, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias, running_mean, running_var, training
    )
    batch_size = features.shape[0]
    use_batch_stats = bool(training) or running_mean is None
    attention, teacher, _, _, mean, var = ffm_fwd(
        features,
        logits,
        fc1_weight,
        bn_weight.contiguous(),
        bn_bias.contiguous(),
        fc2_weight.contiguous(),
        fc2_bias.contiguous(),
        None if use_batch_stats else running_mean,
        None if use_batch_stats else running_var,
        use_batch_stats,
        float(eps),
    )
    if training and running_mean is not None and running_var is not None:
        ffm_update_running_stats(running_mean, running_var, mean.detach(), var.detach(), float(momentum), batch_size)
    return attention, teacher
