"""What every method shares: its output, its loss terms, the ramp-up, and the online-KD loss composition.

A method is an ``nn.Module`` that owns the network (and any gate / FFM / attention head) and knows what is trained
against what: ``forward(images) -> MethodOutput`` and ``loss(output, target, kd_scale) -> LossTerms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from okdfast.ops.dispatch import fused_enabled
from okdfast.ops.online_kd import online_kd_loss_and_terms
from okdfast.ops.reference import online_kd_rows_reference


class MethodOutput(NamedTuple):
    logits: Tensor  # (B, K, C) branch logits
    teacher: Tensor | None = None  # (B, C) shared or (B, K, C) per-branch KD targets; None: nothing distilled
    head: Tensor | None = None  # (B, C) logits of the method's own ensemble head (gate/FFM teacher, leader)
    attention: Tensor | None = None  # (B, K) weights over branches (gate / FFM), for logging


class LossTerms(NamedTuple):
    total: Tensor  # the scalar that is back-propagated
    terms: dict[str, Tensor]  # detached scalars for logging: 'ce', 'kd', 'teacher_ce', 'cd', ...


@dataclass
class MethodConfig:
    """Hyper-parameters of the online-KD methods (METHOD.md sections 2-4)."""

    num_branches: int = 3
    temperature: float = 3.0  # T
    alpha: float = 1.0  # weight of the KD terms after ramp-up
    rampup_epochs: float = 80.0  # L of the sigmoid ramp-up w(e)
    detach_teacher: bool | None = None  # None: the method's reference-code default
    cd_weight: float = 1.0  # lambda_CD of MDE (our choice: the paper text giving it was not reachable)
    label_smoothing: float = 0.0
    fused_loss: str = "auto"  # 'auto' | 'on' | 'off': the fused Triton op or the PyTorch reference
    fused_ffm: str = "auto"  # 'auto' | 'on' | 'off': MDE's fused FFM op (Triton on CUDA) or the eager module

    def __post_init__(self) -> None:
        if not 1 <= self.num_branches <= 8:
            raise ValueError(f"num_branches={self.num_branches}: use 2..8 branches (1 only for 'baseline')")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.rampup_epochs < 0:
            raise ValueError(f"rampup_epochs={self.rampup_epochs}: must be >= 0")
        if self.fused_loss not in ("auto", "on", "off"):
            raise ValueError(f"fused_loss={self.fused_loss!r}: use 'auto', 'on' or 'off'")


def sigmoid_rampup(epoch: float, length: float) -> float:
    """w(e) = exp(-5 (1 - e/L)^2) for e < L, else 1 (Laine & Aila; OKDDip's get_current_consistency_weight)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


class Method(nn.Module):
    """Base class: subclasses set ``name``, build their network in ``__init__`` and implement forward/loss."""

    name: str = ""
    has_head: bool = False  # True when MethodOutput.head is filled (evaluated as its own classifier)
    head_name: str = "head"  # what the head is called in metrics: 'gate', 'ffm', 'leader'
    default_branches: int = 3
    min_branches: int = 2
    max_branches: int = 8

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__()
        if config.num_branches < self.min_branches:
            raise ValueError(f"method {self.name!r} needs --branches >= {self.min_branches}, got {config.num_branches}")
        self.arch = arch
        self.num_classes = num_classes
        self.config = config

    def forward(self, images: Tensor) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, output: MethodOutput, target: Tensor, kd_scale: float | Tensor) -> LossTerms:  # pragma: no cover
        raise NotImplementedError

    def online_kd(
        self,
        logits: Tensor,
        target: Tensor,
        teacher: Tensor | None = None,
        *,
        kd_scale: float | Tensor,
        mode: str = "ensemble",
        detach_default: bool = True,
        teacher_ce_weight: float = 0.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_k CE(z_k, y) + teacher_ce_weight * CE(t, y) + kd_scale * T^2 sum_k KD_k, batch-mean (METHOD.md).

        ``detach_default`` is the method's reference-code choice for the KL target; ``--detach-teacher`` overrides
        it. Returns the differentiable total and the detached, unweighted per-term means for logging.
        ``--fused-loss`` (MethodConfig.fused_loss) picks the fused op ``okdfast::online_kd_loss`` (one pass, the
        logging terms from the same pass) or the PyTorch reference; 'auto' fuses where the Triton kernel runs.
        """
        detach = detach_default if self.config.detach_teacher is None else self.config.detach_teacher
        # a tensor kd_scale (the train loop passes one: no recompile per epoch) is never compared on the host
        with_kd = isinstance(kd_scale, Tensor) or kd_scale != 0.0
        if logits.shape[1] >= 2 and fused_enabled(self.config.fused_loss, logits):
            total, rows = online_kd_loss_and_terms(
                logits,
                target,
                teacher,
                mode=mode,
                temperature=self.config.temperature,
                kd_weight=kd_scale if with_kd else 0.0,
                teacher_ce_weight=teacher_ce_weight,
                detach_teacher=detach,
                label_smoothing=self.config.label_smoothing,
            )
            terms = {"ce": rows.ce.mean()}
            if teacher_ce_weight != 0.0:
                terms["teacher_ce"] = rows.teacher_ce.mean()
            if with_kd:
                terms["kd"] = rows.kd.mean()
            return total, terms
        rows = online_kd_rows_reference(
            logits,
            target,
            teacher,
            mode=mode,
            temperature=self.config.temperature,
            detach_teacher=detach,
            label_smoothing=self.config.label_smoothing,
        )
        ce = rows.ce.mean()
        terms = {"ce": ce.detach()}
        total = ce
        if teacher_ce_weight != 0.0:
            teacher_ce = rows.teacher_ce.mean()
            total = total + teacher_ce_weight * teacher_ce
            terms["teacher_ce"] = teacher_ce.detach()
        if with_kd:
            kd = rows.kd.mean()
            total = total + kd_scale * kd
            terms["kd"] = kd.detach()
        return total, terms

    @torch.no_grad()
    def predict(self, images: Tensor) -> MethodOutput:
        return self(images)
