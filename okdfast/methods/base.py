"""What every method shares: its output, its loss terms, the ramp-up, and the online-KD loss composition.

A method is an ``nn.Module`` that owns the network (and any gate / FFM / attention head) and knows what is trained
against what: ``forward(images) -> MethodOutput`` and ``loss(output, target, kd_weight) -> LossTerms``. Every
method expresses its teachers as weights over the branches, so the whole CE + KL part of its loss is one call of
the fused op (``okdfast.ops.online_kd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn

from okdfast.models import MultiBranchNet
from okdfast.models.ffm import FFM_INPUTS
from okdfast.models.grouped import BRANCH_IMPLS
from okdfast.ops.dispatch import fused_enabled
from okdfast.ops.online_kd import online_kd
from okdfast.ops.online_kd_options import OnlineKDOptions, temperature_error
from okdfast.ops.reference import PREDICTION_CD_FORMS, WEIGHT_CD_FORMS


class MethodOutput(NamedTuple):
    logits: Tensor  # (B, K, C) branch logits
    teacher_weights: Tensor | None = None  # W over the branches: (B, K) shared, (B, K, K) | (1, K, K) per branch
    attention: Tensor | None = None  # (B, K') | (B, R, K') weights of the method's attention (gate / FFM / peers)
    attention_logits: Tensor | None = None  # MDE: the FFM's logits before its softmax, (B, K-1) | (B, K-1, K-1)


class LossTerms(NamedTuple):
    total: Tensor  # the scalar that is back-propagated
    terms: dict[str, Tensor]  # detached scalars for logging: 'ce', 'kd', 'teacher_ce', 'cd', ...


CD_FORMS = PREDICTION_CD_FORMS + WEIGHT_CD_FORMS  # MDE's --cd-form choices (docs/METHOD.md section 3)
FFM_TARGETS = ("shared", "per-aux")


@dataclass
class MethodConfig:
    """Hyper-parameters of the online-KD methods (docs/METHOD.md sections 2-4)."""

    num_branches: int = 3
    temperature: float = 3.0  # T
    alpha: float = 1.0  # weight of the KD terms after ramp-up
    rampup_epochs: float = 80.0  # L of the sigmoid ramp-up w(e)
    detach_teacher: bool | None = None  # None: the method's reference-code default
    cd_weight: float | None = None  # lambda_CD of MDE; None: the form's default (methods/mde.py CD_DEFAULT_WEIGHTS)
    cd_form: str = "nontarget_corr"  # MDE's CD loss: nontarget_corr (per sample) | frobenius | abscos | cos2
    ffm: bool = True  # MDE: the FFM target (False: the mean of the auxiliary branches)
    ffm_input: str = "sum"  # MDE: what the FFM reads (models/ffm.py FFM_INPUTS)
    ffm_temperature: float = 1.0  # MDE: tau of the FFM's attention softmax
    ffm_targets: str = "shared"  # MDE: one target for all auxiliaries (shared) or one each (per-aux)
    target_ce: float = 1.0  # MDE: weight of CE(target, y)
    detach_leader_target: bool = True  # MDE: L_kl2 trains the leader only (False: the auxiliaries too, as OKDDip)
    label_smoothing: float = 0.0
    fused_loss: str = "auto"  # 'auto' | 'on' | 'off': the fused Triton op or the PyTorch reference
    branch_impl: str = "auto"  # 'auto' | 'loop' | 'grouped': how the K branches run (okdfast/models/grouped.py)

    def __post_init__(self) -> None:
        if not 1 <= self.num_branches <= 8:
            raise ValueError(f"num_branches={self.num_branches}: use 2..8 branches (1 only for 'baseline')")
        for name in ("temperature", "ffm_temperature"):
            message = temperature_error(getattr(self, name), name)
            if message:
                raise ValueError(message)
        if self.rampup_epochs < 0:
            raise ValueError(f"rampup_epochs={self.rampup_epochs}: must be >= 0")
        if self.fused_loss not in ("auto", "on", "off"):
            raise ValueError(f"fused_loss={self.fused_loss!r}: use 'auto', 'on' or 'off'")
        if self.branch_impl not in BRANCH_IMPLS:
            raise ValueError(f"branch_impl={self.branch_impl!r}: use one of {', '.join(BRANCH_IMPLS)}")
        if self.cd_form not in CD_FORMS:
            raise ValueError(f"cd_form={self.cd_form!r}: use one of {', '.join(CD_FORMS)}")
        if self.ffm_input not in FFM_INPUTS:
            raise ValueError(f"ffm_input={self.ffm_input!r}: use one of {', '.join(FFM_INPUTS)}")
        if self.ffm_targets not in FFM_TARGETS:
            raise ValueError(f"ffm_targets={self.ffm_targets!r}: use one of {', '.join(FFM_TARGETS)}")
        if self.cd_weight is not None and not self.cd_weight >= 0:
            raise ValueError(f"cd_weight={self.cd_weight}: must be >= 0")
        if not self.target_ce >= 0:
            raise ValueError(f"target_ce={self.target_ce}: must be >= 0")


def sigmoid_rampup(epoch: float, length: float) -> float:
    """w(e) = exp(-5 (1 - e/L)^2) for e < L, else 1 (Laine & Aila; OKDDip's get_current_consistency_weight)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


class Method(nn.Module):
    """Base class: subclasses set ``name``, build their network in ``__init__`` and implement forward/loss.

    Evaluation (okdfast.evaluate) reads every branch, their mean and their ensemble for every method, plus the
    method's own heads (:meth:`heads`), e.g. ONE's gate ensemble or a two-level method's leader. ``head_name`` is
    the head a results table reports as the method's own model; ``aux_branches`` the branches whose mean, ensemble
    and diversity a two-level method reports apart from its leader (None: no such split).
    """

    name: str = ""
    head_name: str | None = None  # the head a table reports: 'gate' (ONE), 'leader' (OKDDip, MDE); None: none
    aux_branches: int | None = None  # K-1 auxiliary branches before one leader (OKDDip, MDE); None: no leader
    layout_version: int = 1  # bumped when the method's parameters change meaning (old checkpoints are refused)
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

    def build_net(self, shared_trunk: bool = True) -> MultiBranchNet:
        """The method's K-branch network (okdfast/models/multibranch.py): every method builds it here, its branches
        run as ``config.branch_impl`` says ('auto' resolves for CUDA when available, else the CPU; the training
        loop passes the impl resolved for its device)."""
        return MultiBranchNet(
            self.arch,
            self.num_classes,
            self.config.num_branches,
            shared_trunk=shared_trunk,
            branch_impl=self.config.branch_impl,
        )

    def forward(self, images: Tensor) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:  # pragma: no cover
        raise NotImplementedError

    def heads(self, output: MethodOutput) -> dict[str, Tensor]:
        """The method's own classifiers besides the branches, (B, C) logits by name (evaluated on the test set)."""
        return {}

    def online_kd(
        self,
        output: MethodOutput,
        target: Tensor,
        kd_weight: Tensor | float,
        *,
        mode: str = "ensemble",
        detach_default: bool = True,
        teacher_ce_weight: float = 0.0,
        teacher_ce_rows: tuple[int, ...] | None = None,
        detached_teacher_rows: tuple[int, ...] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_k CE(z_k, y) + teacher_ce_weight * CE(t, y) + kd_weight * T^2 sum_k KD_k, batch-mean (docs/METHOD.md),
        with the teacher given as ``output.teacher_weights`` over the branches: one op call for all of it.

        ``kd_weight`` is alpha * w(e) (a device tensor from the train loop: no recompile per epoch; a float 0.0
        leaves the KD term out). ``detach_default`` is the method's reference-code choice for the KL target;
        ``--detach-teacher`` overrides it. ``detached_teacher_rows``: teacher rows whose KL target is always detached
        (MDE's leader target). ``--fused-loss`` (MethodConfig.fused_loss) picks the Triton kernels or
        the PyTorch reference ('auto': the kernels where they run). Returns the differentiable total and the
        detached, unweighted per-term means for logging.
        """
        detach = detach_default if self.config.detach_teacher is None else self.config.detach_teacher
        weight_tensor = kd_weight if isinstance(kd_weight, Tensor) else None
        with_kd = weight_tensor is not None or kd_weight != 0.0
        options = OnlineKDOptions(
            mode=mode,
            temperature=self.config.temperature,
            kd_weight=1.0 if weight_tensor is not None else float(kd_weight),
            teacher_ce_weight=teacher_ce_weight,
            teacher_ce_rows=teacher_ce_rows,
            detach_teacher=detach,
            detached_teacher_rows=detached_teacher_rows,
            label_smoothing=self.config.label_smoothing,
        )
        kernel = fused_enabled(self.config.fused_loss, output.logits)
        total, parts = online_kd(
            output.logits, target, None, output.teacher_weights, options, weight_tensor, kernel=kernel
        )
        terms = {"ce": parts.ce, "part_ce": parts.ce}
        if teacher_ce_weight != 0.0:
            terms |= {"teacher_ce": parts.teacher_ce, "part_teacher_ce": teacher_ce_weight * parts.teacher_ce}
        if with_kd:
            weight = kd_weight.detach().float().reshape(()) if weight_tensor is not None else float(kd_weight)
            terms |= {"kd": parts.kd, "part_kd": weight * parts.kd}
        return total, terms

    @classmethod
    def check_layout(cls, version: int | None, where: str) -> None:
        """Refuse a checkpoint written by an earlier layout of this method (``version``: what it recorded; None
        for checkpoints from before layouts were recorded, i.e. version 1) with one line naming the change."""
        version = 1 if version is None else version
        if version != cls.layout_version:
            raise ValueError(
                f"{where}: written by layout {version} of method {cls.name!r}, this okdfast builds layout "
                f"{cls.layout_version} ({cls.layout_change}); its weights do not fit: train it again"
            )

    layout_change: str = ""  # what the current layout_version changed, for the message above

    def diversified_classifiers(self) -> slice:
        """The branches whose classifiers the diagnostics compare (the auxiliaries of a two-level method)."""
        return slice(0, self.aux_branches)
