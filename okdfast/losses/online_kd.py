"""Thin ``nn.Module`` wrappers of :func:`okdfast.functional.online_kd_loss` and
:func:`okdfast.functional.classifier_diversity_loss`, keyword arguments as in the functions (torch's style)."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from okdfast.functional import classifier_diversity_loss
from okdfast.ops.mde_head import mde_head
from okdfast.ops.mde_head_options import MDEHeadOptions
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


class MDEHeadLoss(nn.Module):
    """``MDEHeadLoss(**options)(logits (B, K, C), target (B,), attention_logits, *, kd_weight=None)``: MDE's whole
    per-sample loss (:func:`okdfast.functional.mde_head_loss`); the options are the fields of ``MDEHeadOptions``,
    checked once here. ``kd_weight``: an optional one-element tensor multiplying ``options.kd_weight`` (a ramp-up).

    Example (an FFM over the auxiliaries' pooled features; the leader is the last branch)::

        ffm = FeatureFusionModule(channels, num_inputs=K - 1)
        criterion = MDEHeadLoss(cd_weight=1.0)
        loss = criterion(logits, y, ffm(pooled[:, :-1], logits[:, :-1]))
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = MDEHeadOptions(**options)

    def forward(
        self, logits: Tensor, target: Tensor, attention_logits: Tensor, *, kd_weight: Tensor | None = None
    ) -> Tensor:
        return mde_head(logits, target, attention_logits, self.options, kd_weight)[0]

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
