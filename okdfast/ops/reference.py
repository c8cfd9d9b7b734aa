"""Pure-PyTorch references of every okdfast op: the spec, the CPU fallback and the test oracle.

The fused Triton kernels (``okdfast.kernels``) must equal these functions; tests and benchmarks import them from
here so they can never drift apart. Everything is computed in float32 (inputs are upcast) whatever the input dtype,
except float64, which stays float64 (:func:`upcast`).

Notation (METHOD.md): B batch, K branches, C classes, z_k the logits of branch k, T the temperature,
p^T(z) = softmax(z / T), KL(p || q) = sum_c p_c (log p_c - log q_c), CE(z, y) = -log softmax(z)_y.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
KD_MODES = ("ensemble", "peer")


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
    """Unweighted per-row terms of the online-KD loss, float32, (B,) each; ``valid`` marks non-ignored rows."""

    ce: Tensor  # sum_k CE_eps(z_bk, y_b)
    teacher_ce: Tensor  # CE_eps(t_b, y_b)
    kd: Tensor  # T^2 * sum_k KD_bk
    valid: Tensor  # (B,) bool

    def weighted(
        self, ce_weight: float, teacher_ce_weight: float, kd_weight: float | Tensor, *, with_kd: bool
    ) -> Tensor:
        """L_b = ce_weight * CE + teacher_ce_weight * teacher CE [+ kd_weight * KD when ``with_kd``], per row; a
        zero teacher-CE weight leaves that term out of the sum rather than multiplying it by 0."""
        total = ce_weight * self.ce
        if teacher_ce_weight != 0.0:
            total = total + teacher_ce_weight * self.teacher_ce
        if with_kd:
            total = total + kd_weight * self.kd
        return total


def online_kd_rows_reference(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    *,
    mode: str = "ensemble",
    temperature: float = 3.0,
    detach_teacher: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> OnlineKDRows:
    """The three unweighted per-row terms of :func:`online_kd_loss_reference` (see there for the equations)."""
    z = upcast(logits)
    num_branches = z.shape[1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))

    t = z.mean(dim=1) if teacher is None else upcast(teacher)
    ce = smoothed_cross_entropy_rows(z, safe_target.unsqueeze(1).expand(-1, num_branches), label_smoothing).sum(1)
    if t.dim() == 2:
        teacher_ce = smoothed_cross_entropy_rows(t, safe_target, label_smoothing)
    else:  # per-branch teachers: the sum over k of CE(t_k, y)
        teacher_ce = smoothed_cross_entropy_rows(
            t, safe_target.unsqueeze(1).expand(-1, num_branches), label_smoothing
        ).sum(1)
    if mode == "ensemble":
        kd_target = t.detach() if detach_teacher else t
        if kd_target.dim() == 2:
            kd_target = kd_target.unsqueeze(1).expand_as(z)
        kd = kl_rows(kd_target, z, temperature)
    else:
        kd = peer_kl_rows(z, temperature, detach_peers=detach_teacher)
    return OnlineKDRows(ce, teacher_ce, temperature**2 * kd.sum(dim=1), valid)


def online_kd_loss_reference(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    *,
    mode: str = "ensemble",
    temperature: float = 3.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    teacher_ce_weight: float = 0.0,
    detach_teacher: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The multi-branch online-KD loss, per row b (a sample whose label is not ``ignore_index``):

        L_b = ce_weight * sum_k CE_eps(z_bk, y_b)
            + teacher_ce_weight * CE_eps(t_b, y_b)
            + kd_weight * T^2 * sum_k KD_bk

    with KD_bk = KL(p^T(t_bk) || p^T(z_bk)) in ``mode='ensemble'`` (t_bk = t_b for a shared (B, C) teacher, the
    k-th row of a per-branch (B, K, C) teacher, or the mean of the K branch logits when ``teacher`` is None) and
    KD_bk = (1/(K-1)) sum_{j != k} KL(p^T(z_bj) || p^T(z_bk)) in ``mode='peer'`` (DML).
    ``detach_teacher`` stops the gradient into the KL targets (t, or z_j in peer mode); the teacher-CE term always
    back-propagates into the teacher. With a per-branch teacher the teacher-CE term is sum_k CE_eps(t_bk, y_b).

    Reduction: 'mean' = sum_b L_b / (number of non-ignored rows), which is the 'batchmean' of METHOD.md when no
    row is ignored; 'sum' = sum_b L_b; 'none' = (B,) with zeros at ignored rows.
    Returns float32.
    """
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
    total = rows.weighted(ce_weight, teacher_ce_weight, kd_weight, with_kd=kd_weight != 0.0)
    return reduce_rows(total, rows.valid, reduction)


def classifier_diversity_loss_reference(weights: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Classifier Diversification (CD) loss on the branch classifiers' weights (MDE, METHOD.md section 3).

    weights (K, C, D): W_k of every branch classifier (any float dtype). For every class c the rows w_kc of the
    K classifiers are L2-normalised; the loss is the squared cosine similarity averaged over the K(K-1)/2 branch
    pairs (k < l) and the C classes:

        L_CD = 2 / (K (K-1) C) * sum_{k<l} sum_c cos(w_kc, w_lc)^2          in [0, 1]

    It is 0 when, for every class, the K branches' class vectors are mutually orthogonal, and it is invariant to
    the scale of W (so weight decay and lambda_CD do not fight over the norm). Squared rather than signed so that
    the minimum is "different" (orthogonal), not "opposite". Returns a float32 scalar.
    See okdfast/methods/mde.py for why this form and what the paper text does and does not confirm.
    """
    w = F.normalize(upcast(weights), dim=-1, eps=eps)  # (K, C, D)
    num_branches = w.shape[0]
    cosine = torch.einsum("kcd,lcd->klc", w, w)  # (K, K, C)
    first, second = torch.triu_indices(num_branches, num_branches, offset=1, device=w.device)
    return cosine[first, second].square().mean()


def ffm_attention_reference(
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
    """The attention of MDE's Feature Fusion Module and the teacher it builds (okdfast/models/ffm.py, METHOD.md 3):

        s = GAP(sum_k F_k)                   (B, D)   features (B, K, D, H, W): the branches' last-block features
        h = ReLU(BN(s W1^T))                 (B, R)   fc1_weight (R, D), BatchNorm1d(R) (bn_weight, bn_bias)
        a = softmax_k(h W2^T + b2)           (B, K)   fc2_weight (K, R), fc2_bias (K,)
        t = sum_k a_k z_k                    (B, C)   logits z (B, K, C)

    BatchNorm follows ``F.batch_norm``: ``training=True`` normalises with the batch statistics and, when the running
    statistics are given, updates them in place (``momentum``; running_var gets the unbiased variance);
    ``training=False`` uses the running statistics (required then). Returns (attention, teacher), computed in
    float32, or float64 when an input is float64 (so that ``gradcheck`` can check the op against it).
    """
    dtype = torch.promote_types(torch.promote_types(features.dtype, logits.dtype), torch.float32)
    s = features.to(dtype).sum(dim=1).mean(dim=(-2, -1))
    u = s @ fc1_weight.to(dtype).t()
    y = F.batch_norm(
        u, running_mean, running_var, bn_weight.to(dtype), bn_bias.to(dtype), training, momentum, eps
    )
    attention = torch.softmax(torch.relu(y) @ fc2_weight.to(dtype).t() + fc2_bias.to(dtype), dim=-1)
    teacher = torch.einsum("bk,bkc->bc", attention, logits.to(dtype))
    return attention, teacher
