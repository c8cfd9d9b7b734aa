"""Thin ``nn.Module`` wrappers of :func:`okdfast.functional.online_kd_loss` and
:func:`okdfast.functional.classifier_diversity_loss`, keyword arguments as in the functions (torch's style)."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from okdfast.functional import classifier_diversity_loss
from okdfast.ops.online_kd import online_kd
from okdfast.ops.online_kd_options import OnlineKDOptions


class OnlineKDLoss(nn.Module):
    """``OnlineKDLoss(**options)(logits (B, K, C), target (B,), teacher=None, *, teacher_weights=None)``: the
    options are the keywords of :func:`okdfast.functional.online_kd_loss` (the fields of ``OnlineKDOptions``),
    checked once here; see that function for the equation and what each reduction divides by.

    Example (a K-head model; the teacher is the mean of the heads, detached)::

        criterion = OnlineKDLoss(temperature=3.0)
        loss = criterion(torch.stack([head(x) for head in heads], dim=1), y)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = OnlineKDOptions(**options)

    def forward(
        self, logits: Tensor, target: Tensor, teacher: Tensor | None = None, *, teacher_weights: Tensor | None = None
    ) -> Tensor:
        return online_kd(logits, target, teacher, teacher_weights, self.options)[0]

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))


class ClassifierDiversityLoss(nn.Module):
    """``ClassifierDiversityLoss(form='frobenius', eps=1e-8)(weights (M, C, D))``: MDE's CD loss
    (:func:`okdfast.functional.classifier_diversity_loss`)."""

    def __init__(self, form: str = "frobenius", *, eps: float = 1e-8) -> None:
        super().__init__()
        self.form = form
        self.eps = eps

    def forward(self, weights: Tensor) -> Tensor:
        return classifier_diversity_loss(weights, self.form, eps=self.eps)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, eps={self.eps}"
