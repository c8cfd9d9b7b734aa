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
from okdfast.models.multibranch import MAX_BRANCHES
from okdfast.ops.dispatch import FUSED_MODES, kernel_argument
from okdfast.ops.online_kd import online_kd
from okdfast.ops.online_kd_options import (
    DEFAULT_TEMPERATURE,
    TEMPERATURE_RANGE,
    OnlineKDOptions,
    temperature_problem,
)
from okdfast.ops.reference import PREDICTION_CD_FORMS, WEIGHT_CD_FORMS
from okdfast.utils.params import at_least, one_of, param, param_problems


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
KD_OFF = " (0 turns the KD terms off)"


def _branch_count(value: int) -> str | None:
    return None if 1 <= value <= MAX_BRANCHES else f"K must be between 2 and {MAX_BRANCHES} (1 only for baseline)"


@dataclass
class MethodConfig:
    """Hyper-parameters of the online-KD methods (docs/METHOD.md sections 2-4): each one's default, help text and
    check, written once here (``okdfast.utils.params``); the run's config (``okdfast.config.TrainConfig``) takes
    the same declarations for its flags."""

    num_branches: int = param(3, help="number of branches K", check=_branch_count)
    temperature: float = param(
        DEFAULT_TEMPERATURE,
        help=f"temperature T of the distillation softmax, in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]",
        check=temperature_problem,
    )
    alpha: float = param(
        1.0, help="weight of the KD terms after the ramp-up (0 turns distillation off)", check=at_least(0, KD_OFF)
    )
    rampup_epochs: float = param(80.0, help="length L of the KD ramp-up w(e), in epochs", check=at_least(0))
    detach_teacher: bool | None = param(
        None, help="stop the gradient into KD targets (default: each method's reference-code choice)"
    )
    cd_weight: float | None = param(
        None,
        help="lambda_CD, the weight of mde's CD loss (default: the --cd-form's, okdfast/methods/mde.py; 0 turns it "
        "off)",
        check=at_least(0, " (0 turns the CD loss off)"),
    )
    cd_form: str = param(
        "nontarget_corr",
        help="mde's Classifier Diversification loss over pairs of auxiliary branches: nontarget_corr (per sample: "
        "the correlation of their tempered non-target probabilities) | frobenius (sum ||W_i^T W_j||_F of the "
        "classifier weights) | abscos (mean |cos|) | cos2 (mean cos^2); docs/METHOD.md section 3",
        check=one_of(CD_FORMS),
    )
    ffm: bool = param(True, help="mde's FFM target (False: the mean of the auxiliary branches, an ablation)")
    ffm_input: str = param(
        "sum",
        help="what mde's FFM reads: sum | concat of the auxiliaries' pooled features, +logits (their logits, "
        "detached), or logits alone",
        check=one_of(FFM_INPUTS),
    )
    ffm_temperature: float = param(
        1.0, help="temperature tau of mde's FFM attention softmax (a = softmax(e / tau))", check=temperature_problem
    )
    ffm_targets: str = param(
        "shared",
        help="mde's FFM targets: shared (one target for every auxiliary) | per-aux (one each, (B, K-1, K-1))",
        check=one_of(FFM_TARGETS),
    )
    target_ce: float = param(
        1.0,
        help="weight of CE(target, y), the FFM target's own cross-entropy in mde's loss",
        check=at_least(0, " (0 drops CE(target, y))"),
    )
    detach_leader_target: bool = param(
        True,
        help="mde: detach the auxiliaries' mean that distils into the leader, so L_kl2 trains the leader only (our "
        "reading); --no-detach-leader-target lets it train the auxiliaries too, as OKDDip's code does",
    )
    label_smoothing: float = param(
        0.0,
        help="label smoothing eps of every cross-entropy, in [0, 1]",
        check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1], as in F.cross_entropy",
    )
    fused_loss: str = param(
        "auto",
        help="the online-KD loss and MDE's head: auto (the fused Triton op where it runs: CUDA; MDE's head not where "
        "a GPU benchmark measured it slower, okdfast/ops/fused_verdicts.json) | on (the op; an error where it "
        "cannot run) | off (the reference in plain PyTorch)",
        check=one_of(FUSED_MODES),
    )
    branch_impl: str = param(
        "auto",
        help="how the K branches run: loop (one after another) | grouped (as one network: grouped convs, one BN and "
        "one batched classifier over the K branches; same results) | auto (per device and arch, what "
        "benchmarks/bench_branches.py measured faster; okdfast/models/grouped.py)",
        check=one_of(BRANCH_IMPLS),
    )

    def __post_init__(self) -> None:
        for name, value, problem in param_problems(self):
            raise ValueError(f"{name}={value!r}: {problem}")


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
        kernel = kernel_argument(self.config.fused_loss)
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
