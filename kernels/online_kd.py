"""Fused Triton kernel of the multi-branch online-KD loss: softmax, CE, teacher CE and T^2 KL, values and gradients
in one launch (reference: ``okdfast.ops.reference.online_kd_loss_reference``; op: ``okdfast.ops.online_kd``).

The math, per row b (a sample; y its label, eps the label smoothing, T the temperature, z_k the K branch logits,
t the teacher: the mean of the z_k, a shared (C,) row or a per-branch (K, C) tile):

    lse_k  = logsumexp(z_k),   lseT_k = logsumexp(z_k / T),   p_k = softmax(z_k / T),   q = softmax(t / T)
    CE_k   = lse_k - (1 - eps) z_ky - eps mean_c(z_k)                    d/dz_k = softmax(z_k) - (1-eps) 1_y - eps/C
    KL_k   = KL(q || p_k) = sum_c q_c (t_c - z_kc) / T - lseT_t + lseT_k   d(T^2 KL_k)/dz_k = T (p_k - q)
                                                                      d(T^2 KL_k)/dt   = T q (log q - log p_k - KL_k)
    peer:  sum_k KD_k = 1/(K-1) sum_j R_j,  R_j = sum_{k != j} KL(p_j || p_k) = sum_c p_jc (K log p_jc - L_c),
           L_c = sum_k log p_kc;   d(T^2 sum KD)/dz_k = T/(K-1) (K p_k - sum_j p_j)            (as a student)
                                                        + T/(K-1) p_k (K log p_k - L - R_k)    (as a target)

Every sum over c above that needs the final log-sum-exp is rewritten as an online, rescaled sum (like the online
softmax's denominator), taken on max-shifted values so that large logits cancel before they are summed:
    KL_k = sum_c w_c ((t_c - m_t) - (z_kc - m_k)) / (T sum_c w_c) - log sum_c w_c + log sum_c e^{(z_kc - m_k)/T},
    w_c = e^{(t_c - m_t)/T}; when a running max moves by d, earlier terms are rescaled by e^{-d/T} and the shifted
    sum changes by -d sum_c w_c. (The same for R_j.) So pass 1 produces every loss value, and pass 2 only writes
    gradients, which need no further reduction over c.

Grid and passes (one program per row: all K branch rows of the sample and its teacher, so every logit is read by
exactly one program and the teacher once per row, not once per branch):

    pass 1  loop over C in BLOCK_C chunks of a [BLOCK_K, BLOCK_C] tile: running max, sum e^{z-m}, sum e^{(z-m)/T},
            sum z (label smoothing), the KL / peer cross terms; then the row's loss and terms.
            reads  K*C*e (logits, e = bytes per element) + C*e or K*C*e (teacher, if given)
            writes 4 floats (loss, ce, teacher_ce, kd)
    pass 2  the same loop again: gradients w.r.t. the logits (and the teacher), already multiplied by 1/n_valid for
            reduction='mean', written in the input dtype.
            reads  K*C*e (+ teacher) again: from L1/L2 when the row fits one block (C <= BLOCK_C, every CIFAR
                   shape), from DRAM for rows of tens of thousands of classes
            writes K*C*e (+ C*e or K*C*e for the teacher gradient when it is needed)

Minimum traffic for a fwd+bwd (what any implementation must move): read the logits once, write their gradient once,
2*B*K*C*e bytes (+ the teacher). This kernel moves that plus one re-read for long rows (3x instead of 2x); the eager
reference materialises a dozen or more (B, K, C) float32 temporaries forward (upcast, two log_softmax, exp, products)
and as many backward.
The op's backward (``okdfast::scale_saved_grad``) then only multiplies the saved gradient by grad_output: one more
read and write of B*K*C*e.

Arithmetic is float32 whatever the input dtype (float64 for float64 inputs: gradcheck); every load and store is
masked; row and column offsets are int64; any strides (Triton specialises stride 1, so contiguous rows vectorise).
Ignored rows (y == ignore_index) write zero loss and zero gradients; a label outside [0, C) that is not
ignore_index (only possible when the host-side check was skipped, e.g. under torch.compile) makes the row's loss
and gradients NaN instead of reading out of bounds.

The launch heuristics (``launch_config``) were chosen from ptxas register / spill reports for sm_90
(benchmarks/gpu_checks/compile_kernels.py), not from timings: tune them on a GPU (``block_c`` / ``num_warps``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# launch heuristics
# ---------------------------------------------------------------------------------------------------------------

MAX_TILE = 2048  # elements of the [BLOCK_K, BLOCK_C] tile; about a dozen such fp32 tiles are live in pass 2
TEACHER_MEAN, TEACHER_SHARED, TEACHER_PER_BRANCH = 0, 1, 2


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def launch_config(
    num_branches: int,
    num_classes: int,
    block_c: int | None = None,
    num_warps: int | None = None,
    per_branch_teacher: bool = False,
) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_C, num_warps): the whole (K, C) row in one tile when it fits MAX_TILE, else C in chunks.

    num_warps gives every thread 8 elements of the tile (4 when BLOCK_K >= 8; half that with a per-branch teacher,
    whose tile doubles the live registers), at most 16 warps: compiled for sm_90 with ptxas this keeps the
    specialisations at <= ~128 registers with no or a few bytes of spills (16 elements per thread spill hundreds;
    see benchmarks/gpu_checks/compile_kernels.py). ``block_c`` / ``num_warps`` override (tests, tuning sweeps).
    """
    block_k = _pow2(num_branches)
    per_thread = (8 if block_k <= 4 else 4) // (2 if per_branch_teacher else 1)
    if block_c is None:
        block_c = max(min(_pow2(num_classes), MAX_TILE // block_k), 16)
        while block_c > 16 and block_k * block_c > 16 * 32 * per_thread:  # more than 16 warps' worth
            block_c //= 2
    elif block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c={block_c}: must be a power of two")
    if num_warps is None:
        num_warps = min(max(block_k * block_c // (32 * per_thread), 1), 16)
    return block_k, block_c, num_warps


# ---------------------------------------------------------------------------------------------------------------
# forward kernel (writes the gradients too)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _online_kd_fwd_kernel(
    z_ptr,  # [B, K, C] branch logits, any strides
    stride_zb,
    stride_zk,
    stride_zc,
    y_ptr,  # [B] int64 labels
    t_ptr,  # [B, C] shared or [B, K, C] per-branch teacher logits (unused when TEACHER_MODE == 0)
    stride_tb,
    stride_tk,  # 0 for a shared teacher
    stride_tc,
    n_valid_ptr,  # [1] float32 number of non-ignored rows (read when MEAN)
    kd_scale_ptr,  # [1] float32 device-side multiplier of kd_weight (read when HAS_KD_SCALE: a ramp-up w(e))
    loss_ptr,  # [B] weighted per-row loss (ACC dtype)
    terms_ptr,  # [B, 3] unweighted per-row ce, teacher_ce, kd (ACC dtype)
    gz_ptr,  # [B, K, C] contiguous d loss / d logits (logits dtype)
    gt_ptr,  # [B, C] or [B, K, C] contiguous d loss / d teacher (teacher dtype)
    K,
    C,
    ignore_index,
    temperature,
    label_smoothing,
    ce_weight,
    kd_weight,
    teacher_ce_weight,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TB: tl.constexpr,  # rows of the teacher tile: 1 (mean / shared teacher) or BLOCK_K (per-branch)
    TEACHER_MODE: tl.constexpr,  # 0 mean of the branches, 1 shared (B, C), 2 per-branch (B, K, C)
    PEER: tl.constexpr,  # DML: branch k distils from every other branch
    DETACH: tl.constexpr,  # no gradient into the KL targets
    HAS_TCE: tl.constexpr,  # teacher_ce_weight != 0
    HAS_KD: tl.constexpr,  # kd_weight != 0
    HAS_KD_SCALE: tl.constexpr,
    MEAN_T_GRAD: tl.constexpr,  # TEACHER_MODE == 0 and the teacher receives a gradient (it flows into every z_k)
    MEAN: tl.constexpr,  # reduction == 'mean': gradients carry 1 / n_valid
    WRITE_GZ: tl.constexpr,
    WRITE_GT: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, TB)
    offs_c = tl.arange(0, BLOCK_C)
    mask_k = offs_k < K
    if TEACHER_MODE == 2:
        kt = K
    else:
        kt = 1
    mask_t = offs_t < kt
    z_k = z_ptr + row * stride_zb + offs_k.to(tl.int64) * stride_zk  # [BLOCK_K] row starts of the K branches
    t_k = t_ptr + row * stride_tb + offs_t.to(tl.int64) * stride_tk  # [TB]
    gz_k = gz_ptr + (row * K + offs_k.to(tl.int64)) * C  # [BLOCK_K]
    gt_k = gt_ptr + (row * kt + offs_t.to(tl.int64)) * C  # [TB]

    y = tl.load(y_ptr + row)
    if y == ignore_index:  # ignored row: zero loss, zero gradients
        if WRITE_GZ:
            for start in range(0, C, BLOCK_C):
                cols = start + offs_c
                zero = tl.zeros([BLOCK_K, BLOCK_C], ACC)
                tl.store(
                    gz_k[:, None] + cols[None, :],
                    zero.to(gz_ptr.dtype.element_ty),
                    mask=mask_k[:, None] & (cols < C)[None, :],
                )
        if WRITE_GT:
            for start in range(0, C, BLOCK_C):
                cols = start + offs_c
                zero_t = tl.zeros([TB, BLOCK_C], ACC)
                tl.store(
                    gt_k[:, None] + cols[None, :],
                    zero_t.to(gt_ptr.dtype.element_ty),
                    mask=mask_t[:, None] & (cols < C)[None, :],
                )
        tl.store(loss_ptr + row, 0.0)
        tl.store(terms_ptr + row * 3 + tl.arange(0, 4), tl.zeros([4], ACC), mask=tl.arange(0, 4) < 3)
        return

    y_ok = (y >= 0) & (y < C)  # False only for an unchecked out-of-range label: the row becomes NaN below
    y_safe = tl.where(y_ok, y, 0)
    inv_t = 1.0 / temperature
    eps = label_smoothing
    if HAS_KD_SCALE:
        kd_weight = kd_weight * tl.load(kd_scale_ptr).to(ACC)
    neg_inf = float("-inf")

    # ---- pass 1: online statistics of every branch row and of the teacher -------------------------------------
    # Sums are taken relative to the running maxima (m_ref: the max, or 0 while nothing finite was seen), so the
    # large logit magnitudes cancel before summation, not after: when a max moves by d, a sum of shifted values
    # w_c (x_c - m) over earlier blocks changes by -d * sum_c w_c, and its weights by e^{-d/T} (online softmax).
    m = tl.full([BLOCK_K], neg_inf, ACC)  # running max of z_k
    m_ref = tl.zeros([BLOCK_K], ACC)
    s1 = tl.zeros([BLOCK_K], ACC)  # sum_c e^{z_k - m}
    st = tl.zeros([BLOCK_K], ACC)  # sum_c e^{(z_k - m)/T}
    sum_z = tl.zeros([BLOCK_K], ACC)  # sum_c z_k (label smoothing)
    # ensemble: sum_c e^{(t - m_t)/T} ((t - m_t) - (z_k - m_k));  peer: sum_c e^{(z_k - m_k)/T} (K (z_k - m_k) -
    # sum_j (z_j - m_j))
    cross = tl.zeros([BLOCK_K], ACC)
    m_t = tl.full([TB], neg_inf, ACC)
    mt_ref = tl.zeros([TB], ACC)
    s1_t = tl.zeros([TB], ACC)
    st_t = tl.zeros([TB], ACC)
    sum_t = tl.zeros([TB], ACC)
    for start in range(0, C, BLOCK_C):
        cols = start + offs_c
        mask_c = cols < C
        mask = mask_k[:, None] & mask_c[None, :]
        mask_tc = mask_t[:, None] & mask_c[None, :]
        z = tl.load(z_k[:, None] + cols[None, :].to(tl.int64) * stride_zc, mask=mask, other=0.0).to(ACC)
        if TEACHER_MODE == 0:
            t = (tl.sum(z, axis=0) / K)[None, :]  # [1, BLOCK_C]: z is 0 where masked
        else:
            t = tl.load(t_k[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask_tc, other=0.0).to(ACC)

        m_new = tl.maximum(m, tl.max(tl.where(mask, z, neg_inf), axis=1))
        m_ref_new = tl.where(m_new == neg_inf, 0.0, m_new)  # a row with nothing finite yet keeps its sums at 0
        shift = m_ref_new - m_ref
        zc = tl.where(mask, z - m_ref_new[:, None], 0.0)
        e1 = tl.where(mask, tl.exp(zc), 0.0)
        et = tl.where(mask, tl.exp(zc * inv_t), 0.0)
        alpha_t = tl.exp((m - m_ref_new) * inv_t)

        mt_new = tl.maximum(m_t, tl.max(tl.where(mask_tc, t, neg_inf), axis=1))
        mt_ref_new = tl.where(mt_new == neg_inf, 0.0, mt_new)
        shift_t = mt_ref_new - mt_ref
        tc = tl.where(mask_tc, t - mt_ref_new[:, None], 0.0)
        et_t = tl.where(mask_tc, tl.exp(tc * inv_t), 0.0)
        alpha_tt = tl.exp((m_t - mt_ref_new) * inv_t)

        if PEER:
            drift = tl.sum(tl.where(mask_k, shift, 0.0), axis=0) - K * shift
            zc_sum = tl.sum(zc, axis=0)  # [BLOCK_C] sum_j (z_j - m_j)
            cross = alpha_t * (cross + drift * st) + tl.sum(et * (K * zc - zc_sum[None, :]), axis=1)
        else:
            cross = alpha_tt * (cross + (shift - shift_t) * st_t) + tl.sum(et_t * (tc - zc), axis=1)

        s1 = s1 * tl.exp(m - m_ref_new) + tl.sum(e1, axis=1)
        st = st * alpha_t + tl.sum(et, axis=1)
        sum_z += tl.sum(z, axis=1)
        m = m_new
        m_ref = m_ref_new
        s1_t = s1_t * tl.exp(m_t - mt_ref_new) + tl.sum(tl.where(mask_tc, tl.exp(tc), 0.0), axis=1)
        st_t = st_t * alpha_tt + tl.sum(et_t, axis=1)
        sum_t += tl.sum(t, axis=1)
        m_t = mt_new
        mt_ref = mt_ref_new

    # padded branch rows get harmless finite statistics (they are masked out of every sum and store)
    log_s1 = tl.log(tl.where(mask_k, s1, 1.0))  # logsumexp(z_k) = m_k + log_s1
    log_st = tl.log(tl.where(mask_k, st, 1.0))  # logsumexp(z_k / T) = m_k / T + log_st
    log_s1_t = tl.log(tl.where(mask_t, s1_t, 1.0))
    log_st_t = tl.log(tl.where(mask_t, st_t, 1.0))
    st = tl.where(mask_k, st, 1.0)
    st_t = tl.where(mask_t, st_t, 1.0)

    zy = tl.load(z_k + y_safe * stride_zc, mask=mask_k & y_ok, other=0.0).to(ACC)  # [BLOCK_K] z_ky
    if TEACHER_MODE == 0:
        ty = tl.zeros([TB], ACC) + tl.sum(zy, axis=0) / K
    else:
        ty = tl.load(t_k + y_safe * stride_tc, mask=mask_t & y_ok, other=0.0).to(ACC)  # [TB] t_y

    # CE_eps(z, y) = lse - (1 - eps) z_y - eps mean_c z = log_s1 + (1 - eps) (m - z_y) + eps (m - mean_c z)
    ce_k = log_s1 + (1.0 - eps) * (m_ref - zy) + eps * (m_ref - sum_z / C)
    ce = tl.sum(tl.where(mask_k, ce_k, 0.0), axis=0)
    tce_k = log_s1_t + (1.0 - eps) * (mt_ref - ty) + eps * (mt_ref - sum_t / C)
    tce = tl.sum(tl.where(mask_t, tce_k, 0.0), axis=0)
    if PEER:
        # R_k = sum_{j != k} KL(p_k || p_j) = sum_c p_kc (K (z_kc - m_k) - sum_j (z_jc - m_j)) / T
        #       - K log_st_k + sum_j log_st_j
        r = cross / (st * temperature) - K * log_st + tl.sum(tl.where(mask_k, log_st, 0.0), axis=0)
        kd = tl.sum(tl.where(mask_k, r, 0.0), axis=0) / (K - 1)
    else:
        # KL_k = sum_c q_c ((t_c - m_t) - (z_kc - m_k)) / T - log_st_t + log_st_k
        kl = cross / (st_t * temperature) - log_st_t + log_st
        kd = tl.sum(tl.where(mask_k, kl, 0.0), axis=0)
    kd = kd * temperature * temperature
    loss = ce_weight * ce
    if HAS_TCE:
        loss += teacher_ce_weight * tce
    if HAS_KD:
        loss += kd_weight * kd
    nan = float("nan")
    tl.store(loss_ptr + row, tl.where(y_ok, loss, nan))
    terms = tl.where(tl.arange(0, 4) == 0, ce, tl.where(tl.arange(0, 4) == 1, tce, kd))
    tl.store(terms_ptr + row * 3 + tl.arange(0, 4), tl.where(y_ok, terms, nan), mask=tl.arange(0, 4) < 3)

    # ---- pass 2: gradients --------------------------------------------------------------------------------------
    if WRITE_GZ or WRITE_GT:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.load(n_valid_ptr).to(ACC)
        scale = tl.where(y_ok, scale, nan)
        smooth_off = eps / C  # label-smoothed target: 1 - eps + eps/C at y, eps/C elsewhere
        for start in range(0, C, BLOCK_C):
            cols = start + offs_c
            mask_c = cols < C
            mask = mask_k[:, None] & mask_c[None, :]
            mask_tc = mask_t[:, None] & mask_c[None, :]
            z = tl.load(z_k[:, None] + cols[None, :].to(tl.int64) * stride_zc, mask=mask, other=0.0).to(ACC)
            if TEACHER_MODE == 0:
                t = (tl.sum(z, axis=0) / K)[None, :]
            else:
                t = tl.load(t_k[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask_tc, other=0.0).to(ACC)
            target = tl.where((cols == y)[None, :], 1.0 - eps + smooth_off, smooth_off)  # [1, BLOCK_C]
            zc = z - m_ref[:, None]
            tc = t - mt_ref[:, None]
            log_p = zc * inv_t - log_st[:, None]  # log softmax(z_k / T)
            p = tl.exp(log_p)
            gz = ce_weight * (tl.exp(zc - log_s1[:, None]) - target)
            gt = tl.zeros([TB, BLOCK_C], ACC)
            if HAS_TCE:
                gt += teacher_ce_weight * (tl.exp(tc - log_s1_t[:, None]) - target)
            if HAS_KD:
                if PEER:
                    coef = kd_weight * temperature / (K - 1)
                    p_sum = tl.sum(tl.where(mask, p, 0.0), axis=0)
                    gz += coef * (K * p - p_sum[None, :])
                    if not DETACH:
                        log_p_sum = tl.sum(tl.where(mask, log_p, 0.0), axis=0)
                        gz += coef * p * (K * log_p - log_p_sum[None, :] - r[:, None])
                else:
                    log_q = tc * inv_t - log_st_t[:, None]
                    q = tl.exp(log_q)
                    gz += kd_weight * temperature * (p - q)
                    if not DETACH:
                        g_kl = kd_weight * temperature * q * (log_q - log_p - kl[:, None])  # [BLOCK_K, BLOCK_C]
                        if TEACHER_MODE == 2:
                            gt += g_kl
                        else:
                            gt += tl.sum(tl.where(mask, g_kl, 0.0), axis=0)[None, :]
            if MEAN_T_GRAD:  # t = mean_k z_k: its gradient reaches every branch with weight 1/K
                gz += gt / K
            if WRITE_GZ:
                tl.store(gz_k[:, None] + cols[None, :], (gz * scale).to(gz_ptr.dtype.element_ty), mask=mask)
            if WRITE_GT:
                tl.store(gt_k[:, None] + cols[None, :], (gt * scale).to(gt_ptr.dtype.element_ty), mask=mask_tc)


# ---------------------------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------------------------


def _interpreted(kernel):
    """The kernel object that runs on ``device``. Triton decides interpretation when ``@triton.jit`` runs (at
    import of this module) and decorates its own standard library (tl.sum, tl.zeros, ...) when ``triton`` is first
    imported, so TRITON_INTERPRET=1 must be in the environment before anything imports triton."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "okdfast: CPU tensors can only run the Triton kernels in Triton's interpreter, and TRITON_INTERPRET=1 was "
            "not set when triton was imported; start the process with TRITON_INTERPRET=1 (and OKDFAST_FORCE_TRITON=1)"
        )
    return kernel


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def online_kd_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    *,
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
    kd_scale: torch.Tensor | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: ``(loss, terms (B, 3), grad_logits, grad_teacher)``.

    Inputs must already be validated (``okdfast.ops.online_kd``). ``loss`` is reduced ('mean': sum over rows /
    number of non-ignored rows; 'sum'; 'none': (B,)); ``terms`` are the unweighted per-row ce, teacher_ce, kd (zero
    at ignored rows); the gradients are d loss / d input for grad_output = 1 (already divided by the number of
    valid rows for 'mean'), contiguous, in the input's dtype, or empty tensors when not requested.
    ``kd_scale``: an optional one-element float32 tensor on the logits' device that multiplies ``kd_weight`` (read
    by the kernel: no host sync, no recompilation). ``block_c`` / ``num_warps``: see :func:`launch_config`.
    """
    batch, num_branches, num_classes = logits.shape
    device = logits.device
    acc = _acc_dtype(logits, teacher)
    loss_rows = torch.empty(batch, dtype=acc, device=device)
    terms = torch.empty(batch, 3, dtype=acc, device=device)
    gz = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_logits else logits.new_empty(0)
    write_gt = grad_teacher and teacher is not None
    if write_gt:
        gt = torch.empty_like(teacher, memory_format=torch.contiguous_format)
    else:
        gt = logits.new_empty(0) if teacher is None else teacher.new_empty(0)
    valid = target != ignore_index
    n_valid = valid.sum().to(torch.float32)

    if batch > 0:
        if teacher is None:
            teacher_mode, t_arg, t_strides = TEACHER_MEAN, logits, (0, 0, 0)
        elif teacher.dim() == 2:
            teacher_mode, t_arg, t_strides = TEACHER_SHARED, teacher, (teacher.stride(0), 0, teacher.stride(1))
        else:
            teacher_mode, t_arg, t_strides = TEACHER_PER_BRANCH, teacher, teacher.stride()
        block_k, block_c, num_warps = launch_config(
            num_branches, num_classes, block_c, num_warps, teacher_mode == TEACHER_PER_BRANCH
        )
        peer = mode == "peer"
        has_kd = kd_weight != 0.0 or kd_scale is not None
        has_tce = teacher_ce_weight != 0.0
        kernel = _online_kd_fwd_kernel if device.type == "cuda" else _interpreted(_online_kd_fwd_kernel)
        kernel[(batch,)](
            logits,
            *logits.stride(),
            target,
            t_arg,
            *t_strides,
            n_valid,
            n_valid if kd_scale is None else kd_scale,
            loss_rows,
            terms,
            gz if grad_logits else loss_rows,  # a placeholder pointer when nothing is written
            gt if write_gt else loss_rows,
            num_branches,
            num_classes,
            ignore_index,
            float(temperature),
            float(label_smoothing),
            float(ce_weight),
            float(kd_weight),
            float(teacher_ce_weight),
            BLOCK_K=block_k,
            BLOCK_C=block_c,
            TB=block_k if teacher_mode == TEACHER_PER_BRANCH else 1,
            TEACHER_MODE=teacher_mode,
            PEER=peer,
            DETACH=bool(detach_teacher),
            HAS_TCE=has_tce,
            HAS_KD=has_kd,
            HAS_KD_SCALE=kd_scale is not None,
            MEAN_T_GRAD=teacher_mode == TEACHER_MEAN and (has_tce or (has_kd and not peer and not detach_teacher)),
            MEAN=reduction == "mean",
            WRITE_GZ=bool(grad_logits),
            WRITE_GT=write_gt,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=num_warps,
        )
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / n_valid.to(acc)  # NaN when every row is ignored, like F.cross_entropy
    return loss, terms, gz, gt
