"""The options of MDE's loss head, spelled once (the public function, the nn.Module, the reference, the torch.library
op's schema and the kernel launcher take this object), and the checks of its tensor arguments, made once at the
Python boundary before any work starts: every message names the argument and the fix.

The head (docs/METHOD.md section 3): K branches, the first M = K-1 auxiliaries and the leader last; the FFM's
attention logits, (B, M) for one target shared by the auxiliaries or (B, M, M) for one target per auxiliary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from okdfast.ops.online_kd_options import (
    DEFAULT_TEMPERATURE,
    FLOAT_DTYPES,
    OnlineKDOptions,
    check_shared_options,
    temperature_error,
)


@dataclass(frozen=True)
class MDEHeadOptions:
    """See :func:`okdfast.functional.mde_head_loss` for what each weight multiplies."""

    temperature: float = DEFAULT_TEMPERATURE  # T of the distillation softmax and of the prediction-space CD
    attention_temperature: float = 1.0  # tau of the attention softmax a = softmax(attention_logits / tau)
    target_ce_weight: float = 1.0  # weight of CE(target, y) (the mean over the targets with per-auxiliary targets)
    kd_weight: float = 1.0  # weight of both distillation levels (times the device tensor kd_weight, when given)
    cd_weight: float = 0.0  # lambda of the prediction-space CD term (the non-target correlation of the auxiliaries)
    detach_target: bool = False  # no gradient into the first-level KL target (then only CE(target) trains the FFM)
    detach_leader_target: bool = True  # no gradient into the leader's target (L_kl2 trains the leader only)
    label_smoothing: float = 0.0  # eps of every CE, as in F.cross_entropy
    ignore_index: int = -100  # rows with this label contribute nothing
    reduction: str = "mean"  # 'mean' over non-ignored rows | 'sum' | 'none' (B,)

    def __post_init__(self) -> None:
        for name in ("temperature", "attention_temperature"):
            message = temperature_error(getattr(self, name), name)
            if message:
                raise ValueError(message)
        check_shared_options(self, ("target_ce_weight", "kd_weight", "cd_weight"))
        for name in ("detach_target", "detach_leader_target"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")

    @staticmethod
    def schema() -> str:
        """These fields as the trailing arguments of a torch.library schema, in field order."""
        return ", ".join(f"{f.type} {f.name}" for f in dataclasses.fields(MDEHeadOptions))

    def as_args(self) -> tuple:
        return tuple(
            float(getattr(self, f.name)) if f.type == "float" else getattr(self, f.name)
            for f in dataclasses.fields(self)
        )

    @classmethod
    def from_args(cls, args: tuple | list) -> MDEHeadOptions:
        return cls(**dict(zip([f.name for f in dataclasses.fields(cls)], args)))


class MDEHeadTerms(NamedTuple):
    """The unweighted terms, each averaged over the non-ignored rows, detached (for logging)."""

    ce: Tensor  # sum_k CE(z_k, y) over the K branches
    target_ce: Tensor  # CE(target, y) (the mean over the targets with per-auxiliary targets)
    kd: Tensor  # T^2 [sum_i KL(p^T(target_i) || p^T(z_i)) + KL(p^T(mean_i z_i) || p^T(z_leader))]
    cd: Tensor  # the mean over the auxiliary pairs of their non-target correlation (computed even at weight 0)


def head_kd_options(options: MDEHeadOptions, num_branches: int, target_rows: int) -> OnlineKDOptions:
    """The CE + KL part of the head as the online-KD op's options over its (B, K, K) teacher rows (rows 0..K-2 the
    auxiliaries' targets, row K-1 the leader's): CE(target) on row 0 (one shared target) or the mean over the
    auxiliaries' rows, the leader's target detached with ``detach_leader_target``, every target with
    ``detach_target``."""
    shared = target_rows == 1
    leader = (num_branches - 1,) if options.detach_leader_target else None
    return OnlineKDOptions(
        temperature=options.temperature,
        kd_weight=options.kd_weight,
        teacher_ce_weight=options.target_ce_weight / (1 if shared else num_branches - 1),
        teacher_ce_rows=(0,) if shared else tuple(range(num_branches - 1)),
        detach_teacher=options.detach_target,
        detached_teacher_rows=None if options.detach_target else leader,
        label_smoothing=options.label_smoothing,
        ignore_index=options.ignore_index,
        reduction=options.reduction,
    )


MDE_HEAD_LAYOUTS = ("shared", "per-aux")  # one target shared by the auxiliaries, or one per auxiliary


def layout_name(shared: bool) -> str:
    """The layout's name in the benchmark rows and the fused verdicts: 'shared' or 'per-aux'."""
    return MDE_HEAD_LAYOUTS[0] if shared else MDE_HEAD_LAYOUTS[1]


def attention_layout(attention_logits: Tensor, batch: int, num_aux: int) -> int:
    """The number of target rows: 1 for (B, M) or (B, 1, M) (one target shared by the auxiliaries), M for
    (B, M, M) (one target per auxiliary). Raises a ValueError naming the shapes otherwise."""
    shape = tuple(attention_logits.shape)
    if shape in ((batch, num_aux), (batch, 1, num_aux)):
        return 1
    if shape == (batch, num_aux, num_aux):
        return num_aux
    raise ValueError(
        f"attention_logits: expected ({batch}, {num_aux}) (one target shared by the {num_aux} auxiliaries) or "
        f"({batch}, {num_aux}, {num_aux}) (one target per auxiliary), got {shape}; the leader (the last branch) "
        "takes no attention"
    )


def validate_mde_head_inputs(
    logits: Tensor, target: Tensor, attention_logits: Tensor, kd_weight: Tensor | None, options: MDEHeadOptions
) -> None:
    """Raise a ValueError naming the argument and the fix for anything the kernel must never see."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"logits: expected (B, K, C) branch logits, the auxiliaries first and the leader last, got {shape}"
        )
    batch, num_branches, num_classes = logits.shape
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits: dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    if not 3 <= num_branches <= 8:
        raise ValueError(f"logits: K={num_branches}; MDE's head needs 2..7 auxiliaries and one leader (K = 3..8)")
    if num_classes < 3:
        raise ValueError(f"logits: C={num_classes}; the head needs C >= 3 (its CD correlates the non-target classes)")
    if not isinstance(target, Tensor) or target.shape != (batch,):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target: expected shape ({batch},) (one class id per row of logits), got {shape}")
    if target.dtype != torch.int64:
        raise ValueError(f"target: dtype {target.dtype}; class ids must be int64 (use target.long())")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}; move them to one device")
    if not isinstance(attention_logits, Tensor):
        raise ValueError(f"attention_logits: expected a tensor, got {type(attention_logits).__name__}")
    if attention_logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"attention_logits: dtype {attention_logits.dtype} is not supported; use a float dtype")
    if attention_logits.device != logits.device:
        raise ValueError(
            f"attention_logits is on {attention_logits.device} but logits on {logits.device}; move them to one device"
        )
    attention_layout(attention_logits, batch, num_branches - 1)
    if kd_weight is not None and (
        kd_weight.numel() != 1 or not kd_weight.is_floating_point() or kd_weight.device != logits.device
    ):
        raise ValueError(
            f"kd_weight: a tensor weight must be a one-element float tensor on {logits.device}, got shape "
            f"{tuple(kd_weight.shape)}, {kd_weight.dtype} on {kd_weight.device}; or pass a Python float"
        )
