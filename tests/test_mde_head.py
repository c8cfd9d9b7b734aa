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
    """The ``triton`` tests again with the CPU tensors on the kernel path (the fused online-KD kernel in the
    interpreter, the attention and CD around it)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]
