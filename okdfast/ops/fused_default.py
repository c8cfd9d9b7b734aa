"""Where a fused op's kernel is the default: ``kernel=None`` (and ``--fused-loss auto``) runs the Triton kernel only
where the GPU benchmark did not measure it slower than what would run instead.

The measurements: ``fused_verdicts.json`` beside this file, written by ``python -m benchmarks.fused_verdicts`` from
the rows of GPU visits (``benchmarks/results/gpu/<run_id>/loss.csv``; tests/test_fused_default.py checks that the
committed file is what the committed rows give). Each verdict is one measured shape of one op on one GPU
architecture, dtype and layout: the kernel's fwd+bwd against the eager reference (``vs_reference``) and against
the reference under torch.compile (``vs_compiled``), each 'wins', 'loses' or 'cannot tell apart'
(:func:`benchmarks.harness.verdict`: whether the timings' 20th-80th percentile ranges overlap).

The rule, for a call on a device where the kernel runs:
- the alternative is what would run instead: the reference compiled together with its caller when the call is
  being traced by torch.compile (``vs_compiled``), the eager reference otherwise (``vs_reference``);
- the verdict is that of the measured shape nearest to the call's (B, K, C) (the sum of the log2 ratios) for the
  same op, architecture, dtype and layout; the reference runs only where it says 'loses'. A tie keeps the kernel:
  the same time in fewer launches, without the reference's (B, K, C) intermediates;
- nothing measured for that op, architecture, dtype and layout: the kernel (the design's default, unmeasured).

Only the MDE head (``okdfast.ops.mde_head``) reads them so far (``OPS_WITH_VERDICTS``); the online-KD op's forms
run their kernel wherever it runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

WINS, LOSES, CANNOT_TELL = "wins", "loses", "cannot tell apart"
VERDICT_WORDS = (WINS, LOSES, CANNOT_TELL)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
OPS_WITH_VERDICTS = ("mde_head",)  # the bench_loss subjects whose kernel=None reads the verdicts
VERDICTS_FILE = Path(__file__).with_name("fused_verdicts.json")
REGENERATE = "regenerate it with `python -m benchmarks.fused_verdicts benchmarks/results/gpu/*/loss.csv`"


class Verdict(NamedTuple):
    op: str  # the bench_loss subject: 'mde_head'
    arch: str  # device_arch(): 'sm_90'
    dtype: str  # DTYPE_NAMES: 'bf16'
    layout: str  # the subject's form: 'shared' / 'per-aux' for the MDE head
    shape: tuple[int, int, int]  # (B, K, C) measured
    vs_reference: str  # the kernel against the eager reference, fwd+bwd
    vs_compiled: str  # the kernel against torch.compile of the reference, fwd+bwd
    run_id: str  # the visit that measured it (its rows: benchmarks/results/gpu/<run_id>/loss.csv)


def load_verdicts(path: Path | str = VERDICTS_FILE) -> tuple[Verdict, ...]:
    """The verdicts of a file :mod:`benchmarks.fused_verdicts` wrote; a ValueError naming the file and the entry
    for anything else (JSON only: reading it runs no code)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))["verdicts"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a fused-verdicts file ({type(error).__name__}: {error}); {REGENERATE}") from None
    out = []
    for number, entry in enumerate(entries):
        try:
            verdict = Verdict(**{**entry, "shape": tuple(int(n) for n in entry["shape"])})
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: verdict {number}: {error}; {REGENERATE}") from None
        words = (verdict.vs_reference, verdict.vs_compiled)
        if len(verdict.shape) != 3 or any(word not in VERDICT_WORDS for word in words):
            raise ValueError(f"{path}: verdict {number}: shape {verdict.shape} or verdicts {words}; {REGENERATE}")
        out.append(verdict)
    return tuple(out)


VERDICTS = load_verdicts()


def device_arch(device: torch.device | str) -> str:
    """'sm_<major><minor>' for a CUDA device (H100 and H200: 'sm_90'); the device type for any other."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    properties = torch.cuda.get_device_properties(device)  # torch.compile folds it to a constant
    return f"sm_{properties.major}{properties.minor}"


def verdicts_here(op: str, device: torch.device | str, verdicts: tuple[Verdict, ...]) -> list[Verdict]:
    """``op``'s verdicts for the architecture of ``device``; none measured for ``op`` at all: no device query (so
    nothing for torch.compile to trace)."""
    if not any(v.op == op for v in verdicts):
        return []
    arch = device_arch(device)
    return [v for v in verdicts if v.op == op and v.arch == arch]


def measured_here(op: str, device: torch.device | str) -> int:
    """How many verdicts ``op`` has for the architecture of ``device`` (the run's log line says it)."""
    return len(verdicts_here(op, device, VERDICTS))


def shape_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """The sum over dimensions of |log2(a_i / b_i)|: 1024x4x100 is 3 from 128x4x100 and 8.4 from 4096x4x32768."""
    return sum(abs(math.log2(x / y)) for x, y in zip(a, b))


def kernel_by_default(op: str, logits: Tensor, layout: str, verdicts: tuple[Verdict, ...] | None = None) -> bool:
    """Whether ``kernel=None`` runs ``op``'s kernel for ``logits`` (B, K, C) in ``layout``, the kernel being able
    to run there (the rule in this module's docstring). ``verdicts``: :data:`VERDICTS` unless given."""
    here = verdicts_here(op, logits.device, VERDICTS if verdicts is None else verdicts)
    dtype = DTYPE_NAMES.get(logits.dtype, str(logits.dtype))
    measured = [v for v in here if (v.dtype, v.layout) == (dtype, layout)]
    if not measured:  # nothing measured here: the kernel, and no shape read to trace
        return True
    shape = tuple(int(n) for n in logits.shape)
    nearest = min(measured, key=lambda v: (shape_distance(v.shape, shape), v.shape))
    return (nearest.vs_compiled if torch.compiler.is_compiling() else nearest.vs_reference) != LOSES
