"""The fused online-KD op (okdfast::online_kd_loss) against the reference, on fresh random inputs.

The tests marked ``triton`` run twice: here, through the op's CPU path (the reference values and the closed-form
gradients), and in a subprocess with ``TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1`` (``test_triton_interpreter_suite``),
through the Triton kernel in Triton's CPU interpreter. A subprocess because TRITON_INTERPRET only takes effect when
it is set before triton is first imported (triton decorates its own standard library then), and setting it for the
whole pytest session would also turn every other Triton kernel into interpreted code on a GPU machine.
Run just the interpreter part by hand:  TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1 pytest -m triton <this file>
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from okdfast.functional import online_kd_loss
from okdfast.losses import OnlineKDLoss
from okdfast.methods import MethodConfig, MethodOutput, create_method
from okdfast.ops.dispatch import fused_enabled, use_triton
from okdfast.ops.online_kd import online_kd_loss_and_terms
from okdfast.ops.reference import online_kd_loss_reference, online_kd_rows_reference

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("OKDFAST_FORCE_TRITON") == "1"
interpreter_only = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_triton_interpreter_suite's subprocess")

# (rtol, atol relative to the largest reference value) per input dtype; the oracle is the fp32 reference on the
# upcast inputs. Values are computed in fp32 from the same (rounded) inputs, so they match closely for every dtype
# (within the two fp32 computations' rounding, ~1e-5 of the largest value when logits reach +-1000); gradients are
# stored in the input dtype, so they carry its rounding.
TOLERANCE = {
    torch.float32: {"value": (1e-5, 1e-5), "grad": (1e-5, 1e-5)},
    torch.bfloat16: {"value": (1e-5, 1e-5), "grad": (1e-2, 4e-3)},
    torch.float16: {"value": (1e-5, 1e-5), "grad": (2e-3, 5e-4)},
    torch.float64: {"value": (1e-7, 1e-8), "grad": (1e-7, 1e-8)},  # hyper-parameters reach the kernel as fp32
}


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
    teacher: str = "none"  # none | shared | branch
    mode: str = "ensemble"
    detach: bool = True
    teacher_ce: float = 0.0
    smoothing: float = 0.0
    ignored: bool = False  # every third label is ignore_index
    reduction: str = "mean"
    dtype: torch.dtype = torch.float32
    strided: bool = False  # non-contiguous logits (branch-major storage, every other class)
    scale: float = 3.0  # logit magnitude
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.batch}x{self.branches}x{self.classes}", self.teacher, self.mode]
        parts += ["det" if self.detach else "nodet", f"tce{self.teacher_ce}", f"ls{self.smoothing}"]
        parts += ["ign" if self.ignored else "", self.reduction, str(self.dtype).split(".")[-1]]
        parts += ["strided" if self.strided else "", f"x{self.scale}"]
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
    # K = 8: C = 5000 in 20 blocks of the default width (256)
    Case(batch=3, branches=8, classes=5000, teacher="branch", detach=False, teacher_ce=0.5, reduction="none"),
]


def make_inputs(case: Case, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    b, k, c = case.batch, case.branches, case.classes
    if case.strided:  # made non-contiguous on the device: .to(device) would copy a strided view contiguously
        storage = (torch.randn(k, b, 2 * c, generator=gen) * case.scale).to(device=device, dtype=case.dtype)
        logits = storage[..., ::2].transpose(0, 1)
        assert not logits.is_contiguous()
    else:
        logits = (torch.randn(b, k, c, generator=gen) * case.scale).to(case.dtype)
    target = torch.randint(0, c, (b,), generator=gen)
    if case.ignored:
        target[::3] = -100
    teacher = None
    if case.teacher == "shared":
        teacher = (torch.randn(b, c, generator=gen) * case.scale).to(case.dtype)
    elif case.teacher == "branch":
        teacher = (torch.randn(b, k, c, generator=gen) * case.scale).to(case.dtype)
    grad_out = torch.rand(b, generator=gen) + 0.5 if case.reduction == "none" else torch.tensor(1.7)
    logits, target, grad_out = logits.to(device), target.to(device), grad_out.to(device)  # (no-op when strided)
    teacher = None if teacher is None else teacher.to(device)
    kwargs = dict(
        mode=case.mode,
        detach_teacher=case.detach,
        teacher_ce_weight=case.teacher_ce,
        label_smoothing=case.smoothing,
        reduction=case.reduction,
        **case.kwargs,
    )
    return logits, target, teacher, grad_out, kwargs


def leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(True)


def fused_outputs(logits, target, teacher, grad_out, kwargs):
    z, t = leaf(logits), leaf(teacher)
    loss, rows = online_kd_loss_and_terms(z, target, t, **kwargs)
    loss.backward(grad_out)
    return loss.detach(), rows, z.grad, None if t is None else t.grad


def reference_outputs(logits, target, teacher, grad_out, kwargs):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z, t = leaf(logits, acc), leaf(teacher, acc)
    loss = online_kd_loss_reference(z, target, t, **kwargs)
    row_kwargs = {k: v for k, v in kwargs.items() if k in ("mode", "temperature", "detach_teacher", "label_smoothing")}
    rows = online_kd_rows_reference(z.detach(), target, None if t is None else t.detach(), **row_kwargs)
    inputs = [x for x in (z, t) if x is not None]
    grads = torch.autograd.grad(loss, inputs, grad_out.to(acc), allow_unused=True, materialize_grads=True)
    return loss.detach(), rows, grads[0], grads[1] if t is not None else None


def check_case(case: Case, seed: int = 0, device: str = "cpu") -> None:
    logits, target, teacher, grad_out, kwargs = make_inputs(case, seed, device)
    loss, rows, g_logits, g_teacher = fused_outputs(logits, target, teacher, grad_out, kwargs)
    ref_loss, ref_rows, ref_g_logits, ref_g_teacher = reference_outputs(logits, target, teacher, grad_out, kwargs)
    assert loss.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, case.dtype, "value", f"loss {case}")
    valid = ref_rows.valid
    assert torch.equal(rows.valid, valid)
    for name in ("ce", "teacher_ce", "kd"):
        expected = torch.where(valid, getattr(ref_rows, name), torch.zeros((), device=valid.device))
        assert_close(getattr(rows, name), expected, case.dtype, "value", f"{name} rows {case}")
    assert g_logits.dtype == logits.dtype and g_logits.shape == logits.shape
    assert_close(g_logits, ref_g_logits, case.dtype, "grad", f"d/dlogits {case}")
    if teacher is not None:
        g_teacher = torch.zeros_like(teacher) if g_teacher is None else g_teacher
        assert_close(g_teacher, ref_g_teacher, case.dtype, "grad", f"d/dteacher {case}")


# ---------------------------------------------------------------------------------------------------------------
# the op against the reference (CPU path here; the Triton kernel in the interpreter subprocess)
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
def test_float64_exact_and_gradcheck():
    check_case(Case(batch=5, branches=3, classes=7, teacher="shared", detach=False, teacher_ce=0.5, smoothing=0.1,
                    dtype=torch.float64, ignored=True))  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    target = torch.tensor([1, 3, -100])
    for teacher_shape, mode, reduction in (((3, 4), "ensemble", "mean"), (None, "ensemble", "none"),
                                           (None, "peer", "sum"), ((3, 3, 4), "ensemble", "mean")):  # fmt: skip
        logits = torch.randn(3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        inputs = [logits]
        if teacher_shape is not None:
            inputs.append(torch.randn(*teacher_shape, dtype=torch.float64, generator=gen, requires_grad=True))

        def fn(z, t=None, mode=mode, reduction=reduction):
            return online_kd_loss(z, target, t, mode=mode, reduction=reduction, detach_teacher=False,
                                  teacher_ce_weight=0.5, label_smoothing=0.1, temperature=2.0)  # fmt: skip

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=IN_INTERPRETER)


@pytest.mark.triton
def test_opcheck():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    target = torch.tensor([1, -100, 3, 9])
    args = (logits, target, teacher, None, "ensemble", 3.0, 1.0, 1.0, 0.5, False, 0.1, -100, "none", True, True)
    torch.library.opcheck(torch.ops.okdfast.online_kd_loss.default, args)
    args = (logits, target, None, torch.tensor(0.3), "peer", 2.0, 1.0, 1.0, 0.0, True, 0.0, -100, "mean", True, False)
    torch.library.opcheck(torch.ops.okdfast.online_kd_loss.default, args)


@pytest.mark.triton
def test_double_backward_raises_clearly():
    logits = torch.randn(3, 2, 5, requires_grad=True)
    loss = online_kd_loss(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(loss, logits, create_graph=True)


@pytest.mark.triton
def test_no_grad_and_detached_inputs():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 10, requires_grad=True)
    target = torch.randint(0, 10, (5,))
    teacher = torch.randn(5, 10, requires_grad=True)
    with torch.no_grad():
        loss = online_kd_loss(logits, target, teacher, teacher_ce_weight=1.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, online_kd_loss_reference(logits, target, teacher, teacher_ce_weight=1.0))
    # a detached KL target with no teacher-CE: nothing can reach the teacher
    online_kd_loss(logits, target, teacher).backward()
    assert teacher.grad is None and logits.grad is not None
    # only the teacher needs a gradient
    logits.grad = None
    online_kd_loss(logits.detach(), target, teacher, detach_teacher=False).backward()
    (expected,) = torch.autograd.grad(
        online_kd_loss_reference(logits.detach(), target, teacher, detach_teacher=False), teacher
    )
    torch.testing.assert_close(teacher.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.triton
def test_tensor_kd_weight_equals_float():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 10)
    target = torch.randint(0, 10, (6,))
    teacher = torch.randn(6, 10)
    results = []
    for weight in (0.37, torch.tensor(0.37)):
        z, t = leaf(logits), leaf(teacher)
        loss = online_kd_loss(z, target, t, kd_weight=weight, detach_teacher=False, teacher_ce_weight=1.0)
        loss.backward()
        results.append((loss.detach(), z.grad, t.grad))
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


# ---------------------------------------------------------------------------------------------------------------
# the kernel itself (interpreter only): C in blocks, labels the host check did not see
# ---------------------------------------------------------------------------------------------------------------


def _launch(logits, target, teacher, block_c=None, **kwargs):
    from okdfast.kernels.online_kd import online_kd_forward

    options = dict(mode="ensemble", temperature=3.0, ce_weight=1.0, kd_weight=1.0, teacher_ce_weight=0.0,
                   detach_teacher=True, label_smoothing=0.0, ignore_index=-100, reduction="mean")  # fmt: skip
    options.update(kwargs)
    return online_kd_forward(logits, target, teacher, grad_logits=True, grad_teacher=teacher is not None,
                             block_c=block_c, **options)  # fmt: skip


@interpreter_only
@pytest.mark.triton
@pytest.mark.parametrize(
    "teacher, mode, detach",
    [("shared", "ensemble", False), ("branch", "ensemble", False), ("none", "peer", False), ("none", "ensemble", True)],
)
def test_kernel_loops_over_c_in_blocks(teacher, mode, detach):
    """C = 100 in blocks of 16 (7 blocks, the last one partial), K = 3 padded to 4: the online statistics."""
    case = Case(batch=5, branches=3, classes=100, teacher=teacher, mode=mode, detach=detach, teacher_ce=0.5,
                smoothing=0.1, ignored=True, reduction="none", scale=10.0)  # fmt: skip
    logits, target, teacher_t, _, kwargs = make_inputs(case)
    loss, terms, g_logits, g_teacher = _launch(logits, target, teacher_t, block_c=16, **kwargs)
    ref_loss, ref_rows, ref_g_logits, ref_g_teacher = reference_outputs(
        logits, target, teacher_t, torch.ones(5), kwargs
    )
    assert_close(loss, ref_loss, torch.float32, "value", "loss")
    assert_close(terms[:, 2], torch.where(ref_rows.valid, ref_rows.kd, 0.0), torch.float32, "value", "kd rows")
    assert_close(g_logits, ref_g_logits, torch.float32, "grad", "d/dlogits")
    if teacher_t is not None:
        assert_close(g_teacher, ref_g_teacher, torch.float32, "grad", "d/dteacher")


@interpreter_only
@pytest.mark.triton
def test_kernel_out_of_range_label_is_nan_not_an_out_of_bounds_read():
    """What happens when the host check is skipped (torch.compile): that row is NaN, the others are exact."""
    logits = torch.randn(3, 2, 5)
    target = torch.tensor([1, 7, -3])
    loss, terms, g_logits, _ = _launch(logits, target, None, reduction="none")
    assert loss[0].isfinite() and loss[1:].isnan().all() and terms[1:].isnan().all()
    assert g_logits[0].isfinite().all() and g_logits[1:].isnan().all()
    expected = online_kd_loss_reference(logits[:1], target[:1], reduction="none")
    torch.testing.assert_close(loss[:1], expected)


# ---------------------------------------------------------------------------------------------------------------
# in-process only: validation, torch.compile, the methods, GPU compilation
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
    (_bad(mode="dml"), "mode='dml'"),
    (_bad(reduction="batchmean"), "reduction='batchmean'"),
    (_bad(temperature=0.0), "temperature=0.0: must be > 0"),
    (_bad(temperature=float("nan")), "temperature=nan: must be a finite number"),
    (_bad(kd_weight=float("inf")), "kd_weight=inf"),
    (_bad(ce_weight=None), "ce_weight=None"),
    (_bad(teacher_ce_weight=float("nan")), "teacher_ce_weight=nan"),
    (_bad(label_smoothing=1.5), "label_smoothing=1.5"),
    (_bad(ignore_index=-1.5), "ignore_index"),
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


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_train_step(backend, device="cpu"):
    """A train step of a K-head model through the op compiles with no graph break and matches eager."""
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(8, 16).to(device), torch.nn.Linear(16, 3 * 10).to(device)
    gate = torch.nn.Linear(16, 3).to(device)
    params = [*trunk.parameters(), *heads.parameters(), *gate.parameters()]
    x, y = torch.randn(12, 8, device=device), torch.randint(0, 10, (12,), device=device)
    kd_scale = torch.tensor(0.4, device=device)

    def step(x, y, kd_scale):
        h = torch.relu(trunk(x))
        logits = heads(h).view(-1, 3, 10)
        teacher = torch.einsum("bk,bkc->bc", torch.softmax(gate(h), -1), logits)
        loss, rows = online_kd_loss_and_terms(
            logits, y, teacher, kd_weight=kd_scale, teacher_ce_weight=1.0, detach_teacher=False, label_smoothing=0.1
        )
        return loss, rows.kd.mean()

    def run(fn):
        for p in params:
            p.grad = None
        loss, kd = fn(x, y, kd_scale)
        loss.backward()
        return [loss.detach(), kd] + [p.grad.clone() for p in params]

    eager = run(step)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for got, expected in zip(run(compiled), eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    kd_scale.fill_(0.9)  # a new ramp-up weight: same graph, new value
    for got, expected in zip(run(compiled), run(step)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["independent", "dml", "one", "cl_ilr", "okddip", "mde"])
def test_methods_fused_loss_on_equals_off(name):
    """``--fused-loss on`` (the op; its CPU path here) and ``off`` (the reference) train identically."""
    results = []
    for fused in ("on", "off"):
        torch.manual_seed(0)
        method = create_method(name, "resnet8", 10, MethodConfig(fused_loss=fused, cd_weight=0.5))
        torch.manual_seed(1)
        images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        out = method(images)
        terms = method.loss(out, target, kd_scale=torch.tensor(0.6))  # a tensor, as the train loop passes it
        terms.total.backward()
        grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        results.append((terms.total.detach(), {k: v.detach() for k, v in terms.terms.items()}, grads))
    (total_on, terms_on, grads_on), (total_off, terms_off, grads_off) = results
    torch.testing.assert_close(total_on, total_off, rtol=1e-5, atol=1e-6)
    assert terms_on.keys() == terms_off.keys()
    for key in terms_on:
        torch.testing.assert_close(terms_on[key], terms_off[key], rtol=1e-5, atol=1e-6)
    assert len(grads_on) == len(grads_off) > 0
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_method_float_kd_scale_zero_logs_no_kd():
    method = create_method("one", "resnet8", 10, MethodConfig(fused_loss="on"))
    logits = torch.randn(4, 3, 10)
    out = MethodOutput(logits, teacher=logits.mean(1), head=logits.mean(1))
    terms = method.loss(out, torch.randint(0, 10, (4,)), kd_scale=0.0)
    assert "kd" not in terms.terms and "teacher_ce" in terms.terms


def _load_compile_kernels():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks" / "compile_kernels.py"
    spec = importlib.util.spec_from_file_location("okdfast_compile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_compile_for_sm90():
    """Compile (no GPU needed) two specialisations for sm_90 with Triton's bundled ptxas: no significant spills."""
    pytest.importorskip("triton")
    compile_online_kd = _load_compile_kernels().compile_online_kd

    for config in (
        dict(num_branches=4, num_classes=32768, teacher="shared", peer=False, detach=False, dtype="bf16"),
        dict(num_branches=3, num_classes=100, teacher="branch", peer=True, detach=False, dtype="fp32"),
    ):
        report = compile_online_kd(**config)
        if report is None:
            pytest.skip("no ptxas in this triton install")
        assert report["spill_bytes"] <= 64, report


# ---------------------------------------------------------------------------------------------------------------
# GPU tier (pytest -m gpu; benchmarks/gpu_checks/loss.sh): the compiled Triton kernel on CUDA
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_CASES = CASES + [
    Case(batch=64, branches=4, classes=32768, teacher="shared", detach=False, teacher_ce=1.0, dtype=torch.bfloat16),
    Case(batch=64, branches=4, classes=32768, mode="peer", detach=False, smoothing=0.1, ignored=True),
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
@pytest.mark.parametrize("block_c", [16, 128, 1024])
def test_gpu_block_sizes(block_c):
    case = Case(batch=16, branches=4, classes=3000, teacher="shared", detach=False, teacher_ce=1.0, reduction="none")
    logits, target, teacher, _, kwargs = make_inputs(case, device="cuda")
    loss, _, g_logits, g_teacher = _launch(logits, target, teacher, block_c=block_c, **kwargs)
    ref_loss, _, ref_g_logits, ref_g_teacher = reference_outputs(
        logits, target, teacher, torch.ones(16, device="cuda"), kwargs
    )
    assert_close(loss, ref_loss, torch.float32, "value", "loss")
    assert_close(g_logits, ref_g_logits, torch.float32, "grad", "d/dlogits")
    assert_close(g_teacher, ref_g_teacher, torch.float32, "grad", "d/dteacher")


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_opcheck_and_labels(monkeypatch):
    test_compile_fullgraph_train_step("inductor", device="cuda")
    logits = torch.randn(4, 3, 10, device="cuda", requires_grad=True)
    target = torch.tensor([1, -100, 3, 9], device="cuda")
    args = (logits, target, None, None, "peer", 2.0, 1.0, 1.0, 0.5, False, 0.1, -100, "none", True, False)
    torch.library.opcheck(torch.ops.okdfast.online_kd_loss.default, args)
    with pytest.raises(ValueError, match="class id 10"):
        online_kd_loss(logits, torch.tensor([1, 10, 3, 9], device="cuda"))
    monkeypatch.setenv("OKDFAST_CHECK_TARGETS", "0")  # no host sync: the bad row becomes NaN, nothing else
    rows = online_kd_loss(logits, torch.tensor([1, 10, 3, 9], device="cuda"), reduction="none")
    assert rows[1].isnan() and rows[[0, 2, 3]].isfinite().all()


# ---------------------------------------------------------------------------------------------------------------
# the interpreter run of every ``triton`` test above
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(IN_INTERPRETER, reason="this process already runs the interpreter")
def test_triton_interpreter_suite():
    """Every ``triton`` test of this file again, in a fresh process where CPU tensors run the Triton kernel."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton and not slow", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
