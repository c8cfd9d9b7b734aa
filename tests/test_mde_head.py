"""MDE's loss head (okdfast.ops.mde_head, okdfast.functional.mde_head_loss) against an independent hand composition
from torch.nn.functional, by float64 gradcheck, under torch.compile(fullgraph=True), with bad arguments, and its
kernel path in Triton's interpreter (``triton``-marked tests run again in a subprocess with TRITON_INTERPRET=1
OKDFAST_FORCE_TRITON=1, as in tests/test_online_kd_op.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from okdfast.functional import mde_head_loss, mde_head_loss_and_terms
from okdfast.losses import MDEHeadLoss
from okdfast.ops import MDEHeadOptions, mde_head
from okdfast.ops.reference import mde_head_reference

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("OKDFAST_FORCE_TRITON") == "1"


def kl_batchmean(student, teacher, temperature):
    log_q = F.log_softmax(teacher / temperature, -1)
    log_p = F.log_softmax(student / temperature, -1)
    return temperature**2 * (log_q.exp() * (log_q - log_p)).sum(-1)


def corr_rows(aux, target, temperature):
    rows = []
    for b in range(aux.shape[0]):
        p = torch.softmax(aux[b] / temperature, -1)
        keep = [c for c in range(aux.shape[-1]) if c != int(target[b])]
        r = p[:, keep] - p[:, keep].mean(-1, keepdim=True)
        m = aux.shape[1]
        pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        rows.append(sum(F.cosine_similarity(r[i], r[j], dim=0) for i, j in pairs) / len(pairs))
    return torch.stack(rows)


def hand_rows(logits, target, energy, o: MDEHeadOptions):
    """Per-row loss written from docs/METHOD.md section 3, one term at a time."""
    z, k = logits.double(), logits.shape[1]
    aux, leader = z[:, :-1], z[:, -1]
    a = torch.softmax(energy.double() / o.attention_temperature, -1).reshape(z.shape[0], -1, k - 1)
    goals = torch.einsum("bri,bic->brc", a, aux).expand(-1, k - 1, -1)  # (B, K-1, C): each auxiliary's target
    ce = sum(F.cross_entropy(z[:, j], target, reduction="none", label_smoothing=o.label_smoothing) for j in range(k))
    distinct = goals[:, :1] if a.shape[1] == 1 else goals  # one shared target, or one per auxiliary
    goal_ce = [
        F.cross_entropy(g, target, reduction="none", label_smoothing=o.label_smoothing) for g in distinct.unbind(1)
    ]
    target_ce = sum(goal_ce) / len(goal_ce)
    kl_goals = goals.detach() if o.detach_target else goals
    kl1 = sum(kl_batchmean(aux[:, i], kl_goals[:, i], o.temperature) for i in range(k - 1))
    mean = aux.mean(1).detach() if (o.detach_leader_target or o.detach_target) else aux.mean(1)
    kl2 = kl_batchmean(leader, mean, o.temperature)
    cd = corr_rows(aux, target, o.temperature)
    return ce + o.target_ce_weight * target_ce + o.kd_weight * (kl1 + kl2) + o.cd_weight * cd


CASES = [
    dict(shape=(5, 4, 10), per_aux=False, options=dict(cd_weight=0.7)),
    dict(shape=(3, 3, 7), per_aux=True, options=dict(cd_weight=2.0, attention_temperature=0.5, target_ce_weight=0.3)),
    dict(shape=(4, 5, 13), per_aux=False, options=dict(cd_weight=1.0, detach_target=True, label_smoothing=0.1)),
    dict(shape=(2, 8, 5), per_aux=True, options=dict(cd_weight=0.1, detach_leader_target=False, kd_weight=0.4)),
]


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['shape']}-per_aux={c['per_aux']}")
def test_head_equals_the_hand_composition_values_and_gradients(case):
    torch.manual_seed(0)
    b, k, c = case["shape"]
    logits = (2 * torch.randn(b, k, c)).requires_grad_()
    energy = torch.randn(*((b, k - 1, k - 1) if case["per_aux"] else (b, k - 1))).requires_grad_()
    target = torch.randint(0, c, (b,))
    options = MDEHeadOptions(**case["options"])
    upstream = torch.randn(b)  # a random upstream gradient through reduction='none'
    got = mde_head(logits, target, energy, MDEHeadOptions(**case["options"], reduction="none"))[0]
    want = hand_rows(logits, target, energy, options)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    g_got = torch.autograd.grad((got * upstream).sum(), (logits, energy))
    g_want = torch.autograd.grad((want * upstream.double()).sum(), (logits, energy))
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-4, atol=2e-6)
    mean = mde_head(logits, target, energy, options)[0]
    torch.testing.assert_close(mean.double(), want.mean(), rtol=2e-5, atol=2e-5)


@pytest.mark.triton
def test_head_ignore_index_strided_and_bf16_inputs():
    torch.manual_seed(1)
    base = torch.randn(6, 4, 22)
    logits = base[:, :, ::2]  # a strided view, C = 11
    energy = torch.randn(3, 6).T  # (6, 3), transposed strides
    target = torch.tensor([0, 3, -100, 10, 5, -100])
    options = MDEHeadOptions(cd_weight=1.0)
    loss, terms = mde_head(logits, target, energy, options)
    want, want_terms = mde_head_reference(logits.contiguous(), target, energy.contiguous(), options)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for x, y in zip(terms, want_terms):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    low = mde_head(logits.bfloat16(), target, energy.bfloat16(), options)[0]
    ref = mde_head_reference(logits.bfloat16().float(), target, energy.bfloat16().float(), options)[0]
    torch.testing.assert_close(low.float(), ref, rtol=1e-4, atol=1e-4)  # fp32 math on the upcast inputs


F32_UNIT = 2.0**-24  # float32's unit roundoff (round to nearest)


def fuzz_cases():
    """Odd and multi-chunk C (the CD's co-moments merged over several chunks), K 3..8, one shared or per-auxiliary
    attention rows, strided / expanded / transposed inputs, bf16, ignored rows, every reduction and option."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for i, (b, k, c) in enumerate([(7, 4, 517), (5, 3, 3), (6, 5, 61), (4, 8, 129), (9, 4, 100), (3, 6, 1000)]):
        cases.append(dict(
            shape=(b, k, c), per_aux=i % 2 == 1, seed=int(torch.randint(0, 2**31, (1,), generator=g)),
            layout=("strided", "expanded", "transposed", "contiguous")[i % 4],
            dtype=(torch.float32, torch.bfloat16)[i % 3 == 2],
            options=dict(
                cd_weight=(0.0, 0.5, 1.0, 3.0)[i % 4], temperature=(3.0, 1.0, 4.0)[i % 3],
                attention_temperature=(1.0, 0.5, 2.0)[i % 3], target_ce_weight=(1.0, 0.0, 0.3)[i % 3],
                detach_target=i == 3, detach_leader_target=i != 4, label_smoothing=0.1 * (i % 2),
                reduction=("none", "mean", "sum")[i % 3],
            ),
        ))  # fmt: skip
    return cases


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (B, K, C) with the same values in another memory layout."""
    if layout == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded":  # one row's logits shared by every row: stride 0 over the batch
        return x[:1].expand_as(x)
    if layout == "transposed":
        return x.transpose(0, 2).contiguous().transpose(0, 2)
    return x


@pytest.mark.triton
@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"{c['shape']}-{c['layout']}-{str(c['dtype'])[6:]}")
def test_one_pass_kernel_equals_the_float64_reference(case):
    """Values, terms and both gradients (random upstream gradient) of the kernel path against the reference in
    float64 on the upcast inputs. The tolerance is the float32 reference's own distance from it (the same math in
    float32, measured on these inputs: it grows with C and with the CD's cancellation), times 4, plus 16 ulps of
    each tensor's scale, plus the rounding of a gradient to the inputs' dtype: a bound from the operation's rounding,
    not from what passed on one CPU."""
    if not IN_INTERPRETER:
        pytest.skip("the kernel path: it runs in the interpreter run (test_triton_interpreter_suite)")
    torch.manual_seed(case["seed"])
    b, k, c = case["shape"]
    logits = laid_out((3 * torch.randn(b, k, c)).to(case["dtype"]), case["layout"])
    energy = torch.randn(*((b, k - 1, k - 1) if case["per_aux"] else (k - 1, b))).to(case["dtype"])
    energy = energy if case["per_aux"] else energy.T  # (B, M) with transposed strides
    target = torch.randint(0, c, (b,))
    target[b // 2] = -100
    options = MDEHeadOptions(**case["options"])
    upstream = torch.randn(b) if options.reduction == "none" else torch.randn(())

    def run(z, e, kernel):
        z, e = z.detach().requires_grad_(), e.detach().requires_grad_()
        loss, terms = mde_head(z, target, e, options, kernel=kernel)
        grads = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), (z, e))
        return [loss.double(), torch.stack(list(terms)).double(), *(g.double() for g in grads)]

    want = run(logits.double(), energy.double(), False)
    fp32 = run(logits.float(), energy.float(), False)
    got = run(logits, energy, True)
    # the gradients are returned in the inputs' dtype: one rounding, and B of them plus the sum's where autograd adds
    # the B rows of an expanded input (in that dtype)
    stored = torch.finfo(case["dtype"]).eps / 2 * (b + 1 if case["layout"] == "expanded" else 1)
    for name, w, r, x in zip(("loss", "terms", "d logits", "d attention"), want, fp32, got):
        scale = w.abs().max().item()
        bound = 4 * (r - w).abs().max().item() + 16 * F32_UNIT * scale + (stored * scale if name[0] == "d" else 0)
        assert (x - w).abs().max().item() <= bound, (name, (x - w).abs().max().item(), bound)


@pytest.mark.triton
def test_one_pass_kernel_equals_the_composed_path():
    """The one-pass kernel and the composition it replaces (the fused online-KD op with the attention and CD in
    PyTorch around it) give the same loss, terms and gradients."""
    if not IN_INTERPRETER:
        pytest.skip("both are kernel paths: they run in the interpreter run")
    torch.manual_seed(5)
    logits, energy, target = torch.randn(6, 4, 33), torch.randn(6, 3), torch.randint(0, 33, (6,))
    options = MDEHeadOptions(cd_weight=1.0, target_ce_weight=0.5)
    results = []
    for kernel in (True, "composed"):
        z, e = logits.clone().requires_grad_(), energy.clone().requires_grad_()
        loss, terms = mde_head(z, target, e, options, kernel=kernel)
        loss.backward()
        results.append([loss, torch.stack(list(terms)), z.grad, e.grad])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_one_pass_head_is_three_launches(monkeypatch):
    """Forward + backward of the whole head: the row kernel, the batch reduction, the backward row kernel."""
    if not IN_INTERPRETER:
        pytest.skip("counts the kernel path's launches")
    from okdfast.kernels import online_kd as kernels

    launched, runnable = [], kernels._runnable
    monkeypatch.setattr(kernels, "_runnable", lambda k, d: launched.append(k.__name__) or runnable(k, d))
    logits = torch.randn(4, 4, 20, requires_grad=True)
    energy = torch.randn(4, 3, requires_grad=True)
    loss, _ = mde_head(logits, torch.randint(0, 20, (4,)), energy, MDEHeadOptions(cd_weight=1.0), kernel=True)
    loss.backward()
    assert launched == ["_online_kd_fwd_kernel", "_online_kd_reduce_kernel", "_online_kd_bwd_kernel"]
    assert logits.grad is not None and energy.grad is not None


@pytest.mark.triton
def test_kernel_none_follows_the_measured_verdicts(monkeypatch):
    """kernel=None runs the one-pass kernel except where a verdict (okdfast.ops.fused_default) measured it slower than
    the alternative: the eager reference for an eager call, the compiled reference inside torch.compile. Here the
    interpreter's CPU stands in for a GPU architecture ('cpu'); no launch means the reference ran."""
    if not IN_INTERPRETER:
        pytest.skip("which path kernel=None takes where the kernel runs")
    from okdfast.kernels import online_kd as kernels

    from okdfast.ops import fused_default
    from okdfast.ops.fused_default import Verdict

    launched, runnable = [], kernels._runnable
    monkeypatch.setattr(kernels, "_runnable", lambda k, d: launched.append(k.__name__) or runnable(k, d))
    torch.manual_seed(12)
    logits, target, options = torch.randn(6, 4, 20), torch.randint(0, 20, (6,)), MDEHeadOptions(cd_weight=1.0)
    shared, per_aux = torch.randn(6, 3), torch.randn(6, 3, 3)
    eager = lambda z, e: mde_head(z, target, e, options)[0]

    def launches(vs_reference, vs_compiled, fn=eager, energy=shared):
        measured = Verdict("mde_head", "cpu", "fp32", "shared", (8, 4, 16), vs_reference, vs_compiled, "r")
        monkeypatch.setattr(fused_default, "VERDICTS", (measured,))
        launched.clear()
        want = mde_head_reference(logits, target, energy, options)[0]
        torch.testing.assert_close(fn(logits, energy), want, rtol=1e-5, atol=1e-6)
        return len(launched)

    assert launches("loses", "wins") == 0
    assert launches("wins", "loses") == 2 and launches("cannot tell apart", "loses") == 2  # fwd: rows + reduction
    assert launches("loses", "loses", energy=per_aux) == 2  # no verdict for the per-auxiliary layout: the kernel
    for vs_reference, vs_compiled, want in (("wins", "loses", 0), ("loses", "wins", 2)):
        torch._dynamo.reset()
        compiled = torch.compile(eager, fullgraph=True, backend="eager")
        assert launches(vs_reference, vs_compiled, compiled) == want
    torch._dynamo.reset()


@pytest.mark.triton
@pytest.mark.parametrize("rows_per_program", [2, 3, 8])
def test_rows_per_program_changes_no_bit(rows_per_program, monkeypatch):
    """A program handling several rows one after another (the launch parameter bench_loss --sweep times) computes
    every row as one program per row does, bit for bit: 7 rows (not a multiple of 2 or 3, fewer than 8), one
    ignored, per-auxiliary attention, the CD on."""
    if not IN_INTERPRETER:
        pytest.skip("the kernel's launch configuration")
    from okdfast.kernels import online_kd as kernels

    torch.manual_seed(11)
    logits, energy = torch.randn(7, 4, 21), torch.randn(7, 3, 3)
    target = torch.randint(0, 21, (7,))
    target[4] = -100
    options = MDEHeadOptions(cd_weight=1.0, target_ce_weight=0.5)
    real = kernels.launch_config

    def run(rows):
        monkeypatch.setattr(kernels, "launch_config", lambda *a, **k: real(*a[:6], rows_per_program=rows))
        z, e = logits.clone().requires_grad_(), energy.clone().requires_grad_()
        loss, terms = mde_head(z, target, e, options, kernel=True)
        loss.backward()
        return [loss, torch.stack(list(terms)), z.grad, e.grad]

    for x, y in zip(run(1), run(rows_per_program)):
        assert torch.equal(x, y)


@pytest.mark.triton
def test_opcheck_of_the_head_ops():
    if not IN_INTERPRETER:
        pytest.skip("the ops' CPU kernels are the interpreted Triton kernels")
    torch.manual_seed(6)
    logits = torch.randn(4, 4, 10, requires_grad=True)
    target = torch.tensor([1, -100, 3, 9])
    fwd = torch.ops.okdfast.mde_head_fwd.default
    for energy, options in (
        (torch.randn(4, 3, requires_grad=True), MDEHeadOptions(cd_weight=0.5, reduction="none")),
        (torch.randn(4, 3, 3, requires_grad=True), MDEHeadOptions(cd_weight=1.0, detach_leader_target=False)),
    ):
        torch.library.opcheck(fwd, (logits, target, energy, torch.tensor(0.3), *options.as_args()))


@pytest.mark.triton
def test_head_float64_gradcheck():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    energy = torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2])
    options = MDEHeadOptions(cd_weight=0.8, detach_leader_target=False, attention_temperature=0.7)
    assert torch.autograd.gradcheck(lambda z, e: mde_head(z, target, e, options)[0], (logits, energy))


def test_public_function_module_and_terms():
    torch.manual_seed(3)
    logits, energy, target = torch.randn(4, 4, 10), torch.randn(4, 3), torch.randint(0, 10, (4,))
    loss = mde_head_loss(logits, target, energy, cd_weight=0.5, kd_weight=torch.tensor(0.3))
    module = MDEHeadLoss(cd_weight=0.5)(logits, target, energy, kd_weight=torch.tensor(0.3))
    _, terms = mde_head_loss_and_terms(logits, target, energy, cd_weight=0.5)
    want = hand_rows(logits, target, energy, MDEHeadOptions(cd_weight=0.5, kd_weight=0.3)).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module, loss)
    assert -1.0 <= float(terms.cd) <= 1.0


def test_compile_fullgraph_with_changing_kd_weight():
    torch.manual_seed(4)
    logits, energy, target = torch.randn(4, 4, 10), torch.randn(4, 3), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda z, e, w: mde_head_loss(z, target, e, cd_weight=0.5, kd_weight=w), fullgraph=True)
    for w in (0.1, 0.2, 0.3):
        got = compiled(logits, energy, torch.tensor(w))
        torch.testing.assert_close(got, mde_head_loss(logits, target, energy, cd_weight=0.5, kd_weight=torch.tensor(w)))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(logits=torch.randn(4, 2, 10)), "K=2"),
        (dict(logits=torch.randn(4, 4, 2)), "C=2"),
        (dict(energy=torch.randn(4, 4)), "attention_logits: expected"),
        (dict(energy=torch.randn(4, 3, 2)), "attention_logits: expected"),
        (dict(target=torch.zeros(4, dtype=torch.int32)), "int64"),
        (dict(energy=torch.zeros(4, 3, dtype=torch.long)), "attention_logits: dtype"),
    ],
)
def test_bad_arguments_are_one_clear_error(change, message):
    args = dict(logits=torch.randn(4, 4, 10), energy=torch.randn(4, 3), target=torch.randint(0, 10, (4,)))
    args |= change
    with pytest.raises(ValueError, match=message):
        mde_head(args["logits"], args["target"], args["energy"])


@pytest.mark.parametrize(
    "field, value", [("temperature", 0.0), ("attention_temperature", 1e9), ("cd_weight", float("nan"))]
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MDEHeadOptions(**{field: value})


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the interpreter run itself")
def test_triton_interpreter_suite():
    """The ``triton`` tests again with the CPU tensors on the kernel path (the one-pass head kernel in the
    interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]
