"""Fused Triton kernel of MDE's Classifier Diversification (CD) loss, value and gradient in one launch
(reference: ``okdfast.ops.reference.classifier_diversity_loss_reference``; op: ``okdfast.ops.classifier_diversity``).

The math, W (K, C, D) the K branch classifiers, w_kc the class-c row of branch k, n_kc = max(||w_kc||, eps):

    u_kc = w_kc / n_kc,   G_c[k, l] = u_kc . u_lc                            (K x K cosine Gram matrix of class c)
    L    = s * sum_c sum_{k<l} G_c[k, l]^2,   s = 2 / (K (K-1) C)            (the mean over pairs and classes)
    dL/du_kc = 2 s sum_{l != k} G_c[k, l] u_lc =: g_kc,   and   g_kc . u_kc = 2 s sum_{l != k} G_c[k, l]^2
    dL/dw_kc = (g_kc - (g_kc . u_kc) u_kc) / n_kc   if ||w_kc|| > eps   (the normalisation's projection)
             =  g_kc / eps                          otherwise             (F.normalize clamps the norm at eps)

The projection coefficient g . u comes from G alone, so no reduction over D is needed after the Gram matrix.

Grid (C,): one program per class holds the K rows w_kc (a [BLOCK_K, BLOCK_D] tile, D in chunks when it is long).
    pass 1  reads K*D*e: the raw Gram matrix sum_d w_kd w_ld (a [BLOCK_K, BLOCK_K, BLOCK_D] product, summed over d)
            writes 1 float: sum_{k<l} G_c[k, l]^2 (the host sums the C partials: deterministic, no atomics)
    pass 2  reads K*D*e again (from L1/L2: a class's rows are a few KB), writes dL/dW (K*D*e)
The weights are small (ResNet-32 on CIFAR-100, K=4: 4*100*64 floats), so this kernel is bound by its launch; the
point of fusing is one launch instead of the ~15 of the eager normalize/einsum/triu/square/mean chain and its
backward. Arithmetic in float32 (float64 for float64 weights); masked loads and stores; int64 offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# launch heuristics
# ---------------------------------------------------------------------------------------------------------------

MAX_TILE = 8192  # elements of the [BLOCK_K, BLOCK_K, BLOCK_D] Gram product


def launch_config(num_branches: int, dim: int, block_d: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps); ``block_d`` (a power of two) overrides the chunk width of D (tests)."""
    block_k = triton.next_power_of_2(max(num_branches, 1))
    if block_d is None:
        block_d = min(triton.next_power_of_2(max(dim, 1)), max(MAX_TILE // (block_k * block_k), 16))
    elif block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d={block_d}: must be a power of two")
    num_warps = min(max(block_k * block_k * block_d // 1024, 1), 8)
    return block_k, block_d, num_warps


# ---------------------------------------------------------------------------------------------------------------
# forward kernel (writes the gradient too)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _cd_fwd_kernel(
    w_ptr,  # [K, C, D] classifier weights, any strides
    stride_wk,
    stride_wc,
    stride_wd,
    part_ptr,  # [C] sum_{k<l} cos(w_kc, w_lc)^2 (ACC dtype)
    gw_ptr,  # [K, C, D] contiguous dL/dW (weights dtype), L = s * sum_c part_c
    K,
    C,
    D,
    eps,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_l = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    w_k = w_ptr + offs_k.to(tl.int64) * stride_wk + c * stride_wc  # [BLOCK_K] row starts
    gw_k = gw_ptr + (offs_k.to(tl.int64) * C + c) * D

    # ---- pass 1: raw Gram matrix sum_d w_kd w_ld ------------------------------------------------------------
    gram = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    for start in range(0, D, BLOCK_D):
        cols = start + offs_d
        mask = mask_k[:, None] & (cols < D)[None, :]
        w = tl.load(w_k[:, None] + cols[None, :].to(tl.int64) * stride_wd, mask=mask, other=0.0).to(ACC)
        gram += tl.sum(w[:, None, :] * w[None, :, :], axis=2)
    diag = offs_k[:, None] == offs_l[None, :]
    norm = tl.sqrt(tl.sum(tl.where(diag, gram, 0.0), axis=1))  # [BLOCK_K] ||w_kc||
    norm_c = tl.maximum(norm, eps)
    norm_l = tl.sqrt(tl.sum(tl.where(diag, gram, 0.0), axis=0))  # the same norms, laid out along l
    cos = gram / (norm_c[:, None] * tl.maximum(norm_l, eps)[None, :])
    pair = (offs_k[:, None] != offs_l[None, :]) & mask_k[:, None] & (offs_l < K)[None, :]
    cos = tl.where(pair, cos, 0.0)
    cos2 = cos * cos
    tl.store(part_ptr + c, tl.sum(tl.sum(cos2, axis=1), axis=0) * 0.5)  # each pair appears twice in G

    # ---- pass 2: dL/dW ----------------------------------------------------------------------------------------
    if WRITE_GRAD:
        s2 = 4.0 / (K * (K - 1) * C)  # 2 s
        proj = tl.where(norm > eps, s2 * tl.sum(cos2, axis=1), 0.0)  # g_k . u_k, or 0 where the norm is clamped
        for start in range(0, D, BLOCK_D):
            cols = start + offs_d
            mask = mask_k[:, None] & (cols < D)[None, :]
            w = tl.load(w_k[:, None] + cols[None, :].to(tl.int64) * stride_wd, mask=mask, other=0.0).to(ACC)
            u = w / norm_c[:, None]
            g = s2 * tl.sum(cos[:, :, None] * u[None, :, :], axis=1)  # [BLOCK_K, BLOCK_D]
            grad = (g - proj[:, None] * u) / norm_c[:, None]
            tl.store(gw_k[:, None] + cols[None, :], grad.to(gw_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------------------------


def classifier_diversity_forward(
    weights: torch.Tensor, *, eps: float, grad: bool, block_d: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``(loss, grad_weights)``, the scalar L_CD (float32; float64 for float64 weights) and dL/dW for
    grad_output = 1 (contiguous, weights' dtype; empty when ``grad`` is False). Inputs must be validated."""
    from okdfast.kernels.online_kd import _interpreted

    num_branches, num_classes, dim = weights.shape
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    part = torch.empty(num_classes, dtype=acc, device=weights.device)
    gw = torch.empty_like(weights, memory_format=torch.contiguous_format) if grad else weights.new_empty(0)
    block_k, block_d, num_warps = launch_config(num_branches, dim, block_d)
    kernel = _cd_fwd_kernel if weights.device.type == "cuda" else _interpreted(_cd_fwd_kernel)
    kernel[(num_classes,)](
        weights,
        *weights.stride(),
        part,
        gw if grad else part,  # a placeholder pointer when nothing is written
        num_branches,
        num_classes,
        dim,
        float(eps),
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        WRITE_GRAD=bool(grad),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=num_warps,
    )
    scale = 2.0 / (num_branches * (num_branches - 1) * num_classes)
    return part.sum() * scale, gw
