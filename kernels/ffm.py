"""Fused Triton kernels of the FFM attention (MDE's Feature Fusion Module, okdfast/models/ffm.py), fwd + bwd.

The math (reference: ``okdfast.ops.reference.ffm_attention_reference``), F (B, K, D, H, W) the branches' last-block
features, z (B, K, C) their logits, R = fc1's width:

    s   = (1 / HW) sum_k sum_hw F[:, k, :, hw]                  (B, D)   fuse + global average pool
    u   = s W1^T                                                (B, R)   fc1, no bias
    y   = (u - mu) * rstd * gamma + beta                        (B, R)   BatchNorm1d (batch stats or running stats)
    h   = ReLU(y)
    a   = softmax_k(h W2^T + b2)                                (B, K)   attention over the branches
    t   = sum_k a_k z_k                                         (B, C)   the ensemble teacher

Where the time goes, and so what is fused where. Only F is big: B*K*D*HW elements (ResNet-32, B=128, K=4: 2 M,
8 MB in fp32; WRN-20-8, B=512: 67 M, 268 MB). Everything else is B x (D + R + K*C) or smaller, so at the paper's
shapes the eager chain (stack-sum, mean, linear, 5 BN ops, relu, linear, softmax, einsum; ~25 kernels fwd+bwd) is
bound by launches, not bytes. The plan is the fewest launches that respect the one hard dependency: training-mode
BatchNorm couples the whole batch (mu and rstd over B; in the backward, sum_b dy and sum_b dy*xhat).

forward, 2 launches (+ 1 tiny one in training: the running statistics)
  A  _ffm_pool_project_kernel   grid (B,)      read F once (B*K*D*HW*e bytes, e = 2 or 4), W1 (R*D*4, L2-resident);
                                               write s (B*D*4) and u (B*R*4). 8 warps, 4096-element tiles (16 KB
                                               of fp32 in flight per step; K is chunked in for small maps).
                                               Eager also writes and re-reads sum_k F (B*D*HW*e) here.
  B  _ffm_head_fwd_kernel       grid (B/BB,)   every program reduces the batch statistics of u (B*R*4 from L2, one
                                               shifted-data pass), then its rows: BN, ReLU, W2, softmax, t. Reads z
                                               (B*K*C*e), writes a (B*K*4) and t (B*C*4); program 0 writes mu, var
                                               (R*4 each: saved, and the input of the running update).
  R  _ffm_running_stats_kernel  grid (R/1024,) running_mean/var <- lerp toward mu, var * B/(B-1) (4*R*4 bytes). A
                                               launch of its own because a torch.library op with an autograd
                                               formula may not mutate its inputs (okdfast::ffm_update_running_stats).
backward, 2 launches, nothing F-sized written
  C  _ffm_head_bwd_kernel       grid (B/BB,)   rows: da = dA + <dt, z_k>, dz = a dt (B*K*C*e write), softmax and
                                               ReLU backward, dy (B*R*4); per-program partial sums of dW2, db2,
                                               dgamma, dbeta (G x (K*R + K + 2R) floats, deterministic: no atomics).
  D  _ffm_param_input_bwd_kernel  one grid, three roles: dW1 tiles (dW1 = dU^T s, tl.dot over the batch), the
                                               partial-sum reduction (dW2, db2, dgamma, dbeta), and ds tiles
                                               (ds = dU W1 / HW, B*D*4). dU (the BN input gradient) is recomputed
                                               per tile from dy, u, mu, var and the batch sums, never stored.
dF[b, k, d, h, w] = ds[b, d] for every k, h, w: the op returns it as a stride-0 broadcast of ds (B, D) (what
PyTorch's own backward of sum/expand does), so the pooling backward writes B*D floats, not B*K*D*HW. Its one
consumer, autograd's sum with the branch's own pooling gradient of F_k, materialises F_k's gradient once, as it
would anyway. Saved for the backward: s, u (B*(D+R)*4), mu, var and the attention a; F itself is not saved (its
values are not needed). s is 1/(K*HW) of F (1/256 at ResNet-32 shapes); recomputing it instead would cost the
backward a second full read of F, so storing it is the cheaper side. Per training step the fused path moves
F once (read) plus O(B*(D + R + K*C)); eager additionally writes and reads sum_k F in the forward and writes
(B, D, H, W) in the backward (mean's backward), besides ~20 more launches.

Tuning left for a GPU (benchmarks/gpu_checks/ffm.sh): kernel A has one program per sample, i.e. B programs of
4 warps (B=128 on 132 SMs: one wave); if it does not reach ~70% of HBM bandwidth at WRN shapes, try num_warps 8
or splitting D across programs (u then needs a second pass or atomics). Block sizes come from the register budget
(POOL_TILE, HEAD_TILE), not from autotuning.

All arithmetic is fp32 whatever the input dtype; every load and store is masked; row offsets are int64. Small
matrix products use tl.dot(input_precision="ieee") (fp32 FMA, not tf32) so fp32 results match the reference.
Triton's specialisation of stride == 1 arguments gives coalesced accesses for both contiguous features
(hw fastest) and channels-last ones stacked by MultiBranchNet (strides (K*D*HW, D, 1, W*K*D, K*D): d fastest).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# launch heuristics
# ---------------------------------------------------------------------------------------------------------------

# Register budget: the tile sizes below keep every live tile at <= 16 fp32 values per thread, so no kernel spills
# at any supported shape on sm_80/sm_90 (checked by benchmarks/gpu_checks/compile_ffm.py with ptxas -v).
POOL_TILE = 4096  # kernel A: F tile [BLOCK_KC, BLOCK_D, BLOCK_HW] and W1 tile [BLOCK_R, BLOCK_D], 8 warps
POOL_WARPS = 8  # one program per sample streams B*K*D*HW: more warps, more loads in flight per SM
HEAD_TILE = 2048  # kernels B, C: [BLOCK_B, BLOCK_R] and [BLOCK_B, BLOCK_C] tiles, 4 warps
NUM_WARPS = 4
DOT_BLOCK = 32  # tile edge of the tl.dot products in kernel D (tl.dot needs every dimension >= 16)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def pool_blocks(k: int, d: int, hw: int, r: int) -> tuple[int, int, int, int]:
    """(BLOCK_KC, BLOCK_D, BLOCK_HW, BLOCK_R) of kernel A: a [BLOCK_KC, BLOCK_D, BLOCK_HW] tile of F per step (K
    chunks only when D*HW is small, e.g. VGG's 2x2 maps) and a [BLOCK_R, BLOCK_D] slice of W1."""
    block_hw = min(_pow2(hw), 64)
    block_r = _pow2(r)
    block_d = max(min(_pow2(d), POOL_TILE // block_hw, POOL_TILE // block_r), 1)
    block_kc = max(min(_pow2(k), POOL_TILE // (block_d * block_hw)), 1)
    return block_kc, block_d, block_hw, block_r


def head_blocks(k: int, r: int, c: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_BS, BLOCK_K, BLOCK_R, BLOCK_C) of kernels B and C: rows per program, rows per step of the
    batch-statistics loop, and the padded K, R and class-chunk widths."""
    block_k = max(_pow2(k), 2)
    block_r = _pow2(r)
    block_c = min(_pow2(c), 128)
    block_b = max(min(32, HEAD_TILE // max(block_r, block_c)), 1)
    block_bs = max(min(HEAD_TILE // block_r, 256), 1)
    return block_b, block_bs, block_k, block_r, block_c


# ---------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _ffm_pool_project_kernel(
    f_ptr,  # [B, K, D, HW] features (any dtype), strides given; HW flattened (stride_h == W * stride_w)
    w1_ptr,  # [R, D] fc1.weight
    s_ptr,  # [B, D] fp32 out: s = GAP(sum_k F_k)
    u_ptr,  # [B, R] fp32 out: u = s W1^T (the BatchNorm input)
    stride_fb,
    stride_fk,
    stride_fd,
    stride_fhw,
    stride_w1r,
    stride_w1d,
    K,
    D,
    R,
    HW,
    inv_hw,
    BLOCK_KC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    f_row = f_ptr + b * stride_fb
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_kc = tl.arange(0, BLOCK_KC)
    u_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_KC, BLOCK_D, BLOCK_HW], dtype=tl.float32)
        # sum_k sum_hw F[b, k, d, hw], BLOCK_KC branches x BLOCK_HW pixels per step
        for k0 in range(0, K, BLOCK_KC):
            offs_k = k0 + offs_kc
            for hw0 in range(0, HW, BLOCK_HW):
                offs_hw = hw0 + tl.arange(0, BLOCK_HW)
                mask = (offs_k < K)[:, None, None] & mask_d[None, :, None] & (offs_hw < HW)[None, None, :]
                ptrs = (
                    f_row
                    + offs_k[:, None, None] * stride_fk
                    + offs_d[None, :, None] * stride_fd
                    + offs_hw[None, None, :] * stride_fhw
                )
                acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        s_blk = tl.sum(tl.sum(acc, axis=2), axis=0) * inv_hw  # [BLOCK_D]
        tl.store(s_ptr + b * D + offs_d, s_blk, mask=mask_d)
        # u[b, r] += sum_d W1[r, d] s[b, d]
        w1 = tl.load(
            w1_ptr + offs_r[:, None] * stride_w1r + offs_d[None, :] * stride_w1d,
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        u_acc += tl.sum(w1 * s_blk[None, :], axis=1)
    tl.store(u_ptr + b * R + offs_r, u_acc, mask=mask_r)


@triton.jit
def _column(x, offs_k, k):
    """Column k of a [BLOCK_B, BLOCK_K] tile as a [BLOCK_B] vector (K <= 8: a masked row sum, no gather)."""
    return tl.sum(tl.where(offs_k[None, :] == k, x, 0.0), axis=1)


@triton.jit
def _ffm_head_fwd_kernel(
    u_ptr,  # [B, R] fp32 BatchNorm input
    gamma_ptr,  # [R] bn.weight
    beta_ptr,  # [R] bn.bias
    w2_ptr,  # [K, R] fc2.weight, contiguous
    b2_ptr,  # [K] fc2.bias
    z_ptr,  # [B, K, C] branch logits (any dtype), strides given
    a_ptr,  # [B, K] fp32 out: attention
    t_ptr,  # [B, C] fp32 out: teacher
    mean_ptr,  # [R] fp32 out: the mean used (batch or running), saved for backward
    var_ptr,  # [R] fp32 out: the (biased) variance used, saved for backward and for the running update
    rm_ptr,  # [R] running_mean: read when not USE_BATCH_STATS
    rv_ptr,  # [R] running_var: idem
    stride_zb,
    stride_zk,
    stride_zc,
    B,
    K,
    R,
    C,
    eps,
    USE_BATCH_STATS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_BS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if USE_BATCH_STATS:
        # mu, var over the batch in one pass on data shifted by row 0 (keeps E[x^2] - E[x]^2 from cancelling);
        # every program recomputes them (B*R floats from L2) instead of waiting for another launch.
        shift = tl.load(u_ptr + offs_r, mask=mask_r, other=0.0)
        acc1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_BS):
            offs_bs = b0 + tl.arange(0, BLOCK_BS)
            m = (offs_bs < B)[:, None] & mask_r[None, :]
            x = tl.load(u_ptr + offs_bs.to(tl.int64)[:, None] * R + offs_r[None, :], mask=m, other=0.0)
            xc = tl.where(m, x - shift[None, :], 0.0)
            acc1 += tl.sum(xc, axis=0)
            acc2 += tl.sum(xc * xc, axis=0)
        mean_c = acc1 / B
        var = tl.maximum(acc2 / B - mean_c * mean_c, 0.0)
        mean = shift + mean_c
    else:
        mean = tl.load(rm_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + offs_r, mask=mask_r, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    if pid == 0:
        tl.store(mean_ptr + offs_r, mean, mask=mask_r)
        tl.store(var_ptr + offs_r, var, mask=mask_r)

    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask_br = mask_b[:, None] & mask_r[None, :]
    gamma = tl.load(gamma_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    x = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=mask_br, other=0.0)
    # h = ReLU(BN(u)); padded rows / columns are zeroed so they add nothing below
    h = tl.where(mask_br, tl.maximum((x - mean[None, :]) * (rstd * gamma)[None, :] + beta[None, :], 0.0), 0.0)
    # logit[:, k] = h W2[k]^T + b2[k], one branch at a time (K <= 8) to keep the tiles 2-D
    logit = tl.full([BLOCK_B, BLOCK_K], float("-inf"), dtype=tl.float32)
    for k in range(K):
        w2k = tl.load(w2_ptr + k * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        lk = tl.sum(h * w2k[None, :], axis=1) + tl.load(b2_ptr + k).to(tl.float32)
        logit = tl.where(offs_k[None, :] == k, lk[:, None], logit)
    e = tl.exp(logit - tl.max(logit, axis=1)[:, None])  # padded branches: exp(-inf) = 0
    a = e / tl.sum(e, axis=1)[:, None]  # softmax over the branches
    tl.store(a_ptr + rows[:, None] * K + offs_k[None, :], a, mask=mask_b[:, None] & mask_k[None, :])

    # t[b, c] = sum_k a[b, k] z[b, k, c]
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_bc = mask_b[:, None] & (offs_c < C)[None, :]
        t = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for k in range(K):
            z = tl.load(
                z_ptr + rows[:, None] * stride_zb + k * stride_zk + offs_c[None, :] * stride_zc, mask=mask_bc, other=0.0
            ).to(tl.float32)
            t += _column(a, offs_k, k)[:, None] * z
        tl.store(t_ptr + rows[:, None] * C + offs_c[None, :], t, mask=mask_bc)


@triton.jit
def _ffm_running_stats_kernel(
    rm_ptr,  # [R] running_mean, updated in place
    rv_ptr,  # [R] running_var, updated in place
    mean_ptr,  # [R] fp32 batch mean (from kernel B)
    var_ptr,  # [R] fp32 biased batch variance (from kernel B)
    R,
    momentum,
    unbias,  # B / (B - 1): running_var tracks the unbiased variance, as torch's BatchNorm does
    BLOCK_R: tl.constexpr,
):
    # r <- (1 - momentum) r + momentum x. A launch of its own because a torch.library op with an autograd formula
    # may not mutate its inputs (the fused forward is functional; this op is the mutation).
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rm = tl.load(rm_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_r, mask=mask_r, other=0.0)
    var = tl.load(var_ptr + offs_r, mask=mask_r, other=0.0)
    tl.store(rm_ptr + offs_r, (1.0 - momentum) * rm + momentum * mean, mask=mask_r)
    tl.store(rv_ptr + offs_r, (1.0 - momentum) * rv + momentum * var * unbias, mask=mask_r)


# ---------------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _ffm_head_bwd_kernel(
    da_ptr,  # [B, K] grad of attention (HAS_DA), strides given (may be 0: expanded grads)
    dt_ptr,  # [B, C] grad of teacher (HAS_DT), strides given
    z_ptr,  # [B, K, C] branch logits, strides given
    a_ptr,  # [B, K] fp32 attention (saved output)
    u_ptr,  # [B, R] fp32 BatchNorm input (saved)
    mean_ptr,  # [R] fp32 (saved)
    var_ptr,  # [R] fp32 (saved)
    gamma_ptr,  # [R]
    beta_ptr,  # [R]
    w2_ptr,  # [K, R], contiguous
    dz_ptr,  # [B, K, C] out, contiguous, logits dtype: dz = a dt
    dy_ptr,  # [B, R] fp32 out: dL/dy, the BatchNorm output gradient (after the ReLU mask)
    part_ptr,  # [G, P] fp32 out: this program's partial sums: dW2 (K*R) | db2 (K) | dgamma (R) | dbeta (R)
    stride_dab,
    stride_dak,
    stride_dtb,
    stride_dtc,
    stride_zb,
    stride_zk,
    stride_zc,
    B,
    K,
    R,
    C,
    P,
    eps,
    HAS_DA: tl.constexpr,
    HAS_DT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    mask_bk = mask_b[:, None] & mask_k[None, :]

    a = tl.load(a_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_bk, other=0.0)
    if HAS_DA:
        da = tl.load(da_ptr + rows[:, None] * stride_dab + offs_k[None, :] * stride_dak, mask=mask_bk, other=0.0)
        da = da.to(tl.float32)
    else:
        da = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    # da[b, k] += sum_c dt[b, c] z[b, k, c];  dz[b, k, c] = a[b, k] dt[b, c]
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_bc = mask_b[:, None] & (offs_c < C)[None, :]
        if HAS_DT:
            dt = tl.load(
                dt_ptr + rows[:, None] * stride_dtb + offs_c[None, :] * stride_dtc, mask=mask_bc, other=0.0
            ).to(tl.float32)
        else:
            dt = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for k in range(K):
            if HAS_DT:
                z = tl.load(
                    z_ptr + rows[:, None] * stride_zb + k * stride_zk + offs_c[None, :] * stride_zc,
                    mask=mask_bc,
                    other=0.0,
                ).to(tl.float32)
                da = tl.where(offs_k[None, :] == k, da + tl.sum(z * dt, axis=1)[:, None], da)
            dz = _column(a, offs_k, k)[:, None] * dt
            dz_ptrs = dz_ptr + rows[:, None] * (K * C) + k * C + offs_c[None, :]
            tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_bc)
    # softmax backward: dl = a * (da - sum_j a_j da_j); zero on padded rows since a = 0 there
    dl = a * (da - tl.sum(a * da, axis=1)[:, None])

    mask_br = mask_b[:, None] & mask_r[None, :]
    mean = tl.load(mean_ptr + offs_r, mask=mask_r, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_r, mask=mask_r, other=1.0) + eps)
    gamma = tl.load(gamma_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    x = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=mask_br, other=0.0)
    xhat = tl.where(mask_br, (x - mean[None, :]) * rstd[None, :], 0.0)  # recomputed, not stored
    y = xhat * gamma[None, :] + beta[None, :]
    h = tl.where(mask_br, tl.maximum(y, 0.0), 0.0)
    # dh = dl W2, and this program's share of dW2 = dl^T h, one branch at a time
    part = part_ptr + pid.to(tl.int64) * P
    dh = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for k in range(K):
        dl_k = _column(dl, offs_k, k)
        w2k = tl.load(w2_ptr + k * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        dh += dl_k[:, None] * w2k[None, :]
        tl.store(part + k * R + offs_r, tl.sum(dl_k[:, None] * h, axis=0), mask=mask_r)
    dy = tl.where(mask_br & (y > 0.0), dh, 0.0)  # ReLU backward (torch: grad where output > 0)
    tl.store(dy_ptr + rows[:, None] * R + offs_r[None, :], dy, mask=mask_br)
    # the rest of this program's batch sums: db2 = sum dl, dgamma = sum dy xhat, dbeta = sum dy
    tl.store(part + K * R + offs_k, tl.sum(dl, axis=0), mask=mask_k)
    tl.store(part + K * R + K + offs_r, tl.sum(dy * xhat, axis=0), mask=mask_r)
    tl.store(part + K * R + K + R + offs_r, tl.sum(dy, axis=0), mask=mask_r)


@triton.jit
def _column_totals(part_ptr, cols, mask_cols, G, P, BLOCK_G: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """sum over the G rows of part[G, P] at columns ``cols`` ([BLOCK_COLS]) -> [BLOCK_COLS] fp32."""
    total = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        m = (offs_g < G)[:, None] & mask_cols[None, :]
        total += tl.sum(tl.load(part_ptr + offs_g.to(tl.int64)[:, None] * P + cols[None, :], mask=m, other=0.0), 0)
    return total


@triton.jit
def _bn_input_grad(
    dy_ptr, u_ptr, rows, mask_b, offs_r, mask_r, R, mean, rstd, gamma, dgamma, dbeta, inv_b, USE_BATCH_STATS
):
    """dU[rows, offs_r], the gradient of the BatchNorm input, recomputed from dy and u.

    batch stats:   dU = gamma * rstd * (dy - sum_b dy / B - xhat * sum_b(dy xhat) / B),  xhat = (u - mu) * rstd
    running stats: dU = gamma * rstd * dy
    """
    m = mask_b[:, None] & mask_r[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * R + offs_r[None, :], mask=m, other=0.0)
    if USE_BATCH_STATS:
        x = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=m, other=0.0)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dy = dy - (dbeta * inv_b)[None, :] - xhat * (dgamma * inv_b)[None, :]
    return tl.where(m, dy * (gamma * rstd)[None, :], 0.0)


@triton.jit
def _ffm_param_input_bwd_kernel(
    dy_ptr,  # [B, R] fp32 from kernel C
    u_ptr,  # [B, R] fp32 (saved)
    mean_ptr,  # [R] fp32 (saved)
    var_ptr,  # [R] fp32 (saved)
    gamma_ptr,  # [R]
    s_ptr,  # [B, D] fp32 pooled features (saved)
    w1_ptr,  # [R, D] fc1.weight
    part_ptr,  # [G, P] fp32 partial sums from kernel C
    ds_ptr,  # [B, D] fp32 out: dL/dF[b, k, d, h, w] for every k, h, w (= dL/ds / HW)
    dw1_ptr,  # [R, D] fp32 out
    dw2_ptr,  # [K, R] fp32 out
    db2_ptr,  # [K] fp32 out
    dgamma_ptr,  # [R] fp32 out
    dbeta_ptr,  # [R] fp32 out
    stride_w1r,
    stride_w1d,
    B,
    K,
    R,
    D,
    G,
    P,
    inv_b,
    inv_hw,
    eps,
    USE_BATCH_STATS: tl.constexpr,
    BLOCK: tl.constexpr,  # edge of the dot tiles (rows of B, columns of R and D)
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK)
    num_dw1 = tl.cdiv(R, BLOCK) * num_d
    offs = tl.arange(0, BLOCK)
    col_dgamma = K * R + K
    col_dbeta = K * R + K + R
    if pid < num_dw1:
        # role 1 (longest: loops over the batch, so scheduled first): dW1[r, d] = sum_b dU[b, r] s[b, d]
        offs_r = (pid // num_d) * BLOCK + offs
        offs_d = (pid % num_d) * BLOCK + offs
        mask_r = offs_r < R
        mask_d = offs_d < D
        mean = tl.load(mean_ptr + offs_r, mask=mask_r, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_r, mask=mask_r, other=1.0) + eps)
        gamma = tl.load(gamma_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        dgamma = _column_totals(part_ptr, col_dgamma + offs_r, mask_r, G, P, BLOCK_G, BLOCK)
        dbeta = _column_totals(part_ptr, col_dbeta + offs_r, mask_r, G, P, BLOCK_G, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for b0 in range(0, B, BLOCK):
            offs_b = b0 + offs
            mask_b = offs_b < B
            rows = offs_b.to(tl.int64)
            du = _bn_input_grad(
                dy_ptr, u_ptr, rows, mask_b, offs_r, mask_r, R, mean, rstd, gamma, dgamma, dbeta, inv_b, USE_BATCH_STATS
            )
            s = tl.load(s_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            acc += tl.dot(tl.trans(du), s, input_precision="ieee")
        tl.store(dw1_ptr + offs_r[:, None] * D + offs_d[None, :], acc, mask=mask_r[:, None] & mask_d[None, :])
    elif pid == num_dw1:
        # role 2: finish the batch sums of kernel C: dW2, db2, dgamma, dbeta (P = K*R + K + 2R columns)
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, P, BLOCK_P):
            cols = p0 + offs_p
            mask_p = cols < P
            total = _column_totals(part_ptr, cols, mask_p, G, P, BLOCK_G, BLOCK_P)
            tl.store(dw2_ptr + cols, total, mask=cols < K * R)
            tl.store(db2_ptr + (cols - K * R), total, mask=(cols >= K * R) & (cols < col_dgamma))
            tl.store(dgamma_ptr + (cols - col_dgamma), total, mask=(cols >= col_dgamma) & (cols < col_dbeta))
            tl.store(dbeta_ptr + (cols - col_dbeta), total, mask=(cols >= col_dbeta) & mask_p)
    else:
        # role 3: ds[b, d] = sum_r dU[b, r] W1[r, d] / HW
        q = pid - num_dw1 - 1
        offs_b = (q // num_d) * BLOCK + offs
        offs_d = (q % num_d) * BLOCK + offs
        mask_b = offs_b < B
        mask_d = offs_d < D
        rows = offs_b.to(tl.int64)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for r0 in range(0, R, BLOCK):
            offs_r = r0 + offs
            mask_r = offs_r < R
            mean = tl.load(mean_ptr + offs_r, mask=mask_r, other=0.0)
            rstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_r, mask=mask_r, other=1.0) + eps)
            gamma = tl.load(gamma_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            dgamma = _column_totals(part_ptr, col_dgamma + offs_r, mask_r, G, P, BLOCK_G, BLOCK)
            dbeta = _column_totals(part_ptr, col_dbeta + offs_r, mask_r, G, P, BLOCK_G, BLOCK)
            du = _bn_input_grad(
                dy_ptr, u_ptr, rows, mask_b, offs_r, mask_r, R, mean, rstd, gamma, dgamma, dbeta, inv_b, USE_BATCH_STATS
            )
            w1 = tl.load(
                w1_ptr + offs_r[:, None] * stride_w1r + offs_d[None, :] * stride_w1d,
                mask=mask_r[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.dot(du, w1, input_precision="ieee")
        tl.store(ds_ptr + rows[:, None] * D + offs_d[None, :], acc * inv_hw, mask=mask_b[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------------------------
# host launchers (arguments already validated by okdfast.ops.ffm)
# ---------------------------------------------------------------------------------------------------------------


def _flat_hw_stride(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Features whose (H, W) can be addressed as one index hw with a single stride, and that stride. Holds for
    contiguous and channels-last stacks; anything else (e.g. a spatial slice) is copied once."""
    _, _, _, h, w = features.shape
    sh, sw = features.stride(3), features.stride(4)
    if w == 1:
        return features, sh
    if h == 1 or sh == w * sw:
        return features, sw
    features = features.contiguous()
    return features, features.stride(4)


def ffm_forward(
    features: torch.Tensor,  # (B, K, D, H, W)
    logits: torch.Tensor,  # (B, K, C)
    fc1_weight: torch.Tensor,  # (R, D)
    bn_weight: torch.Tensor,  # (R,)
    bn_bias: torch.Tensor,  # (R,)
    fc2_weight: torch.Tensor,  # (K, R)
    fc2_bias: torch.Tensor,  # (K,)
    running_mean: torch.Tensor | None,  # (R,) or None
    running_var: torch.Tensor | None,  # (R,) or None
    use_batch_stats: bool,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Kernels A + B. Returns fp32 (attention (B, K), teacher (B, C), pooled s (B, D), bn_input u (B, R), mean (R,),
    var (R,)): the statistics BatchNorm used (biased batch variance, or the running ones). Mutates nothing."""
    batch, num_branches, channels, height, width = features.shape
    num_classes = logits.shape[2]
    hidden = fc1_weight.shape[0]
    hw = height * width
    features, stride_hw = _flat_hw_stride(features)
    dev = features.device
    f32 = torch.float32
    pooled = torch.empty(batch, channels, device=dev, dtype=f32)
    bn_input = torch.empty(batch, hidden, device=dev, dtype=f32)
    attention = torch.empty(batch, num_branches, device=dev, dtype=f32)
    teacher = torch.empty(batch, num_classes, device=dev, dtype=f32)
    mean = torch.empty(hidden, device=dev, dtype=f32)
    var = torch.empty(hidden, device=dev, dtype=f32)

    block_kc, block_d, block_hw, block_r = pool_blocks(num_branches, channels, hw, hidden)
    _ffm_pool_project_kernel[(batch,)](
        features,
        fc1_weight,
        pooled,
        bn_input,
        features.stride(0),
        features.stride(1),
        features.stride(2),
        stride_hw,
        fc1_weight.stride(0),
        fc1_weight.stride(1),
        num_branches,
        channels,
        hidden,
        hw,
        1.0 / hw,
        BLOCK_KC=block_kc,
        BLOCK_D=block_d,
        BLOCK_HW=block_hw,
        BLOCK_R=block_r,
        num_warps=POOL_WARPS,
    )

    block_b, block_bs, block_k, block_r, block_c = head_blocks(num_branches, hidden, num_classes)
    stats_dummy = mean  # never read when batch statistics are used
    _ffm_head_fwd_kernel[(triton.cdiv(batch, block_b),)](
        bn_input,
        bn_weight,
        bn_bias,
        fc2_weight.contiguous(),
        fc2_bias,
        logits,
        attention,
        teacher,
        mean,
        var,
        running_mean if running_mean is not None else stats_dummy,
        running_var if running_var is not None else stats_dummy,
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        batch,
        num_branches,
        hidden,
        num_classes,
        eps,
        USE_BATCH_STATS=use_batch_stats,
        BLOCK_B=block_b,
        BLOCK_BS=block_bs,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return attention, teacher, pooled, bn_input, mean, var


def update_running_stats(
    running_mean: torch.Tensor,  # (R,) updated in place
    running_var: torch.Tensor,  # (R,) updated in place
    mean: torch.Tensor,  # (R,) fp32 batch mean
    var: torch.Tensor,  # (R,) fp32 biased batch variance
    momentum: float,
    batch: int,
) -> None:
    hidden = mean.shape[0]
    block_r = min(_pow2(hidden), 1024)
    _ffm_running_stats_kernel[(triton.cdiv(hidden, block_r),)](
        running_mean, running_var, mean, var, hidden, momentum, batch / max(batch - 1, 1), BLOCK_R=block_r
    )


def ffm_backward(
    grad_attention: torch.Tensor | None,  # (B, K) or None
    grad_teacher: torch.Tensor | None,  # (B, C) or None
    logits: torch.Tensor,  # (B, K, C)
    fc1_weight: torch.Tensor,  # (R, D)
    bn_weight: torch.Tensor,  # (R,)
    bn_bias: torch.Tensor,  # (R,)
    fc2_weight: torch.Tensor,  # (K, R)
    attention: torch.Tensor,  # (B, K) fp32, saved
    pooled: torch.Tensor,  # (B, D) fp32, saved
    bn_input: torch.Tensor,  # (B, R) fp32, saved
    mean: torch.Tensor,  # (R,) fp32, saved
    var: torch.Tensor,  # (R,) fp32, saved
    use_batch_stats: bool,
    eps: float,
    hw: int,
) -> tuple[torch.Tensor, ...]:
    """Kernels C + D. Returns fp32 (grad_pooled_per_pixel (B, D) = dL/dF[b, k, d, h, w], grad_logits (B, K, C) in
    the logits dtype, grad_fc1_weight (R, D), grad_bn_weight (R,), grad_bn_bias (R,), grad_fc2_weight (K, R),
    grad_fc2_bias (K,))."""
    batch, num_branches, num_classes = logits.shape
    hidden, channels = fc1_weight.shape
    dev = logits.device
    f32 = torch.float32
    fc2_weight = fc2_weight.contiguous()
    block_b, _, block_k, block_r, block_c = head_blocks(num_branches, hidden, num_classes)
    groups = triton.cdiv(batch, block_b)
    width = num_branches * hidden + num_branches + 2 * hidden  # P: dW2 | db2 | dgamma | dbeta
    grad_logits = torch.empty(batch, num_branches, num_classes, device=dev, dtype=logits.dtype)
    grad_y = torch.empty(batch, hidden, device=dev, dtype=f32)
    partials = torch.empty(groups, width, device=dev, dtype=f32)
    da = grad_attention if grad_attention is not None else attention  # dummy pointer when absent
    dt = grad_teacher if grad_teacher is not None else attention
    _ffm_head_bwd_kernel[(groups,)](
        da,
        dt,
        logits,
        attention,
        bn_input,
        mean,
        var,
        bn_weight,
        bn_bias,
        fc2_weight,
        grad_logits,
        grad_y,
        partials,
        da.stride(0),
        da.stride(1),
        dt.stride(0),
        dt.stride(1),
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        batch,
        num_branches,
        hidden,
        num_classes,
        width,
        eps,
        HAS_DA=grad_attention is not None,
        HAS_DT=grad_teacher is not None,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )

    grad_pixel = torch.empty(batch, channels, device=dev, dtype=f32)
    grad_w1 = torch.empty(hidden, channels, device=dev, dtype=f32)
    grad_w2 = torch.empty(num_branches, hidden, device=dev, dtype=f32)
    grad_b2 = torch.empty(num_branches, device=dev, dtype=f32)
    grad_gamma = torch.empty(hidden, device=dev, dtype=f32)
    grad_beta = torch.empty(hidden, device=dev, dtype=f32)
    block = DOT_BLOCK
    block_g = min(_pow2(groups), 64)
    block_p = max(min(_pow2(width), HEAD_TILE // block_g), 1)
    num_d = triton.cdiv(channels, block)
    grid = (triton.cdiv(hidden, block) * num_d + 1 + triton.cdiv(batch, block) * num_d,)
    _ffm_param_input_bwd_kernel[grid](
        grad_y,
        bn_input,
        mean,
        var,
        bn_weight,
        pooled,
        fc1_weight,
        partials,
        grad_pixel,
        grad_w1,
        grad_w2,
        grad_b2,
        grad_gamma,
        grad_beta,
        fc1_weight.stride(0),
        fc1_weight.stride(1),
        batch,
        num_branches,
        hidden,
        channels,
        groups,
        width,
        1.0 / batch,
        1.0 / hw,
        eps,
        USE_BATCH_STATS=use_batch_stats,
        BLOCK=block,
        BLOCK_G=block_g,
        BLOCK_P=block_p,
        num_warps=NUM_WARPS,
    )
    return grad_pixel, grad_logits, grad_w1, grad_gamma, grad_beta, grad_w2, grad_b2
