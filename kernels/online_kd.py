"""Triton kernels of the multi-branch online-KD loss: softmax, CE, teacher CE and T^2 KL for every branch, with the
teachers formed in the kernel from the logits it already holds (reference:
``okdfast.ops.reference.online_kd_reference``; op: ``okdfast.ops.online_kd``).

The math, per row b (a sample; y its label, eps the label smoothing, T the temperature, z_k the K branch logits, t_r
the teacher rows: the mean of the z_k, explicit logits, or t_r = sum_j W_rj z_j from weights W over the branches):

    lse_k  = logsumexp(z_k),   lseT_k = logsumexp(z_k / T),   p_k = softmax(z_k / T),   q_r = softmax(t_r / T)
    CE_k   = lse_k - (1 - eps) z_ky - eps mean_c(z_k)                   d/dz_k = softmax(z_k) - (1-eps) 1_y - eps/C
    KL_k   = KL(q_r(k) || p_k) = sum_c q_c (t_c - z_kc) / T - lseT_t + lseT_k    (r(k) = k, or 0 for one teacher)
             d(T^2 KL_k)/dz_k = T (p_k - q),   d(T^2 KL_k)/dt = T q (log q - log p_k - KL_k)
    peer:  sum_k KD_k = 1/(K-1) sum_j R_j,  R_j = sum_{k != j} KL(p_j || p_k) = sum_c p_jc (K log p_jc - L_c),
           L_c = sum_k log p_kc;   d(T^2 sum KD)/dz_k = T/(K-1) (K p_k - sum_j p_j)            (as a student)
                                                        + T/(K-1) p_k (K log p_k - L - R_k)    (as a target)
    weights: dL/dW_rj = sum_c dL/dt_rc z_jc,   dL/dz_j += sum_r W_rj dL/dt_r            (when the teacher is trained)

Every sum over c that needs a final log-sum-exp is an online, rescaled sum (as in the online softmax), taken on
max-shifted values so that large logits cancel before they are summed; when a running max moves by d, earlier
terms are rescaled by e^{-d/T} and a shifted sum changes by -d sum_c w_c.

Kernels and the bytes they move (e = bytes per logit, one program per row in the row kernels):

    forward   reads the logits once, K*C*e per row (+ C*e or K*C*e of explicit teacher logits, + K*K*4 of weights);
              writes the row's loss and terms and 7*BLOCK_K float32 statistics (max, log-sum-exps, KL), so the
              backward needs no second pass over C
    reduce    one program: sums the B loss rows and terms and counts the valid rows (B*4 floats)
    backward  reads the logits once more and writes their gradient, already multiplied by grad_output (read on the
              device: no host sync) and by 1/n_valid for 'mean' (+ the teacher's / the weights' gradient)

In all: 3 * B*K*C*e per forward + backward (read, read, write), the minimum for a loss whose gradient needs the
row's log-sum-exp before any of it can be written; no (B, K, C) temporary besides the gradient itself.

Arithmetic is float32 whatever the input dtype (float64 for float64 inputs: gradcheck); every load and store is
masked; offsets are int64; any strides, including 0 (expanded) and those of an offset view, for every tensor.
Non-finite logits propagate (the row's loss and gradients become NaN, as in the reference). Ignored rows
(y == ignore_index) write zero loss and zero gradients; a label outside [0, C) that is not ignore_index (only
possible when the host-side check was skipped) makes its row's loss and gradients NaN instead of reading out of
bounds.

The block sizes (``launch_config``) come from a table of tile sizes and ptxas register / spill reports for sm_90
(benchmarks/gpu_checks/compile_kernels.py), not from timings: tune them on a GPU (``block_c`` / ``num_warps``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# launch heuristics
# ---------------------------------------------------------------------------------------------------------------

MAX_TILE = 2048  # elements of a [BLOCK_K, BLOCK_C] tile (about a dozen such fp32 tiles are live in the backward)
MAX_TILE_3D = 4096  # elements of the [TB, BLOCK_K, BLOCK_C] product that forms per-branch teachers from weights
NUM_STATS = 7  # per-row statistics saved for the backward: m, log_s1, log_st, kl|r (branches), m_t, log_s1_t, log_st_t
# TEACHER_ATTENTION: MDE's head. The weights are formed in the kernel from the FFM's attention logits (softmax over
# the M = K-1 auxiliaries, one row shared by them or one row each; the leader's row the uniform mean), and the
# prediction-space CD (the non-target correlation of the auxiliaries) is computed in the same pass.
TEACHER_MEAN, TEACHER_EXPLICIT, TEACHER_WEIGHTS, TEACHER_ATTENTION = 0, 1, 2, 3
CD_EPS = 1e-8  # the norm floor of okdfast.ops.reference.nontarget_correlation_rows


def stat_slots(block_k: int, cd: bool) -> int:
    """Rows of BLOCK_K statistics per sample: NUM_STATS, and with the CD the non-target mean, r and A (BLOCK_K)."""
    return NUM_STATS + (2 + block_k if cd else 0)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class LaunchConfig(NamedTuple):
    """How the row kernels are launched (``launch_config``)."""

    block_k: int  # BLOCK_K: the branches, padded to a power of two
    tb: int  # TB: the teacher tile's rows
    block_c: int  # BLOCK_C: the classes one chunk covers
    num_warps: int
    rows_per_program: int  # consecutive rows one program handles; the grid is ceil(B / rows_per_program)

    def describe(self) -> str:
        """The configuration as the benchmark rows write it."""
        return (
            f"BLOCK_K={self.block_k} TB={self.tb} BLOCK_C={self.block_c} num_warps={self.num_warps} "
            f"rows_per_program={self.rows_per_program}"
        )


def launch_config(
    num_branches: int,
    num_classes: int,
    teacher_rows: int = 1,
    weighted: bool = False,
    block_c: int | None = None,
    num_warps: int | None = None,
    rows_per_program: int | None = None,
) -> LaunchConfig:
    """(BLOCK_K, TB, BLOCK_C, num_warps, rows_per_program): the whole (K, C) row in one tile when it fits, else C in
    chunks; one row per program.

    TB is the teacher tile's rows (1, or BLOCK_K for per-branch teachers). With per-branch weights the teacher is a
    [TB, BLOCK_K, BLOCK_C] product, so BLOCK_C shrinks to keep it within MAX_TILE_3D. num_warps gives every thread
    about 8 tile elements (4 for BLOCK_K >= 8, half that with a per-branch teacher), at most 16 warps: at that
    density the sm_90 compiles stay at <= ~128 registers with no or few spills (gpu_checks/compile_kernels.py).
    A program handles ``rows_per_program`` consecutive rows one after another (fewer programs, each with more
    work, for many short rows); the default stays 1 until a GPU sweep (``bench_loss --sweep``) measures another
    to win. ``block_c`` / ``num_warps`` / ``rows_per_program`` override (tests, tuning sweeps).
    """
    block_k = _pow2(num_branches)
    tb = block_k if teacher_rows > 1 else 1
    per_thread = (8 if block_k <= 4 else 4) // (2 if tb > 1 else 1)
    if block_c is None:
        limit = MAX_TILE // block_k
        if weighted:
            limit = min(limit, MAX_TILE_3D // (tb * block_k))
        block_c = max(min(_pow2(num_classes), limit), 16)
        while block_c > 16 and block_k * block_c > 16 * 32 * per_thread:  # more than 16 warps' worth
            block_c //= 2
    elif block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c={block_c}: must be a power of two")
    if num_warps is None:
        num_warps = min(max(block_k * block_c // (32 * per_thread), 1), 16)
    if rows_per_program is None:
        rows_per_program = 1
    elif rows_per_program < 1:
        raise ValueError(f"rows_per_program={rows_per_program}: must be at least 1")
    return LaunchConfig(block_k, tb, block_c, num_warps, int(rows_per_program))


# ---------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _teacher_tile(
    z,  # [BLOCK_K, BLOCK_C] logits tile, 0 where masked
    t_rows,  # [TB] row starts of explicit teacher logits
    w,  # [TB, BLOCK_K] weights over the branches, 0 where masked
    cols,
    mask_tc,
    stride_tc,
    K,
    TEACHER_MODE: tl.constexpr,
    ACC: tl.constexpr,
):
    """[TB, BLOCK_C] teacher logits: the branch mean, explicit rows, or sum_j W_rj z_j."""
    if TEACHER_MODE == 0:
        t = (tl.sum(z, axis=0) / K)[None, :]
    elif TEACHER_MODE == 1:
        t = tl.load(t_rows[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask_tc, other=0.0).to(ACC)
    else:
        t = tl.sum(w[:, :, None] * z[None, :, :], axis=1)
    return t


@triton.jit
def _load_weights(
    w_ptr,
    row,
    stride_wb,
    stride_wt,
    stride_wk,
    offs_t,
    offs_k,
    mask_tk,
    K,
    attention_temperature,
    TB: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TEACHER_MODE: tl.constexpr,
    ACC: tl.constexpr,
):
    """[TB, BLOCK_K] teacher weights over the branches: loaded (TEACHER_MODE 2), or MDE's (TEACHER_MODE 3): row
    r < K-1 is softmax(a_r / tau) over the K-1 auxiliaries (a_r the attention logits, stride_wt 0 when one row is
    shared), row K-1 (the leader's target) 1/(K-1) on every auxiliary; zero on the leader's column."""
    w = tl.zeros([TB, BLOCK_K], ACC)
    if TEACHER_MODE == 2:
        w_ptrs = w_ptr + row * stride_wb + offs_t[:, None].to(tl.int64) * stride_wt + offs_k[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=mask_tk, other=0.0).to(ACC)
    elif TEACHER_MODE == 3:
        aux_t = offs_t < K - 1
        aux_k = offs_k < K - 1
        mask_a = aux_t[:, None] & aux_k[None, :]
        a_ptrs = w_ptr + row * stride_wb + offs_t[:, None].to(tl.int64) * stride_wt + offs_k[None, :] * stride_wk
        a = tl.load(a_ptrs, mask=mask_a, other=0.0).to(ACC) / attention_temperature
        a = tl.where(mask_a, a, float("-inf"))
        a_max = tl.where(aux_t, tl.max(a, axis=1), 0.0)
        e = tl.where(mask_a, tl.exp(a - a_max[:, None]), 0.0)
        total = tl.where(aux_t, tl.sum(e, axis=1), 1.0)
        leader = (offs_t == K - 1)[:, None] & aux_k[None, :]
        w = tl.where(leader, 1.0 / (K - 1).to(ACC), e / total[:, None])  # in ACC: 1/3 exact to float64 too
    return w


@triton.jit
def _in_acc(x, ACC: tl.constexpr):
    """A scalar argument (float32, or a Python float in the interpreter) as a scalar of the accumulation dtype."""
    return tl.sum(tl.zeros([1], ACC), axis=0) + x


@triton.jit
def _widen(x, BLOCK_K: tl.constexpr, TB: tl.constexpr, ACC: tl.constexpr):
    """[TB] -> [BLOCK_K]: a one-row teacher's value repeated (TB == 1), else x itself (TB == BLOCK_K)."""
    if TB == 1:
        return tl.zeros([BLOCK_K], ACC) + tl.sum(x, axis=0)
    else:
        return x


# ---------------------------------------------------------------------------------------------------------------
# forward: the row's loss, terms and statistics
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_row(
    row,  # the sample (int64)
    z_ptr,  # [B, K, C] branch logits, any strides
    stride_zb,
    stride_zk,
    stride_zc,
    y_ptr,  # [B] int64 labels, any stride
    stride_y,
    t_ptr,  # [B, KT, C] explicit teacher logits (TEACHER_MODE 1; stride_tk 0 for a shared teacher)
    stride_tb,
    stride_tk,
    stride_tc,
    w_ptr,  # [B, KT, K] teacher weights (TEACHER_MODE 2; stride_wb 0 for a constant matrix)
    stride_wb,
    stride_wt,
    stride_wk,
    kdw_ptr,  # [1] device-side multiplier of kd_weight (read when HAS_KDW: a ramp-up w(e))
    loss_ptr,  # [B] weighted per-row loss (ACC)
    terms_ptr,  # [B, NUM_TERMS] unweighted per-row ce, teacher_ce, kd (and cd) (ACC)
    stats_ptr,  # [B, STATS, BLOCK_K] statistics for the backward (ACC)
    K,
    KT,  # teacher rows: 1 or K
    C,
    ignore_index,
    temperature,
    label_smoothing,
    ce_weight,
    kd_weight,
    teacher_ce_weight,
    attention_temperature,  # tau of the attention softmax (TEACHER_MODE 3)
    cd_weight,  # lambda of the CD term (HAS_CD)
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TB: tl.constexpr,  # rows of the teacher tile: 1 or BLOCK_K
    TEACHER_MODE: tl.constexpr,  # 0 mean, 1 explicit logits, 2 weights over the branches, 3 MDE's attention
    PEER: tl.constexpr,  # DML: branch k distils from every other branch
    HAS_KD: tl.constexpr,
    HAS_KDW: tl.constexpr,
    TCE_MASK: tl.constexpr,  # bit r: teacher row r gets the teacher CE (0: no teacher CE)
    HAS_CD: tl.constexpr,  # the non-target correlation of the first K-1 branches (MDE's prediction-space CD)
    STATS: tl.constexpr,  # stat_slots(BLOCK_K, HAS_CD)
    NUM_TERMS: tl.constexpr,  # 3, or 4 with the CD
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
):
    """One row's loss, terms and statistics (the math: the module docstring)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, TB)
    offs_c = tl.arange(0, BLOCK_C)
    mask_k = offs_k < K
    mask_t = offs_t < KT
    z_rows = z_ptr + row * stride_zb + offs_k.to(tl.int64) * stride_zk  # [BLOCK_K]
    t_rows = t_ptr + row * stride_tb + offs_t.to(tl.int64) * stride_tk  # [TB]
    stats = stats_ptr + row * (STATS * BLOCK_K) + offs_k  # [BLOCK_K] slot 0; slot s at + s * BLOCK_K

    y = tl.load(y_ptr + row * stride_y)
    if y == ignore_index:  # ignored row: zero loss, terms and statistics (the backward writes it zero gradients)
        tl.store(loss_ptr + row, 0.0)
        tl.store(terms_ptr + row * NUM_TERMS + tl.arange(0, 4), tl.zeros([4], ACC), mask=tl.arange(0, 4) < NUM_TERMS)
        for slot in tl.static_range(STATS):
            tl.store(stats + slot * BLOCK_K, tl.zeros([BLOCK_K], ACC))
        return

    y_ok = (y >= 0) & (y < C)  # False only for an unchecked out-of-range label: the row becomes NaN below
    y_safe = tl.where(y_ok, y, 0)
    temperature = _in_acc(temperature, ACC)  # one T in every product and quotient (1/T not mixed with /T in float64)
    inv_t = 1.0 / temperature
    eps = label_smoothing
    if HAS_KDW:
        kd_weight = kd_weight * tl.load(kdw_ptr).to(ACC)
    neg_inf = float("-inf")
    mask_tk = mask_t[:, None] & mask_k[None, :]
    w = _load_weights(w_ptr, row, stride_wb, stride_wt, stride_wk, offs_t, offs_k, mask_tk, K,
                      attention_temperature, TB, BLOCK_K, TEACHER_MODE, ACC)  # fmt: skip

    # ---- one pass over C: online statistics of every branch row and every teacher row -------------------------
    # Sums are taken relative to the running maxima (m_ref: the max, or 0 while nothing finite was seen).
    m = tl.full([BLOCK_K], neg_inf, ACC)  # running max of z_k
    m_ref = tl.zeros([BLOCK_K], ACC)
    s1 = tl.zeros([BLOCK_K], ACC)  # sum_c e^{z_k - m}
    st = tl.zeros([BLOCK_K], ACC)  # sum_c e^{(z_k - m)/T}
    sum_z = tl.zeros([BLOCK_K], ACC)  # sum_c z_k (label smoothing)
    # ensemble: sum_c e^{(t - m_t)/T} ((t - m_t) - (z_k - m_k)); peer: sum_c e^{(z_k - m_k)/T} (K (z_k - m_k) -
    # sum_j (z_j - m_j))
    cross = tl.zeros([BLOCK_K], ACC)
    m_t = tl.full([TB], neg_inf, ACC)
    mt_ref = tl.zeros([TB], ACC)
    s1_t = tl.zeros([TB], ACC)
    st_t = tl.zeros([TB], ACC)
    sum_t = tl.zeros([TB], ACC)
    # CD: count, mean and centred co-moments of e^{(z_k - m_k)/T} over the non-target classes, merged chunk by chunk
    # (Chan et al.), rescaled with the running maxima: no sum of squares minus a squared sum to cancel in float32
    n_cd = _in_acc(0.0, ACC)
    mean_cd = tl.zeros([BLOCK_K], ACC)
    co_cd = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    for start in range(0, C, BLOCK_C):
        cols = start + offs_c
        mask_c = cols < C
        mask = mask_k[:, None] & mask_c[None, :]
        mask_tc = mask_t[:, None] & mask_c[None, :]
        z = tl.load(z_rows[:, None] + cols[None, :].to(tl.int64) * stride_zc, mask=mask, other=0.0).to(ACC)
        t = _teacher_tile(z, t_rows, w, cols, mask_tc, stride_tc, K, TEACHER_MODE, ACC)

        # A NaN logit needs no special case: whatever the maxima do with it, it reaches every sum below (e^NaN)
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

        if HAS_CD:
            other = mask_c & (cols != y)  # the non-target classes of this chunk
            n_b = tl.sum(other.to(ACC), axis=0)
            e_b = tl.where(mask & other[None, :], et, 0.0)
            mean_b = tl.sum(e_b, axis=1) / tl.maximum(n_b, 1.0)
            dev = tl.where(mask & other[None, :], et - mean_b[:, None], 0.0)
            co_b = tl.sum(dev[:, None, :] * dev[None, :, :], axis=2)
            mean_cd = mean_cd * alpha_t
            co_cd = co_cd * alpha_t[:, None] * alpha_t[None, :]
            n_ab = n_cd + n_b
            delta = mean_b - mean_cd
            frac = n_b / tl.maximum(n_ab, 1.0)
            co_cd = co_cd + co_b + delta[:, None] * delta[None, :] * (n_cd * frac)
            mean_cd = mean_cd + delta * frac
            n_cd = n_ab
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

    # padded branch / teacher rows get harmless finite statistics (they are masked out of every sum and store)
    log_s1 = tl.log(tl.where(mask_k, s1, 1.0))  # logsumexp(z_k) = m_k + log_s1
    log_st = tl.log(tl.where(mask_k, st, 1.0))  # logsumexp(z_k / T) = m_k / T + log_st
    log_s1_t = tl.log(tl.where(mask_t, s1_t, 1.0))
    log_st_t = tl.log(tl.where(mask_t, st_t, 1.0))
    st = tl.where(mask_k, st, 1.0)
    st_t = tl.where(mask_t, st_t, 1.0)

    zy = tl.load(z_rows + y_safe * stride_zc, mask=mask_k & y_ok, other=0.0).to(ACC)  # [BLOCK_K] z_ky
    if TEACHER_MODE == 0:
        ty = tl.zeros([TB], ACC) + tl.sum(zy, axis=0) / K
    elif TEACHER_MODE == 1:
        ty = tl.load(t_rows + y_safe * stride_tc, mask=mask_t & y_ok, other=0.0).to(ACC)  # [TB] t_y
    else:
        ty = tl.sum(w * zy[None, :], axis=1)

    cd = 0.0
    if HAS_CD:
        # In units of p = e / st: M_ij = co_ij / (st_i st_j), n_i = sqrt(M_ii) floored at CD_EPS, the row's term
        # (1/P) sum_{i<j<K-1} M_ij / (n_i n_j). Its gradient (the backward): d cd / d u_i = sum_j A_ij u_j for the
        # centred non-target p u_i, with A_ij = c / (n_i n_j) (j != i) and A_ii = -c sum_{j!=i} corr_ij / n_i^2,
        # c = 1/P; through the softmax d cd / d z_i = (1/T) p_i (g_i - r_i), r_i = sum_j A_ij M_ij.
        eye = offs_k[:, None] == offs_k[None, :]
        aux = offs_k < K - 1
        norm_raw = tl.sqrt(tl.maximum(tl.sum(tl.where(eye, co_cd, 0.0), axis=1), 0.0)) / st
        norm = tl.maximum(norm_raw, 1e-8)
        gram = co_cd / (st[:, None] * st[None, :])
        corr = gram / (norm[:, None] * norm[None, :])
        num_pairs = (K - 1) * (K - 2) // 2
        c_pair = 1.0 / num_pairs.to(ACC)
        pair = (offs_k[:, None] < offs_k[None, :]) & aux[None, :]
        cd = tl.sum(tl.sum(tl.where(pair, corr, 0.0), axis=1), axis=0) * c_pair
        off = aux[:, None] & aux[None, :] & (offs_k[:, None] != offs_k[None, :])
        a_cd = tl.where(off, c_pair / (norm[:, None] * norm[None, :]), 0.0)
        row_corr = tl.sum(tl.where(off, corr, 0.0), axis=1)
        a_diag = tl.where(aux & (norm_raw >= 1e-8), -c_pair * row_corr / (norm * norm), 0.0)  # floored: no norm term
        a_cd = a_cd + tl.where(eye, a_diag[:, None], 0.0)
        r_cd = tl.sum(a_cd * gram, axis=1)
        tl.store(stats + 7 * BLOCK_K, mean_cd / st)
        tl.store(stats + 8 * BLOCK_K, r_cd)
        # A row-major in slots 9.. (A_ij at slot 9 + i, column j): A is symmetric, so the slot order is immaterial
        a_ptrs = stats_ptr + row * (STATS * BLOCK_K) + (9 + offs_k[:, None]) * BLOCK_K + offs_k[None, :]
        tl.store(a_ptrs, a_cd)

    # CE_eps(z, y) = lse - (1 - eps) z_y - eps mean_c z = log_s1 + (1 - eps) (m - z_y) + eps (m - mean_c z)
    ce_k = log_s1 + (1.0 - eps) * (m_ref - zy) + eps * (m_ref - sum_z / C)
    ce = tl.sum(tl.where(mask_k, ce_k, 0.0), axis=0)
    tce_k = log_s1_t + (1.0 - eps) * (mt_ref - ty) + eps * (mt_ref - sum_t / C)
    selected = mask_t & (((tl.full([TB], TCE_MASK, tl.int32) >> offs_t) & 1) == 1)
    tce = tl.sum(tl.where(selected, tce_k, 0.0), axis=0)
    if PEER:
        # R_k = sum_{j != k} KL(p_k || p_j) = sum_c p_kc (K (z_kc - m_k) - sum_j (z_jc - m_j)) / T
        #       - K log_st_k + sum_j log_st_j
        kl = cross / (st * temperature) - K * log_st + tl.sum(tl.where(mask_k, log_st, 0.0), axis=0)
        kd = tl.sum(tl.where(mask_k, kl, 0.0), axis=0) / (K - 1)
    else:
        # KL_k = sum_c q_c ((t_c - m_t) - (z_kc - m_k)) / T - log_st_t + log_st_k
        kl = cross / (st_t * temperature) - log_st_t + log_st
        kd = tl.sum(tl.where(mask_k, kl, 0.0), axis=0)
    kd = kd * temperature * temperature
    loss = ce_weight * ce
    if TCE_MASK != 0:
        loss += teacher_ce_weight * tce
    if HAS_KD:
        loss += kd_weight * kd
    if HAS_CD:
        loss += cd_weight * cd
    nan = float("nan")
    tl.store(loss_ptr + row, tl.where(y_ok, loss, nan))
    slot4 = tl.arange(0, 4)
    terms = tl.where(slot4 == 0, ce, tl.where(slot4 == 1, tce, tl.where(slot4 == 2, kd, cd)))
    tl.store(terms_ptr + row * NUM_TERMS + slot4, tl.where(y_ok, terms, nan), mask=slot4 < NUM_TERMS)
    tl.store(stats, m_ref)
    tl.store(stats + BLOCK_K, log_s1)
    tl.store(stats + 2 * BLOCK_K, log_st)
    tl.store(stats + 3 * BLOCK_K, tl.where(mask_k, kl, 0.0))
    # teacher slots are written whole (a one-row teacher repeated), so every element of stats is defined
    tl.store(stats + 4 * BLOCK_K, _widen(mt_ref, BLOCK_K, TB, ACC))
    tl.store(stats + 5 * BLOCK_K, _widen(log_s1_t, BLOCK_K, TB, ACC))
    tl.store(stats + 6 * BLOCK_K, _widen(log_st_t, BLOCK_K, TB, ACC))


@triton.jit
def _online_kd_fwd_kernel(
    z_ptr,
    stride_zb,
    stride_zk,
    stride_zc,
    y_ptr,
    stride_y,
    t_ptr,
    stride_tb,
    stride_tk,
    stride_tc,
    w_ptr,
    stride_wb,
    stride_wt,
    stride_wk,
    kdw_ptr,
    loss_ptr,
    terms_ptr,
    stats_ptr,
    K,
    KT,
    C,
    ignore_index,
    temperature,
    label_smoothing,
    ce_weight,
    kd_weight,
    teacher_ce_weight,
    attention_temperature,
    cd_weight,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TB: tl.constexpr,
    TEACHER_MODE: tl.constexpr,
    PEER: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_KDW: tl.constexpr,
    TCE_MASK: tl.constexpr,
    HAS_CD: tl.constexpr,
    STATS: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    ACC: tl.constexpr,
    B,  # rows
    ROWS_PER_PROGRAM: tl.constexpr,  # rows one program handles, one after another (launch_config)
):
    """_fwd_row for ROWS_PER_PROGRAM consecutive rows (the parameters are commented there)."""
    first = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    for i in tl.static_range(ROWS_PER_PROGRAM):
        if first + i < B:
            _fwd_row(
                first + i,
                z_ptr,
                stride_zb,
                stride_zk,
                stride_zc,
                y_ptr,
                stride_y,
                t_ptr,
                stride_tb,
                stride_tk,
                stride_tc,
                w_ptr,
                stride_wb,
                stride_wt,
                stride_wk,
                kdw_ptr,
                loss_ptr,
                terms_ptr,
                stats_ptr,
                K,
                KT,
                C,
                ignore_index,
                temperature,
                label_smoothing,
                ce_weight,
                kd_weight,
                teacher_ce_weight,
                attention_temperature,
                cd_weight,
                BLOCK_K,
                BLOCK_C,
                TB,
                TEACHER_MODE,
                PEER,
                HAS_KD,
                HAS_KDW,
                TCE_MASK,
                HAS_CD,
                STATS,
                NUM_TERMS,
                ACC,
            )


# ---------------------------------------------------------------------------------------------------------------
# reduce: the batch's loss, term means and number of valid rows, in one program (deterministic, no atomics)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _online_kd_reduce_kernel(
    loss_rows_ptr,  # [B] (ACC)
    terms_ptr,  # [B, NUM_TERMS] (ACC)
    y_ptr,  # [B] int64 labels, any stride
    stride_y,
    loss_ptr,  # [] reduced loss (ACC)
    summary_ptr,  # [NUM_TERMS + 1] each term's mean over the valid rows, then the number of valid rows (ACC)
    B,
    ignore_index,
    MEAN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    NUM_TERMS: tl.constexpr,  # 3 (ce, teacher_ce, kd) or 4 (and cd)
    ACC: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_B)
    total = tl.zeros([BLOCK_B], ACC)
    ce = tl.zeros([BLOCK_B], ACC)
    tce = tl.zeros([BLOCK_B], ACC)
    kd = tl.zeros([BLOCK_B], ACC)
    cd = tl.zeros([BLOCK_B], ACC)
    count = tl.zeros([BLOCK_B], ACC)
    for start in range(0, B, BLOCK_B):
        rows = (start + offs).to(tl.int64)
        mask = rows < B
        y = tl.load(y_ptr + rows * stride_y, mask=mask, other=ignore_index)
        total += tl.load(loss_rows_ptr + rows, mask=mask, other=0.0)
        ce += tl.load(terms_ptr + rows * NUM_TERMS, mask=mask, other=0.0)
        tce += tl.load(terms_ptr + rows * NUM_TERMS + 1, mask=mask, other=0.0)
        kd += tl.load(terms_ptr + rows * NUM_TERMS + 2, mask=mask, other=0.0)
        if NUM_TERMS == 4:
            cd += tl.load(terms_ptr + rows * NUM_TERMS + 3, mask=mask, other=0.0)
        count += tl.where(mask & (y != ignore_index), 1.0, 0.0)
    n_valid = tl.sum(count, axis=0)
    loss = tl.sum(total, axis=0)
    if MEAN:
        loss = loss / n_valid  # NaN when every row is ignored, like F.cross_entropy
    tl.store(loss_ptr, loss)
    tl.store(summary_ptr, tl.sum(ce, axis=0) / n_valid)
    tl.store(summary_ptr + 1, tl.sum(tce, axis=0) / n_valid)
    tl.store(summary_ptr + 2, tl.sum(kd, axis=0) / n_valid)
    if NUM_TERMS == 4:
        tl.store(summary_ptr + 3, tl.sum(cd, axis=0) / n_valid)
    tl.store(summary_ptr + NUM_TERMS, n_valid)


# ---------------------------------------------------------------------------------------------------------------
# backward: gradients times grad_output, in one pass over C
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_row(
    row,  # the sample (int64)
    z_ptr,  # [B, K, C] branch logits, any strides
    stride_zb,
    stride_zk,
    stride_zc,
    y_ptr,  # [B] int64 labels, any stride
    stride_y,
    t_ptr,  # [B, KT, C] explicit teacher logits (TEACHER_MODE 1)
    stride_tb,
    stride_tk,
    stride_tc,
    w_ptr,  # [B, KT, K] teacher weights (TEACHER_MODE 2)
    stride_wb,
    stride_wt,
    stride_wk,
    kdw_ptr,  # [1] device-side multiplier of kd_weight (HAS_KDW)
    stats_ptr,  # [B, STATS, BLOCK_K] from the forward (ACC)
    summary_ptr,  # [NUM_TERMS + 1] from the reduce kernel; [NUM_TERMS] is the number of valid rows (read when MEAN)
    gout_ptr,  # [] or [B] grad_output
    stride_gout,  # 0 for a scalar grad_output
    gz_ptr,  # [B, K, C] contiguous d loss / d logits (logits dtype)
    gt_ptr,  # [B, KT, C] contiguous d loss / d teacher (teacher dtype; WRITE_GT)
    gw_ptr,  # [B, KT, K] contiguous d loss / d weights (ACC; WRITE_GW), or [B, TA, K-1] d loss / d attention logits
    # (TEACHER_MODE 3; TA = 1 for one shared attention row (stride_wt 0), else K-1)
    K,
    KT,
    C,
    ignore_index,
    temperature,
    label_smoothing,
    ce_weight,
    kd_weight,
    teacher_ce_weight,
    attention_temperature,
    cd_weight,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TB: tl.constexpr,
    TEACHER_MODE: tl.constexpr,
    PEER: tl.constexpr,
    DETACH_MASK: tl.constexpr,  # bit r: teacher row r's KL target is detached (peer mode: 0 or 1, all or none)
    HAS_KD: tl.constexpr,
    HAS_KDW: tl.constexpr,
    TCE_MASK: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,  # the teacher receives a gradient (teacher CE, or an undetached KL target)
    MEAN: tl.constexpr,  # reduction == 'mean': gradients carry 1 / n_valid
    WRITE_GZ: tl.constexpr,
    WRITE_GT: tl.constexpr,
    WRITE_GW: tl.constexpr,
    HAS_CD: tl.constexpr,
    CD_GRAD: tl.constexpr,  # HAS_CD and cd_weight != 0
    ATTN_SHARED: tl.constexpr,  # TEACHER_MODE 3: one attention row for every auxiliary (stride_wt 0)
    STATS: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    ACC: tl.constexpr,
):
    """One row's gradients, from the forward's statistics, in one pass over C."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, TB)
    offs_c = tl.arange(0, BLOCK_C)
    mask_k = offs_k < K
    mask_t = offs_t < KT
    mask_tk = mask_t[:, None] & mask_k[None, :]
    z_rows = z_ptr + row * stride_zb + offs_k.to(tl.int64) * stride_zk
    t_rows = t_ptr + row * stride_tb + offs_t.to(tl.int64) * stride_tk
    gz_rows = gz_ptr + (row * K + offs_k.to(tl.int64)) * C  # [BLOCK_K]
    gt_rows = gt_ptr + (row * KT + offs_t.to(tl.int64)) * C  # [TB]
    gw_tile = gw_ptr + row * KT * K + offs_t[:, None].to(tl.int64) * K + offs_k[None, :]  # [TB, BLOCK_K]
    stats = stats_ptr + row * (STATS * BLOCK_K) + offs_k
    stats_t = stats_ptr + row * (STATS * BLOCK_K) + offs_t
    aux_tk = (offs_t < K - 1)[:, None] & (offs_k < K - 1)[None, :]  # the attention's entries (TEACHER_MODE 3)
    mask_ga = aux_tk
    if TEACHER_MODE == 3:  # d loss / d attention logits: (B, 1, K-1) shared, or (B, K-1, K-1)
        if ATTN_SHARED:
            mask_ga = aux_tk & (offs_t == 0)[:, None]
            gw_tile = gw_ptr + row * (K - 1) + offs_t[:, None].to(tl.int64) * 0 + offs_k[None, :]
        else:
            gw_tile = gw_ptr + row * (K - 1) * (K - 1) + offs_t[:, None].to(tl.int64) * (K - 1) + offs_k[None, :]

    y = tl.load(y_ptr + row * stride_y)
    if y == ignore_index:  # ignored row: zero gradients, whatever its logits hold
        for start in range(0, C, BLOCK_C):
            cols = start + offs_c
            if WRITE_GZ:
                zero = tl.zeros([BLOCK_K, BLOCK_C], ACC).to(gz_ptr.dtype.element_ty)
                tl.store(gz_rows[:, None] + cols[None, :], zero, mask=mask_k[:, None] & (cols < C)[None, :])
            if WRITE_GT:
                zero_t = tl.zeros([TB, BLOCK_C], ACC).to(gt_ptr.dtype.element_ty)
                tl.store(gt_rows[:, None] + cols[None, :], zero_t, mask=mask_t[:, None] & (cols < C)[None, :])
        if WRITE_GW:
            tl.store(gw_tile, tl.zeros([TB, BLOCK_K], ACC), mask=mask_ga if TEACHER_MODE == 3 else mask_tk)
        return

    y_ok = (y >= 0) & (y < C)
    temperature = _in_acc(temperature, ACC)  # one T in every product and quotient (1/T not mixed with /T in float64)
    inv_t = 1.0 / temperature
    eps = label_smoothing
    if HAS_KDW:
        kd_weight = kd_weight * tl.load(kdw_ptr).to(ACC)
    scale = tl.load(gout_ptr + row * stride_gout).to(ACC)
    if MEAN:
        scale = scale / tl.load(summary_ptr + NUM_TERMS).to(ACC)
    scale = tl.where(y_ok, scale, float("nan"))
    w = _load_weights(w_ptr, row, stride_wb, stride_wt, stride_wk, offs_t, offs_k, mask_tk, K,
                      attention_temperature, TB, BLOCK_K, TEACHER_MODE, ACC)  # fmt: skip
    m_ref = tl.load(stats)
    log_s1 = tl.load(stats + BLOCK_K)
    log_st = tl.load(stats + 2 * BLOCK_K)
    kl = tl.load(stats + 3 * BLOCK_K)  # KL_k (ensemble) or R_k (peer)
    mt_ref = tl.load(stats_t + 4 * BLOCK_K)
    log_s1_t = tl.load(stats_t + 5 * BLOCK_K)
    log_st_t = tl.load(stats_t + 6 * BLOCK_K)
    selected = mask_t & (((tl.full([TB], TCE_MASK, tl.int32) >> offs_t) & 1) == 1)
    smooth_off = eps / C  # the label-smoothed target: 1 - eps + eps/C at y, eps/C elsewhere
    gw = tl.zeros([TB, BLOCK_K], ACC)
    if CD_GRAD:  # the forward's CD coefficients (the kernel's module docstring and the forward)
        mean_cd = tl.load(stats + 7 * BLOCK_K)
        r_cd = tl.load(stats + 8 * BLOCK_K)
        a_cd = tl.load(stats_ptr + row * (STATS * BLOCK_K) + (9 + offs_k[:, None]) * BLOCK_K + offs_k[None, :])
    for start in range(0, C, BLOCK_C):
        cols = start + offs_c
        mask_c = cols < C
        mask = mask_k[:, None] & mask_c[None, :]
        mask_tc = mask_t[:, None] & mask_c[None, :]
        z = tl.load(z_rows[:, None] + cols[None, :].to(tl.int64) * stride_zc, mask=mask, other=0.0).to(ACC)
        t = _teacher_tile(z, t_rows, w, cols, mask_tc, stride_tc, K, TEACHER_MODE, ACC)
        target = tl.where((cols == y)[None, :], 1.0 - eps + smooth_off, smooth_off)  # [1, BLOCK_C]
        zc = z - m_ref[:, None]
        log_p = zc * inv_t - log_st[:, None]  # log softmax(z_k / T)
        p = tl.exp(log_p)
        gz = ce_weight * (tl.exp(zc - log_s1[:, None]) - target)
        if CD_GRAD:
            other = mask & (cols != y)[None, :]
            u = tl.where(other, p - mean_cd[:, None], 0.0)
            g_cd = tl.where(other, tl.sum(a_cd[:, :, None] * u[None, :, :], axis=1), 0.0)
            gz += (cd_weight * inv_t) * p * (g_cd - r_cd[:, None])
        gt = tl.zeros([TB, BLOCK_C], ACC)
        if TCE_MASK != 0:
            tce_grad = teacher_ce_weight * (tl.exp(t - mt_ref[:, None] - log_s1_t[:, None]) - target)
            gt += tl.where(selected[:, None], tce_grad, 0.0)
        if HAS_KD:
            if PEER:
                coef = kd_weight * temperature / (K - 1)
                p_sum = tl.sum(tl.where(mask, p, 0.0), axis=0)
                gz += coef * (K * p - p_sum[None, :])
                if DETACH_MASK == 0:
                    log_p_sum = tl.sum(tl.where(mask, log_p, 0.0), axis=0)
                    gz += coef * p * (K * log_p - log_p_sum[None, :] - kl[:, None])
            else:
                log_q = (t - mt_ref[:, None]) * inv_t - log_st_t[:, None]
                q = tl.exp(log_q)
                gz += kd_weight * temperature * (p - q)
                if DETACH_MASK != (1 << TB) - 1:  # some row's KL target is trained
                    g_kl = kd_weight * temperature * q * (log_q - log_p - kl[:, None])  # [BLOCK_K, BLOCK_C]
                    if TB == 1:
                        gt += tl.sum(tl.where(mask, g_kl, 0.0), axis=0)[None, :]
                    else:
                        trained = ((tl.full([TB], DETACH_MASK, tl.int32) >> offs_t) & 1) == 0
                        gt += tl.where(mask & trained[:, None], g_kl, 0.0)
        if TEACHER_GRAD:
            gt = tl.where(mask_tc, gt, 0.0)
            if TEACHER_MODE == 0:  # t = mean_k z_k: its gradient reaches every branch with weight 1/K
                gz += gt / K
            else:  # t_r = sum_j W_rj z_j
                gz += tl.sum(w[:, :, None] * gt[:, None, :], axis=0)
                if WRITE_GW:
                    gw += tl.sum(gt[:, None, :] * z[None, :, :], axis=2)
        if WRITE_GZ:
            tl.store(gz_rows[:, None] + cols[None, :], (gz * scale).to(gz_ptr.dtype.element_ty), mask=mask)
        if WRITE_GT:
            tl.store(gt_rows[:, None] + cols[None, :], (gt * scale).to(gt_ptr.dtype.element_ty), mask=mask_tc)
    if WRITE_GW:
        if TEACHER_MODE == 3:
            # through the attention softmax of each auxiliary row: da_rj = (1/tau) W_rj (gW_rj - sum_j' W_rj' gW_rj')
            gw = tl.where(aux_tk, gw, 0.0)
            ga = tl.where(aux_tk, w * (gw - tl.sum(w * gw, axis=1)[:, None]) / attention_temperature, 0.0)
            if ATTN_SHARED:  # one row shared by every auxiliary's target: the rows' gradients add up
                ga = tl.zeros([TB, BLOCK_K], ACC) + tl.sum(ga, axis=0)[None, :]
            tl.store(gw_tile, ga * scale, mask=mask_ga)
        else:
            tl.store(gw_tile, gw * scale, mask=mask_tk)


@triton.jit
def _online_kd_bwd_kernel(
    z_ptr,
    stride_zb,
    stride_zk,
    stride_zc,
    y_ptr,
    stride_y,
    t_ptr,
    stride_tb,
    stride_tk,
    stride_tc,
    w_ptr,
    stride_wb,
    stride_wt,
    stride_wk,
    kdw_ptr,
    stats_ptr,
    summary_ptr,
    gout_ptr,
    stride_gout,
    gz_ptr,
    gt_ptr,
    gw_ptr,
    K,
    KT,
    C,
    ignore_index,
    temperature,
    label_smoothing,
    ce_weight,
    kd_weight,
    teacher_ce_weight,
    attention_temperature,
    cd_weight,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TB: tl.constexpr,
    TEACHER_MODE: tl.constexpr,
    PEER: tl.constexpr,
    DETACH_MASK: tl.constexpr,
    HAS_KD: tl.constexpr,
    HAS_KDW: tl.constexpr,
    TCE_MASK: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    WRITE_GZ: tl.constexpr,
    WRITE_GT: tl.constexpr,
    WRITE_GW: tl.constexpr,
    HAS_CD: tl.constexpr,
    CD_GRAD: tl.constexpr,
    ATTN_SHARED: tl.constexpr,
    STATS: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    ACC: tl.constexpr,
    B,  # rows
    ROWS_PER_PROGRAM: tl.constexpr,  # rows one program handles, one after another (launch_config)
):
    """_bwd_row for ROWS_PER_PROGRAM consecutive rows (the parameters are commented there)."""
    first = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    for i in tl.static_range(ROWS_PER_PROGRAM):
        if first + i < B:
            _bwd_row(
                first + i,
                z_ptr,
                stride_zb,
                stride_zk,
                stride_zc,
                y_ptr,
                stride_y,
                t_ptr,
                stride_tb,
                stride_tk,
                stride_tc,
                w_ptr,
                stride_wb,
                stride_wt,
                stride_wk,
                kdw_ptr,
                stats_ptr,
                summary_ptr,
                gout_ptr,
                stride_gout,
                gz_ptr,
                gt_ptr,
                gw_ptr,
                K,
                KT,
                C,
                ignore_index,
                temperature,
                label_smoothing,
                ce_weight,
                kd_weight,
                teacher_ce_weight,
                attention_temperature,
                cd_weight,
                BLOCK_K,
                BLOCK_C,
                TB,
                TEACHER_MODE,
                PEER,
                DETACH_MASK,
                HAS_KD,
                HAS_KDW,
                TCE_MASK,
                TEACHER_GRAD,
                MEAN,
                WRITE_GZ,
                WRITE_GT,
                WRITE_GW,
                HAS_CD,
                CD_GRAD,
                ATTN_SHARED,
                STATS,
                NUM_TERMS,
                ACC,
            )


# ---------------------------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------------------------


def _runnable(kernel, device: torch.device):
    """The kernel object that runs on ``device``. Triton decides interpretation when ``@triton.jit`` runs (at
    import of this module) and decorates its own standard library when ``triton`` is first imported, so
    TRITON_INTERPRET=1 must be in the environment before anything imports triton."""
    if device.type == "cuda":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    from okdfast.compat import patch_triton_interpreter

    patch_triton_interpreter()  # triton < 3.7's interpreter under numpy >= 2.4 (okdfast/compat.py)

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "okdfast: CPU tensors can only run the Triton kernels in Triton's interpreter, and TRITON_INTERPRET=1 was "
            "not set when triton was imported; start the process with TRITON_INTERPRET=1 (and OKDFAST_FORCE_TRITON=1)"
        )
    return kernel


def _acc(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


class _Layout:
    """The teacher's form as kernel arguments: mode, rows KT, and the (teacher, weights) pointers and strides.
    ``head``: MDE's head (a ``MDEHeadOptions``; ``weights`` are then the attention logits, (B, M) or (B, M, M))."""

    def __init__(self, logits, teacher, weights, weight_rows: int, head=None) -> None:
        batch, k, _ = logits.shape
        self.mode, self.rows = TEACHER_MEAN, 1
        self.t_arg, self.t_strides = logits, (0, 0, 0)
        self.w_arg, self.w_strides = logits, (0, 0, 0)
        self.head, self.attention_rows = head, 0
        if head is not None:
            a = weights.reshape(batch, -1, k - 1) if weights.dim() == 2 else weights  # a view, no copy
            self.mode, self.rows, self.w_arg, self.attention_rows = TEACHER_ATTENTION, k, a, a.shape[1]
            self.w_strides = (a.stride(0), 0 if a.shape[1] == 1 else a.stride(1), a.stride(2))
        elif teacher is not None:
            self.mode, self.t_arg = TEACHER_EXPLICIT, teacher
            if teacher.dim() == 2:
                self.t_strides = (teacher.stride(0), 0, teacher.stride(1))
            else:
                self.rows, self.t_strides = k, teacher.stride()
        elif weights is not None:
            self.mode, self.rows = TEACHER_WEIGHTS, weight_rows
            w = weights.reshape(-1, weight_rows, k) if weights.dim() == 2 else weights  # views, no copy
            self.w_arg = w
            self.w_strides = (0 if w.shape[0] == 1 else w.stride(0), w.stride(1), w.stride(2))

    def inputs(self, logits: torch.Tensor, target: torch.Tensor, kd_weight: torch.Tensor | None) -> tuple:
        """The pointer and stride arguments both row kernels start with: logits, labels, teacher, weights, kd."""
        teacher_args = (self.t_arg, *self.t_strides, self.w_arg, *self.w_strides)
        kd = logits if kd_weight is None else kd_weight  # any pointer where there is no kd tensor
        return (logits, *logits.stride(), target, target.stride(0), *teacher_args, kd)

    def scalars(self, logits: torch.Tensor, options) -> tuple:
        """The scalar arguments both row kernels share: K, KT, C, ignore_index and the options' numbers."""
        _, num_branches, num_classes = logits.shape
        numbers = (options.temperature, options.label_smoothing, options.ce_weight, options.kd_weight)
        numbers += (options.teacher_ce_weight,)
        numbers += (self.head.attention_temperature, self.head.cd_weight) if self.head else (1.0, 0.0)
        return (num_branches, self.rows, num_classes, options.ignore_index, *map(float, numbers))

    def teacher_ce_mask(self, options) -> int:
        """The rows of the teacher CE; MDE's head computes CE(target) at weight 0 too (it is logged)."""
        if self.head is None or options.teacher_ce_rows is None:
            return options.teacher_ce_mask(self.rows)
        return sum(1 << r for r in set(options.teacher_ce_rows))

    def constexprs(self, options, kd_weight: torch.Tensor | None, acc: torch.dtype, config: tuple) -> dict:
        """The specialisations both row kernels share (``config``: launch_config's result)."""
        block_k, tb, block_c, num_warps, rows_per_program = config
        cd = self.head is not None
        return {
            "BLOCK_K": block_k,
            "BLOCK_C": block_c,
            "TB": tb,
            "TEACHER_MODE": self.mode,
            "PEER": options.mode == "peer",
            "HAS_KD": options.kd_weight != 0.0 or kd_weight is not None,
            "HAS_KDW": kd_weight is not None,
            "TCE_MASK": self.teacher_ce_mask(options),
            "HAS_CD": cd,
            "STATS": stat_slots(block_k, cd),
            "NUM_TERMS": 4 if cd else 3,
            "ACC": tl.float64 if acc == torch.float64 else tl.float32,
            "ROWS_PER_PROGRAM": rows_per_program,
            "num_warps": num_warps,
        }


def online_kd_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    teacher_weights: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    options,
    weight_rows: int,
    block_c: int | None = None,
    num_warps: int | None = None,
    head=None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two launches: ``(loss, summary (4,), stats (B, 7, BLOCK_K))``.

    Inputs must be validated (``okdfast.ops.online_kd_options``); ``options`` is an ``OnlineKDOptions``.
    ``loss``: reduced ('mean' over the valid rows, 'sum') or the (B,) rows ('none'); ``summary``: mean ce,
    teacher_ce and kd over the valid rows, and their number; ``stats``: what the backward reads instead of a second
    pass over C. ``weight_rows``: the teacher rows of ``teacher_weights`` (1 shared, K per branch).

    ``head``: MDE's head (an ``MDEHeadOptions``; see :func:`mde_head_forward`): ``teacher_weights`` are the
    attention logits, the summary gains the CD term's mean (5,) and the statistics its coefficients.
    """
    batch, num_branches, num_classes = logits.shape
    device = logits.device
    acc = _acc(logits, teacher, teacher_weights)
    layout = _Layout(logits, teacher, teacher_weights, weight_rows, head)
    weighted = layout.mode in (TEACHER_WEIGHTS, TEACHER_ATTENTION)
    config = launch_config(num_branches, num_classes, layout.rows, weighted, block_c, num_warps, rows_per_program)
    shared = layout.constexprs(options, kd_weight, acc, config)
    loss_rows = torch.empty(batch, dtype=acc, device=device)
    terms = torch.empty(batch, shared["NUM_TERMS"], dtype=acc, device=device)
    stats = torch.empty(batch, shared["STATS"], config.block_k, dtype=acc, device=device)
    if batch > 0:
        _runnable(_online_kd_fwd_kernel, device)[(triton.cdiv(batch, config.rows_per_program),)](
            *layout.inputs(logits, target, kd_weight),
            loss_rows,
            terms,
            stats,
            *layout.scalars(logits, options),
            B=batch,
            **shared,
        )
    loss = torch.empty((), dtype=acc, device=device)
    summary = torch.empty(shared["NUM_TERMS"] + 1, dtype=acc, device=device)
    _runnable(_online_kd_reduce_kernel, device)[(1,)](
        loss_rows,
        terms,
        target,
        target.stride(0) if batch else 1,
        loss,
        summary,
        batch,
        options.ignore_index,
        MEAN=options.reduction == "mean",
        BLOCK_B=min(_pow2(batch), 1024),
        NUM_TERMS=shared["NUM_TERMS"],
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )
    return (loss_rows if options.reduction == "none" else loss), summary, stats


def online_kd_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    teacher_weights: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    summary: torch.Tensor,
    stats: torch.Tensor,
    options,
    weight_rows: int,
    needs: tuple[bool, bool, bool],
    block_c: int | None = None,
    num_warps: int | None = None,
    head=None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One launch: ``(d logits, d teacher, d teacher_weights)`` times ``grad_loss``, each None unless ``needs``
    asks for it (logits, teacher, weights). The logits' and teacher's gradients are contiguous, in their dtypes; the
    weights' is float32 in their shape (summed over the batch for a constant matrix). ``head``: MDE's head (the
    weights' gradient is then the attention logits', in their shape and dtype)."""
    batch, num_branches, num_classes = logits.shape
    device = logits.device
    acc = _acc(logits, teacher, teacher_weights)
    layout = _Layout(logits, teacher, teacher_weights, weight_rows, head)
    weighted = layout.mode in (TEACHER_WEIGHTS, TEACHER_ATTENTION)
    config = launch_config(num_branches, num_classes, layout.rows, weighted, block_c, num_warps, rows_per_program)
    shared = layout.constexprs(options, kd_weight, acc, config)
    if stats.shape[-2:] != (shared["STATS"], config.block_k):
        raise RuntimeError("online_kd_backward: stats were written with another BLOCK_K or head")
    need_z, need_t, need_w = needs
    need_t = need_t and teacher is not None
    need_w = need_w and teacher_weights is not None
    detach_mask, kl_trained = _detach_mask(options, layout, shared, config.tb)
    gz = torch.empty(logits.shape, dtype=logits.dtype, device=device) if need_z else None
    gt = torch.empty(teacher.shape, dtype=teacher.dtype, device=device) if need_t else None
    gw = _weights_gradient_buffer(layout, logits, acc) if need_w else None
    if batch > 0 and (need_z or need_t or need_w):
        placeholder = stats  # a pointer for the outputs not written
        _runnable(_online_kd_bwd_kernel, device)[(triton.cdiv(batch, config.rows_per_program),)](
            *layout.inputs(logits, target, kd_weight),
            stats,
            summary,
            grad_loss,
            grad_loss.stride(0) if grad_loss.dim() == 1 else 0,
            placeholder if gz is None else gz,
            placeholder if gt is None else gt,
            placeholder if gw is None else gw,
            *layout.scalars(logits, options),
            DETACH_MASK=detach_mask,
            TEACHER_GRAD=shared["TCE_MASK"] != 0 or kl_trained,
            MEAN=options.reduction == "mean",
            WRITE_GZ=need_z,
            WRITE_GT=need_t,
            WRITE_GW=need_w,
            CD_GRAD=head is not None and head.cd_weight != 0.0,
            ATTN_SHARED=layout.attention_rows == 1,
            B=batch,
            **shared,
        )
    if gw is not None:
        gw = _in_weights_shape(gw, teacher_weights, layout.rows, head is not None)
    return gz, gt, gw


def _detach_mask(options, layout, shared, tb: int) -> tuple[int, bool]:
    """The backward's detach bits (padded teacher rows, TB > KT, count as detached, so a fully detached teacher
    reads (1 << TB) - 1) and whether any KL term trains its teacher."""
    detach_mask = options.detach_mask(layout.rows) | ((1 << tb) - (1 << layout.rows) if tb > layout.rows else 0)
    if shared["PEER"]:
        detach_mask = 1 if options.detach_teacher else 0
    kl_trained = shared["HAS_KD"] and not shared["PEER"] and detach_mask != (1 << tb) - 1
    return detach_mask, kl_trained


def _weights_gradient_buffer(layout, logits: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Where the kernel writes the teacher weights' gradient: per row (B, KT, K), or for MDE's head the attention
    logits' (B, 1 or M, M), in the accumulation dtype."""
    batch, num_branches, _ = logits.shape
    if layout.head is not None:
        shape = (batch, layout.attention_rows, num_branches - 1)
    else:
        shape = (batch, layout.rows, num_branches)
    return torch.empty(shape, dtype=acc, device=logits.device)


def _in_weights_shape(gw: torch.Tensor, teacher_weights: torch.Tensor, rows: int, head: bool) -> torch.Tensor:
    """The weights' gradient in their shape and dtype, summed over the batch when one matrix served every row."""
    if not head:
        constant = (teacher_weights.dim() == 2 and rows > 1) or teacher_weights.shape[0] == 1
        gw = gw.sum(0) if constant else gw
    return gw.reshape(teacher_weights.shape).to(teacher_weights.dtype)
