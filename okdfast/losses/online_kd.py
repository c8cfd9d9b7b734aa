"""Thin ``nn.Module`` wrappers of :func:`okdfast.functional.online_kd_loss` and
:func:`okdfast.functional.classifier_diversity_loss`, keyword arguments as in the functions (torch's style)."""

from __future__ import annotations

from torch import Tensor, nn

from okdfast.functional import classifier_diversity_loss, online_kd_loss


class OnlineKDLoss(nn.Module):
    """``OnlineKDLoss(**kwargs)(logits (B, K, C), target (B,), teacher=None)``: see
    :func:`okdfast.functional.online_kd_loss` for the equation, the arguments and what each reduction divides by.

    Example (a K-head model; the teacher is the mean of the heads, detached)::

        criterion = OnlineKDLoss(temperature=3.0)
        loss = criterion(torch.stack([head(x) for head in heads], dim=1), y)
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        self.mode = mode
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.teacher_ce_weight = teacher_ce_weight
        self.detach_teacher = detach_teacher
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor, teacher: Tensor | None = None) -> Tensor:
        return online_kd_loss(
            logits,
            target,
            teacher,
            mode=self.mode,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            kd_weight=self.kd_weight,
            teacher_ce_weight=self.teacher_ce_weight,
            detach_teacher=self.detach_teacher,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, temperature={self.temperature}, ce_weight={self.ce_weight}, "
            f"kd_weight={self.kd_weight}, teacher_ce_weight={self.teacher_ce_weight}, "
            f"detach_teacher={self.detach_teacher}, label_smoothing={self.label_smoothing}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )


class ClassifierDiversityLoss(nn.Module):
    """``ClassifierDiversityLoss(eps=1e-8)(weights (K, C, D))``: the mean squared cosine similarity of the branch
    classifiers' per-class weight vectors (:func:`okdfast.functional.classifier_diversity_loss`)."""

    def __init__(self, *, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weights: Tensor) -> Tensor:
        return classifier_diversity_loss(weights, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
