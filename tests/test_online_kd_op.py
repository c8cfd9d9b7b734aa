"""The online-KD loss (okdfast.ops.online_kd: the Triton kernels where they run, the reference elsewhere) against
the reference, on fresh random inputs: every teacher form (mean, explicit logits, weights over the branches), both
modes, odd and strided shapes, every dtype, a random upstream gradient.

The tests marked ``triton`` run twice: here, through the public API's CPU path (the reference under autograd), and
in a subprocess with ``TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1`` (``test_triton_interpreter_suite``), through the
Triton kernels in Triton's CPU interpreter. A subprocess because TRITON_INTERPRET only takes effect when it is set
before triton is first imported, and setting it for the whole session would also turn every other Triton kernel
into interpreted code on a GPU machine.
Run just the interpreter part by hand:  TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1 pytest -m triton <this file>
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from okdfast.functional import online_kd_loss, online_kd_loss_and_terms
from okdfast.losses import OnlineKDLoss
from okdfast.ops.dispatch import fused_enabled, kernel_argument, use_triton
from okdfast.ops.online_kd import online_kd
from okdfast.ops.online_kd_options import OnlineKDOptions
from okdfast.ops.reference import online_kd_reference

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("OKDFAST_FORCE_TRITON") == "1"
interpreter_only = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_triton_interpreter_suite's subprocess")

# (rtol, atol relative to the largest reference value) per input dtype; the oracle is the fp32 reference on the
# upcast inputs. Values are computed in fp32 from the same (rounded) inputs, so they agree to fp32 rounding
# (~1e-5 of the largest value when logits reach +-300); gradients are stored in the input dtype and carry its
# rounding (bf16: 8 bits of mantissa, 4e-3 relative; fp16: 11 bits, 5e-4).
TOLERANCE = {
    torch.float32: {"value": (1e-5, 1e-5), "grad": (1e-5, 1e-5)},
    torch.bfloat16: {"value": (1e-5, 1e-5), "grad": (1e-2, 4e-3)},
    torch.float16: {"value": (1e-5, 1e-5), "grad": (2e-3, 5e-4)},
    torch.float64: {"value": (1e-7, 1e-8), "grad": (1e-7, 1e-8)},  # hyper-parameters reach the kernel as fp32
}
TEACHERS = ("none", "shared", "branch", "w_shared", "w_branch", "w_const")


def assert_close(actual, expected, dtype, kind, what):
    rtol, atol = TOLERANCE[dtype][kind]
    expected = expected.to(torch.float64)
    scale = max(expected.abs().max().item(), 1e-12) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol * scale, msg=what)


@dataclass
class Case:
    batch: int = 6
    branches: int = 3
    classes: int = 10
    teacher: str = "none"  # one of TEACHERS
    mode: str = "ensemble"
    detach: bool = True
    teacher_ce: float = 0.0
    ce_rows: tuple[int, ...] | None = None
    detached_rows: tuple[int, ...] | None = None
    smoothing: float = 0.0
    ignored: bool = False  # every third label is ignore_index
    reduction: str = "mean"
    dtype: torch.dtype = torch.float32
    strided: bool = False  # every tensor a non-contiguous, offset view (logits branch-major, every other class)
    scale: float = 3.0  # logit magnitude
    kd_tensor: bool = False  # kd_weight as a device tensor
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.batch}x{self.branches}x{self.classes}", self.teacher, self.mode]
        parts += ["det" if self.detach else "nodet", f"tce{self.teacher_ce}", f"ls{self.smoothing}"]
        parts += [
            f"rows{self.ce_rows}" if self.ce_rows else "",
            f"drows{self.detached_rows}" if self.detached_rows else "",
        ]
        parts += ["ign" if self.ignored else "", self.reduction, str(self.dtype).split(".")[-1]]
        parts += ["strided" if self.strided else "", f"x{self.scale}", "kdT" if self.kd_tensor else ""]
        return "-".join(p for p in parts if p)


CASES = [
    Case(),  # the defaults
    Case(batch=1, branches=2, classes=10, teacher="shared", teacher_ce=1.0, detach=False),
    Case(batch=37, branches=4, classes=100, teacher="shared", teacher_ce=1.0, detach=False, smoothing=0.1),
    Case(batch=5, branches=5, classes=1000, mode="peer", detach=True),
    Case(batch=6, branches=3, classes=100, mode="peer", detach=False, teacher_ce=0.5, ignored=True, reduction="sum"),
    Case(batch=5, branches=4, classes=17, teacher="branch", detach=False, teacher_ce=0.7, reduction="none"),
    Case(batch=7, branches=3, classes=10, teacher="none", detach=False, teacher_ce=0.3, smoothing=0.2, ignored=True),
    Case(batch=4, branches=2, classes=100, teacher="branch", mode="peer", detach=False, reduction="none"),
    Case(batch=6, branches=3, classes=33, teacher="shared", strided=True, ignored=True, smoothing=0.1),
    Case(batch=8, branches=4, classes=100, dtype=torch.bfloat16, teacher="shared", teacher_ce=1.0, detach=False),
    Case(batch=5, branches=3, classes=100, dtype=torch.float16, mode="peer", detach=False, reduction="none"),
    Case(batch=5, branches=3, classes=50, dtype=torch.bfloat16, teacher="none", detach=False, strided=True),
    Case(batch=4, branches=3, classes=10, scale=300.0, teacher="shared", detach=False, teacher_ce=1.0),
    Case(batch=4, branches=3, classes=10, kwargs={"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 2.5}),
    Case(batch=4, branches=3, classes=1, teacher="shared", detach=False, teacher_ce=1.0, smoothing=0.1),
    Case(batch=4, branches=2, classes=3, mode="peer", detach=False, teacher="branch", teacher_ce=1.0, smoothing=0.3),
    # the methods' teachers as weights over the branches
    Case(batch=9, branches=4, classes=100, teacher="w_shared", teacher_ce=1.0, detach=False, kd_tensor=True),  # ONE
    Case(batch=6, branches=4, classes=100, teacher="w_const", detach=False),  # CL-ILR's mean of the others
    Case(batch=6, branches=4, classes=100, teacher="w_branch", detach=False),  # OKDDip: attention + leader mean
    Case(
        batch=7,
        branches=4,
        classes=100,
        teacher="w_branch",
        detach=False,
        teacher_ce=1.0,
        ce_rows=(0,),
        detached_rows=(3,),
        kd_tensor=True,
    ),  # MDE  # fmt: skip
    Case(
        batch=5,
        branches=3,
        classes=37,
        teacher="w_branch",
        detach=True,
        teacher_ce=0.5,
        ce_rows=(0, 2),
        ignored=True,
        reduction="none",
        smoothing=0.1,
        strided=True,
    ),  # fmt: skip
    Case(batch=6, branches=5, classes=21, teacher="w_shared", detach=False, dtype=torch.bfloat16, strided=True),
    Case(
        batch=4,
        branches=3,
        classes=12,
        teacher="w_const",
        detach=False,
        teacher_ce=0.4,
        reduction="sum",
        strided=True,
        dtype=torch.float16,
    ),  # fmt: skip
    Case(
        batch=3,
        branches=6,
        classes=300,
        teacher="w_branch",
        detach=False,
        teacher_ce=1.0,
        ce_rows=(0,),
        detached_rows=(5,),
        scale=30.0,
    ),  # fmt: skip
    # K = 8: C = 5000 in blocks of the default width
    Case(batch=3, branches=8, classes=5000, teacher="branch", detach=False, teacher_ce=0.5, reduction="none"),
    Case(
        batch=2,
        branches=8,
        classes=700,
        teacher="w_branch",
        detach=False,
        teacher_ce=1.0,
        ce_rows=(0,),
        detached_rows=(7,),
    ),  # fmt: skip
]


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view with a storage offset (every other element of a bigger buffer)."""
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    big[..., 1::2] = x
    return big[..., 1::2]


def make_inputs(case: Case, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    b, k, c = case.batch, case.branches, case.classes
    logits = (torch.randn(b, k, c, generator=gen) * case.scale).to(device=device, dtype=case.dtype)
    target = torch.randint(0, c, (b,), generator=gen).to(device)
    if case.ignored:
        target[::3] = -100
    teacher = weights = None
    if case.teacher == "shared":
        teacher = (torch.randn(b, c, generator=gen) * case.scale).to(device=device, dtype=case.dtype)
    elif case.teacher == "branch":
        teacher = (torch.randn(b, k, c, generator=gen) * case.scale).to(device=device, dtype=case.dtype)
    elif case.teacher.startswith("w_"):  # float32 weights (as softmax makes them under autocast); float64 for gradcheck
        shape = {"w_shared": (b, k), "w_branch": (b, k, k), "w_const": (k, k)}[case.teacher]
        weights_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
        weights = torch.softmax(torch.randn(*shape, generator=gen), -1).to(device=device, dtype=weights_dtype)
    if case.strided:
        logits = _strided(logits.transpose(0, 1)).transpose(0, 1)  # branch-major storage, every other class
        target = _strided(target)
        teacher = None if teacher is None else _strided(teacher)
        weights = None if weights is None else _strided(weights)
        assert not logits.is_contiguous() and not target.is_contiguous() and target.storage_offset() == 1
    grad_out = torch.rand(b, generator=gen) + 0.5 if case.reduction == "none" else torch.tensor(1.7)
    options = OnlineKDOptions(
        mode=case.mode,
        detach_teacher=case.detach,
        teacher_ce_weight=case.teacher_ce,
        teacher_ce_rows=case.ce_rows,
        detached_teacher_rows=case.detached_rows,
        label_smoothing=case.smoothing,
        reduction=case.reduction,
        **case.kwargs,
    )
    kd_weight = torch.tensor(0.37, device=device) if case.kd_tensor else None
    return logits, target, teacher, weights, kd_weight, grad_out.to(device), options


def leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(True)


def run(fn, logits, target, teacher, weights, kd_weight, grad_out, options, dtype=None):
    z, t, w = leaf(logits, dtype), leaf(teacher, dtype), leaf(weights, dtype)
    loss, terms = fn(z, target, t, w, options, kd_weight)
    inputs = [x for x in (z, t, w) if x is not None]
    grads = iter(torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype), allow_unused=True, materialize_grads=True))
    named = {name: None if x is None else next(grads) for name, x in (("logits", z), ("teacher", t), ("weights", w))}
    return loss.detach(), terms, named


def check_case(case: Case, seed: int = 0, device: str = "cpu") -> None:
    inputs = make_inputs(case, seed, device)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    loss, terms, grads = run(online_kd, *inputs)
    ref_loss, ref_terms, ref_grads = run(online_kd_reference, *inputs, dtype=acc)
    assert loss.dtype == acc and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, case.dtype, "value", f"loss {case}")
    for name, got, want in zip(("ce", "teacher_ce", "kd"), terms, ref_terms):
        assert_close(got, want, case.dtype, "value", f"{name} {case}")
    assert grads["logits"].dtype == case.dtype and grads["logits"].shape == inputs[0].shape
    for name, grad in grads.items():
        if grad is not None:
            # weights are float32 in every case: their gradient carries fp32 rounding only
            kind_dtype = torch.float32 if name == "weights" and case.dtype != torch.float64 else case.dtype
            assert_close(grad, ref_grads[name], kind_dtype, "grad", f"d/d{name} {case}")


# ---------------------------------------------------------------------------------------------------------------
# the op against the reference (CPU path here; the Triton kernels in the interpreter subprocess)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_dispatch_matches_the_process():
    assert use_triton(torch.zeros(1), float64=True) == IN_INTERPRETER


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    check_case(case)


@pytest.mark.triton
def test_defaults_equal_plain_torch_composition():
    torch.manual_seed(0)
    logits = torch.randn(7, 3, 10, requires_grad=True)
    target = torch.randint(0, 10, (7,))
    teacher = logits.mean(1).detach()
    expected = sum(F.cross_entropy(logits[:, k], target) for k in range(3)) + sum(
        9.0 * F.kl_div(F.log_softmax(logits[:, k] / 3, -1), F.softmax(teacher / 3, -1), reduction="batchmean")
        for k in range(3)
    )
    (g_expected,) = torch.autograd.grad(expected, logits)
    for loss in (online_kd_loss(logits, target), OnlineKDLoss()(logits, target)):
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, g_expected, rtol=1e-5, atol=1e-7)


@pytest.mark.triton
def test_weights_teacher_equals_explicit_teacher():
    """W over the branches gives the same loss and logits gradient as the teacher it describes, built by hand."""
    torch.manual_seed(3)
    z = torch.randn(5, 4, 20, requires_grad=True)
    y = torch.randint(0, 20, (5,))
    w = torch.softmax(torch.randn(5, 4, 4), -1)
    a = online_kd_loss(z, y, teacher_weights=w, detach_teacher=False, teacher_ce_weight=0.5)
    b = online_kd_loss(z, y, torch.einsum("bkj,bjc->bkc", w, z), detach_teacher=False, teacher_ce_weight=0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*(torch.autograd.grad(x, z)[0] for x in (a, b)), rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_float64_exact_and_gradcheck():
    check_case(Case(batch=5, branches=3, classes=7, teacher="shared", detach=False, teacher_ce=0.5, smoothing=0.1,
                    dtype=torch.float64, ignored=True))  # fmt: skip
    check_case(Case(batch=4, branches=4, classes=9, teacher="w_branch", detach=False, teacher_ce=1.0, ce_rows=(0,),
                    detached_rows=(3,), dtype=torch.float64, ignored=True))  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    target = torch.tensor([1, 3, -100])
    forms = (
        ("teacher", (3, 4), "ensemble", "mean"),
        (None, None, "ensemble", "none"),
        (None, None, "peer", "sum"),
        ("teacher", (3, 3, 4), "ensemble", "mean"),
        ("teacher_weights", (3, 1, 3), "ensemble", "mean"),  # shared; (B, K) would be ambiguous at B = K = 3
        ("teacher_weights", (3, 3, 3), "ensemble", "none"),
        ("teacher_weights", (1, 3, 3), "ensemble", "sum"),
    )
    for keyword, shape, mode, reduction in forms:
        logits = torch.randn(3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        inputs = [logits]
        if shape is not None:
            extra = torch.randn(*shape, dtype=torch.float64, generator=gen)
            inputs.append((extra.softmax(-1) if keyword == "teacher_weights" else extra).requires_grad_())

        def fn(z, extra=None, keyword=keyword, mode=mode, reduction=reduction):
            more = {} if extra is None else {keyword: extra}
            return online_kd_loss(z, target, mode=mode, reduction=reduction, detach_teacher=False,
                                  teacher_ce_weight=0.5, label_smoothing=0.1, temperature=2.0, **more)  # fmt: skip

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=IN_INTERPRETER)


@interpreter_only
@pytest.mark.triton
def test_opcheck():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 10, requires_grad=True)
    target = torch.tensor([1, -100, 3, 9])
    weights = torch.softmax(torch.randn(4, 3, 3), -1).requires_grad_()
    teacher = torch.randn(4, 10, requires_grad=True)
    options = OnlineKDOptions(detach_teacher=False, teacher_ce_weight=0.5, teacher_ce_rows=(0,), reduction="none")
    fwd = torch.ops.okdfast.online_kd_fwd.default
    torch.library.opcheck(fwd, (logits, target, None, weights, None, 3, *options.as_args()))
    options = OnlineKDOptions(detach_teacher=False, teacher_ce_weight=0.5, label_smoothing=0.1)
    torch.library.opcheck(fwd, (logits, target, teacher, None, torch.tensor(0.3), 0, *options.as_args()))
    options = OnlineKDOptions(mode="peer", temperature=2.0)
    torch.library.opcheck(fwd, (logits, target, None, None, None, 0, *options.as_args()))


@pytest.mark.triton
def test_double_backward_raises_clearly():
    logits = torch.randn(3, 2, 5, requires_grad=True)
    loss = online_kd_loss(logits, torch.tensor([0, 1, 2]))
    if not IN_INTERPRETER:
        pytest.skip("the reference path is twice-differentiable; only the kernel path refuses")
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(loss, logits, create_graph=True)


@pytest.mark.triton
def test_no_grad_and_detached_inputs():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 10, requires_grad=True)
    target = torch.randint(0, 10, (5,))
    teacher = torch.randn(5, 10, requires_grad=True)
    reference = online_kd_reference(logits, target, teacher, None, OnlineKDOptions(teacher_ce_weight=1.0))[0]
    with torch.no_grad():
        loss = online_kd_loss(logits, target, teacher, teacher_ce_weight=1.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference)
    # a detached KL target with no teacher-CE: nothing can reach the teacher
    online_kd_loss(logits, target, teacher).backward()
    assert teacher.grad is None and logits.grad is not None
    # only the teacher needs a gradient
    online_kd_loss(logits.detach(), target, teacher, detach_teacher=False).backward()
    options = OnlineKDOptions(detach_teacher=False)
    (expected,) = torch.autograd.grad(online_kd_reference(logits.detach(), target, teacher, None, options)[0], teacher)
    torch.testing.assert_close(teacher.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.triton
def test_tensor_kd_weight_equals_float():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 10)
    target = torch.randint(0, 10, (6,))
    weights = torch.softmax(torch.randn(6, 3), -1)
    results = []
    for kd_weight in (0.37, torch.tensor(0.37)):
        z, w = leaf(logits), leaf(weights)
        loss = online_kd_loss(z, target, teacher_weights=w, kd_weight=kd_weight, detach_teacher=False,
                              teacher_ce_weight=1.0)  # fmt: skip
        loss.backward()
        results.append((loss.detach(), z.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.triton
def test_every_row_ignored():
    logits = torch.randn(3, 2, 5, requires_grad=True)
    target = torch.full((3,), -100)
    loss = online_kd_loss(logits, target)
    assert torch.isnan(loss)  # like F.cross_entropy: 0 / 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert online_kd_loss(logits, target, reduction="sum").item() == 0.0
    assert torch.equal(online_kd_loss(logits, target, reduction="none"), torch.zeros(3))


@pytest.mark.triton
@pytest.mark.parametrize("reduction, expected", [("mean", float("nan")), ("sum", 0.0)])
def test_empty_batch(reduction, expected):
    logits = torch.randn(0, 3, 10, requires_grad=True)
    loss = online_kd_loss(logits, torch.zeros(0, dtype=torch.long), reduction=reduction)
    torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
    loss.backward()
    assert logits.grad.shape == (0, 3, 10)


@pytest.mark.triton
def test_custom_ignore_index_and_labels_at_the_edges():
    check_case(Case(batch=4, classes=6, kwargs={"ignore_index": 5}, ignored=False))
    logits = torch.randn(4, 3, 6)
    target = torch.tensor([0, 5, 5, 2])  # ignore_index 5 is also a valid class id: it is ignored
    loss = online_kd_loss(logits, target, ignore_index=5, reduction="none")
    assert loss[1].item() == 0.0 and loss[2].item() == 0.0 and loss[0].item() > 0


@pytest.mark.triton
def test_expanded_inputs():
    """Stride-0 (expanded) logits, teacher, weights and target read like their contiguous copies."""
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 9).expand(5, 3, 9)
    target = torch.tensor(2).expand(5)
    weights = torch.softmax(torch.randn(1, 3, 3), -1).expand(5, 3, 3)
    teacher = torch.randn(9).expand(5, 9)
    grad_out = torch.rand(5)
    options = OnlineKDOptions(detach_teacher=False, teacher_ce_weight=1.0, reduction="none")
    for t, w in ((None, weights), (teacher, None)):
        got = run(online_kd, logits, target, t, w, None, grad_out, options)
        dense = [None if x is None else x.contiguous() for x in (logits, target, t, w)]
        want = run(online_kd_reference, *dense, None, grad_out, options)
        assert_close(got[0], want[0], torch.float32, "value", "loss")
        for name, grad in got[2].items():
            if grad is not None:
                assert_close(grad, want[2][name], torch.float32, "grad", name)


@pytest.mark.triton
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_propagate_like_the_reference(bad):
    """A NaN or +-inf logit makes its row's loss and gradient non-finite, exactly where the reference's are."""
    torch.manual_seed(5)
    logits = torch.randn(4, 3, 8)
    logits[1, 2, 3] = bad
    target = torch.tensor([0, 1, 2, 3])
    weights = torch.softmax(torch.randn(4, 3, 3), -1)
    options = OnlineKDOptions(detach_teacher=False, teacher_ce_weight=1.0, reduction="none")
    got = run(online_kd, logits, target, None, weights, None, torch.ones(4), options)
    want = run(online_kd_reference, logits, target, None, weights, None, torch.ones(4), options)
    assert torch.equal(got[0].isfinite(), want[0].isfinite()), (got[0], want[0])
    assert got[0][[0, 2, 3]].isfinite().all()
    assert torch.equal(got[2]["logits"].isfinite().all(-1), want[2]["logits"].isfinite().all(-1))


# ---------------------------------------------------------------------------------------------------------------
# the kernels themselves (interpreter only): C in blocks, labels the host check did not see
# ---------------------------------------------------------------------------------------------------------------


@interpreter_only
@pytest.mark.triton
@pytest.mark.parametrize(
    "teacher, mode, detach",
    [(t, "ensemble", d) for t in TEACHERS for d in (False, True)] + [(t, "peer", False) for t in TEACHERS[:3]],
)
def test_kernel_loops_over_c_in_blocks(teacher, mode, detach, monkeypatch):
    """C = 100 in blocks of 16 (7 blocks, the last one partial), K = 3 padded to 4: the online statistics."""
    from okdfast.kernels import online_kd as kernels

    real = kernels.launch_config
    monkeypatch.setattr(kernels, "launch_config", lambda *a, **k: real(*a[:4], block_c=16))
    check_case(Case(batch=5, branches=3, classes=100, teacher=teacher, mode=mode, detach=detach, teacher_ce=0.5,
                    smoothing=0.1, ignored=True, reduction="none", scale=10.0))  # fmt: skip


@interpreter_only
@pytest.mark.triton
def test_kernel_out_of_range_label_is_nan_not_an_out_of_bounds_read(monkeypatch):
    """What happens when the host check is skipped (CUDA by default, torch.compile): that row is NaN, the others
    are exact."""
    monkeypatch.setattr(sys.modules["okdfast.ops.online_kd"], "should_check_target_values", lambda target: False)
    logits = torch.randn(3, 2, 5, requires_grad=True)
    target = torch.tensor([1, 7, -3])
    loss = online_kd_loss(logits, target, reduction="none")
    loss.sum().backward()
    assert loss[0].isfinite() and loss[1:].isnan().all()
    assert logits.grad[0].isfinite().all() and logits.grad[1:].isnan().all()
    expected = online_kd_loss(logits[:1].detach(), target[:1], reduction="none")
    torch.testing.assert_close(loss[:1].detach(), expected)


@interpreter_only
@pytest.mark.triton
@pytest.mark.parametrize(
    "name, branches, extra",
    [("independent", 3, {}), ("dml", 3, {}), ("one", 4, {}), ("cl_ilr", 5, {}), ("okddip", 4, {})]
    + [("mde", k, {}) for k in range(3, 9)]
    + [  # MDE's one-pass head with its prediction-space CD, one target per auxiliary, a sharper attention
        ("mde", 4, dict(cd_form="nontarget_corr", cd_weight=1.0, ffm_targets="per-aux", ffm_temperature=0.5)),
        ("mde", 5, dict(cd_form="nontarget_corr", cd_weight=0.3, ffm_input="concat+logits")),
    ],
)
def test_methods_kernel_equals_reference(name, branches, extra):
    """Each method's whole loss through the kernels (``--fused-loss on``) and through the reference (``off``):
    the same loss, terms and parameter gradients, on fresh random inputs."""
    from okdfast.methods import MethodConfig, create_method

    results = []
    for fused in ("on", "off"):
        torch.manual_seed(0)
        config = MethodConfig(num_branches=branches, fused_loss=fused, **extra)
        method = create_method(name, "resnet8", 10, config)
        torch.manual_seed(1)
        images, target = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
        result = method.loss(method(images), target, kd_weight=torch.tensor(0.6))
        result.total.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        results.append((result.total.detach(), result.terms, grads))
    (total_on, terms_on, grads_on), (total_off, terms_off, grads_off) = results
    torch.testing.assert_close(total_on, total_off, rtol=1e-5, atol=1e-6)
    assert terms_on.keys() == terms_off.keys()
    for key in terms_on:  # the kernel's KL is a difference of log-sum-exps (~T^2 log C): fp32 cancellation ~1e-5
        torch.testing.assert_close(terms_on[key], terms_off[key], rtol=1e-5, atol=3e-5)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for key in grads_on:
        torch.testing.assert_close(grads_on[key], grads_off[key], rtol=1e-4, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------------------
# in-process only: validation, torch.compile, GPU compilation
# ---------------------------------------------------------------------------------------------------------------


def _bad(**overrides):
    logits = torch.randn(4, 3, 10)
    args = dict(logits=logits, target=torch.tensor([0, 1, 2, 3]), teacher=None)
    args.update(overrides)
    return args


INVALID = [
    (_bad(logits=torch.randn(4, 30)), "logits: expected a \\(B, K, C\\)"),
    (_bad(logits=torch.randn(4, 1, 10)), "K >= 2"),
    (_bad(logits=torch.randint(0, 3, (4, 3, 10))), "logits: dtype"),
    (_bad(target=torch.tensor([0, 1, 2])), "target: expected shape \\(4,\\)"),
    (_bad(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), "target.long\\(\\)"),
    (_bad(target=torch.tensor([0, 1, 10, 3])), "class id 10 is outside \\[0, 10\\)"),
    (_bad(target=torch.tensor([0, -1, 2, 3])), "class id -1"),
    (_bad(teacher=torch.randn(4, 9)), "teacher: expected \\(4, 10\\)"),
    (_bad(teacher=torch.randn(4, 2, 10)), "teacher: expected"),
    (_bad(teacher=torch.randn(4, 10).to(torch.int64)), "teacher: dtype"),
    (_bad(teacher=torch.randn(4, 10), teacher_weights=torch.ones(4, 3)), "pass one of them"),
    (_bad(teacher_weights=torch.ones(4, 2)), "teacher_weights: expected \\(B, K\\)"),
    (_bad(teacher_weights=torch.ones(4, 3, 2)), "teacher_weights: expected"),
    (_bad(logits=torch.randn(3, 3, 10), target=torch.tensor([0, 1, 2]), teacher_weights=torch.ones(3, 3)), "ambiguous"),
    (_bad(teacher_weights=torch.ones(4, 3, dtype=torch.int64)), "teacher_weights: dtype"),
    (_bad(teacher_weights=torch.ones(4, 3), mode="peer"), "mode='peer' distils"),
    (_bad(teacher_weights=torch.ones(4, 3), teacher_ce_weight=1.0, teacher_ce_rows=(1,)), "teacher has 1 row"),
    (_bad(teacher_ce_rows=[0]), "teacher_ce_rows"),
    (_bad(detached_teacher_rows=(0,), mode="peer"), "detached_teacher_rows"),
    (_bad(mode="dml"), "mode='dml'"),
    (_bad(reduction="batchmean"), "reduction='batchmean'"),
    (_bad(temperature=0.0), r"temperature=0.0: must be a number in \[0.01, 100\]"),
    (_bad(temperature=1000.0), r"temperature=1000.0: must be a number in \[0.01, 100\]"),  # the KL's precision
    (_bad(temperature=float("nan")), "temperature=nan: must be a finite number"),
    (_bad(kd_weight=float("inf")), "kd_weight=inf"),
    (_bad(ce_weight=None), "ce_weight=None"),
    (_bad(teacher_ce_weight=float("nan")), "teacher_ce_weight=nan"),
    (_bad(label_smoothing=1.5), "label_smoothing=1.5"),
    (_bad(ignore_index=-1.5), "ignore_index"),
    (_bad(detach_teacher="no"), "detach_teacher='no'"),
    (_bad(kd_weight=torch.ones(2)), "kd_weight: a tensor weight"),
]


@pytest.mark.parametrize("kwargs, message", INVALID, ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        online_kd_loss(**kwargs)


def test_cpu_dispatch_rules(monkeypatch):
    monkeypatch.delenv("OKDFAST_FORCE_TRITON", raising=False)
    x = torch.zeros(1)
    assert not use_triton(x)
    assert fused_enabled("on", x) and not fused_enabled("off", x) and not fused_enabled("auto", x)
    monkeypatch.setenv("OKDFAST_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)  # both variables are needed
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        fused_enabled("yes", x)
    assert [kernel_argument(mode) for mode in ("auto", "on", "off")] == [None, True, False]  # auto: the op decides
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        kernel_argument("yes")


def test_options_schema_follows_the_dataclass():
    """The op schema is generated from OnlineKDOptions: one spelling of the options, in field order."""
    schema = str(torch.ops.okdfast.online_kd_fwd.default._schema)
    assert schema.endswith(f"{OnlineKDOptions.schema()}) -> (Tensor, Tensor, Tensor)"), schema
    assert len(OnlineKDOptions().as_args()) == len(dataclasses.fields(OnlineKDOptions))
    options = OnlineKDOptions(teacher_ce_rows=(0, 2), detached_teacher_rows=(1,), reduction="sum")
    assert OnlineKDOptions.from_args(options.as_args()) == options


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_train_step(backend, device="cpu"):
    """A train step of a K-head model with a gate through the loss compiles with no graph break, matches eager, and a
    new kd weight value reuses the graph."""
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(8, 16).to(device), torch.nn.Linear(16, 3 * 10).to(device)
    gate = torch.nn.Linear(16, 3).to(device)
    params = [*trunk.parameters(), *heads.parameters(), *gate.parameters()]
    x, y = torch.randn(12, 8, device=device), torch.randint(0, 10, (12,), device=device)
    kd_weight = torch.tensor(0.4, device=device)

    def step(x, y, kd_weight):
        h = torch.relu(trunk(x))
        logits = heads(h).view(-1, 3, 10)
        loss, terms = online_kd_loss_and_terms(logits, y, teacher_weights=torch.softmax(gate(h), -1),
                                               kd_weight=kd_weight, teacher_ce_weight=1.0, detach_teacher=False,
                                               label_smoothing=0.1)  # fmt: skip
        return loss, terms.kd

    def run_step(fn):
        for p in params:
            p.grad = None
        loss, kd = fn(x, y, kd_weight)
        loss.backward()
        return [loss.detach(), kd] + [p.grad.clone() for p in params]

    eager = run_step(step)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for got, expected in zip(run_step(compiled), eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    kd_weight.fill_(0.9)
    for got, expected in zip(run_step(compiled), run_step(step)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_reference_path_peak_memory_is_a_few_logits_buffers():
    """The CPU path is the reference under autograd: its forward keeps a bounded number of (B, K, C) float32
    temporaries alive for the backward (measured with the allocator's saved-tensor hooks), not one per term."""
    z = torch.randn(64, 4, 1000, requires_grad=True)
    y = torch.randint(0, 1000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        online_kd_loss(z, y, teacher_weights=torch.softmax(torch.randn(64, 4, 4), -1), detach_teacher=False)
    logits_buffers = sum(saved) / z.numel()
    assert logits_buffers <= 12, logits_buffers


def _load_compile_kernels():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks" / "compile_kernels.py"
    spec = importlib.util.spec_from_file_location("okdfast_compile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# GPU tier (pytest -m gpu): the compiled Triton kernels on CUDA
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_CASES = CASES + [
    Case(batch=64, branches=4, classes=32768, teacher="shared", detach=False, teacher_ce=1.0, dtype=torch.bfloat16),
    Case(batch=64, branches=4, classes=32768, mode="peer", detach=False, smoothing=0.1, ignored=True),
    Case(
        batch=64,
        branches=4,
        classes=32768,
        teacher="w_branch",
        detach=False,
        teacher_ce=1.0,
        ce_rows=(0,),
        detached_rows=(3,),
        dtype=torch.bfloat16,
    ),  # fmt: skip
    Case(batch=33, branches=8, classes=5000, teacher="branch", detach=False, teacher_ce=0.5, reduction="none"),
    Case(batch=128, branches=5, classes=100, dtype=torch.float16, teacher="none", detach=False, strided=True),
    Case(batch=4, branches=3, classes=50257, teacher="shared", dtype=torch.float64, detach=False, teacher_ce=1.0),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(case):
    assert use_triton(torch.zeros(1, device="cuda"), float64=True)
    check_case(case, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_opcheck_and_labels(monkeypatch):
    test_compile_fullgraph_train_step("inductor", device="cuda")
    logits = torch.randn(4, 3, 10, device="cuda", requires_grad=True)
    options = OnlineKDOptions(mode="peer", temperature=2.0, teacher_ce_weight=0.5, detach_teacher=False)
    target = torch.tensor([1, -100, 3, 9], device="cuda")
    torch.library.opcheck(torch.ops.okdfast.online_kd_fwd.default, (logits, target, None, None, None, 0,
                                                                    *options.as_args()))  # fmt: skip
    rows = online_kd_loss(logits, torch.tensor([1, 10, 3, 9], device="cuda"), reduction="none")  # no host sync
    assert rows[1].isnan() and rows[[0, 2, 3]].isfinite().all()
    monkeypatch.setenv("OKDFAST_CHECK_TARGETS", "1")  # opt-in: the labels are read on the host
    with pytest.raises(ValueError, match="class id 10"):
        online_kd_loss(logits, torch.tensor([1, 10, 3, 9], device="cuda"))


# ---------------------------------------------------------------------------------------------------------------
# the interpreter run of every ``triton`` test above
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(IN_INTERPRETER, reason="this process already runs the interpreter")
def test_triton_interpreter_suite():
    """Every ``triton`` test of this file again, in a fresh process where CPU tensors run the Triton kernels."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton and not slow", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.skipif(IN_INTERPRETER, reason="in the interpreter the kernels do run on the CPU")
def test_kernel_on_a_device_where_it_cannot_run_is_one_clear_error():
    with pytest.raises(ValueError, match="do not run on cpu.*fused_loss='auto'"):
        online_kd(torch.randn(4, 3, 10), torch.tensor([0, 1, 2, 3]), kernel=True)


def test_compile_with_changing_python_floats_neither_breaks_nor_recompiles_per_value():
    """A compiled step passing the ramp-up kd_weight (and a temperature, a label smoothing) as Python floats: a new
    kd_weight compiles once more (a dynamic value) and then never again, without a graph break; a new temperature or
    label smoothing may recompile but never raises; every value equals the eager loss."""
    import torch._dynamo.testing

    from okdfast.functional import mde_head_loss

    torch.manual_seed(0)
    logits, target, energy = torch.randn(8, 4, 10), torch.randint(0, 10, (8,)), torch.randn(8, 3)
    for loss_fn in (
        lambda w, t, ls: online_kd_loss(logits, target, kd_weight=w, temperature=t, label_smoothing=ls),
        lambda w, t, ls: mde_head_loss(logits, target, energy, kd_weight=w, temperature=t, label_smoothing=ls),
    ):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
        for w in (0.1, 0.2, 0.3, 0.4, 0.5):
            torch.testing.assert_close(compiled(w, 3.0, 0.0), loss_fn(w, 3.0, 0.0))
        assert counter.frame_count <= 2, counter.frame_count
        for t, ls in ((2.0, 0.1), (4.0, 0.1), (4.0, 0.2)):
            torch.testing.assert_close(compiled(0.5, t, ls), loss_fn(0.5, t, ls))
