"""Pure-PyTorch references of every okdfast op: the spec, the CPU fallback and the test oracle.

The fused Triton kernels (``okdfast.kernels``) must equal these functions; tests and benchmarks import them from
here so they can never drift apart. Everything is computed in float32 (inputs are upcast) whatever the input dtype,
except float64, which stays float64 (:func:`upcast`).

Notation (docs/METHOD.md): B batch, K branches, C classes, z_k the logits of branch k, T the temperature,
p^T(z) = softmax(z / T), KL(p || q) = sum_c p_c (log p_c - log q_c), CE(z, y) = -log softmax(z)_y.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from okdfast.ops.online_kd_options import OnlineKDOptions, OnlineKDTerms, teacher_weight_layout


def upcast(x: Tensor) -> Tensor:
    """The compute dtype of every reference: float32, except that float64 stays float64 (so that
    ``torch.autograd.gradcheck`` can check the fused ops' CPU path against finite differences)."""
    return x if x.dtype == torch.float64 else x.float()


def smoothed_cross_entropy_rows(logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """Per-row cross-entropy with label smoothing, as ``F.cross_entropy(..., reduction='none')`` defines it.

    logits (..., C) float32, target (...) int64 (already valid class ids) -> (...) float32.
    CE_eps(z, y) = (1 - eps) * (-log p_y) + eps * mean_c(-log p_c).
    """
    log_prob = torch.log_softmax(logits, dim=-1)
    nll = -log_prob.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * log_prob.mean(dim=-1)


def kl_rows(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(p^T(teacher) || p^T(student)) summed over classes: (..., C), (..., C) -> (...)."""
    log_q = torch.log_softmax(teacher_logits / temperature, dim=-1)
    log_p = torch.log_softmax(student_logits / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def peer_kl_rows(logits: Tensor, temperature: float, detach_peers: bool) -> Tensor:
    """DML's peer term per branch: (1/(K-1)) sum_{j != k} KL(p^T(z_j) || p^T(z_k)).

    logits (B, K, C) float32 -> (B, K). With ``detach_peers`` the targets p^T(z_j) carry no gradient.
    """
    num_branches = logits.shape[1]
    log_p = torch.log_softmax(logits / temperature, dim=-1)  # (B, K, C) students
    log_q = log_p.detach() if detach_peers else log_p  # (B, K, C) the same rows, used as targets
    q = log_q.exp()
    neg_entropy = (q * log_q).sum(-1)  # (B, K): sum_c q_j log q_j, indexed by j
    cross = torch.einsum("bjc,bkc->bjk", q, log_p)  # (B, K, K): sum_c q_j log p_k
    kl = neg_entropy.unsqueeze(-1) - cross  # kl[b, j, k] = KL(q_j || p_k)
    off_diagonal = 1.0 - torch.eye(num_branches, dtype=kl.dtype, device=kl.device)
    return (kl * off_diagonal).sum(dim=1) / (num_branches - 1)


def reduce_rows(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Reduce per-row losses. 'mean' divides by the number of non-ignored rows (NaN when there are none, like
    ``F.cross_entropy``); 'sum' adds all rows; 'none' returns the (B,) rows, zero where ignored."""
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


class OnlineKDRows(NamedTuple):
    """Unweighted per-row terms of the online-KD loss, (B,) each; ``valid`` marks the non-ignored rows."""

    ce: Tensor  # sum_k CE_eps(z_bk, y_b)
    teacher_ce: Tensor  # sum over the teacher rows in teacher_ce_rows of CE_eps(t_bt, y_b); 0 at teacher_ce_weight 0
    kd: Tensor  # T^2 * sum_k KD_bk
    valid: Tensor  # (B,) bool


def teacher_rows(logits: Tensor, teacher: Tensor | None, teacher_weights: Tensor | None) -> Tensor:
    """The teachers as (B, Kt, C) rows in the compute dtype: Kt = 1 (one teacher shared by every branch) or K (one
    per branch). From explicit ``teacher`` logits (B, C) | (B, K, C); from ``teacher_weights`` W over the branches,
    t_k = sum_j W_kj z_j, with W (B, K) | (B, 1, K) shared, (B, K, K) | (K, K) | (1, K, K) per branch; or, with
    neither, the mean of the K branches (Kt = 1)."""
    z = upcast(logits)
    batch, num_branches, _ = z.shape
    if teacher is not None:
        t = upcast(teacher)
        return t.unsqueeze(1) if t.dim() == 2 else t
    if teacher_weights is None:
        return z.mean(dim=1, keepdim=True)
    rows, _ = teacher_weight_layout(teacher_weights, batch, num_branches)
    w = upcast(teacher_weights).to(z.dtype).reshape(-1, rows, num_branches).expand(batch, rows, num_branches)
    return torch.einsum("btj,bjc->btc", w, z)


def online_kd_rows_reference(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    teacher_weights: Tensor | None = None,
    options: OnlineKDOptions = OnlineKDOptions(),
) -> OnlineKDRows:
    """The unweighted per-row terms of :func:`online_kd_reference` (see there for the equations)."""
    z = upcast(logits)
    num_branches = z.shape[1]
    valid = target != options.ignore_index
    label = torch.where(valid, target, torch.zeros_like(target))
    eps, temp = options.label_smoothing, options.temperature

    t = teacher_rows(logits, teacher, teacher_weights)  # (B, Kt, C)
    ce = smoothed_cross_entropy_rows(z, label.unsqueeze(1).expand(-1, num_branches), eps).sum(1)
    chosen = [r for r in range(t.shape[1]) if options.teacher_ce_mask(t.shape[1]) >> r & 1]  # none at weight 0
    teacher_ce = smoothed_cross_entropy_rows(t[:, chosen], label.unsqueeze(1).expand(-1, len(chosen)), eps).sum(1)
    if options.mode == "ensemble":
        mask = options.detach_mask(t.shape[1])
        if mask in (0, (1 << t.shape[1]) - 1):  # none or every row detached
            kd_target = t.detach() if mask else t
        else:
            detached = torch.tensor([bool(mask >> r & 1) for r in range(t.shape[1])], device=t.device)
            kd_target = torch.where(detached.view(1, -1, 1), t.detach(), t)
        kd = kl_rows(kd_target.expand_as(z), z, temp)
    else:
        kd = peer_kl_rows(z, temp, detach_peers=options.detach_teacher)
    return OnlineKDRows(ce, teacher_ce, temp**2 * kd.sum(dim=1), valid)


def online_kd_reference(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    teacher_weights: Tensor | None = None,
    options: OnlineKDOptions = OnlineKDOptions(),
    kd_weight: Tensor | None = None,
) -> tuple[Tensor, OnlineKDTerms]:
    """The multi-branch online-KD loss and its logged terms. Per row b (a sample whose label is not ignore_index):

        L_b = ce_weight * sum_k CE_eps(z_bk, y_b)
            + teacher_ce_weight * sum_{t in teacher_ce_rows} CE_eps(t_bt, y_b)
            + kd_weight * T^2 * sum_k KD_bk

    with KD_bk = KL(p^T(t_bk) || p^T(z_bk)) in mode 'ensemble' (t_bk: the shared teacher, or branch k's own row;
    :func:`teacher_rows`) and KD_bk = (1/(K-1)) sum_{j != k} KL(p^T(z_bj) || p^T(z_bk)) in mode 'peer' (DML).
    ``detach_teacher`` stops the gradient into the KL targets (t, and through it W and the z_j it mixes; or z_j in
    peer mode), ``detached_teacher_rows`` into those of the listed teacher rows only; the teacher-CE term always
    back-propagates into the teacher. ``kd_weight``: an optional one-element
    tensor that multiplies ``options.kd_weight`` (a ramp-up on the device; no gradient flows into it).

    Reduction: 'mean' = sum_b L_b / (number of non-ignored rows), the 'batchmean' of the KD literature when no row is
    ignored; 'sum' = sum_b L_b; 'none' = (B,) with zeros at ignored rows. Terms: each unweighted term averaged over
    the non-ignored rows, detached. Float32 (float64 for float64 inputs).
    """
    rows = online_kd_rows_reference(logits, target, teacher, teacher_weights, options)
    total = options.ce_weight * rows.ce
    if options.teacher_ce_weight != 0.0:
        total = total + options.teacher_ce_weight * rows.teacher_ce
    if options.kd_weight != 0.0 or kd_weight is not None:
        weight = options.kd_weight if kd_weight is None else options.kd_weight * kd_weight.detach().reshape(())
        total = total + weight * rows.kd
    loss = reduce_rows(total, rows.valid, options.reduction)
    terms = OnlineKDTerms(*(reduce_rows(r.detach(), rows.valid, "mean") for r in (rows.ce, rows.teacher_ce, rows.kd)))
    return loss, terms


WEIGHT_CD_FORMS = ("frobenius", "abscos", "cos2")  # on the auxiliary classifiers' weights (M, C, D)
PREDICTION_CD_FORMS = ("nontarget_corr",)  # on the auxiliaries' outputs, per sample (in the MDE head op)
CD_FORMS = WEIGHT_CD_FORMS  # the forms classifier_diversity_reference takes


def classifier_diversity_reference(weights: Tensor, form: str = "frobenius", *, eps: float = 1e-8) -> Tensor:
    """MDE's weight-space Classifier Diversification (CD) loss over the pairs i < j of classifiers (docs/METHOD.md
    section 3).

    weights (M, C, D): the weight matrices W_i of M >= 2 classifiers (MDE: the K-1 auxiliary branches' FCs; the
    leader's never enters). P = M (M-1) / 2 pairs; ``form``:

        frobenius   L = sum_{i<j} ||W_i^T W_j||_F                   (first third-party re-implementation; asymmetric
                                                                     tri-training's term; not scale-free)
        abscos      L = (1 / (P C)) sum_{i<j} sum_c |cos(w_ic, w_jc)|     (second re-implementation; in [0, 1])
        cos2        L = (1 / (P C)) sum_{i<j} sum_c cos(w_ic, w_jc)^2     (scale-free, in [0, 1])

    w_ic is row c of W_i (class c's weight vector); cosines divide by max(norm, eps), as ``F.normalize`` does.
    Returns a float32 scalar (float64 for float64 weights).
    """
    w = upcast(weights)
    first, second = torch.triu_indices(w.shape[0], w.shape[0], offset=1, device=w.device)
    if form == "frobenius":
        cross = torch.einsum("pcd,pce->pde", w[first], w[second])  # (pairs, D, D): W_i^T W_j
        return torch.linalg.matrix_norm(cross).sum()
    if form not in ("abscos", "cos2"):
        raise ValueError(f"form={form!r}: use one of {', '.join(CD_FORMS)}")
    unit = F.normalize(w, dim=-1, eps=eps)
    cosine = (unit[first] * unit[second]).sum(dim=-1)  # (pairs, C)
    return cosine.abs().mean() if form == "abscos" else cosine.square().mean()


def nontarget_correlation_rows(aux_logits: Tensor, target: Tensor, temperature: float, eps: float = 1e-8) -> Tensor:
    """MDE's prediction-space CD term per sample: the mean over the pairs i < j of auxiliaries of the correlation of
    their tempered non-target probabilities (docs/METHOD.md section 3, ``--cd-form nontarget_corr``).

    aux_logits (B, M, C), M >= 2 and C >= 3; target (B,) valid class ids. For auxiliary i, p_i = softmax(z_i / T);
    r_i is p_i without its label's class (C - 1 values), centred over those classes; v_i = r_i / max(||r_i||, eps);
    the row's term is (1 / P) sum_{i<j} v_i . v_j, P = M (M-1) / 2: a Pearson correlation over the non-target classes,
    in [-1, 1], scale-free (the same for p_i and for any multiple of it). Minimising it makes the auxiliaries disagree
    about which wrong classes are likely (the "dark knowledge" that an ensemble averages), while the label's
    probability, left out, stays the task's. Returns (B,) in the compute dtype.
    """
    z = upcast(aux_logits)
    num_aux, num_classes = z.shape[1], z.shape[2]
    p = torch.softmax(z / temperature, dim=-1)
    keep = torch.ones_like(p, dtype=torch.bool).scatter(-1, target.view(-1, 1, 1).expand(-1, num_aux, 1), False)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    mean = torch.where(keep, p, zero).sum(-1, keepdim=True) / (num_classes - 1)
    centred = torch.where(keep, p - mean, zero)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(eps)
    first, second = torch.triu_indices(num_aux, num_aux, offset=1, device=z.device)
    return (unit[:, first] * unit[:, second]).sum(-1).mean(-1)


class MDEHeadRows(NamedTuple):
    """Unweighted per-row terms of MDE's head, (B,) each (see :func:`mde_head_reference`)."""

    ce: Tensor
    target_ce: Tensor
    kd: Tensor
    cd: Tensor
    valid: Tensor


def mde_teacher_weights(attention: Tensor, num_branches: int) -> Tensor:
    """MDE's two distillation levels as one (B, K, K) matrix of teacher weights over the branches: rows 0..K-2 are
    the auxiliaries' targets [a_i, 0] (``attention`` (B, M) shared by every auxiliary, or (B, M, M) one row each),
    row K-1 is the leader's target, the uniform mean of the M = K-1 auxiliaries."""
    batch, num_aux = attention.shape[0], num_branches - 1
    rows = attention.reshape(batch, -1, num_aux).expand(batch, num_aux, num_aux)
    leader = torch.full((batch, 1, num_aux), 1.0 / num_aux, dtype=attention.dtype, device=attention.device)
    return F.pad(torch.cat([rows, leader], dim=1), (0, 1))


def mde_head_rows_reference(logits: Tensor, target: Tensor, attention_logits: Tensor, options) -> MDEHeadRows:
    """The unweighted per-row terms of :func:`mde_head_reference` (``options``: an ``MDEHeadOptions``)."""
    z = upcast(logits)
    batch, num_branches, _ = z.shape
    shared = attention_logits.dim() == 2 or attention_logits.shape[1] == 1
    attention = torch.softmax(upcast(attention_logits).to(z.dtype) / options.attention_temperature, dim=-1)
    weights = mde_teacher_weights(attention, num_branches)
    leader = (num_branches - 1,) if options.detach_leader_target else None
    detached = tuple(range(num_branches)) if options.detach_target else leader
    kd_options = OnlineKDOptions(
        temperature=options.temperature,
        teacher_ce_weight=1.0,
        teacher_ce_rows=(0,) if shared else tuple(range(num_branches - 1)),
        detach_teacher=False,
        detached_teacher_rows=detached,
        label_smoothing=options.label_smoothing,
        ignore_index=options.ignore_index,
    )
    rows = online_kd_rows_reference(z, target, None, weights, kd_options)
    label = torch.where(rows.valid, target, torch.zeros_like(target))
    cd = nontarget_correlation_rows(z[:, :-1], label, options.temperature)
    target_ce = rows.teacher_ce if shared else rows.teacher_ce / (num_branches - 1)
    return MDEHeadRows(rows.ce, target_ce, rows.kd, cd, rows.valid)


def mde_head_reference(
    logits: Tensor, target: Tensor, attention_logits: Tensor, options, kd_weight: Tensor | None = None
):
    """MDE's whole per-sample loss head (docs/METHOD.md section 3) and its logged terms. Per non-ignored row b, with
    a = softmax(attention_logits / tau) over the M = K-1 auxiliaries, target_i = sum_j a_ij z_j (one shared row, or
    one per auxiliary), the leader's target mean_i z_i:

        L_b = sum_k CE_eps(z_bk, y_b) + target_ce_weight * mean_targets CE_eps(target_b, y_b)
            + kd_weight * T^2 [sum_i KL(p^T(target_bi) || p^T(z_bi)) + KL(p^T(mean_i z_bi) || p^T(z_bL))]
            + cd_weight * (1/P) sum_{i<j} corr(non-target p^T(z_bi), non-target p^T(z_bj))

    ``detach_target``: no gradient into the first-level KL targets (the FFM then learns from CE(target) alone);
    ``detach_leader_target``: none into the leader's target. ``kd_weight``: an optional one-element tensor that
    multiplies ``options.kd_weight`` (a ramp-up on the device). Reduction and terms as in
    :func:`online_kd_reference`; the cd term is reported even at cd_weight 0 (the diagnostic of an ablation).
    """
    from okdfast.ops.mde_head_options import MDEHeadTerms

    rows = mde_head_rows_reference(logits, target, attention_logits, options)
    total = rows.ce + options.target_ce_weight * rows.target_ce
    weight = options.kd_weight if kd_weight is None else options.kd_weight * kd_weight.detach().reshape(())
    total = total + weight * rows.kd
    if options.cd_weight != 0.0:
        total = total + options.cd_weight * rows.cd
    loss = reduce_rows(total, rows.valid, options.reduction)
    terms = MDEHeadTerms(*(reduce_rows(r.detach(), rows.valid, "mean") for r in rows[:4]))
    return loss, terms
