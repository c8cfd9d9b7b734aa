"""F-style public functions of okdfast's fused ops (``torch.nn.functional`` conventions: (input, target),
``reduction=``, explicit ``temperature``). The ``nn.Module`` forms are in :mod:`okdfast.losses`.

Both are ``torch.library`` ops: the fused Triton kernel on CUDA, the reference on the CPU
(``okdfast.ops.dispatch``), traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from torch import Tensor

from okdfast.ops.classifier_diversity import classifier_diversity_loss as _classifier_diversity_loss
from okdfast.ops.online_kd import online_kd_loss_and_terms

__all__ = ["classifier_diversity_loss", "online_kd_loss", "online_kd_loss_and_terms"]


def online_kd_loss(
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
) -> Tensor:
    """The multi-branch online-KD loss in one fused pass (Li et al., ACCV 2020; ONE, CL-ILR, DML, OKDDip).

    Args:
        logits: (B, K, C) branch logits z_k, K >= 2; float32, bfloat16 or float16 (float64 too); any strides.
        target: (B,) int64 class ids in [0, C); rows equal to ``ignore_index`` contribute nothing.
        teacher: None (t = the mean of the K branch logits), (B, C) teacher logits t shared by every branch (a gate
            or FFM ensemble), or (B, K, C) one teacher per branch (CL-ILR, OKDDip).
        mode: 'ensemble' (every branch distils from its teacher) or 'peer' (DML: branch k distils from every other
            branch j != k, averaged over the K-1 peers; the teacher then only enters the teacher-CE term).
        temperature: T > 0 of the distillation softmax.
        ce_weight, kd_weight, teacher_ce_weight: weights of the three terms below (finite). ``kd_weight`` may also
            be a one-element tensor on the logits' device (e.g. a ramp-up w(e)): read on the device, no host sync,
            no recompile under torch.compile; it is treated as a constant.
        detach_teacher: no gradient into the KL targets (t, or z_j in peer mode). With ``teacher=None`` and
            False, the KL gradient reaches every branch through the mean. The teacher-CE term always trains t.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.

    Per non-ignored row b (y its label, CE_eps the label-smoothed cross-entropy, p^T(z) = softmax(z / T)):

        L_b = ce_weight * sum_k CE_eps(z_bk, y_b)
            + teacher_ce_weight * CE_eps(t_b, y_b)                     (sum_k CE_eps(t_bk, y_b) per-branch teacher)
            + kd_weight * T^2 * sum_k KL(p^T(t_bk) || p^T(z_bk))       ('ensemble')
            | kd_weight * T^2 * sum_k 1/(K-1) sum_{j!=k} KL(p^T(z_bj) || p^T(z_bk))     ('peer')

    Returns (float32; float64 for float64 inputs):
        reduction='mean': sum_b L_b divided by the number of non-ignored rows (not by B; NaN when every row is
            ignored, like ``F.cross_entropy``). With no ignored row this is the 'batchmean' of the KD literature.
        reduction='sum': sum_b L_b (ignored rows add 0).
        reduction='none': the (B,) rows L_b, 0 at ignored rows.

    At the defaults this is ``sum_k F.cross_entropy(z_k, y) + sum_k T^2 * F.kl_div(F.log_softmax(z_k / T),
    F.softmax(mean_k(z_k).detach() / T), reduction='batchmean')`` with T = 3.
    Gradients are computed in the forward pass (backward only scales them by grad_output); the op is
    once-differentiable: double backward raises.
    """
    loss, _ = online_kd_loss_and_terms(
        logits,
        target,
        teacher,
        mode=mode,
        temperature=temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        teacher_ce_weight=teacher_ce_weight,
        detach_teacher=detach_teacher,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss


def classifier_diversity_loss(weights: Tensor, *, eps: float = 1e-8) -> Tensor:
    """MDE's Classifier Diversification loss of the (K, C, D) branch classifier weights (K >= 2):

        L_CD = 2 / (K (K-1) C) * sum_{k<l} sum_c cos(w_kc, w_lc)^2        in [0, 1]

    i.e. the squared cosine similarity of every two branches' class-c weight vectors, averaged over the K(K-1)/2
    pairs and the C classes (a mean, so it does not grow with K or C). Norms below ``eps`` are clamped, as in
    ``F.normalize``. Returns a float32 scalar (float64 for float64 weights).
    """
    return _classifier_diversity_loss(weights, eps=eps)
