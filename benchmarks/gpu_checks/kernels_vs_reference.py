"""Every Triton kernel against its PyTorch reference on the GPU: fresh random inputs, poisoned outputs, odd shapes,
strided inputs, fp32 / bf16 / fp16. The first correctness step of a GPU visit (benchmarks/suite.py).

    python -m benchmarks.gpu_checks.kernels_vs_reference                # on a CUDA machine
    python -m benchmarks.gpu_checks.kernels_vs_reference --seed 123     # replay a printed seed
    TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1 python -m benchmarks.gpu_checks.kernels_vs_reference --device cpu --quick

What it checks, independently of the test files (same references, other inputs):
- the online-KD op (``okdfast.ops.online_kd``, forward and backward kernels through the real op and autograd) for
  every teacher form the methods use (the branch mean, explicit (B, C) and (B, K, C) logits, ONE's (B, K) gate,
  OKDDip's / MDE's (B, K, K) weights, CL-ILR's constant matrix, DML's peer mode, detached and not), every
  reduction, label smoothing, ignored rows, a device-tensor kd_weight and a random upstream gradient; loss, terms
  and every gradient against ``okdfast.ops.reference.online_kd_reference`` under autograd;
- MDE's one-pass head (``okdfast.ops.mde_head``: the attention softmax, targets, CE, KL and the prediction-space CD
  in the kernel; the logits' and the attention logits' gradients) with one shared or per-auxiliary attention rows,
  CD weights 0 / 1 / 3, every reduction, ignored rows, strided inputs, against
  ``okdfast.ops.reference.mde_head_reference``; its tolerance is the family's, or 4 times the float32 reference's
  own distance from the float64 one where that is larger (the CD's cancellation on near-uniform rows);
- the loader's augmentation kernel (``okdfast.kernels.augment``) against ``okdfast.data.transforms``, bit for bit.
Inputs are drawn from a seed that changes every run (printed, and written in every row). Outputs are poisoned:
while a kernel's host launcher runs, every buffer it allocates (``torch.empty``) is filled with NaN (integers with
-7) first, so an element a kernel forgets to write shows up as a mismatch instead of passing on a lucky zero.
Strided cases pass non-contiguous views (branch-major logits, every other class, a transposed weight matrix).

Rows go to ``<results>/check_kernels.csv`` as each case is checked: one per case (``family`` online_kd or augment),
then one per kernel variant that case compiled (``family`` launch: registers, spills, warps, shared memory of what
the real launch built), so a step cut at its limit keeps both. ``--cases visit`` is the first visit's share (every
teacher form in bf16 and strided fp32, the CIFAR headline shapes, C in many chunks); ``--cases rest`` the others;
``--cases all`` both. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.harness import add_output_arguments, append_row, machine_columns, results_dir  # noqa: E402
from okdfast.compat import compiled_kernels  # noqa: E402
from okdfast.ops.mde_head import mde_head  # noqa: E402
from okdfast.ops.mde_head_options import MDEHeadOptions  # noqa: E402
from okdfast.ops.online_kd import online_kd  # noqa: E402
from okdfast.ops.online_kd_options import OnlineKDOptions  # noqa: E402
from okdfast.ops.reference import mde_head_reference, online_kd_reference  # noqa: E402

# max |error| / max |reference| per output dtype: values are fp32 arithmetic on the same rounded inputs; gradients
# are stored in the input dtype and carry its rounding (bf16 8 mantissa bits, fp16 11)
TOLERANCE = {
    torch.float32: {"value": 2e-5, "grad": 2e-5},
    torch.bfloat16: {"value": 2e-5, "grad": 1.6e-2},
    torch.float16: {"value": 2e-5, "grad": 2e-3},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    form: str  # mean | explicit | branch | one | okddip | mde | cl_ilr | peer | peer_trained
    shape: tuple[int, int, int]
    dtype: str
    strided: bool = False
    reduction: str = "mean"
    smoothing: float = 0.0
    ignored: bool = False

    def __str__(self) -> str:
        b, k, c = self.shape
        flags = ["strided" if self.strided else "", f"ls{self.smoothing}" if self.smoothing else "", self.reduction]
        flags.append("ign" if self.ignored else "")
        return "-".join([self.form, f"{b}x{k}x{c}", self.dtype] + [f for f in flags if f])


VISIT_EXTRA = [
    Case("mde", (128, 4, 100), "bf16"),  # the CIFAR headline shape, the paper's teacher
    Case("one", (128, 4, 100), "bf16"),
    Case("mde", (64, 4, 32771), "bf16", ignored=True),  # C in many chunks, not a multiple of 16
]


def online_kd_cases(quick: bool) -> list[Case]:
    forms = ["mean", "explicit", "branch", "one", "okddip", "mde", "cl_ilr", "peer", "peer_trained"]
    reductions = ["mean", "sum", "none"]
    cases = []
    for i, form in enumerate(forms):
        cases.append(Case(form, (37, 4, 1000), "bf16", reduction=reductions[i % 3], ignored=i % 2 == 0))
        cases.append(Case(form, (19, 3 + i % 3, 333), "fp32", strided=True, smoothing=0.1, reduction=reductions[i % 2]))
        if not quick:
            cases.append(Case(form, (33, 5, 100), "fp16", reduction=reductions[(i + 1) % 3], smoothing=0.05))
    if not quick:
        cases += [
            Case("mde", (64, 4, 32771), "bf16", ignored=True),  # C in many chunks, not a multiple of 16
            Case("mean", (64, 4, 32768), "bf16", strided=True),
            Case("mde", (21, 8, 97), "fp32", reduction="none"),  # K = 8: the widest branch tile
            Case("explicit", (7, 2, 1), "fp32", smoothing=0.2),  # one class, two branches
            Case("one", (128, 4, 100), "bf16"),  # the CIFAR headline shapes
            Case("mde", (128, 4, 100), "bf16"),
        ]
    return cases


def _strided(x: torch.Tensor, dims: str) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous, offset view."""
    if dims == "bkc":  # branch-major storage, every other class
        b, k, c = x.shape
        base = torch.empty(k, b, 2 * c + 1, dtype=x.dtype, device=x.device)
        view = base[:, :, 1::2].permute(1, 0, 2)
        view.copy_(x)
        return view
    base = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    view = base[..., ::2]
    view.copy_(x)
    return view


def make_case(case: Case, device: torch.device, gen: torch.Generator):
    """(inputs dict, options, grad_output, the inputs that get gradients)."""
    batch, k, c = case.shape
    dtype = DTYPES[case.dtype]

    def randn(*size: int, scale: float = 3.0) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device) * scale

    logits = randn(batch, k, c).to(dtype)
    if case.strided:
        logits = _strided(logits, "bkc")
    target = torch.randint(0, c, (batch,), generator=gen, device=device)
    if case.ignored:
        target[::3] = -100
    teacher = weights = None
    kwargs: dict[str, Any] = dict(label_smoothing=case.smoothing, reduction=case.reduction)
    if case.form == "explicit":
        teacher = randn(batch, c).to(dtype)
        kwargs |= dict(teacher_ce_weight=0.8, detach_teacher=False)
    elif case.form == "branch":
        teacher = randn(batch, k, c).to(dtype)
        kwargs |= dict(teacher_ce_weight=0.6, detach_teacher=False)
    elif case.form == "one":
        weights = torch.softmax(randn(batch, k, scale=1.0), -1)
        kwargs |= dict(teacher_ce_weight=1.0, detach_teacher=False)
    elif case.form in ("okddip", "mde"):
        aux = torch.softmax(randn(batch, k - 1, k - 1, scale=1.0), -1)
        leader = F.pad(torch.full((batch, 1, k - 1), 1.0 / (k - 1), device=device), (0, 1))
        weights = torch.cat([F.pad(aux, (0, 1)), leader], 1)
        kwargs |= dict(detach_teacher=False)
        if case.form == "mde":
            kwargs |= dict(teacher_ce_weight=1.0, teacher_ce_rows=(0,), detached_teacher_rows=(k - 1,))
    elif case.form == "cl_ilr":
        weights = ((1.0 - torch.eye(k, device=device)) / (k - 1)).unsqueeze(0)
        kwargs |= dict(detach_teacher=False)
    elif case.form == "peer":
        kwargs |= dict(mode="peer")
    elif case.form == "peer_trained":
        kwargs |= dict(mode="peer", detach_teacher=False, teacher_ce_weight=0.5)
        teacher = randn(batch, c).to(dtype)
    if weights is not None and case.strided:
        weights = _strided(weights, "last")
    options = OnlineKDOptions(temperature=2.5, **kwargs)
    grad_out = torch.rand(batch, generator=gen, device=device) + 0.5 if case.reduction == "none" else None
    grad_out = grad_out if grad_out is not None else torch.tensor(0.7, device=device)
    inputs = dict(logits=logits, target=target, teacher=teacher, weights=weights)
    trained = [name for name in ("logits", "teacher", "weights") if inputs[name] is not None]
    if case.form in ("cl_ilr",):
        trained.remove("weights")  # a buffer
    return inputs, options, grad_out, trained


class _PoisonedTorch:
    """``torch`` as a kernel module sees it while poisoned: ``empty`` / ``empty_like`` return NaN (floats), -7
    (integers) or True (bool) instead of whatever memory held."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def _fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True if t.dtype == torch.bool else -7)

    def empty(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._fill(torch.empty(*args, **kwargs))

    def empty_like(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._fill(torch.empty_like(*args, **kwargs))


@contextlib.contextmanager
def poisoned(*modules: Any) -> Iterator[None]:
    saved = [m.torch for m in modules]
    for m in modules:
        m.torch = _PoisonedTorch()
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.torch = original


def run_online_kd(case: Case, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    from okdfast.kernels import online_kd as kd_kernels

    inputs, options, grad_out, trained = make_case(case, device, gen)
    kd_weight = torch.tensor([0.75], device=device)
    results = {}
    for impl in ("kernel", "reference"):
        leaves = {k: (v.detach().requires_grad_(k in trained) if v is not None else None) for k, v in inputs.items()}
        leaves["target"] = inputs["target"]
        args = (leaves["logits"], leaves["target"], leaves["teacher"], leaves["weights"])
        if impl == "kernel":
            with poisoned(kd_kernels):
                loss, terms = online_kd(*args, options, kd_weight, kernel=True)
                grads = torch.autograd.grad(loss, [leaves[n] for n in trained], grad_out)
        else:
            loss, terms = online_kd_reference(*args, options, kd_weight.reshape(()))
            grads = torch.autograd.grad(loss, [leaves[n] for n in trained], grad_out)
        results[impl] = {"loss": loss, "ce": terms.ce, "teacher_ce": terms.teacher_ce, "kd": terms.kd}
        results[impl] |= {f"d_{n}": g for n, g in zip(trained, grads)}
    dtype = DTYPES[case.dtype]
    errors, ok = {}, True
    for name, expected in results["reference"].items():
        got = results["kernel"][name]
        kind = "grad" if name.startswith("d_") else "value"
        scale = max(expected.detach().double().abs().max().item(), 1e-12)
        err = (got.detach().double() - expected.detach().double()).abs().max().item() / scale
        finite_ok = bool((got.isfinite() == expected.isfinite()).all())
        errors[name] = err
        ok &= finite_ok and err <= TOLERANCE[dtype][kind]
    worst = max(errors, key=lambda n: errors[n])
    return {"ok": ok, "worst_output": worst, "worst_rel_error": errors[worst], "errors": errors}


def mde_head_cases(quick: bool) -> list[Case]:
    """form ``shared`` / ``per-aux`` (the attention rows); ``smoothing`` carries the label smoothing."""
    cases = [
        Case("shared", (128, 4, 100), "bf16"),  # the CIFAR headline shape
        Case("per-aux", (37, 4, 1000), "bf16", reduction="sum", ignored=True),
        Case("shared", (19, 5, 333), "fp32", strided=True, smoothing=0.1, reduction="none"),
        Case("shared", (64, 4, 32771), "bf16", ignored=True),  # C in many chunks: the CD's merged co-moments
    ]
    if not quick:
        cases += [
            Case("per-aux", (21, 8, 97), "fp32", reduction="none"),  # K = 8
            Case("shared", (33, 3, 10), "fp16", smoothing=0.05),
            Case("per-aux", (128, 4, 100), "fp32", strided=True),
        ]
    return cases


def run_mde_head(case: Case, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    from okdfast.kernels import online_kd as kd_kernels

    batch, k, c = case.shape
    dtype = DTYPES[case.dtype]
    logits = (torch.randn(batch, k, c, generator=gen, device=device) * 3).to(dtype)
    rows = (k - 1,) if case.form == "per-aux" else ()
    attention = torch.randn(batch, *rows, k - 1, generator=gen, device=device).to(dtype)
    if case.strided:
        logits, attention = _strided(logits, "bkc"), _strided(attention, "last")
    target = torch.randint(0, c, (batch,), generator=gen, device=device)
    if case.ignored:
        target[::3] = -100
    cd_weight = (0.0, 1.0, 3.0)[int(torch.randint(0, 3, (1,), generator=gen, device=device))]
    options = MDEHeadOptions(temperature=2.5, attention_temperature=0.7, cd_weight=cd_weight,
                             label_smoothing=case.smoothing, reduction=case.reduction)  # fmt: skip
    grad_out = torch.rand(batch, generator=gen, device=device) + 0.5 if case.reduction == "none" else None
    grad_out = grad_out if grad_out is not None else torch.tensor(0.7, device=device)
    kd_weight = torch.tensor([0.75], device=device)
    results = {}
    for impl, z, a in (("kernel", logits, attention), ("reference", logits.float(), attention.float()),
                       ("float64", logits.double(), attention.double())):  # fmt: skip
        z, a = z.detach().requires_grad_(), a.detach().requires_grad_()
        if impl == "kernel":
            with poisoned(kd_kernels):
                loss, terms = mde_head(z, target, a, options, kd_weight, kernel=True)
        else:
            loss, terms = mde_head_reference(z, target, a, options, kd_weight.reshape(()).to(z.dtype))
        grads = torch.autograd.grad(loss, (z, a), grad_out.to(loss.dtype))
        results[impl] = dict(zip(("loss", "ce", "target_ce", "kd", "cd", "d_logits", "d_attention"),
                                 (loss, *terms, *grads)))  # fmt: skip
    errors, ok = {}, True
    for name, expected in results["reference"].items():
        exact = results["float64"][name].detach().double()
        scale = max(exact.abs().max().item(), 1e-12)
        own = (expected.detach().double() - exact).abs().max().item() / scale  # the float32 reference's rounding
        err = (results["kernel"][name].detach().double() - exact).abs().max().item() / scale
        got = results["kernel"][name]
        errors[name] = err
        finite_ok = bool((got.isfinite() == exact.isfinite()).all())
        ok &= finite_ok and err <= max(TOLERANCE[dtype]["grad" if name.startswith("d_") else "value"], 4 * own)
    worst = max(errors, key=lambda n: errors[n])
    return {"ok": ok, "worst_output": worst, "worst_rel_error": errors[worst], "errors": errors}


def augment_cases(quick: bool) -> list[tuple[str, bool, bool, int]]:
    dtypes = ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16")
    return [(d, cl, aug, 37) for d in dtypes for cl in (True, False) for aug in (True, False)]


def jobs_for(cases: str, quick: bool = False) -> list[tuple[str, Any]]:
    """(family, case) in checking order: ``visit`` (every form quickly + the headline shapes), ``rest``, ``all``."""
    every = [("online_kd", c) for c in online_kd_cases(quick)] + [("mde_head", c) for c in mde_head_cases(quick)]
    every += [("augment", c) for c in augment_cases(quick)]
    visit = [("mde_head", c) for c in mde_head_cases(True)]  # what MDE trains with first
    visit += [("online_kd", c) for c in online_kd_cases(True) + VISIT_EXTRA]
    visit += [("augment", c) for c in augment_cases(True) if c[1] and c[2]]  # channels-last, augmented: training's
    if cases == "visit":
        return visit
    keys = {(family, str(case)) for family, case in visit}
    rest = [(family, case) for family, case in every if (family, str(case)) not in keys]
    return rest if cases == "rest" else visit + rest


def launch_rows(seen: set[int], case_label: str) -> list[dict[str, Any]]:
    """A row for every kernel variant compiled since the last call (what the real launches built)."""
    from okdfast.kernels import augment as augment_kernels
    from okdfast.kernels import online_kd as kd_kernels

    rows = []
    for kernel in (
        kd_kernels._online_kd_fwd_kernel,
        kd_kernels._online_kd_reduce_kernel,
        kd_kernels._online_kd_bwd_kernel,
        augment_kernels._crop_flip_lut_kernel,
    ):
        for compiled in compiled_kernels(kernel):
            if id(compiled) in seen:
                continue
            seen.add(id(compiled))
            meta = compiled.metadata
            constants = getattr(getattr(compiled, "src", None), "constants", None) or {}
            blocks = {str(k[-1] if isinstance(k, tuple) else k): v for k, v in dict(constants).items()}
            rows.append(
                {
                    "family": "launch",
                    "case": case_label,
                    "kernel": getattr(kernel, "__name__", str(kernel)),
                    "registers": getattr(compiled, "n_regs", ""),
                    "spills": getattr(compiled, "n_spills", ""),
                    "num_warps": getattr(meta, "num_warps", ""),
                    "shared_bytes": getattr(meta, "shared", ""),
                    "blocks": " ".join(f"{k}={v}" for k, v in blocks.items() if str(k).isupper()),
                }
            )
    return rows


def run_augment(case: tuple[str, bool, bool, int], device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    from okdfast.kernels import augment as augment_kernels

    from okdfast.data.transforms import crop_flip_normalize, normalize_lut, sample_crop_flip

    dtype_name, channels_last, augment, batch = case
    dtype = DTYPES[dtype_name]
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    images = torch.randint(0, 256, (1000, 32, 32, 3), generator=gen, device=device, dtype=torch.uint8)
    index = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    top, left, flip = (None, None, None)
    if augment:
        top, left, flip = (
            t.to(device) for t in sample_crop_flip(batch, torch.Generator().manual_seed(gen.initial_seed()))
        )
    with poisoned(augment_kernels):
        got = augment_kernels.crop_flip_normalize(
            images, index, top, left, flip, normalize_lut(mean, std, dtype, device), channels_last=channels_last
        )
    expected = crop_flip_normalize(images, index, top, left, flip, mean, std, dtype=dtype, channels_last=channels_last)
    ok = torch.equal(got, expected) and got.stride() == expected.stride()
    err = (got.float() - expected.float()).abs().nan_to_num(float("inf")).max().item()
    return {"ok": ok, "worst_output": "out", "worst_rel_error": err, "errors": {"out": err}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    parser.add_argument("--quick", action="store_true", help="fewer cases (the interpreter on a CPU)")
    parser.add_argument("--cases", choices=["all", "visit", "rest"], default="all", help="which share of the cases")
    parser.add_argument("--first", type=int, default=None, help="only the first N cases (a CPU rehearsal)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "kernels_vs_reference: needs a CUDA device (or --device cpu with TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1)"
        )
        return 2
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 2**31
    print(f"seed {seed} (rerun with --seed {seed})", flush=True)
    folder = results_dir(args.results_dir, args.commit_results)
    base = machine_columns("check_kernels", device) | {"seed": seed}
    failures = 0
    jobs = jobs_for(args.cases, args.quick)[: args.first]
    seen: set[int] = set()
    for n, (family, case) in enumerate(jobs):
        gen = torch.Generator(device=device).manual_seed(seed + n)
        start = time.perf_counter()
        try:
            run = {"online_kd": run_online_kd, "mde_head": run_mde_head, "augment": run_augment}[family]
            result = run(case, device, gen)
        except Exception as error:  # a crash is a failure of this case, reported; the others still run
            traceback.print_exc()
            result = {"ok": False, "worst_output": f"error: {type(error).__name__}: {error}"[:300], "errors": {}}
            result["worst_rel_error"] = ""
        label = str(case) if family in ("online_kd", "mde_head") else "-".join(map(str, case))
        row = base | {
            "family": family,
            "case": label,
            "ok": result["ok"],
            "worst_output": result["worst_output"],
            "worst_rel_error": result["worst_rel_error"],
            "errors": " ".join(f"{k}={v:.2e}" for k, v in result["errors"].items()),
            "seconds": round(time.perf_counter() - start, 3),
        }
        append_row("check_kernels", row, folder)
        for launch in launch_rows(seen, label):
            append_row("check_kernels", base | launch, folder)
        failures += not result["ok"]
        mark = "ok  " if result["ok"] else "FAIL"
        print(f"{mark} {family:9s} {label:45s} worst {result['worst_output']} {result['worst_rel_error']}", flush=True)
    print(f"{len(jobs) - failures} of {len(jobs)} cases match their reference; rows in {folder}/check_kernels.csv")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
