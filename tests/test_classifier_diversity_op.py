"""The fused CD op (okdfast::classifier_diversity_loss) against the reference, on fresh random weights.

As in test_online_kd_op.py, the ``triton`` tests run here through the op's CPU path (reference value, closed-form
gradient) and again in a subprocess with ``TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1`` through the Triton kernel
(``test_triton_interpreter_suite``; see test_online_kd_op.py for why a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from okdfast.functional import classifier_diversity_loss
from okdfast.losses import ClassifierDiversityLoss
from okdfast.ops.dispatch import use_triton
from okdfast.ops.reference import classifier_diversity_loss_reference

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("OKDFAST_FORCE_TRITON") == "1"
interpreter_only = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_triton_interpreter_suite's subprocess")

# (rtol, atol relative to the largest reference value); the oracle is the fp32 reference on the upcast weights
TOLERANCE = {
    torch.float32: {"value": (1e-5, 1e-6), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"value": (1e-5, 1e-6), "grad": (1e-2, 4e-3)},
    torch.float16: {"value": (1e-5, 1e-6), "grad": (2e-3, 5e-4)},
    torch.float64: {"value": (1e-7, 1e-9), "grad": (1e-6, 1e-8)},  # eps reaches the kernel as fp32
}


def assert_close(actual, expected, dtype, kind, what):
    rtol, atol = TOLERANCE[dtype][kind]
    expected = expected.to(torch.float64)
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol * scale, msg=what)


def check(weights: torch.Tensor, what: str) -> None:
    w = weights.detach().requires_grad_(True)
    loss = classifier_diversity_loss(w)
    loss.backward(torch.tensor(1.3))
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    w_ref = weights.detach().to(acc).requires_grad_(True)
    expected = classifier_diversity_loss_reference(w_ref)
    (g_expected,) = torch.autograd.grad(expected, w_ref, torch.tensor(1.3, dtype=acc))
    assert loss.dtype == acc and loss.shape == ()
    assert_close(loss.detach(), expected.detach(), weights.dtype, "value", f"value {what}")
    assert w.grad.dtype == weights.dtype and w.grad.shape == weights.shape
    assert_close(w.grad, g_expected, weights.dtype, "grad", f"grad {what}")


@pytest.mark.triton
def test_dispatch_matches_the_process():
    assert use_triton(torch.zeros(1), float64=True) == IN_INTERPRETER


@pytest.mark.triton
@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((2, 10, 64), torch.float32),
        ((3, 100, 64), torch.float32),
        ((4, 7, 33), torch.float32),
        ((5, 3, 130), torch.float32),
        ((4, 10, 64), torch.bfloat16),
        ((3, 10, 20), torch.float16),
        ((3, 5, 9), torch.float64),
    ],
    ids=str,
)
def test_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    check(torch.randn(*shape, generator=gen).to(dtype), f"{shape} {dtype}")


@pytest.mark.triton
def test_non_contiguous_weights_and_degenerate_rows():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(10, 3, 2 * 16, generator=gen)[..., ::2].transpose(0, 1)  # (3, 10, 16), strided
    assert not weights.is_contiguous()
    check(weights, "strided")
    weights = torch.randn(3, 6, 8, generator=gen)
    weights[0, 1] = 0.0  # a zero class vector: its norm is clamped at eps (F.normalize), the gradient is g / eps
    weights[2, 4] *= 1e-9  # below eps as well
    weights[1, 3] = weights[0, 3] * 4.0  # parallel rows: cos = 1
    check(weights, "degenerate rows")


@pytest.mark.triton
def test_module_and_hand_computed_values():
    w = torch.randn(1, 5, 8)
    assert ClassifierDiversityLoss()(w.repeat(3, 1, 1)).item() == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(4).reshape(4, 1, 4).repeat(1, 3, 1)  # branch k's class vectors all along axis k: orthogonal
    assert classifier_diversity_loss(eye).item() == pytest.approx(0.0, abs=1e-7)
    # the plain torch composition: mean over pairs k<l and classes of the squared cosine
    w = torch.randn(3, 6, 5)
    n = F.normalize(w, dim=-1)
    expected = torch.stack([(n[i] * n[j]).sum(-1).square() for i in range(3) for j in range(i + 1, 3)]).mean()
    torch.testing.assert_close(classifier_diversity_loss(w), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.triton
def test_gradcheck_float64():
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        classifier_diversity_loss, (w,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=IN_INTERPRETER
    )


@pytest.mark.triton
def test_opcheck_and_no_grad():
    w = torch.randn(3, 10, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.okdfast.classifier_diversity_loss.default, (w, 1e-8, True))
    torch.library.opcheck(torch.ops.okdfast.classifier_diversity_loss.default, (w.detach(), 1e-8, False))
    with torch.no_grad():
        loss = classifier_diversity_loss(w)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, classifier_diversity_loss_reference(w.detach()))


@pytest.mark.triton
def test_double_backward_raises_clearly():
    w = torch.randn(3, 4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(classifier_diversity_loss(w), w, create_graph=True)


@interpreter_only
@pytest.mark.triton
def test_kernel_loops_over_d_in_blocks():
    """D = 100 in blocks of 16 (the last one partial), K = 3 padded to 4."""
    from okdfast.kernels.classifier_diversity import classifier_diversity_forward

    weights = torch.randn(3, 6, 100)
    weights[1, 2] = 0.0
    loss, grad = classifier_diversity_forward(weights, eps=1e-8, grad=True, block_d=16)
    w_ref = weights.clone().requires_grad_(True)
    expected = classifier_diversity_loss_reference(w_ref)
    (g_expected,) = torch.autograd.grad(expected, w_ref)
    assert_close(loss, expected.detach(), torch.float32, "value", "value")
    assert_close(grad, g_expected, torch.float32, "grad", "grad")


# ---------------------------------------------------------------------------------------------------------------
# in-process only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, eps, message",
    [
        (torch.randn(30, 8), 1e-8, "weights: expected \\(K, C, D\\)"),
        (torch.randn(1, 10, 8), 1e-8, "K >= 2"),
        (torch.randn(3, 0, 8), 1e-8, "C=0, D=8"),
        (torch.randint(0, 3, (3, 10, 8)), 1e-8, "weights: dtype"),
        (torch.randn(3, 10, 8), 0.0, "eps=0.0"),
        (torch.randn(3, 10, 8), float("nan"), "eps=nan"),
    ],
)
def test_invalid_arguments_raise_clear_errors(weights, eps, message):
    with pytest.raises(ValueError, match=message):
        classifier_diversity_loss(weights, eps=eps)


def test_compile_fullgraph():
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 10) for _ in range(3))

    def cd(heads_weights):
        return classifier_diversity_loss(torch.stack(heads_weights)) * 2.0

    weights = [h.weight for h in heads]
    eager = cd(weights)
    (g_eager,) = torch.autograd.grad(eager, weights[0])
    compiled = torch.compile(cd, fullgraph=True, backend="aot_eager")(weights)
    (g_compiled,) = torch.autograd.grad(compiled, weights[0])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((4, 100, 64), torch.float32),
        ((8, 1000, 512), torch.float32),
        ((3, 32768, 64), torch.bfloat16),
        ((2, 10, 640), torch.float64),
    ],  # fmt: skip
    ids=str,
)
def test_gpu_matches_reference(shape, dtype):
    assert use_triton(torch.zeros(1, device="cuda"), float64=True)
    check(torch.randn(*shape, device="cuda").to(dtype), f"cuda {shape} {dtype}")


@pytest.mark.skipif(IN_INTERPRETER, reason="this process already runs the interpreter")
def test_triton_interpreter_suite():
    """Every ``triton`` test of this file again, in a fresh process where CPU tensors run the Triton kernel."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton and not slow", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
