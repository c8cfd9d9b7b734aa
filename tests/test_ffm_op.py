"""The fused FFM attention op (okdfast/ops/ffm.py, kernels/ffm.py) against the PyTorch reference.

Two implementations are checked against ``ffm_attention_reference`` evaluated in float64 (autograd through it
is the gradient oracle): the op's PyTorch path ("torch") and its Triton kernels ("triton"). The "triton" cases
run on CUDA when there is one; on a CPU they run in ``test_triton_interpreter_suite``'s subprocess with
``TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1`` (TRITON_INTERPRET only takes effect when set before triton is first
imported, and setting it for the whole session would turn every other kernel into interpreted code).
Run just the interpreter part by hand:  TRITON_INTERPRET=1 OKDFAST_FORCE_TRITON=1 pytest -m triton <this file>
Shapes are small and irregular (odd B, D, C, R not powers of two) so that every mask and loop tail is exercised;
the architecture shapes run at batch 8.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from okdfast.methods import MethodConfig, create_method
from okdfast.models.ffm import FeatureFusionModule
from okdfast.ops import ffm as ffm_ops
from okdfast.ops.ffm import ffm_attention, fused_enabled, use_triton
from okdfast.ops.reference import ffm_attention_reference

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("OKDFAST_FORCE_TRITON") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
PATHS = ["torch", "triton"]
# Both paths compute in fp32 from the same input values, so fp32 results agree to rounding; bf16 rows cover the
# gradients that are returned in bf16 (features, logits) and the looser sums on a GPU. atol is relative to the
# tensor's largest magnitude: the BatchNorm backward cancels (dy - mean dy - xhat mean(dy xhat)), so at batch 8
# dW1 of any fp32 implementation, autograd through the fp32 reference included, sits up to ~5e-5 x max|g| from the
# float64 truth (measured: resnet32 shapes, K=8: fp32 reference 2.3e-5, this op 2.3e-5).
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 2e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
# (D, H, W) of the last-block features of every supported architecture (METHOD.md section 1)
ARCH_SHAPES = {
    "resnet32": (64, 8, 8),
    "wrn20_8": (512, 8, 8),
    "vgg16": (512, 2, 2),
    "densenet40_12": (456, 8, 8),
    "densenet40_12_bc": (132, 8, 8),
    "resnet110_bottleneck": (256, 8, 8),
}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Select the op's implementation: 'torch' (PyTorch on CPU) or 'triton' (CUDA, or the CPU interpreter)."""
    if request.param == "triton":
        if not (HAS_CUDA or IN_INTERPRETER):
            pytest.skip("runs in test_triton_interpreter_suite's subprocess (or on a GPU)")
        return request.param, DEVICE
    monkeypatch.delenv("OKDFAST_FORCE_TRITON", raising=False)  # CPU tensors take the PyTorch path
    return request.param, torch.device("cpu")


def make_inputs(
    batch=5,
    branches=3,
    channels=24,
    height=3,
    width=3,
    classes=7,
    hidden=32,
    *,
    dtype=torch.float32,
    channels_last=False,
    device=DEVICE,
    seed=0,
):
    """Fresh random inputs: features stacked from per-branch (B, D, H, W) maps exactly as MultiBranchNet does."""
    gen = torch.Generator().manual_seed(seed)
    per_branch = [torch.randn(batch, channels, height, width, generator=gen).relu() for _ in range(branches)]
    if channels_last:
        per_branch = [f.contiguous(memory_format=torch.channels_last) for f in per_branch]
    features = torch.stack(per_branch, dim=1).to(device=device, dtype=dtype).requires_grad_()
    logits = (2 * torch.randn(batch, branches, classes, generator=gen)).to(device=device, dtype=dtype)
    params = [
        torch.randn(hidden, channels, generator=gen) / channels**0.5,  # fc1.weight
        1.0 + 0.2 * torch.randn(hidden, generator=gen),  # bn.weight
        0.2 * torch.randn(hidden, generator=gen),  # bn.bias
        torch.randn(branches, hidden, generator=gen) / hidden**0.5,  # fc2.weight
        0.2 * torch.randn(branches, generator=gen),  # fc2.bias
    ]
    params = [p.to(device).requires_grad_() for p in params]
    running = [
        (0.1 * torch.randn(hidden, generator=gen)).to(device),
        (0.5 + torch.rand(hidden, generator=gen)).to(device),
    ]
    return features, logits.requires_grad_(), params, running


def run_both(features, logits, params, running, *, training, use_attention=True, use_teacher=True, seed=1):
    """Forward + backward through the op, and through the reference evaluated in float64 on the same input values
    (the oracle: the fp32 reference itself is no closer to the truth than the op), with the same random upstream
    gradients (grad_output != 1). Returns (op results, reference results): [attention, teacher, stats, grads]."""
    results = []
    for fn in (ffm_attention, ffm_attention_reference):
        stats = [r.clone() for r in running]
        if fn is ffm_attention_reference:
            features, logits = (x.detach().double().requires_grad_() for x in (features, logits))
            params = [p.detach().double().requires_grad_() for p in params]
            stats = [r.double() for r in stats]
        attention, teacher = fn(features, logits, *params, *stats, training=training, momentum=0.1, eps=1e-5)
        gen = torch.Generator().manual_seed(seed)
        grad_a = torch.randn(attention.shape, generator=gen).to(attention)
        grad_t = torch.randn(teacher.shape, generator=gen).to(teacher)
        loss = 0.0
        if use_attention:
            loss = loss + (attention * grad_a).sum()
        if use_teacher:
            loss = loss + (teacher * grad_t).sum()
        grads = torch.autograd.grad(loss, [features, logits, *params], allow_unused=True)
        results.append((attention, teacher, stats, grads))
    return results


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCES[dtype]
    expected = expected.float().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.float().cpu(), expected, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(op, ref, dtype, inputs):
    (a, t, stats, grads), (a_ref, t_ref, stats_ref, grads_ref) = op, ref
    assert a.dtype == torch.float32 and t.dtype == torch.float32
    assert_close(a, a_ref, dtype, "attention")
    assert_close(t, t_ref, dtype, "teacher")
    for name, s, s_ref in zip(("running_mean", "running_var"), stats, stats_ref):
        assert_close(s, s_ref, torch.float32, name)
    names = ["features", "logits", "fc1.weight", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        assert g is not None, name
        assert g.shape == g_ref.shape and g.dtype == inputs[names.index(name)].dtype, name
        assert_close(g, g_ref, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(path, dtype, channels_last, training):
    _, device = path
    features, logits, params, running = make_inputs(dtype=dtype, channels_last=channels_last, device=device)
    op, ref = run_both(features, logits, params, running, training=training)
    check_against_reference(op, ref, dtype, [features, logits, *params])


@pytest.mark.triton
@pytest.mark.parametrize("use_attention,use_teacher", [(True, False), (False, True)], ids=["attention", "teacher"])
def test_one_output_used(path, use_attention, use_teacher):
    """Backward with only one of the two outputs in the loss (the other's gradient is None)."""
    _, device = path
    features, logits, params, running = make_inputs(device=device, seed=3)
    op, ref = run_both(
        features, logits, params, running, training=True, use_attention=use_attention, use_teacher=use_teacher
    )
    check_against_reference(op, ref, torch.float32, [features, logits, *params])


@pytest.mark.triton
def test_loop_tails(path):
    """Shapes that take every loop more than once and end each on a partial block: B=37 > the row and dot blocks,
    R=200 (not a power of two, several stat rows per step), D=40 (two D blocks in kernel A), C=130 (two class
    chunks), K=5."""
    _, device = path
    features, logits, params, running = make_inputs(37, 5, 40, 3, 3, 130, 200, device=device, seed=4)
    op, ref = run_both(features, logits, params, running, training=True)
    check_against_reference(op, ref, torch.float32, [features, logits, *params])


@pytest.mark.triton
@pytest.mark.parametrize("batch", [3, 7, 9])
def test_odd_batches(path, batch):
    # Not B = 2: with two rows, training-mode BatchNorm has xhat = +-1 and its input gradient is exactly 0, so both
    # implementations return rounding noise (scaled by rstd) for dW1 and dF; nothing to compare there.
    _, device = path
    features, logits, params, running = make_inputs(batch, 2, 17, 1, 5, 11, 33, device=device, seed=batch)
    op, ref = run_both(features, logits, params, running, training=True)
    check_against_reference(op, ref, torch.float32, [features, logits, *params])


@pytest.mark.triton
def test_strided_features(path):
    """A spatial slice (stride_h != W * stride_w) and mixed dtypes: bf16 features with fp32 logits."""
    _, device = path
    features, logits, params, running = make_inputs(4, 3, 16, 5, 5, 9, 32, device=device, seed=5)
    sliced = features.detach()[..., 1:4, 1:4].to(torch.bfloat16).requires_grad_()
    op, ref = run_both(sliced, logits, params, running, training=True)
    check_against_reference(op, ref, torch.bfloat16, [sliced, logits, *params])


def _arch_cases():
    # K = 4 at every shape, K = 2 and 8 at ResNet-32's; the other (K, shape) pairs are slow in the interpreter
    return [
        pytest.param(
            arch,
            channels,
            height,
            width,
            branches,
            id=f"{arch}-K{branches}",
            marks=[] if branches == 4 or arch == "resnet32" else [pytest.mark.slow],
        )
        for arch, (channels, height, width) in ARCH_SHAPES.items()
        for branches in (2, 4, 8)
    ]


@pytest.mark.triton
@pytest.mark.parametrize("arch,channels,height,width,branches", _arch_cases())
def test_architecture_shapes(path, arch, channels, height, width, branches):
    """The last-block shapes of every supported architecture (R = max(D // 4, 32) as in the module), batch 8,
    channels-last as MultiBranchNet stacks them on a GPU run."""
    _, device = path
    hidden = max(channels // 4, 32)
    features, logits, params, running = make_inputs(
        8, branches, channels, height, width, 10, hidden, channels_last=True, device=device, seed=branches
    )
    op, ref = run_both(features, logits, params, running, training=True)
    check_against_reference(op, ref, torch.float32, [features, logits, *params])


# ---------------------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training):
    """float64 runs the op's PyTorch path: its hand-written backward (the kernels' math) against finite differences."""
    features, logits, params, running = make_inputs(4, 3, 6, 2, 3, 5, 4, device=torch.device("cpu"), seed=6)
    inputs = [features.detach().double().requires_grad_(), logits.detach().double().requires_grad_()]
    inputs += [p.detach().double().requires_grad_() for p in params]
    stats = [r.double() for r in running]

    def fn(*args):
        return ffm_attention(*args, *([None, None] if training else stats), training=training)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_samples(device):
    features, logits, params, running = make_inputs(4, 3, 10, 2, 2, 6, 32, device=device, seed=7)
    fc1, gamma, beta, w2, b2 = params
    samples = [
        (features, logits, fc1, gamma, beta, w2, b2, None, None, True, 1e-5),
        (features.detach(), logits.detach(), fc1, gamma, beta, w2, b2, *running, False, 1e-5),
    ]
    return samples, running


@pytest.mark.triton
def test_opcheck(path):
    _, device = path
    samples, running = _op_samples(device)
    for args in samples:
        torch.library.opcheck(torch.ops.okdfast.ffm_fwd.default, args)
    attention, teacher, pooled, bn_input, mean, var = torch.ops.okdfast.ffm_fwd(*samples[0])
    logits, fc1, gamma, beta, w2 = samples[0][1], *samples[0][2:6]
    grads = (torch.randn_like(attention), torch.randn_like(teacher))
    saved = tuple(t.detach() for t in (attention, pooled, bn_input, mean, var))
    for grad_a, grad_t in [grads, (None, grads[1]), (grads[0], None)]:
        bwd_args = (grad_a, grad_t, logits.detach(), fc1.detach(), gamma.detach(), beta.detach(), w2.detach())
        torch.library.opcheck(torch.ops.okdfast.ffm_bwd.default, (*bwd_args, *saved, True, 1e-5, 4))
    update_args = (running[0].clone(), running[1].clone(), mean, var, 0.1, 4)
    torch.library.opcheck(torch.ops.okdfast.ffm_update_running_stats.default, update_args)


def _step(features, logits, params, stats):
    attention, teacher = ffm_attention(features, logits, *params, *stats, training=True)
    weights = torch.linspace(-1, 1, attention.shape[1], device=attention.device)
    return (attention * weights).sum() + teacher.square().sum()


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(path, backend):
    """torch.compile(fullgraph=True) traces the op, its autograd formula and the running-statistics mutation."""
    _, device = path
    features, logits, params, running = make_inputs(device=device, seed=8)
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    results = []
    for fn in (_step, compiled):
        stats = [r.clone() for r in running]
        loss = fn(features, logits, params, stats)
        grads = torch.autograd.grad(loss, [features, logits, *params])
        results.append((loss, stats, grads))
    (loss, stats, grads), (loss_c, stats_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss)
    for s, s_c in zip(stats, stats_c):
        torch.testing.assert_close(s_c, s)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)


# ---------------------------------------------------------------------------------------------------------------
# the module, MDE, dispatch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_fused_matches_eager(path, momentum):
    """FeatureFusionModule(fused='on') equals fused='off' (the eager submodules) in train and eval mode, running
    statistics and num_batches_tracked included (momentum=None: the cumulative average)."""
    _, device = path
    fused = FeatureFusionModule(24, 3, fused="on").to(device)
    eager = FeatureFusionModule(24, 3, fused="off").to(device)
    fused.bn.momentum = eager.bn.momentum = momentum
    eager.load_state_dict(fused.state_dict())
    for mode in (True, True, False):
        features, logits, _, _ = make_inputs(device=device, seed=9 + mode)
        fused.train(mode)
        eager.train(mode)
        a, t = fused(features, logits)
        a_ref, t_ref = eager(features, logits)
        assert_close(a, a_ref, torch.float32, "attention")
        assert_close(t, t_ref, torch.float32, "teacher")
        ga = torch.autograd.grad(t.sum() + a[:, 0].sum(), [features, fused.fc1.weight, fused.bn.weight])
        gb = torch.autograd.grad(t_ref.sum() + a_ref[:, 0].sum(), [features, eager.fc1.weight, eager.bn.weight])
        for g, g_ref in zip(ga, gb):
            assert_close(g, g_ref, torch.float32, "grad")
        for name, buf in fused.bn.named_buffers():
            torch.testing.assert_close(buf, dict(eager.bn.named_buffers())[name], msg=name)


def test_mde_fused_flag():
    """MDE passes --fused-ffm through MethodConfig; 'on' and 'off' give the same teacher and attention."""
    torch.manual_seed(0)
    methods = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        methods[mode] = create_method("mde", "resnet8", 10, MethodConfig(num_branches=3, fused_ffm=mode))
        assert methods[mode].ffm.fused == mode
    images = torch.randn(4, 3, 32, 32)
    out_on, out_off = methods["on"](images), methods["off"](images)
    torch.testing.assert_close(out_on.attention, out_off.attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_on.teacher, out_off.teacher, atol=1e-5, rtol=1e-4)


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("OKDFAST_FORCE_TRITON", raising=False)
    assert not use_triton(cpu)
    monkeypatch.setenv("OKDFAST_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu) == ffm_ops.triton_available()
    assert not use_triton(cpu.double())  # float64 (gradcheck) always takes the PyTorch path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(cpu)
    assert fused_enabled("on", cpu) and not fused_enabled("off", cpu)
    assert fused_enabled("auto", cpu) is False  # 'auto' = where the Triton kernels run (TRITON_INTERPRET is 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_enabled("auto", cpu) == ffm_ops.triton_available()
    with pytest.raises(ValueError, match="fused mode"):
        fused_enabled("yes", cpu)
    with pytest.raises(ValueError, match="fused"):
        FeatureFusionModule(8, 2, fused="maybe")


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def _bad(**change):
    features, logits, params, running = make_inputs(device=torch.device("cpu"), seed=10)
    args = {
        "features": features,
        "logits": logits,
        "fc1_weight": params[0],
        "bn_weight": params[1],
        "bn_bias": params[2],
        "fc2_weight": params[3],
        "fc2_bias": params[4],
        "running_mean": running[0],
        "running_var": running[1],
    }
    training = change.pop("training", True)
    args.update(change)
    return args, training


@pytest.mark.parametrize(
    "change,match",
    [
        ({"features": torch.zeros(5, 3, 24, 9)}, "features must be"),
        ({"features": torch.zeros(5, 1, 24, 3, 3), "logits": torch.zeros(5, 1, 7)}, "K=1"),
        ({"features": torch.zeros(5, 9, 24, 3, 3)}, "K=9"),
        ({"logits": torch.zeros(5, 2, 7)}, "logits must be"),
        ({"logits": torch.zeros(4, 3, 7)}, "logits must be"),
        ({"fc1_weight": torch.zeros(32, 23)}, "fc1_weight"),
        ({"bn_weight": torch.zeros(31)}, "bn_weight"),
        ({"fc2_weight": torch.zeros(2, 32)}, "fc2_weight"),
        ({"fc2_bias": torch.zeros(4)}, "fc2_bias"),
        ({"running_var": None}, "both running_mean"),
        ({"running_mean": None, "running_var": None, "training": False}, "training=False"),
        ({"features": torch.zeros(1, 3, 24, 3, 3), "logits": torch.zeros(1, 3, 7)}, "more than 1 value"),
        ({"logits": torch.zeros(5, 3, 7, dtype=torch.long)}, "floating-point"),
        ({"fc2_bias": torch.zeros(3, device="meta")}, "is on meta"),
    ],
)
def test_errors(change, match):
    args, training = _bad(**change)
    with pytest.raises((ValueError, TypeError), match=match):
        ffm_attention(**args, training=training)


def test_double_backward_raises():
    features, logits, params, _ = make_inputs(device=torch.device("cpu"))
    attention, teacher = ffm_attention(features, logits, *params)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(teacher.sum(), [features], create_graph=True)


def test_module_errors():
    module = FeatureFusionModule(24, 3, fused="on")
    features, logits, _, _ = make_inputs(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="expects features"):
        module(features[:, :2], logits)
    with pytest.raises(ValueError, match="expects logits"):
        module(features, logits[:4])


# ---------------------------------------------------------------------------------------------------------------
# GPU tier (pytest -m gpu; benchmarks/gpu_checks/ffm.sh): the compiled kernels at training shapes
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _gpu_cases():
    cases = []
    for arch, (channels, height, width) in ARCH_SHAPES.items():
        for batch in (128, 512):
            for branches in (2, 4, 8) if arch == "resnet32" else (4,):
                for dtype in (torch.float32, torch.bfloat16):
                    name = f"{arch}-B{batch}-K{branches}-{str(dtype)[6:]}"
                    cases.append(pytest.param(arch, channels, height, width, batch, branches, dtype, id=name))
    return cases


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("arch,channels,height,width,batch,branches,dtype", _gpu_cases())
def test_gpu_training_shapes(arch, channels, height, width, batch, branches, dtype, channels_last):
    hidden = max(channels // 4, 32)
    features, logits, params, running = make_inputs(
        batch, branches, channels, height, width, 100, hidden, dtype=dtype, channels_last=channels_last, seed=11
    )
    op, ref = run_both(features, logits, params, running, training=True)
    check_against_reference(op, ref, dtype, [features, logits, *params])


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_inductor_and_cuda_graph():
    """torch.compile(fullgraph, inductor) on CUDA, and a CUDA-graph capture of the op's forward + backward (no host
    sync anywhere in it): both give the eager op's values."""
    features, logits, params, running = make_inputs(128, 4, 64, 8, 8, 100, 32, channels_last=True, seed=12)
    stats = [r.clone() for r in running]
    expected = _step(features, logits, params, stats)
    expected_grads = torch.autograd.grad(expected, [features, logits, *params])
    compiled = torch.compile(_step, fullgraph=True, backend="inductor")
    loss = compiled(features, logits, params, [r.clone() for r in running])
    torch.testing.assert_close(loss, expected)
    for g, g_ref in zip(torch.autograd.grad(loss, [features, logits, *params]), expected_grads):
        torch.testing.assert_close(g, g_ref)

    inputs = [features, logits, *params]
    graph_stats = [r.clone() for r in running]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles here), as CUDA graphs require
        for _ in range(2):
            torch.autograd.grad(_step(features, logits, params, [r.clone() for r in running]), inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss = _step(features, logits, params, graph_stats)
        graph_grads = torch.autograd.grad(graph_loss, inputs)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, expected)
    for g, g_ref in zip(graph_grads, expected_grads):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.gpu
@needs_cuda
def test_gpu_mde_fused_matches_eager_under_autocast():
    """MDE on ResNet-32, channels-last, bf16 autocast: --fused-ffm on and off agree (the eager FFM computes in bf16
    under autocast, so the tolerance is bf16's), and the fused path really dispatches to Triton."""
    images = torch.randn(64, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    outputs = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        method = create_method("mde", "resnet32", 100, MethodConfig(num_branches=4, fused_ffm=mode)).to(DEVICE)
        method = method.to(memory_format=torch.channels_last)
        assert method.ffm.uses_fused_op(torch.zeros(1, device=DEVICE)) == (mode == "on")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs[mode] = method(images)
    torch.testing.assert_close(outputs["on"].attention.float(), outputs["off"].attention.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outputs["on"].teacher.float(), outputs["off"].teacher.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(IN_INTERPRETER or HAS_CUDA, reason="this process already runs the Triton kernels")
def test_triton_interpreter_suite():
    """Every ``triton`` test of this file again, in a fresh process where CPU tensors run the Triton kernels."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton and not slow", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
