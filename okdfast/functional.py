"""F-style public functions of okdfast's losses (``torch.nn.functional`` conventions: (input, target),
``reduction=``, explicit ``temperature``). The ``nn.Module`` forms are in :mod:`okdfast.losses`.

The online-KD loss runs the fused Triton kernels where they run (CUDA) and the pure-PyTorch reference elsewhere
(``okdfast.ops.online_kd``); both are traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from torch import Tensor

from okdfast.ops.classifier_diversity import classifier_diversity_loss as _classifier_diversity_loss
from okdfast.ops.mde_head import mde_head
from okdfast.ops.mde_head_options import MDEHeadOptions, MDEHeadTerms
from okdfast.ops.online_kd import online_kd
from okdfast.ops.online_kd_options import DEFAULT_TEMPERATURE, OnlineKDOptions, OnlineKDTerms, split_kd_weight

__all__ = [
    "classifier_diversity_loss",
    "mde_head_loss",
    "mde_head_loss_and_terms",
    "online_kd_loss",
    "online_kd_loss_and_terms",
]


def online_kd_loss(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    *,
    teacher_weights: Tensor | None = None,
    mode: str = "ensemble",
    temperature: float = DEFAULT_TEMPERATURE,
    ce_weight: float = 1.0,
    kd_weight: float | Tensor = 1.0,
    teacher_ce_weight: float = 0.0,
    teacher_ce_rows: tuple[int, ...] | None = None,
    detach_teacher: bool = True,
    detached_teacher_rows: tuple[int, ...] | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The multi-branch online-KD loss (Li et al., ACCV 2020; ONE, CL-ILR, DML, OKDDip) in one fused pass.

    Args:
        logits: (B, K, C) branch logits z_k, K >= 2; float32, bfloat16 or float16 (float64 too); any strides.
        target: (B,) int64 class ids in [0, C); rows equal to ``ignore_index`` contribute nothing.
        teacher: explicit teacher logits: (B, C) shared by every branch, or (B, K, C) one per branch.
        teacher_weights: the teacher as weights W over the branches, formed in the kernel from the logits:
            t_r = sum_j W_rj z_j. (B, K) (or (B, 1, K)): one shared teacher per sample (ONE's gate);
            (B, K, K): a teacher per branch and sample (OKDDip's attention, MDE's FFM + leader mean); (K, K) (or
            (1, K, K)): a constant per-branch matrix (CL-ILR's mean of the others). Gradients flow into W when the
            teacher is trained (its CE, or an undetached KL target). With neither ``teacher`` nor
            ``teacher_weights``, t = the mean of the K branch logits.
        mode: 'ensemble' (branch k distils from its teacher) or 'peer' (DML: branch k distils from every other
            branch j != k, averaged over the K-1 peers; an explicit teacher then only enters the teacher-CE term).
        temperature: T > 0 of the distillation softmax.
        ce_weight, kd_weight, teacher_ce_weight: weights of the three terms below (finite). ``kd_weight`` may be a
            one-element tensor on the logits' device (a ramp-up w(e)): read on the device, no host sync, no
            recompile under torch.compile; no gradient flows into it.
        teacher_ce_rows: which teacher rows get the teacher CE (None: every row). MDE's auxiliary branches share
            one target in rows 0..K-2, so it trains it once with (0,).
        detach_teacher: no gradient into the KL targets (t, and through it W and the z_j it mixes; or z_j in
            peer mode). The teacher-CE term always trains the teacher.
        detached_teacher_rows: teacher rows whose KL target is detached even when ``detach_teacher`` is False
            (MDE: the leader's target, so the second-level KL trains the leader only).
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.

    Per non-ignored row b (y its label, CE_eps the label-smoothed cross-entropy, p^T(z) = softmax(z / T), t_bk the
    teacher of branch k):

        L_b = ce_weight * sum_k CE_eps(z_bk, y_b)
            + teacher_ce_weight * sum_{r in teacher_ce_rows} CE_eps(t_br, y_b)
            + kd_weight * T^2 * sum_k KL(p^T(t_bk) || p^T(z_bk))                         ('ensemble')
            | kd_weight * T^2 * sum_k 1/(K-1) sum_{j!=k} KL(p^T(z_bj) || p^T(z_bk))      ('peer')

    Returns (float32; float64 for float64 inputs):
        reduction='mean': sum_b L_b divided by the number of non-ignored rows (not by B; NaN when every row is
            ignored, like ``F.cross_entropy``): the 'batchmean' of the KD literature when no row is ignored.
        reduction='sum': sum_b L_b (ignored rows add 0).  reduction='none': the (B,) rows L_b, 0 at ignored rows.

    At the defaults this is ``sum_k F.cross_entropy(z_k, y) + sum_k T^2 * F.kl_div(F.log_softmax(z_k / T),
    F.softmax(mean_k(z_k).detach() / T), reduction='batchmean')`` with T = 3. Once-differentiable on the kernel
    path (double backward raises).
    """
    loss, _ = online_kd_loss_and_terms(
        logits,
        target,
        teacher,
        teacher_weights=teacher_weights,
        mode=mode,
        temperature=temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        teacher_ce_weight=teacher_ce_weight,
        teacher_ce_rows=teacher_ce_rows,
        detach_teacher=detach_teacher,
        detached_teacher_rows=detached_teacher_rows,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss


def online_kd_loss_and_terms(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None = None,
    *,
    teacher_weights: Tensor | None = None,
    kd_weight: float | Tensor = 1.0,
    **options,
) -> tuple[Tensor, OnlineKDTerms]:
    """:func:`online_kd_loss` and its unweighted terms ``OnlineKDTerms(ce, teacher_ce, kd)``, each averaged over
    the non-ignored rows and detached (from the same pass, for logging). ``options``: the other keywords of
    :func:`online_kd_loss` (the fields of :class:`okdfast.ops.OnlineKDOptions`)."""
    kd_float, weight_tensor = split_kd_weight(kd_weight, logits)
    opts = OnlineKDOptions(kd_weight=kd_float, **options)
    return online_kd(logits, target, teacher, teacher_weights, opts, weight_tensor)


def classifier_diversity_loss(weights: Tensor, form: str = "frobenius", *, eps: float = 1e-8) -> Tensor:
    """MDE's Classifier Diversification loss of M >= 2 classifiers' stacked weights (M, C, D), summed or averaged
    over the M(M-1)/2 pairs i < j (docs/METHOD.md section 3):

        'frobenius'  sum_{i<j} ||W_i^T W_j||_F
        'abscos'     mean over pairs and classes c of |cos(w_ic, w_jc)|
        'cos2'       mean over pairs and classes c of cos(w_ic, w_jc)^2      (scale-free, in [0, 1])

    w_ic is row c of W_i; norms below ``eps`` are clamped, as in ``F.normalize``. Returns a float32 scalar (float64
    for float64 weights), differentiable (the pure-PyTorch reference: a few kilobytes, no kernel of its own).
    """
    return _classifier_diversity_loss(weights, form, eps=eps)


def mde_head_loss(
    logits: Tensor,
    target: Tensor,
    attention_logits: Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    attention_temperature: float = 1.0,
    target_ce_weight: float = 1.0,
    kd_weight: float | Tensor = 1.0,
    cd_weight: float = 1.0,
    detach_target: bool = False,
    detach_leader_target: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """MDE's whole per-sample loss (Li et al., ACCV 2020; docs/METHOD.md section 3) from the branch logits and the
    FFM's attention logits: the attention softmax, the auxiliaries' target(s), the leader's mean, every CE and KL
    term and the prediction-space CD.

    Args:
        logits: (B, K, C) branch logits, the K-1 auxiliaries first and the group leader last; K = 3..8, C >= 3.
        target: (B,) int64 class ids; rows equal to ``ignore_index`` contribute nothing.
        attention_logits: the FFM's output before its softmax: (B, K-1) for one target shared by the auxiliaries,
            (B, K-1, K-1) for one target per auxiliary. Its gradient is returned (the FFM learns through it).
        temperature: T of the distillation softmax and of the CD's probabilities.
        attention_temperature: tau, a = softmax(attention_logits / tau).
        target_ce_weight, kd_weight, cd_weight: the weights below; ``kd_weight`` may be a one-element tensor (a
            ramp-up: no recompile, no host sync).
        detach_target: no gradient into the first-level KL targets; detach_leader_target: none into the leader's.

    Per non-ignored row b, with target_i = sum_j a_ij z_j (the same for every i with a shared target):

        L_b = sum_k CE(z_k, y) + target_ce_weight * mean_targets CE(target, y)
            + kd_weight * T^2 [sum_i KL(p^T(target_i) || p^T(z_i)) + KL(p^T(mean_i z_i) || p^T(z_leader))]
            + cd_weight * mean_{i<j} corr(non-target p^T(z_i), non-target p^T(z_j))

    Reduction as :func:`online_kd_loss`. Float32 (float64 for float64 inputs).
    """
    loss, _ = mde_head_loss_and_terms(
        logits,
        target,
        attention_logits,
        temperature=temperature,
        attention_temperature=attention_temperature,
        target_ce_weight=target_ce_weight,
        kd_weight=kd_weight,
        cd_weight=cd_weight,
        detach_target=detach_target,
        detach_leader_target=detach_leader_target,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss


def mde_head_loss_and_terms(
    logits: Tensor, target: Tensor, attention_logits: Tensor, *, kd_weight: float | Tensor = 1.0, **options
) -> tuple[Tensor, MDEHeadTerms]:
    """:func:`mde_head_loss` and its unweighted terms ``MDEHeadTerms(ce, target_ce, kd, cd)`` averaged over the
    non-ignored rows, detached (``cd`` is reported even at cd_weight 0). ``options``: the other keywords of
    :func:`mde_head_loss` (the fields of :class:`okdfast.ops.MDEHeadOptions`)."""
    kd_float, weight_tensor = split_kd_weight(kd_weight, logits)
    opts = MDEHeadOptions(kd_weight=kd_float, **options)
    return mde_head(logits, target, attention_logits, opts, weight_tensor)
