"""Each method's loss on a toy batch against an independent composition of torch.nn.functional, and the pieces
that make each method what it is (gate, ILR, peer attention, FFM, CD)."""

import math

import pytest
import torch
import torch.nn.functional as F

from okdfast.methods import MethodConfig, MethodOutput, create_method, list_methods, sigmoid_rampup
from okdfast.methods.cl_ilr import mean_of_other_branches

T = 3.0


def kl_batchmean(student, teacher):
    return T * T * F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1), reduction="batchmean")


@pytest.fixture
def toy():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 10)
    target = torch.randint(0, 10, (6,))
    return logits, target


def test_rampup_values():
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(80, 80) == 1.0 and sigmoid_rampup(200, 80) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_registry_lists_every_method_and_rejects_unknown():
    assert set(list_methods()) == {"baseline", "independent", "dml", "one", "cl_ilr", "okddip", "mde"}
    with pytest.raises(ValueError, match="unknown method 'nope'.*mde"):
        create_method("nope", "resnet8", 10)


@pytest.mark.parametrize("name", ["independent", "dml", "one", "cl_ilr", "okddip", "mde"])
def test_fewer_than_two_branches_rejected(name):
    with pytest.raises(ValueError, match="branches"):
        create_method(name, "resnet8", 10, MethodConfig(num_branches=1))


def test_baseline_needs_one_branch():
    with pytest.raises(ValueError, match="--branches 1"):
        create_method("baseline", "resnet8", 10, MethodConfig(num_branches=3))


def test_independent_is_sum_of_ce(toy):
    logits, target = toy
    method = create_method("independent", "resnet8", 10)
    loss = method.loss(MethodOutput(logits), target, kd_scale=0.7).total
    assert loss.item() == pytest.approx(sum(F.cross_entropy(logits[:, k], target).item() for k in range(3)), rel=1e-5)


def test_dml_loss_by_composition(toy):
    logits, target = toy
    method = create_method("dml", "resnet8", 10)
    loss = method.loss(MethodOutput(logits), target, kd_scale=0.5).total
    expected = sum(F.cross_entropy(logits[:, k], target) for k in range(3))
    expected += 0.5 * sum(kl_batchmean(logits[:, k], logits[:, j]) / 2 for k in range(3) for j in range(3) if j != k)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["one", "mde"])
def test_gated_ensemble_loss_by_composition(name, toy):
    logits, target = toy
    weights = torch.softmax(torch.randn(6, 3), -1)
    teacher = torch.einsum("bk,bkc->bc", weights, logits)
    method = create_method(name, "resnet8", 10, MethodConfig(cd_weight=0.0))
    loss = method.loss(MethodOutput(logits, teacher=teacher, head=teacher), target, kd_scale=0.25).total
    expected = sum(F.cross_entropy(logits[:, k], target) for k in range(3)) + F.cross_entropy(teacher, target)
    expected += 0.25 * sum(kl_batchmean(logits[:, k], teacher) for k in range(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mde_adds_cd_on_the_branch_classifiers(toy):
    logits, target = toy
    method = create_method("mde", "resnet8", 10, MethodConfig(cd_weight=0.3))
    out = MethodOutput(logits, teacher=logits.mean(1), head=logits.mean(1))
    terms = method.loss(out, target, kd_scale=0.0)
    w = torch.stack([b.classifier.weight for b in method.net.branches]).detach()
    w = F.normalize(w, dim=-1)
    cos2 = [(w[i] * w[j]).sum(-1).square().mean() for i in range(3) for j in range(i + 1, 3)]
    assert terms.terms["cd"].item() == pytest.approx(sum(cos2).item() / 3, rel=1e-5)
    terms.total.backward()
    assert method.net.branches[0].classifier.weight.grad is not None


def test_cl_ilr_teachers_and_gradient_rescaling(toy):
    logits, _ = toy
    others = mean_of_other_branches(logits)
    assert torch.allclose(others[:, 0], (logits[:, 1] + logits[:, 2]) / 2)
    torch.manual_seed(0)
    method = create_method("cl_ilr", "resnet8", 10)
    images = torch.randn(4, 3, 32, 32)
    method.eval()

    def trunk_grad(scale):
        method.zero_grad()
        method.net.trunk_grad_scale = scale
        method(images).logits.sum().backward()
        return next(method.net.trunk.parameters()).grad.clone()

    assert method.net.trunk_grad_scale == pytest.approx(1 / 3)
    assert torch.allclose(trunk_grad(1 / 3), trunk_grad(1.0) / 3, rtol=1e-4, atol=1e-7)


def test_okddip_targets():
    torch.manual_seed(0)
    method = create_method("okddip", "resnet8", 10)
    assert method.config.num_branches == 4
    out = method(torch.randn(5, 3, 32, 32))
    assert out.teacher.shape == (5, 4, 10)
    assert torch.allclose(out.teacher[:, -1], out.logits[:, :3].mean(1), atol=1e-6)
    assert torch.allclose(out.head, out.logits[:, -1])
    # Each peer target is a convex combination of the peer logits: inside their per-class min/max.
    peers = out.logits[:, :3]
    assert torch.all(out.teacher[:, :3] <= peers.max(1, keepdim=True).values + 1e-5)
    assert torch.all(out.teacher[:, :3] >= peers.min(1, keepdim=True).values - 1e-5)
    # Nothing detached by default: the KD term trains the query/key projections.
    loss = method.loss(out, torch.randint(0, 10, (5,)), kd_scale=1.0).total
    loss.backward()
    assert method.attention.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["one", "mde"])
def test_attention_heads_are_distributions(name):
    torch.manual_seed(0)
    method = create_method(name, "resnet8", 10)
    out = method(torch.randn(5, 3, 32, 32))
    assert out.attention.shape == (5, 3)
    assert torch.allclose(out.attention.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(out.teacher, torch.einsum("bk,bkc->bc", out.attention, out.logits), atol=1e-5)


def test_detach_teacher_flag_stops_gradient_into_the_gate():
    torch.manual_seed(0)
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for detach, expect_grad in ((False, True), (True, False)):
        method = create_method("one", "resnet8", 10, MethodConfig(detach_teacher=detach))
        out = method(images)
        # Only the KD term: with a detached teacher nothing reaches the gate.
        total, _ = method.online_kd(out.logits.detach(), target, out.teacher, kd_scale=1.0)
        total = total + 0 * out.teacher.sum()
        total.backward()
        grad = method.gate.fc.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad
