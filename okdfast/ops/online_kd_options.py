"""The options of the online-KD loss, spelled once: a typed object that the public function, the nn.Module, the
reference, the torch.library op (its schema is generated from these fields) and the kernel launcher all take.

Also the checks of the tensor arguments, made once at the Python boundary, before any work starts: every message
names the argument and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

KD_MODES = ("ensemble", "peer")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The temperatures at which the float32 loss is right to float rounding (docs/METHOD.md section 2): above the upper
# bound T^2 KL is a difference of nearly equal float32 logs multiplied by T^2 (at T = 1000 rows were off by 1%);
# below the lower one z / T overflows for ordinary logits. The one home of the bound: the config, the method and the
# op all check against it.
TEMPERATURE_RANGE = (0.01, 100.0)
DEFAULT_TEMPERATURE = 3.0  # T of the loss API and of every method (okdfast.methods.base.MethodConfig)


def temperature_problem(value: object) -> str | None:
    """What is wrong with a temperature (None when it is a number inside TEMPERATURE_RANGE); the callers name it."""
    low, high = TEMPERATURE_RANGE
    if not is_finite_number(value) or not bool(low <= value <= high):
        return (
            f"must be a number in [{low:g}, {high:g}] (outside it the float32 KL loses its precision or overflows; "
            "T = 1 is the plain softmax)"
        )
    return None


def temperature_error(value: object, name: str = "temperature") -> str | None:
    """The one-line complaint of a Python API about a temperature (``name=value: ...``), or None when it is fine."""
    problem = temperature_problem(value)
    return f"{name}={value!r}: {problem}" if problem else None


def split_kd_weight(kd_weight: float | Tensor, like: Tensor) -> tuple[float, Tensor | None]:
    """The public functions' ``kd_weight`` as (the options' float, the op's device tensor). A tensor goes to the op
    as it is; so does a Python float under torch.compile, as a 0-d tensor on ``like``'s device made by multiplying
    (a changing ramp-up weight then stays symbolic: one more compile for a dynamic value, none after, no graph
    break); in eager mode a float stays a float."""
    if isinstance(kd_weight, Tensor):
        return 1.0, kd_weight
    if torch.compiler.is_compiling():
        return 1.0, torch.ones((), dtype=torch.float32, device=like.device) * kd_weight
    return kd_weight, None


def is_finite_number(value: object) -> bool:
    """A finite real number (not a bool). Comparisons, not math.isfinite: under torch.compile a Python float that
    changed between calls arrives as a symbolic float (torch's automatic dynamic shapes), and a comparison of it is a
    guard on the property, not a graph break (a new temperature or label smoothing then neither raises nor
    recompiles while it stays valid)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | torch.SymFloat | torch.SymInt):
        return False
    return bool(value == value) and bool(-math.inf < value < math.inf)


def check_shared_options(options: object, finite: tuple[str, ...]) -> None:
    """The checks every loss op's options share: ``reduction``; the fields named in ``finite`` and
    ``label_smoothing`` finite numbers; ``label_smoothing`` in [0, 1]; ``ignore_index`` an int. Raises a ValueError
    naming the field."""
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"reduction={options.reduction!r}: use 'mean', 'sum' or 'none'")
    for name in (*finite, "label_smoothing"):
        value = getattr(options, name)
        if not is_finite_number(value):
            raise ValueError(f"{name}={value!r}: must be a finite number")
    if not 0.0 <= options.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={options.label_smoothing}: must be in [0, 1]")
    if not isinstance(options.ignore_index, int) or isinstance(options.ignore_index, bool):
        raise ValueError(f"ignore_index={options.ignore_index!r}: must be an int")


@dataclass(frozen=True)
class OnlineKDOptions:
    """How the per-row terms are weighted and reduced; see :func:`okdfast.functional.online_kd_loss`."""

    mode: str = "ensemble"  # 'ensemble': branch k distils from its teacher | 'peer': from every other branch (DML)
    temperature: float = DEFAULT_TEMPERATURE  # T of the distillation softmax
    ce_weight: float = 1.0  # weight of sum_k CE(z_k, y)
    kd_weight: float = 1.0  # weight of T^2 sum_k KL (times the device tensor kd_weight, when one is given)
    teacher_ce_weight: float = 0.0  # weight of the teachers' CE(t, y)
    teacher_ce_rows: tuple[int, ...] | None = None  # which teacher rows get that CE; None: every row
    detach_teacher: bool = True  # no gradient into the KL targets
    detached_teacher_rows: tuple[int, ...] | None = None  # KL targets detached even when detach_teacher is False
    label_smoothing: float = 0.0  # eps of every CE, as in F.cross_entropy
    ignore_index: int = -100  # rows with this label contribute nothing
    reduction: str = "mean"  # 'mean' over non-ignored rows | 'sum' | 'none' (B,)

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise ValueError(f"mode={self.mode!r}: use 'ensemble' (distil from the teacher) or 'peer' (DML)")
        check_shared_options(self, ("temperature", "ce_weight", "kd_weight", "teacher_ce_weight"))
        message = temperature_error(self.temperature)
        if message:
            raise ValueError(message)
        if not isinstance(self.detach_teacher, bool):
            raise ValueError(f"detach_teacher={self.detach_teacher!r}: must be True or False")
        for name in ("teacher_ce_rows", "detached_teacher_rows"):
            rows = getattr(self, name)
            if rows is not None and (
                not isinstance(rows, tuple)
                or not rows
                or any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < 8 for r in rows)
            ):
                raise ValueError(f"{name}={rows!r}: must be None or a non-empty tuple of teacher row indices (0..7)")
        if self.detached_teacher_rows is not None and self.mode == "peer":
            raise ValueError("detached_teacher_rows: mode='peer' has no teacher rows; use detach_teacher")

    def teacher_ce_mask(self, num_teacher_rows: int) -> int:
        """The rows that get the teacher CE as a bit mask (bit r: teacher row r); 0 without a teacher CE."""
        if self.teacher_ce_weight == 0.0:
            return 0
        rows = range(num_teacher_rows) if self.teacher_ce_rows is None else self.teacher_ce_rows
        return sum(1 << r for r in set(rows))

    def detach_mask(self, num_teacher_rows: int) -> int:
        """The teacher rows whose KL target is detached, as a bit mask (every row with detach_teacher)."""
        rows = range(num_teacher_rows) if self.detach_teacher else (self.detached_teacher_rows or ())
        return sum(1 << r for r in set(rows) if r < num_teacher_rows)

    @staticmethod
    def schema() -> str:
        """These fields as the trailing arguments of a torch.library schema, in field order."""
        kinds = {"str": "str", "float": "float", "bool": "bool", "int": "int", "tuple[int, ...] | None": "int[]?"}
        return ", ".join(f"{kinds[str(f.type)]} {f.name}" for f in dataclasses.fields(OnlineKDOptions))

    def as_args(self) -> tuple:
        """The field values in schema order (floats as floats, the row tuple as a list)."""
        values = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values.append(list(value) if isinstance(value, tuple) else float(value) if f.type == "float" else value)
        return tuple(values)

    @classmethod
    def from_args(cls, args: tuple | list) -> OnlineKDOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        values = dict(zip(names, args))
        for name in ("teacher_ce_rows", "detached_teacher_rows"):
            if values[name] is not None:
                values[name] = tuple(values[name])
        return cls(**values)


class OnlineKDTerms(NamedTuple):
    """The unweighted loss terms, each averaged over the non-ignored rows, detached (for logging)."""

    ce: Tensor  # sum_k CE(z_k, y)
    teacher_ce: Tensor  # CE of the teacher rows in teacher_ce_rows, summed
    kd: Tensor  # T^2 sum_k KD_k


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def teacher_weight_layout(teacher_weights: Tensor, batch: int, num_branches: int) -> tuple[int, bool]:
    """(teacher rows Kt, constant over the batch) for W of shape (B, K) | (B, K, K) | (K, K) | (1, K, K)."""
    shape = tuple(teacher_weights.shape)
    k = num_branches
    if teacher_weights.dim() == 3 and shape[1:] == (k, k) and shape[0] in (1, batch):
        return k, shape[0] == 1 and batch != 1
    if teacher_weights.dim() == 2 and shape[1] == k:
        if batch == k and shape[0] == k:
            raise ValueError(
                f"teacher_weights: shape {shape} is ambiguous with B = K = {k}: pass (B, 1, K) for one shared "
                f"teacher per sample or (1, K, K) for a constant per-branch matrix"
            )
        if shape[0] == batch:
            return 1, False
        if shape[0] == k:
            return k, True
    if teacher_weights.dim() == 3 and shape[1:] == (1, k) and shape[0] == batch:
        return 1, False
    raise ValueError(
        f"teacher_weights: expected (B, K) = ({batch}, {k}) for one shared teacher, (B, K, K) or (K, K) for one "
        f"teacher per branch (t_k = sum_j W_kj z_j), got {shape}"
    )


def validate_online_kd_inputs(
    logits: Tensor,
    target: Tensor,
    teacher: Tensor | None,
    teacher_weights: Tensor | None,
    kd_weight: Tensor | None,
    options: OnlineKDOptions,
) -> None:
    """Raise a ValueError naming the argument and the fix for anything the kernel must never see.

    The label range (every label in [0, C) or ignore_index) needs the labels' values: it is checked here for CPU
    tensors; on CUDA it would cost a host synchronisation, so it is checked only with OKDFAST_CHECK_TARGETS=1
    (ops.online_kd); an unchecked bad label makes its row's loss and gradients NaN, never an out-of-bounds read.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(
            f"logits: expected a (B, K, C) tensor of branch logits, got {_shape(logits)}; stack the K branches"
        )
    batch, num_branches, num_classes = logits.shape
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits: dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    if num_branches < 2:
        raise ValueError(f"logits: K={num_branches} branches; online KD needs K >= 2 (use F.cross_entropy for one)")
    if num_classes < 1:
        raise ValueError("logits: C=0 classes; every row needs at least one class")
    if not isinstance(target, Tensor) or target.shape != (batch,):
        raise ValueError(f"target: expected shape ({batch},) (one class id per row of logits), got {_shape(target)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target: dtype {target.dtype}; class ids must be int64 (use target.long())")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}; move them to one device")
    if teacher is not None and teacher_weights is not None:
        raise ValueError("teacher and teacher_weights: pass one of them (explicit teacher logits, or weights)")
    teacher_rows = 1
    if teacher is not None:
        if not isinstance(teacher, Tensor) or teacher.shape not in ((batch, num_classes), logits.shape):
            raise ValueError(
                f"teacher: expected ({batch}, {num_classes}) (shared) or {tuple(logits.shape)} (one per branch), "
                f"got {_shape(teacher)}; pass None to use the mean of the branch logits"
            )
        _check_float_on("teacher", teacher, logits.device)
        teacher_rows = num_branches if teacher.dim() == 3 else 1
    if teacher_weights is not None:
        if not isinstance(teacher_weights, Tensor):
            raise ValueError(f"teacher_weights: expected a tensor, got {_shape(teacher_weights)}")
        if options.mode == "peer":
            raise ValueError("teacher_weights: mode='peer' distils from the other branches themselves; use 'ensemble'")
        _check_float_on("teacher_weights", teacher_weights, logits.device)
        teacher_rows, _ = teacher_weight_layout(teacher_weights, batch, num_branches)
    for name in ("teacher_ce_rows", "detached_teacher_rows"):
        rows = getattr(options, name)
        if rows is not None and max(rows) >= teacher_rows:
            raise ValueError(f"{name}={rows}: the teacher has {teacher_rows} row(s) (0..{teacher_rows - 1})")
    if kd_weight is not None:
        if kd_weight.numel() != 1 or not kd_weight.is_floating_point() or kd_weight.device != logits.device:
            raise ValueError(
                f"kd_weight: a tensor weight must be a one-element float tensor on {logits.device}, got shape "
                f"{tuple(kd_weight.shape)}, {kd_weight.dtype} on {kd_weight.device}; or pass a Python float"
            )


def check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every label in [0, C) or ignore_index (reads the labels: a host sync on CUDA)."""
    if target.numel() == 0:
        return
    low, high = torch.aminmax(target)  # one pass: the common case, every label a class id, ends here
    if int(low) >= 0 and int(high) < num_classes:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target: class id {value} is outside [0, {num_classes}) and is not ignore_index={ignore_index}; "
            "fix the labels or the number of classes"
        )


def _check_float_on(name: str, tensor: Tensor, device: torch.device) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {tensor.dtype} is not supported; use float32, bfloat16 or float16")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logits on {device}; move them to one device")
