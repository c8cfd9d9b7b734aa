"""Benchmark of the fused loss ops (``okdfast.ops.online_kd``: the op a training step calls) against their PyTorch
reference, eager and under torch.compile, for the teacher forms the methods really use, from CIFAR shapes (B=128,
K=3..5, C=10/100) up to B=4096, K=4, C=32768; and the sweep of the kernels' launch configuration.

Claim under test (benchmarks/GPU.md): fused forward + backward >= 1.5x torch.compile of the reference at
128x4x100 with both under CUDA graphs, and >= 80% of the measured copy bandwidth at 4096x4x32768 bf16.

What is measured is data: ``SUBJECTS`` (an op with its inputs, its reference and its fused path: ``online_kd`` now;
a new fused op is one more ``Subject``) and ``PRESETS`` (lists of ``Combo(subject, form, shape)`` in measuring
order, with the implementations each one times). Adding a subject to the headline rows of a GPU visit is a Subject
and a line in ``PRESETS["headline"]``. Subjects: ``online_kd`` (the op with each method's teacher form) and
``mde_head`` (MDE's whole loss head, forms ``shared`` / ``per-aux``: its one-pass kernel ``fused``, the same head in
eager PyTorch ``reference`` and under torch.compile ``compiled``, and ``composed``, the fused online-KD op with the
attention softmax and the CD in PyTorch around it). ``launches_per_call``: the device activities one fwd+bwd call
launches (torch.profiler on CUDA; on the CPU the ATen ops an eager call dispatches).

Teacher forms of ``online_kd`` (``--forms``), each with the options its method passes (okdfast/methods/*.py):
    mean      t = mean of the K branches, detached (the op's defaults)
    explicit  a (B, C) teacher head trained by its own CE and the KL (``detach_teacher=False``)
    one       ONE: gate weights (B, K), one shared teacher, teacher CE, KL target trained
    mde       MDE: (B, K, K) weights (rows 0..K-2 the FFM target, row K-1 the leader's mean of the auxiliaries),
              teacher CE on row 0 only, the leader's row detached (teacher_ce_rows=(0,), detached_teacher_rows=(K-1,))
    okddip    OKDDip: (B, K, K) attention + leader row, KL targets trained
    cl_ilr    CL-ILR: a constant (K, K) matrix (the mean of the other branches)
    dml       DML: peer mode, peers detached
Every call gets ``kd_weight`` as a one-element device tensor, as the training loop passes the ramp-up.

Implementations (``--impls``): ``reference`` (eager reference), ``compiled`` (``torch.compile(reference,
fullgraph=True, dynamic=False)``), ``fused`` (the Triton op, what an eager step runs; no host sync, as in training)
and ``fused-compiled`` (the op inside torch.compile, what a ``--compile`` step runs). Where the kernels cannot run
(the CPU) the fused ones are replaced by ``op`` (the public op as a user calls it: its input checks, then the
reference under autograd, the CPU path). Every implementation is validated against the eager reference (loss and
every gradient) before it is timed.

Phases: ``fwd+bwd`` is the headline (``headline`` column): the loss and the gradients of every input that is
trained, what a step pays. ``fwd`` (inputs requiring grad: the fused forward also saves the statistics its backward
reads) and ``bwd`` (the forward rerun untimed before each sample) are timed apart and labelled as such; the split
differs between implementations (the reference saves activations, the op statistics), so compare fwd+bwd.
``timing``: ``stream`` (CUDA events around back-to-back calls) and, for shapes up to ``--graph-max-elements``
logits, ``cuda-graph`` (the calls captured in a CUDA graph and replayed: no launch overhead, as under
``--cuda-graphs``). GB/s: ``bytes_min`` is what any implementation must move (inputs read once, gradients written
once); ``kernel_bytes`` what the fused kernels move (logits read by the forward and again by the backward, the
gradient written); ``pct_copy_bw`` divides by the copy bandwidth measured on this machine (benchmarks/harness.py).
``launch`` names the launch configuration the fused kernels' heuristics chose (``kernels/online_kd.py``).
``speedup_vs_X`` (X = reference, compiled): X's median over the row's; ``verdict_vs_X``: whether the row's
implementation ``wins``, ``loses`` or ``cannot tell apart`` against X beyond the run's spread (the p20-p80 ranges,
``benchmarks.harness.verdict``): where a kernel loses, its row says so, and ``python -m benchmarks.fused_verdicts``
turns the GPU rows of ``mde_head`` into the verdicts its ``kernel=None`` default follows (okdfast/ops/fused_default.py).

``--sweep NAME``: the forward and backward kernels called through their host launchers with every ``block_c`` x
``num_warps`` x ``rows_per_program`` of ``SWEEPS[NAME]`` (MDE's head in the kernels' attention mode, then the
online-KD op's forms; per case the heuristic's choice first, then its neighbours, nearest first; with
``--time-budget`` each case gets an equal share of what is left), each validated against the reference, then
fwd, bwd and fwd+bwd timed (CUDA graphs at the small shape): rows with ``impl = fused-sweep``, the config, and the
registers and spills of the variants it compiled. The rows to choose the heuristics from. C is never split across
programs (a row's statistics are one program's).

``--time-budget``: no combination (or sweep config) starts unless its estimated time, first compiles included,
fits in what is left; the ones skipped are named. ``--tiny`` (a CPU rehearsal of a GPU visit) keeps the plan and
shrinks every shape, and compiles with the ``eager`` backend.

Rows are written to ``<results>/loss.csv`` as they are measured (untracked ``runs/bench/`` unless
``--results-dir`` / ``--commit-results`` / ``$OKDFAST_RESULTS_DIR``), the plot to ``loss_<device>.png``.

    python -m benchmarks.bench_loss --quick                       # every teacher form at 128x4x100, mde at 2 more
    python -m benchmarks.bench_loss                               # every default shape, forms mean explicit one mde
    python -m benchmarks.bench_loss --preset headline --time-budget 70   # a GPU visit's headline rows
    python -m benchmarks.bench_loss --sweep headline --time-budget 50    # the launch-configuration sweep
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    TimeBudget,
    Timing,
    add_output_arguments,
    append_row,
    copy_bandwidth_gbps,
    default_device,
    machine_columns,
    results_dir,
    time_cuda_graph,
    time_fn,
    verdict,
)
from okdfast.compat import compiled_kernels, raise_recompile_limit  # noqa: E402
from okdfast.ops.dispatch import triton_runs_on  # noqa: E402
from okdfast.ops.fused_default import DTYPE_NAMES  # noqa: E402
from okdfast.ops.mde_head import head_kernel_options, mde_head  # noqa: E402
from okdfast.ops.mde_head_options import MDE_HEAD_LAYOUTS, MDEHeadOptions  # noqa: E402
from okdfast.ops.online_kd import online_kd, teacher_is_trained  # noqa: E402
from okdfast.ops.online_kd_options import OnlineKDOptions, teacher_weight_layout  # noqa: E402
from okdfast.ops.reference import mde_head_reference, online_kd_reference  # noqa: E402

Shape = tuple[int, int, int]  # (B, K, C)
CIFAR_SHAPES = [(128, k, c) for c in (10, 100) for k in (3, 4, 5)]
SHAPES = CIFAR_SHAPES + [(1024, 4, 1000), (4096, 4, 1000), (4096, 4, 32768)]
CPU_SHAPES = CIFAR_SHAPES + [(1024, 4, 1000)]  # the larger ones take minutes per row on a CPU
QUICK_SHAPES = [(128, 4, 10), (128, 4, 100), (1024, 4, 1000)]
HEADLINE_SHAPES = [(128, 4, 100), (4096, 4, 32768)]
FORMS = ("mean", "explicit", "one", "mde", "okddip", "cl_ilr", "dml")
DEFAULT_FORMS = ["mean", "explicit", "one", "mde"]
PHASES = ("fwd+bwd", "fwd", "bwd")
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items() if dtype != torch.float64}  # fp32, bf16, fp16
GPU_IMPLS = ["reference", "compiled", "fused", "fused-compiled"]
CPU_IMPLS = ["reference", "op", "compiled"]
KERNEL_IMPLS = ("fused", "fused-compiled", "composed")  # the ones that run Triton kernels (composed: mde_head only)
# what a combination costs, for --time-budget (estimates, not measurements: a GPU visit's first compile is cold)
COLD_COMPILE_S, WARM_COMPILE_S, KERNEL_COMPILE_S = 25.0, 12.0, 3.0
LARGE_ELEMENTS = 2**26  # above this many logits the eager reference takes seconds per phase


# ---------------------------------------------------------------------------------------------------------------
# the online-KD op's inputs: the teacher forms of the methods
# ---------------------------------------------------------------------------------------------------------------


def form_options(form: str, num_branches: int) -> OnlineKDOptions:
    """The options each method passes to the op (okdfast/methods/<method>.py); kd_weight comes as a tensor."""
    if form == "mean":
        return OnlineKDOptions()
    if form in ("explicit", "one"):
        return OnlineKDOptions(teacher_ce_weight=1.0, detach_teacher=False)
    if form == "mde":
        return OnlineKDOptions(
            teacher_ce_weight=1.0,
            teacher_ce_rows=(0,),
            detach_teacher=False,
            detached_teacher_rows=(num_branches - 1,),
        )
    if form in ("okddip", "cl_ilr"):
        return OnlineKDOptions(detach_teacher=False)
    if form == "dml":
        return OnlineKDOptions(mode="peer", detach_teacher=True)
    raise ValueError(f"form {form!r}: use one of {', '.join(FORMS)}")


def _two_level(aux_rows: torch.Tensor) -> torch.Tensor:
    """(B, K-1, K-1) auxiliary rows -> (B, K, K): a zero leader column, then the leader's uniform row (as
    okdfast.methods.two_level.TwoLevelMethod.teacher_weights builds it)."""
    batch, aux, _ = aux_rows.shape
    leader = F.pad(torch.full((batch, 1, aux), 1.0 / aux, device=aux_rows.device), (0, 1))
    return torch.cat([F.pad(aux_rows, (0, 1)), leader], dim=1)


def make_inputs(shape: Shape, dtype: torch.dtype, form: str, device: torch.device, seed: int = 0, values: bool = True):
    """``(logits, target, teacher, teacher_weights, kd_weight)`` of one call; the trained ones require grad.
    ``values=False``: the logits and teacher uninitialised (only shapes, strides and dtypes matter: compile checks)."""
    batch, branches, classes = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device)

    def logits_like(*size: int) -> torch.Tensor:
        if not values:
            return torch.empty(*size, dtype=dtype, device=device).requires_grad_()
        return (randn(*size) * 3).to(dtype).requires_grad_()

    logits = logits_like(batch, branches, classes)
    target = torch.randint(0, classes, (batch,), generator=gen, device=device)
    teacher = weights = None
    if form == "explicit":
        teacher = logits_like(batch, classes)
    elif form == "one":
        weights = torch.softmax(randn(batch, branches), dim=-1).requires_grad_()
    elif form == "mde":
        attention = torch.softmax(randn(batch, 1, branches - 1), dim=-1).expand(-1, branches - 1, -1)
        weights = _two_level(attention).requires_grad_()
    elif form == "okddip":
        weights = _two_level(torch.softmax(randn(batch, branches - 1, branches - 1), dim=-1)).requires_grad_()
    elif form == "cl_ilr":
        weights = ((1.0 - torch.eye(branches, device=device)) / (branches - 1)).unsqueeze(0)  # (1, K, K) buffer
    kd_weight = torch.tensor([0.5], device=device)  # a ramp-up value on the device, as the training loop passes it
    return logits, target, teacher, weights, kd_weight


def trained_inputs(logits, teacher, weights) -> list[torch.Tensor]:
    return [x for x in (logits, teacher, weights) if x is not None and x.requires_grad]


def loss_fns(options: OnlineKDOptions) -> dict[str, Any]:
    def reference(logits, target, teacher, weights, kd_weight):
        return online_kd_reference(logits, target, teacher, weights, options, kd_weight.reshape(()))[0]

    def fused(logits, target, teacher, weights, kd_weight):
        return online_kd(logits, target, teacher, weights, options, kd_weight, kernel=True)[0]

    def op(logits, target, teacher, weights, kd_weight):  # the public op as a user calls it: checks, then dispatch
        return online_kd(logits, target, teacher, weights, options, kd_weight)[0]

    return {"reference": reference, "fused": fused, "op": op}


def bytes_moved(shape: Shape, dtype: torch.dtype, form: str) -> dict[str, dict[str, int]]:
    """Bytes per phase: ``min`` (inputs read once, gradients of the trained inputs written once) and ``kernel``
    (the fused kernels: the forward reads the inputs, the backward reads them again and writes the gradients)."""
    batch, branches, classes = shape
    size = torch.finfo(dtype).bits // 8
    logits = batch * branches * classes * size
    teacher = batch * classes * size if form == "explicit" else 0
    weights = batch * branches * branches * 4 if form in ("mde", "okddip") else batch * branches * 4 * (form == "one")
    reads = logits + teacher + weights + batch * 8  # + int64 labels
    writes = logits + teacher + weights  # the gradients (a detached mean has none besides the logits')
    return {
        "min": {"fwd": reads, "bwd": writes, "fwd+bwd": reads + writes},
        "kernel": {"fwd": reads, "bwd": reads + writes, "fwd+bwd": 2 * reads + writes},
    }


def estimated_reference_peak(shape: Shape) -> int:
    batch, branches, classes = shape
    return 16 * batch * branches * classes * 4  # ~a dozen fp32 (B, K, C) temporaries of the eager fwd + bwd


# ---------------------------------------------------------------------------------------------------------------
# subjects: what can be measured, as data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One measured call: its arguments, the inputs whose gradients it takes, the bytes it must move, and its
    implementations (name -> a function of ``*args`` returning the loss)."""

    args: tuple
    wrt: list[torch.Tensor]
    moved: dict[str, dict[str, int]]
    fns: dict[str, Callable]
    tolerance: float
    launch: str = ""  # the fused path's launch configuration, as its heuristics chose it


@dataclass(frozen=True)
class Subject:
    """An op under test: its forms (the options and inputs of each caller) and how to build one call."""

    name: str
    forms: tuple[str, ...]
    make_call: Callable[[str, Shape, torch.dtype, torch.device], Call]


def online_kd_launch(shape: Shape, teacher, weights) -> str:
    """The launch configuration (BLOCK_K, TB, BLOCK_C, num_warps, rows per program) the kernels' heuristics pick
    for this call."""
    from okdfast.kernels.online_kd import launch_config

    batch, branches, classes = shape
    rows = teacher_weight_layout(weights, batch, branches)[0] if weights is not None else 0
    rows = rows or (branches if teacher is not None and teacher.dim() == 3 else 1)
    return launch_config(branches, classes, rows, weights is not None).describe()


def online_kd_call(form: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Call:
    args = make_inputs(shape, dtype, form, device)
    logits, _, teacher, weights, _ = args
    return Call(
        args=args,
        wrt=trained_inputs(logits, teacher, weights),
        moved=bytes_moved(shape, dtype, form),
        fns=loss_fns(form_options(form, shape[1])),
        tolerance=1e-4 if dtype == torch.float32 else 2e-2,
        launch=online_kd_launch(shape, teacher, weights),
    )


# ---- MDE's whole loss head (okdfast.ops.mde_head): the attention softmax, targets, CE, KL and the CD in one pass
MDE_HEAD_FORMS = MDE_HEAD_LAYOUTS  # one target shared by the auxiliaries, or one each (--ffm-targets)
MDE_HEAD_OPTIONS = MDEHeadOptions(cd_weight=1.0)  # --cd-form nontarget_corr at its weight; T 3, tau 1


def mde_head_inputs(shape: Shape, dtype: torch.dtype, form: str, device: torch.device, seed: int = 0):
    """``(logits, target, attention_logits, kd_weight)``: the FFM's attention logits (B, M) or (B, M, M)."""
    batch, branches, classes = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(batch, branches, classes, generator=gen, device=device) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=gen, device=device)
    rows = (branches - 1,) if form == "per-aux" else ()
    attention = torch.randn(batch, *rows, branches - 1, generator=gen, device=device).to(dtype).requires_grad_()
    return logits, target, attention, torch.tensor([0.5], device=device)


def mde_head_call(form: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Call:
    if form not in MDE_HEAD_FORMS:
        raise ValueError(f"mde_head form {form!r}: use one of {', '.join(MDE_HEAD_FORMS)}")
    args = mde_head_inputs(shape, dtype, form, device)
    logits, _, attention, _ = args
    options = MDE_HEAD_OPTIONS
    size = torch.finfo(dtype).bits // 8
    batch = shape[0]
    reads = logits.numel() * size + attention.numel() * size + batch * 8
    writes = logits.numel() * size + attention.numel() * size

    def reference(z, y, a, w):  # the same head in eager PyTorch: the spec
        return mde_head_reference(z, y, a, options, w.reshape(()))[0]

    def fused(z, y, a, w):  # the one-pass kernel
        return mde_head(z, y, a, options, w, kernel=True)[0]

    def composed(z, y, a, w):  # the fused online-KD op with the attention softmax and the CD in PyTorch around it
        return mde_head(z, y, a, options, w, kernel="composed")[0]

    def op(z, y, a, w):  # the public op as a user calls it
        return mde_head(z, y, a, options, w)[0]

    return Call(
        args=args,
        wrt=[logits, attention],
        moved={
            "min": {"fwd": reads, "bwd": writes, "fwd+bwd": reads + writes},
            "kernel": {"fwd": reads, "bwd": reads + writes, "fwd+bwd": 2 * reads + writes},
        },
        fns={"reference": reference, "fused": fused, "composed": composed, "op": op},
        tolerance=1e-4 if dtype == torch.float32 else 2e-2,
        launch=head_launch_config(shape).describe(),
    )


SUBJECTS: dict[str, Subject] = {
    "online_kd": Subject("online_kd", FORMS, online_kd_call),
    "mde_head": Subject("mde_head", MDE_HEAD_FORMS, mde_head_call),
}


class Combo(NamedTuple):
    subject: str
    form: str
    shape: Shape
    impls: tuple[str, ...] | None = None  # None: every implementation of the run (--impls, else the device's)


@dataclass(frozen=True)
class Preset:
    combos: tuple[Combo, ...]
    dtypes: tuple[str, ...] = ("bf16",)


_SMALL, _LARGE = HEADLINE_SHAPES
_TARGET_IMPLS = ("reference", "compiled", "fused")  # what the targets compare
_OTHER_SHAPES = ((128, 4, 10), (1024, 4, 1000), (4096, 4, 1000))
# MDE's head (issue 20): the one-pass kernel against the same head eager and compiled, and the composition it replaced
MDE_HEAD_SHAPES = ((128, 4, 10), (128, 4, 100), (1024, 4, 100), (4096, 4, 32768))
_HEAD_IMPLS = ("reference", "compiled", "fused", "composed")
PRESETS: dict[str, Preset] = {
    # a GPU visit's first loss step: what MDE trains through, its whole head (the one-pass kernel, the same head
    # eager and compiled, the composition it replaced), at the two shapes the targets name, bf16
    "headline": Preset(tuple(Combo("mde_head", "shared", s, _HEAD_IMPLS) for s in HEADLINE_SHAPES)),
    # the rest of the head's grid (128x4x10, 128x4x100, 1024x4x100, 4096x4x32768 in fp32 and bf16; headline has
    # the bf16 headline shapes), and one target per auxiliary
    "mde-head": Preset(
        tuple(Combo("mde_head", "shared", s, _HEAD_IMPLS) for s in (MDE_HEAD_SHAPES[0], MDE_HEAD_SHAPES[2]))
        + (Combo("mde_head", "per-aux", _SMALL, _HEAD_IMPLS),)
    ),
    "mde-head-fp32": Preset(tuple(Combo("mde_head", "shared", s, _HEAD_IMPLS) for s in MDE_HEAD_SHAPES), ("fp32",)),
    # the second visit: the online-KD op with every teacher form at the headline shapes (MDE's two-level weights
    # first), the op inside torch.compile
    "forms": Preset(
        tuple(Combo("online_kd", "mde", s, _TARGET_IMPLS + ("fused-compiled",)) for s in HEADLINE_SHAPES)
        + tuple(Combo("online_kd", f, s, _TARGET_IMPLS) for s in HEADLINE_SHAPES for f in FORMS if f != "mde")
    ),
    # every teacher form at the headline shapes first, then the others (all implementations)
    "suite": Preset(
        tuple(Combo("online_kd", f, s) for s in HEADLINE_SHAPES for f in ("mde", "one", "explicit", "mean"))
        + tuple(Combo("online_kd", f, s) for s in _OTHER_SHAPES for f in ("mde", "one"))
    ),
}
# --quick: every teacher form at the CIFAR-100 shape, the paper's at the two other quick shapes
QUICK = tuple(Combo("online_kd", f, (128, 4, 100)) for f in FORMS) + tuple(
    Combo("online_kd", "mde", s) for s in QUICK_SHAPES if s != (128, 4, 100)
)


def tiny(shape: Shape) -> Shape:
    """--tiny: the same K, a few rows, C small (C > 1000 stays longer than one block of the kernels)."""
    batch, branches, classes = shape
    return (min(batch, 8), branches, 40 if classes > 1000 else min(classes, 10))


# ---------------------------------------------------------------------------------------------------------------
# validation, phases
# ---------------------------------------------------------------------------------------------------------------


def validate(fn, reference, call: Call) -> float:
    """Max error of fn's loss and gradients relative to the largest reference value (raises when too large)."""
    got = [fn(*call.args)]
    got += torch.autograd.grad(got[0], call.wrt)
    expected = [reference(*call.args)]
    expected += torch.autograd.grad(expected[0], call.wrt)
    return _worst_error(got, expected, call.tolerance)


def _worst_error(got: list[torch.Tensor], expected: list[torch.Tensor], tol: float) -> float:
    worst = 0.0
    for a, b in zip(got, expected):
        scale = b.float().abs().max().clamp_min(1e-12)
        worst = max(worst, ((a.float() - b.float()).abs().max() / scale).item())
    if not worst <= tol:
        raise AssertionError(f"validation failed: relative error {worst:.2e} > {tol}")
    return worst


def phase_calls(fn, call: Call) -> dict[str, tuple]:
    """{phase: (timed call, untimed setup before each sample)}; gradients by autograd.grad (nothing accumulates)."""
    state: dict[str, torch.Tensor] = {}

    def forward():
        state["loss"] = fn(*call.args)

    def backward():
        torch.autograd.grad(state["loss"], call.wrt)

    def both():
        torch.autograd.grad(fn(*call.args), call.wrt)

    return {"fwd+bwd": (both, None), "fwd": (forward, None), "bwd": (backward, forward)}


def make_impl(impl: str, call: Call, backend: str):
    if impl in ("reference", "fused", "op", "composed"):
        if impl not in call.fns:
            raise ValueError(f"--impls {impl}: this subject has no such implementation (it has {', '.join(call.fns)})")
        return call.fns[impl]
    # a fresh torch.compile per combination: dynamic=False specialises each shape, as a training run does
    base = call.fns["reference"] if impl == "compiled" else call.fns["fused"]
    return torch.compile(base, fullgraph=True, dynamic=False, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> Shape:
    """'128x4x100' -> (128, 4, 100)."""
    return tuple(int(n) for n in text.lower().split("x"))


def plan(args: argparse.Namespace, on_gpu: bool) -> list[tuple[Combo, str]]:
    """(combination, dtype) in the order they are measured (the headline ones first)."""
    if args.preset:  # one or more presets, each in its own dtypes, in the order given; --shapes keeps those shapes
        keep = {parse_shape(shape) for shape in args.shapes} if args.shapes else None
        return [
            (combo._replace(shape=tiny(combo.shape)) if args.tiny else combo, dtype)
            for name in args.preset
            for dtype in (args.dtype or PRESETS[name].dtypes)
            for combo in PRESETS[name].combos
            if keep is None or combo.shape in keep
        ]
    else:
        if args.quick and not args.shapes and not args.forms:
            combos = list(QUICK)
        else:
            shapes = QUICK_SHAPES if args.quick else (SHAPES if on_gpu else CPU_SHAPES)
            if args.shapes:
                shapes = [parse_shape(shape) for shape in args.shapes]
            forms = args.forms or (list(FORMS) if args.quick else DEFAULT_FORMS)
            combos = [Combo("online_kd", f, s) for s in shapes for f in forms]
        dtypes = args.dtype or (["bf16", "fp32"] if on_gpu else ["fp32"])
    if args.tiny:
        combos = [c._replace(shape=tiny(c.shape)) for c in combos]
    return [(combo, d) for d in dtypes for combo in combos]


def impls_for(combo: Combo, args: argparse.Namespace, fused_here: bool) -> list[str]:
    impls = list(args.impls or combo.impls or (GPU_IMPLS if fused_here else CPU_IMPLS))
    if not fused_here and any(i in KERNEL_IMPLS for i in impls):  # the CPU: the op is the reference itself
        impls = [i for i in impls if i not in KERNEL_IMPLS] + ([] if "op" in impls else ["op"])
    return impls


def estimate_s(combo: Combo, impls: list[str], compiled_before: int, on_gpu: bool) -> float:
    """Seconds a combination takes, first compiles included (for --time-budget; estimates)."""
    compiles = sum("compiled" in i for i in impls)
    seconds = sum(COLD_COMPILE_S if compiled_before + n == 0 else WARM_COMPILE_S for n in range(compiles))
    seconds += KERNEL_COMPILE_S * sum(i in KERNEL_IMPLS for i in impls)
    elements = math.prod(combo.shape)
    return seconds + (4.0 * len(impls) if elements > LARGE_ELEMENTS or not on_gpu else 1.5 * len(impls))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    fused_here = triton_runs_on(device) and (on_gpu or args.tiny)
    if args.impls and any(i in KERNEL_IMPLS for i in args.impls) and not fused_here:
        print("fused (Triton): needs a CUDA GPU; timing the public op instead (on a CPU it is the reference itself)")
    combos = plan(args, on_gpu)
    # one function compiled for every combination: raise the recompile limit, and fail rather than fall back to
    # eager silently when it is reached (a 'compiled' row must be compiled)
    raise_recompile_limit(4 * len(combos) + 16)
    memory = torch.cuda.get_device_properties(device).total_memory if on_gpu else 24 * 2**30
    copy_gbps = copy_bandwidth_gbps(device)
    base = machine_columns("loss", device) | {"torch_threads": torch.get_num_threads(), "copy_gbps": round(copy_gbps)}
    folder = results_dir(args.results_dir, args.commit_results)
    budget = TimeBudget(args.time_budget)
    print(f"device {base['device_name']}: measured copy bandwidth {copy_gbps:.0f} GB/s; rows -> {folder}/loss.csv")
    rows: list[dict[str, Any]] = []
    args.failures = 0
    compiled = 0
    for combo, dtype_name in combos:
        impls = impls_for(combo, args, fused_here)
        label = f"{combo.subject} {combo.form} {dtype_name} {'x'.join(map(str, combo.shape))}"
        need = estimate_s(combo, impls, compiled, on_gpu)
        if args.time_budget is not None and budget.seconds - budget.elapsed() < need:
            print(f"time budget: skipped {label} (needs ~{need:.0f} s, {budget.seconds - budget.elapsed():.0f} s left)")
            continue
        if estimated_reference_peak(combo.shape) > 0.8 * memory:
            print(f"{label}: skipped, the eager reference would need more memory")
            continue
        rows += run_combo(args, device, impls, combo, dtype_name, base, folder, copy_gbps)
        compiled += sum("compiled" in i for i in impls)
    if args.failures:
        print(f"{args.failures} implementation(s) failed: see the error column of {folder}/loss.csv")
    return rows


def count_launches(fn, call: Call, device: torch.device) -> tuple[int | str, str]:
    """(launches of one fwd+bwd call, how they were counted). On CUDA: the device activities torch.profiler records
    (kernels, memsets, copies); on the CPU: the ATen ops dispatched (each one launch or more on a GPU), eager only
    (a compiled CPU function runs Inductor's C++ loops: no count)."""
    both = phase_calls(fn, call)["fwd+bwd"][0]
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            both()
            torch.cuda.synchronize(device)
        cuda = torch.autograd.DeviceType.CUDA
        return sum(1 for e in prof.events() if e.device_type == cuda), "cuda activities (torch.profiler)"
    if isinstance(fn, Callable) and hasattr(fn, "_torchdynamo_orig_callable"):
        return "", ""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        both()
    return Count.n, "aten ops dispatched (cpu, eager)"


def measure(args, device, fn, reference, call: Call, graphed: bool) -> tuple[float, list[tuple[str, str, Any]]]:
    """Validate ``fn`` against the eager reference, then time its phases: (max error, [(phase, timing, Timing)])."""
    error = validate(fn, reference, call)
    calls = phase_calls(fn, call)
    timings = []
    for phase, (timed, setup) in calls.items():
        if phase in args.phases:
            timing = time_fn(timed, device, warmup=args.warmup, repeats=args.repeats, setup=setup)
            timings.append((phase, "stream", timing))
    if graphed and "fwd+bwd" in args.phases:
        timings.append(("fwd+bwd", "cuda-graph", time_cuda_graph(calls["fwd+bwd"][0], device, repeats=args.repeats)))
    return error, timings


def _where(combo: Combo, dtype_name: str) -> dict[str, Any]:
    batch, branches, classes = combo.shape
    return {"subject": combo.subject, "form": combo.form, "shape": "x".join(map(str, combo.shape)), "batch": batch,
            "branches": branches, "classes": classes, "dtype": dtype_name}  # fmt: skip


def _rates(moved: dict, phase: str, seconds: float, copy_gbps: float, fused: bool) -> dict[str, Any]:
    return {
        "bytes_min": moved["min"][phase],
        "gbps": round(moved["min"][phase] / seconds / 1e9, 2),
        "pct_copy_bw": round(100 * moved["min"][phase] / seconds / 1e9 / copy_gbps, 1),
        "kernel_bytes": moved["kernel"][phase] if fused else "",
        "kernel_pct_copy_bw": round(100 * moved["kernel"][phase] / seconds / 1e9 / copy_gbps, 1) if fused else "",
    }


COMPARED_WITH = ("reference", "compiled")  # every row's speedup_vs_X and verdict_vs_X columns


def comparisons(timing: Timing, others: dict[str, Timing | None]) -> dict[str, Any]:
    """``speedup_vs_X`` (X's median over this one's) and ``verdict_vs_X`` (:func:`benchmarks.harness.verdict`:
    'wins', 'loses' or 'cannot tell apart'; where a fused row loses, it says so) for each X measured before it."""
    row: dict[str, Any] = {}
    for name, other in others.items():
        row[f"speedup_vs_{name}"] = round(other.median_ms / timing.median_ms, 3) if other else ""
        row[f"verdict_vs_{name}"] = verdict(timing, other) if other and other is not timing else ""
    return row


def run_combo(args, device, impls, combo: Combo, dtype_name, base, folder, copy_gbps) -> list[dict[str, Any]]:
    call = SUBJECTS[combo.subject].make_call(combo.form, combo.shape, DTYPES[dtype_name], device)
    reference = call.fns["reference"]
    graphed = device.type == "cuda" and math.prod(combo.shape) <= args.graph_max_elements
    measured: dict[tuple[str, str, str], Timing] = {}
    rows = []
    where = _where(combo, dtype_name)
    for impl in impls:
        try:
            fn = make_impl(impl, call, args.compile_backend)
            error, timings = measure(args, device, fn, reference, call, graphed)
            launches, counted = count_launches(fn, call, device)
        except Exception as failure:  # a failed validation or a crash costs this implementation, not the run
            if type(failure).__name__ == "FailOnRecompileLimitHit":  # a flaw of this benchmark, not of a kernel
                raise
            traceback.print_exc()
            message = f"{type(failure).__name__}: {failure}"[:500]
            append_row("loss", base | where | {"impl": impl, "error": message}, folder)
            print(f"{combo.form} {dtype_name} {where['shape']} {impl}: FAILED ({message})", flush=True)
            args.failures += 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for phase, timing_mode, timing in timings:
            measured[(impl, phase, timing_mode)] = timing
            fused = impl in KERNEL_IMPLS
            row = base | where | {"impl": impl, "phase": phase, "timing": timing_mode, "headline": phase == "fwd+bwd"}
            row |= timing.as_row() | _rates(call.moved, phase, timing.median_ms * 1e-3, copy_gbps, fused)
            row |= {"max_rel_error": error, "compile_backend": args.compile_backend if "compiled" in impl else ""}
            row["launch"] = call.launch if fused else ""
            row |= {"launches_per_call": launches, "launches_counted": counted}
            row |= comparisons(timing, {other: measured.get((other, phase, timing_mode)) for other in COMPARED_WITH})
            append_row("loss", row, folder)
            rows.append(row)
            ratios = [
                f"x{row[f'speedup_vs_{other}']:.2f} vs {other} ({row[f'verdict_vs_{other}']})"
                for other in COMPARED_WITH
                if other != impl and row[f"speedup_vs_{other}"] != ""
            ]
            print(
                f"{combo.form:8s} {dtype_name:4s} {row['shape']:>14s} {impl:14s} {phase:7s} {timing_mode:10s} "
                f"{timing.median_ms:9.4f} ms [{timing.p20_ms:.4f}, {timing.p80_ms:.4f}] {row['gbps']:8.1f} GB/s "
                f"({row['pct_copy_bw']:5.1f}% copy)  " + "  ".join(ratios),
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# --sweep: the kernels' launch configuration
# ---------------------------------------------------------------------------------------------------------------


class SweepCase(NamedTuple):
    form: str
    shape: Shape
    block_c: tuple[int, ...]
    num_warps: tuple[int, ...]
    rows_per_program: tuple[int, ...] = (1,)
    subject: str = "online_kd"  # or mde_head: the head's attention mode of the same kernels, its CD co-moments on


SWEEPS: dict[str, tuple[SweepCase, ...]] = {
    "headline": (
        # MDE's head first, what --method mde trains through: one block covers the row at 128x4x100 (how many warps,
        # whether a program should take several of the 128 rows); C in chunks at 4096x4x32768 (how long a chunk)
        SweepCase("shared", (128, 4, 100), (64, 128), (1, 2, 4, 8), (1, 2, 4), "mde_head"),
        SweepCase("shared", (4096, 4, 32768), (128, 256, 512, 1024), (4, 8, 16), subject="mde_head"),
        # the online-KD op's MDE form (the head without the attention softmax and the CD)
        SweepCase("mde", (128, 4, 100), (64, 128), (1, 2, 4, 8), (1, 2, 4)),
        SweepCase("mde", (4096, 4, 32768), (128, 256, 512, 1024), (4, 8, 16)),
    ),
}
TINY_SWEEP = (  # the interpreter takes seconds per config: the head's grid, the op's rows per program
    SweepCase("shared", (4, 4, 40), (16, 32), (1, 2), (1, 3), "mde_head"),
    SweepCase("mde", (4, 4, 40), (32,), (1,), (1, 3)),
)

SweepConfig = tuple[int, int, int]  # (block_c, num_warps, rows_per_program)


def sweep_order(default: SweepConfig, case: SweepCase) -> list[SweepConfig]:
    """(block_c, num_warps, rows_per_program): the heuristic's choice first, then the grid by distance from it
    (log2 steps summed), so that a time budget cuts the configurations farthest from the default."""
    grid = {(c, w, r) for c in case.block_c for w in case.num_warps for r in case.rows_per_program} | {default}

    def distance(config: SweepConfig) -> tuple[float, SweepConfig]:
        return sum(abs(math.log2(x / d)) for x, d in zip(config, default)), config

    return sorted(grid, key=distance)


def launcher_calls(
    call: Call, form: str, block_c: int, num_warps: int, rows_per_program: int = 1
) -> dict[str, Callable]:
    """fwd, bwd and fwd+bwd of the online-KD kernels through their host launchers at a forced launch config, with
    the arguments the op passes (``okdfast.ops.online_kd``); ``state`` keeps the last forward's outputs."""
    logits, target, teacher, weights, kd_weight = call.args
    batch, branches, _ = logits.shape
    options = form_options(form, branches)
    kd = kd_weight.detach().reshape(()).to(torch.float32)
    weight_rows = teacher_weight_layout(weights, batch, branches)[0] if weights is not None else 0
    rows = weight_rows or (branches if teacher is not None and teacher.dim() == 3 else 1)
    trained = teacher_is_trained(options, True, rows)
    needs = (logits.requires_grad, teacher is not None and trained, weights is not None and trained)
    needs = (needs[0], needs[1] and teacher.requires_grad, needs[2] and weights.requires_grad)
    z, t = logits.detach(), None if teacher is None else teacher.detach()
    w = None if weights is None else weights.detach()
    config = {"block_c": block_c, "num_warps": num_warps, "rows_per_program": rows_per_program}
    return _launcher_phases((z, target, t, w, kd, options, weight_rows), needs, config)


def head_launcher_calls(call: Call, block_c: int, num_warps: int, rows_per_program: int = 1) -> dict[str, Callable]:
    """:func:`launcher_calls` for MDE's head: the kernels' attention mode with the arguments ``okdfast.ops.mde_head``
    passes them (the attention logits as the weights, K teacher rows, the head's options)."""
    logits, target, attention, kd_weight = call.args
    z, a = logits.detach(), attention.detach()
    options = head_kernel_options(z, a, MDE_HEAD_OPTIONS)
    kd = kd_weight.detach().reshape(()).to(torch.float32)
    config = {"block_c": block_c, "num_warps": num_warps, "rows_per_program": rows_per_program}
    config["head"] = MDE_HEAD_OPTIONS
    return _launcher_phases((z, target, None, a, kd, options, logits.shape[1]), (True, False, True), config)


def _launcher_phases(inputs: tuple, needs: tuple[bool, bool, bool], config: dict[str, Any]) -> dict[str, Callable]:
    """fwd, bwd and fwd+bwd of the launchers on ``inputs`` (logits, target, teacher, weights, kd_weight, options,
    weight_rows); ``state`` keeps the last forward's outputs and the gradients (d logits, d teacher, d weights)."""
    from okdfast.kernels.online_kd import online_kd_backward, online_kd_forward

    z, target, t, w, kd, options, weight_rows = inputs
    grad = torch.ones((), dtype=torch.float32, device=z.device)
    state: dict[str, Any] = {}

    def fwd():
        state["out"] = online_kd_forward(*inputs, **config)

    def bwd():
        _, summary, stats = state["out"]
        state["grads"] = online_kd_backward(grad, z, target, t, w, kd, summary, stats, options, weight_rows, needs,
                                            **config)  # fmt: skip

    def both():
        fwd()
        bwd()

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both, "state": state, "needs": needs}


def head_launch_config(shape: Shape):
    """The launch configuration the head's kernels pick at ``shape``: one weighted teacher row per branch."""
    from okdfast.kernels.online_kd import launch_config

    return launch_config(shape[1], shape[2], shape[1], True)


def sweep_subject(case: SweepCase, dtype: torch.dtype, device: torch.device) -> tuple[Call, Any, Callable]:
    """The case's call, the launch configuration its op's heuristic picks, and its launcher calls at a forced one."""
    from okdfast.kernels.online_kd import launch_config

    batch, branches, classes = case.shape
    call = SUBJECTS[case.subject].make_call(case.form, case.shape, dtype, device)
    if case.subject == "mde_head":
        return call, head_launch_config(case.shape), lambda *config: head_launcher_calls(call, *config)
    weights = call.args[3]
    rows = teacher_weight_layout(weights, batch, branches)[0] if weights is not None else 1
    default = launch_config(branches, classes, rows, weights is not None)
    return call, default, lambda *config: launcher_calls(call, case.form, *config)


def _new_variants(seen: set[int]) -> dict[str, tuple[Any, Any]]:
    """(registers, spills) of the forward and backward variants compiled since the last call."""
    from okdfast.kernels import online_kd as kd_kernels

    out = {}
    for name, kernel in (("fwd", kd_kernels._online_kd_fwd_kernel), ("bwd", kd_kernels._online_kd_bwd_kernel)):
        for compiled in compiled_kernels(kernel):
            if id(compiled) not in seen:
                seen.add(id(compiled))
                out[name] = (getattr(compiled, "n_regs", ""), getattr(compiled, "n_spills", ""))
    return out


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device) if args.device else default_device()
    if not triton_runs_on(device):
        print("--sweep: the kernels do not run here (CUDA, or the CPU with TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1)")
        return []
    cases = TINY_SWEEP if args.tiny else SWEEPS[args.sweep]
    dtype_name = (args.dtype or ["bf16"])[0]
    copy_gbps = copy_bandwidth_gbps(device)
    base = machine_columns("loss", device) | {"torch_threads": torch.get_num_threads(), "copy_gbps": round(copy_gbps)}
    folder = results_dir(args.results_dir, args.commit_results)
    budget = TimeBudget(args.time_budget)
    seen: set[int] = set()
    rows: list[dict[str, Any]] = []
    args.failures = 0
    for number, case in enumerate(cases):
        # each case gets an equal share of what is left, so a short budget cuts every case's farthest configs
        # instead of the last cases whole
        now = budget.elapsed()
        case_ends = now + (budget.seconds - now) / (len(cases) - number) if budget.seconds else 0.0
        call, default, calls_at = sweep_subject(case, DTYPES[dtype_name], device)
        expected = [call.fns["reference"](*call.args)]
        expected += torch.autograd.grad(expected[0], call.wrt)
        graphed = device.type == "cuda" and math.prod(case.shape) <= args.graph_max_elements
        configs = sweep_order((default.block_c, default.num_warps, default.rows_per_program), case)
        for n, (block_c, num_warps, rows_per_program) in enumerate(configs):
            where = _where(Combo(case.subject, case.form, case.shape), dtype_name)
            where |= {"impl": "fused-sweep", "block_c": block_c, "num_warps": num_warps}
            where |= {"rows_per_program": rows_per_program, "default_config": n == 0}
            ends = case_ends if n > 0 else budget.seconds  # a case's default runs while the whole budget lasts
            if args.time_budget is not None and ends - budget.elapsed() < KERNEL_COMPILE_S + 1:
                left = ", ".join("/".join(map(str, config)) for config in configs[n:])
                print(f"time budget: skipped {case.subject} {case.form} {where['shape']} block_c/num_warps/rows "
                      f"{left}", flush=True)  # fmt: skip
                break
            try:
                rows += sweep_config(args, device, call, calls_at, expected, graphed, seen, base | where, copy_gbps)
            except Exception as failure:  # a config that does not compile or validate is a row, not the end
                message = f"{type(failure).__name__}: {failure}"[:500]
                append_row("loss", base | where | {"error": message}, folder)
                print(
                    f"sweep {where['shape']} block_c={block_c} num_warps={num_warps} rows_per_program="
                    f"{rows_per_program}: FAILED ({message})",
                    flush=True,
                )
                args.failures += 1
        del call, expected
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def sweep_config(args, device, call, calls_at, expected, graphed, seen, where, copy_gbps) -> list[dict[str, Any]]:
    fns = calls_at(where["block_c"], where["num_warps"], where["rows_per_program"])
    fns["fwd+bwd"]()
    variants = _new_variants(seen)
    loss = fns["state"]["out"][0]
    grads = [g for g in fns["state"]["grads"] if g is not None]
    error = _worst_error([loss] + grads, expected, call.tolerance)
    folder = results_dir(args.results_dir, args.commit_results)
    rows = []
    for phase in ("fwd+bwd", "fwd", "bwd"):
        fns["fwd"]()  # the backward reads the statistics of an eager forward (not of a replayed graph's pool)
        if graphed:
            timing, mode = time_cuda_graph(fns[phase], device, repeats=args.repeats), "cuda-graph"
        else:
            timing, mode = time_fn(fns[phase], device, warmup=args.warmup, repeats=args.repeats), "stream"
        row = where | {"phase": phase, "timing": mode, "headline": False} | timing.as_row()
        row |= _rates(call.moved, phase, timing.median_ms * 1e-3, copy_gbps, True) | {"max_rel_error": error}
        for kernel in ("fwd", "bwd"):
            registers, spills = variants.get(kernel, ("", ""))
            row |= {f"{kernel}_registers": registers, f"{kernel}_spills": spills}
        append_row("loss", row, folder)
        rows.append(row)
        print(
            f"sweep {where['subject']} {where['form']} {row['shape']:>14s} block_c={where['block_c']:<5d} "
            f"num_warps={where['num_warps']:<3d} rows={where['rows_per_program']:<2d} "
            f"{phase:7s} {mode:10s} {timing.median_ms:9.4f} ms  {row['kernel_pct_copy_bw']:5.1f}% copy (kernel bytes)"
            f"{'  [default]' if where['default_config'] else ''}",
            flush=True,
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """fwd+bwd medians (stream timing) per shape, one panel per (form, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["phase"] == "fwd+bwd" and r["timing"] == "stream" and r["impl"] != "fused-sweep"]
    keys = sorted({(r["form"], r["dtype"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3.2 * max(len(keys), 1)), squeeze=False)
    for ax, (form, dtype) in zip(axes[:, 0], keys):
        sel = [r for r in rows if (r["form"], r["dtype"]) == (form, dtype)]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        width = 0.8 / max(len(impls), 1)
        for n, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for s, shape in enumerate(shapes):
                match = [r for r in sel if r["impl"] == impl and r["shape"] == shape]
                if match:
                    r = match[0]
                    xs.append(s + (n - (len(impls) - 1) / 2) * width)
                    ys.append(r["median_ms"])
                    lo.append(r["median_ms"] - r["p20_ms"])
                    hi.append(r["p80_ms"] - r["median_ms"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=impl, capsize=2)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms (median, p20-p80)")
        ax.set_title(f"{form} {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    first = rows[0] if rows else {}
    fig.suptitle(
        f"online-KD loss (B x K x C) on {first.get('device_name', '')}, torch {torch.__version__}, "
        f"run {first.get('run_id', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark the fused loss ops against their reference.")
    parser.add_argument("--quick", action="store_true", help="every teacher form at 128x4x100, mde at 2 more shapes")
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=None,
                        help="fixed plans, measured in the order given (the GPU visits)")  # fmt: skip
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None, help="the kernels' launch-config sweep")
    parser.add_argument("--tiny", action="store_true", help="the plan with tiny shapes, eager compile (rehearsal)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="BxKxC shapes, e.g. 128x4x100 4096x4x32768 (with --preset: only its combinations at these)",
    )
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=None, help="default: mean explicit one mde")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--impls", nargs="+", choices=GPU_IMPLS + ["op", "composed"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="default: all three")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graph-max-elements", type=int, default=2**21, help="largest B*K*C timed under CUDA graphs")
    parser.add_argument("--compile-backend", default=None, help="default inductor (--tiny: eager)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no row starts that would not fit")
    parser.add_argument("--no-plot", action="store_true")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.sweep:
        rows = sweep(args)
        print(f"{len(rows)} sweep rows in {time.perf_counter() - start:.0f} s")
        return 1 if args.failures else 0
    rows = run(args)
    if rows and not args.no_plot:
        png = results_dir(args.results_dir, args.commit_results) / f"loss_{rows[0]['device']}.png"
        plot(rows, png)
        print(f"{len(rows)} rows; plot {png}")
    return 1 if args.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
