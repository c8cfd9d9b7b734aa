"""Each method's loss on a toy batch against an independent composition of torch.nn.functional, and the pieces
that make each method what it is (gate, ILR, peer attention, FFM, leader, CD), including where gradients go."""

import math

import pytest
import torch
import torch.nn.functional as F

from okdfast.methods import MethodConfig, MethodOutput, create_method, list_methods, sigmoid_rampup
from okdfast.methods.cl_ilr import mean_of_others_weights
from okdfast.methods.mde import CD_DEFAULT_WEIGHTS
from okdfast.models.ffm import FFM_INPUTS
from okdfast.ops.reference import classifier_diversity_reference, mde_teacher_weights

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
def test_too_few_branches_rejected(name):
    with pytest.raises(ValueError, match="branches"):
        create_method(name, "resnet8", 10, MethodConfig(num_branches=1 if name not in ("okddip", "mde") else 2))


def test_baseline_needs_one_branch():
    with pytest.raises(ValueError, match="--branches 1"):
        create_method("baseline", "resnet8", 10, MethodConfig(num_branches=3))


def test_independent_is_sum_of_ce(toy):
    logits, target = toy
    method = create_method("independent", "resnet8", 10)
    loss = method.loss(MethodOutput(logits), target, kd_weight=0.7).total
    assert loss.item() == pytest.approx(sum(F.cross_entropy(logits[:, k], target).item() for k in range(3)), rel=1e-5)


def test_dml_loss_by_composition(toy):
    logits, target = toy
    method = create_method("dml", "resnet8", 10)
    loss = method.loss(MethodOutput(logits), target, kd_weight=0.5).total
    expected = sum(F.cross_entropy(logits[:, k], target) for k in range(3))
    expected += 0.5 * sum(kl_batchmean(logits[:, k], logits[:, j]) / 2 for k in range(3) for j in range(3) if j != k)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_loss_by_composition(toy):
    logits, target = toy
    gate = torch.softmax(torch.randn(6, 3), -1)
    teacher = torch.einsum("bk,bkc->bc", gate, logits)
    method = create_method("one", "resnet8", 10)
    out = MethodOutput(logits, teacher_weights=gate, attention=gate)
    loss = method.loss(out, target, kd_weight=torch.tensor(0.25)).total
    expected = sum(F.cross_entropy(logits[:, k], target) for k in range(3)) + F.cross_entropy(teacher, target)
    expected += 0.25 * sum(kl_batchmean(logits[:, k], teacher) for k in range(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(method.heads(out)["gate"], teacher)


def test_cl_ilr_teachers_and_gradient_rescaling(toy):
    logits, target = toy
    w = mean_of_others_weights(3)
    others = torch.einsum("bkj,bjc->bkc", w.expand(6, 3, 3), logits)
    assert torch.allclose(others[:, 0], (logits[:, 1] + logits[:, 2]) / 2)
    method = create_method("cl_ilr", "resnet8", 10)
    loss = method.loss(MethodOutput(logits, teacher_weights=method.teacher_weights), target, kd_weight=0.5).total
    expected = sum(
        F.cross_entropy(logits[:, k], target) + 0.5 * kl_batchmean(logits[:, k], others[:, k]) for k in range(3)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    method.eval()

    def trunk_grad(scale):
        method.zero_grad()
        method.net.trunk_grad_scale = scale
        method(images).logits.sum().backward()
        return next(method.net.trunk.parameters()).grad.clone()

    assert method.net.trunk_grad_scale == pytest.approx(1 / 3)
    assert torch.allclose(trunk_grad(1 / 3), trunk_grad(1.0) / 3, rtol=1e-4, atol=1e-7)


def test_okddip_targets_and_leader():
    torch.manual_seed(0)
    method = create_method("okddip", "resnet8", 10)
    assert method.config.num_branches == 4 and method.aux_branches == 3 and method.head_name == "leader"
    out = method(torch.randn(5, 3, 32, 32))
    w = out.teacher_weights
    assert w.shape == (5, 4, 4)
    assert torch.equal(w[:, :, 3], torch.zeros(5, 4))  # nobody distils from the leader
    assert torch.allclose(w[:, 3, :3], torch.full((5, 3), 1 / 3))  # the leader: the mean of the peers
    assert torch.allclose(w[:, :3, :3].sum(-1), torch.ones(5, 3), atol=1e-6)  # peer targets: convex combinations
    heads = method.heads(out)
    assert torch.equal(heads["leader"], out.logits[:, 3])
    assert torch.allclose(heads["aux_ensemble"], out.logits[:, :3].mean(1))
    # Nothing detached by default: the KD term trains the query/key projections.
    method.loss(out, torch.randint(0, 10, (5,)), kd_weight=1.0).total.backward()
    assert method.attention.query.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# MDE (docs/METHOD.md section 3)
# ---------------------------------------------------------------------------------------------------------------


def mde(**config):
    """MDE on the loop form of the branches (the tests index net.branches and their parameter names)."""
    torch.manual_seed(0)
    branches = config.pop("num_branches", 4)
    return create_method("mde", "resnet8", 10, MethodConfig(num_branches=branches, branch_impl="loop", **config))


def test_mde_layout():
    method = mde()
    assert method.config.num_branches == 4 and method.aux_branches == 3 and method.head_name == "leader"
    assert method.ffm.fc2.out_features == 3 and method.ffm.fc1.in_features == method.net.feature_channels
    out = method(torch.randn(5, 3, 32, 32))
    assert out.attention.shape == (5, 3) and torch.allclose(out.attention.sum(-1), torch.ones(5), atol=1e-6)
    assert out.attention_logits.shape == (5, 3)
    torch.testing.assert_close(out.attention, torch.softmax(out.attention_logits, -1))
    w = mde_teacher_weights(out.attention, 4)
    assert torch.allclose(w[:, :3, :3], out.attention.unsqueeze(1).expand(5, 3, 3))  # one target for every aux
    assert torch.equal(w[:, :, 3], torch.zeros(5, 4)) and torch.allclose(w[:, 3, :3], torch.full((5, 3), 1 / 3))
    heads = method.heads(out)
    assert set(heads) == {"leader", "aux_ensemble", "target"}
    torch.testing.assert_close(heads["target"], torch.einsum("bi,bic->bc", out.attention, out.logits[:, :3]))
    with pytest.raises(ValueError, match="branches"):
        mde(num_branches=2)
    assert mde(num_branches=8).aux_branches == 7


def test_mde_loss_term_by_term():
    """Every term of MDE's loss on a toy batch, composed by hand from torch.nn.functional."""
    method = mde(cd_weight=0.3, target_ce=0.7, cd_form="frobenius")
    torch.manual_seed(1)
    logits, target = torch.randn(6, 4, 10), torch.randint(0, 10, (6,))
    a = torch.softmax(torch.randn(6, 3), -1)
    out = MethodOutput(logits, attention=a, attention_logits=a.log())
    result = method.loss(out, target, kd_weight=torch.tensor(0.4))
    aux, leader = logits[:, :3], logits[:, 3]
    goal = torch.einsum("bi,bic->bc", a, aux)  # the FFM target
    ce = sum(F.cross_entropy(logits[:, k], target) for k in range(4))
    target_ce = F.cross_entropy(goal, target)
    kl1 = sum(kl_batchmean(aux[:, i], goal) for i in range(3))
    kl2 = kl_batchmean(leader, aux.mean(1))
    w = torch.stack([b.classifier.weight for b in method.net.branches[:3]]).detach()
    cd = sum(torch.linalg.matrix_norm(w[i].T @ w[j]) for i in range(3) for j in range(i + 1, 3))
    terms = result.terms
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["teacher_ce"].item() == pytest.approx(target_ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx((kl1 + kl2).item(), rel=1e-5)
    assert terms["cd"].item() == pytest.approx(cd.item(), rel=1e-5)
    expected = ce + 0.7 * target_ce + 0.4 * (kl1 + kl2) + 0.3 * cd
    assert result.total.item() == pytest.approx(expected.item(), rel=1e-5)


def nontarget_corr_by_hand(aux, target, temperature):
    """The prediction-space CD of one sample at a time, written out: Pearson correlations of the non-target
    probabilities of every pair of auxiliaries, averaged over the pairs."""
    rows = []
    for b in range(aux.shape[0]):
        p = torch.softmax(aux[b] / temperature, -1)
        keep = [c for c in range(aux.shape[-1]) if c != int(target[b])]
        r = p[:, keep] - p[:, keep].mean(-1, keepdim=True)
        pairs = [(i, j) for i in range(aux.shape[1]) for j in range(i + 1, aux.shape[1])]
        rows.append(sum(F.cosine_similarity(r[i], r[j], dim=0) for i, j in pairs) / len(pairs))
    return torch.stack(rows)


def test_mde_prediction_space_cd_by_hand():
    """The default CD form: lambda * the mean over samples of the auxiliaries' non-target correlation; the leader
    is not in it and gets none of its gradient; it is logged as aux_corr whatever the form."""
    method = mde(cd_weight=0.3, target_ce=0.0, cd_form="nontarget_corr")
    torch.manual_seed(7)
    logits = torch.randn(6, 4, 10, requires_grad=True)
    target = torch.randint(0, 10, (6,))
    out = MethodOutput(logits, attention=torch.full((6, 3), 1 / 3), attention_logits=torch.zeros(6, 3))
    result = method.loss(out, target, kd_weight=0.0)
    hand = nontarget_corr_by_hand(logits[:, :3], target, 3.0).mean()
    assert result.terms["cd"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert result.terms["aux_corr"].item() == pytest.approx(hand.item(), rel=1e-5)
    ce = sum(F.cross_entropy(logits[:, k], target) for k in range(4))
    assert result.total.item() == pytest.approx((ce + 0.3 * hand).item(), rel=1e-5)
    (grad,) = torch.autograd.grad(result.total - ce, logits)
    assert grad[:, 3].abs().max() == 0 and grad[:, :3].abs().max() > 0
    assert torch.equal(grad[torch.arange(6), 0, target], torch.zeros(6))  # the label's class is left out


def test_mde_ffm_variants_shapes_and_per_auxiliary_targets():
    for inputs in FFM_INPUTS:
        method = mde(ffm_input=inputs, ffm_targets="per-aux", ffm_temperature=0.5)
        out = method(torch.randn(4, 3, 32, 32))
        assert out.attention_logits.shape == (4, 3, 3), inputs
        torch.testing.assert_close(out.attention, torch.softmax(out.attention_logits / 0.5, -1))
        loss = method.loss(out, torch.randint(0, 10, (4,)), kd_weight=1.0).total
        (grad,) = torch.autograd.grad(loss, method.ffm.fc2.weight)
        assert grad.abs().max() > 0, inputs
    assert mde(ffm_input="concat").ffm.fc1.in_features == 3 * 64
    assert mde(ffm_input="sum+logits").ffm.fc1.in_features == 64 + 3 * 10


@pytest.mark.parametrize("form", ["nontarget_corr", "frobenius", "abscos", "cos2"])
def test_mde_cd_forms_and_default_weights(form):
    method = mde(cd_form=form)
    assert method.cd_weight == CD_DEFAULT_WEIGHTS[form]
    if form == "nontarget_corr":
        return
    out = method(torch.randn(4, 3, 32, 32))
    cd = method.loss(out, torch.randint(0, 10, (4,)), kd_weight=0.0).terms["cd"]
    w = torch.stack([b.classifier.weight for b in method.net.branches[:3]])
    assert cd.item() == pytest.approx(classifier_diversity_reference(w, form).item(), rel=1e-6)


def _grads(method, loss):
    method.zero_grad()
    loss.backward(retain_graph=True)
    return {name: None if p.grad is None else p.grad.clone() for name, p in method.named_parameters()}


def _zero(grad):
    return grad is None or grad.abs().max().item() == 0.0


def test_mde_gradient_routing():
    """The method's gradient equals the hand composition CE + L_kl1 + L_kl2 + CD in which L_kl2's target (the
    auxiliaries' mean) is detached: so the leader's classifier gets no CD and no L_kl1 gradient, the auxiliaries
    get none from L_kl2, and the FFM learns only through L_kl1 (and the target's CE)."""
    torch.manual_seed(2)
    images, target = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    method = mde(cd_weight=0.1, cd_form="frobenius")
    out = method(images)
    got = _grads(method, method.loss(out, target, kd_weight=1.0).total)

    aux, leader = out.logits[:, :3], out.logits[:, 3]
    goal = method.heads(out)["target"]
    ce = sum(F.cross_entropy(out.logits[:, k], target) for k in range(4)) + F.cross_entropy(goal, target)
    kl1 = sum(kl_batchmean(aux[:, i], goal) for i in range(3))
    kl2 = kl_batchmean(leader, aux.mean(1).detach())
    cd = classifier_diversity_reference(method.net.classifier_weights(slice(0, -1)), "frobenius")
    want = _grads(method, ce + kl1 + kl2 + 0.1 * cd)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    g_kl1, g_kl2, g_cd = _grads(method, kl1), _grads(method, kl2), _grads(method, cd)
    assert _zero(g_cd["net.branches.3.classifier.weight"]) and not _zero(g_cd["net.branches.0.classifier.weight"])
    assert _zero(g_kl1["net.branches.3.classifier.weight"])
    assert all(_zero(g_kl2[f"net.branches.{i}.classifier.weight"]) for i in range(3))
    assert _zero(g_kl2["ffm.fc2.weight"]) and not _zero(g_kl1["ffm.fc2.weight"])


def test_mde_detach_teacher_leaves_the_ffm_only_its_ce():
    torch.manual_seed(3)
    images, target = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    for target_ce in (0.0, 1.0):
        method = mde(detach_teacher=True, target_ce=target_ce, cd_weight=0.0)
        out = method(images)
        g = _grads(method, method.loss(out, target, kd_weight=1.0).total)
        if target_ce == 0.0:
            assert _zero(g["ffm.fc1.weight"]) and _zero(g["ffm.fc2.weight"])
        else:  # exactly the gradient of CE(target, y)
            goal = method.heads(out)["target"]
            g_ce = _grads(method, F.cross_entropy(goal, target))
            torch.testing.assert_close(g["ffm.fc2.weight"], g_ce["ffm.fc2.weight"], rtol=1e-4, atol=1e-7)


def test_mde_ablations_change_exactly_the_terms_they_name():
    torch.manual_seed(4)
    images, target = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    results = {}
    for name, config in {"full": {}, "no_cd": {"cd_weight": 0.0}, "no_ffm": {"ffm": False}}.items():
        method = mde(**config)
        torch.manual_seed(5)
        results[name] = (method, method(images), method.loss(method(images), target, kd_weight=0.5).terms)
    full, no_cd, no_ffm = (results[k][2] for k in ("full", "no_cd", "no_ffm"))
    assert "cd" not in no_cd and {"ce", "teacher_ce", "kd"} <= set(no_cd)
    for key in ("ce", "teacher_ce", "kd"):
        assert no_cd[key].item() == pytest.approx(full[key].item(), rel=1e-6)
    # --ffm off: no FFM parameters; the target is the mean of the auxiliaries; CE and CD unchanged
    method, out, _ = results["no_ffm"]
    assert method.ffm is None and not any("ffm" in n for n, _ in method.named_parameters())
    torch.testing.assert_close(method.heads(out)["target"], out.logits[:, :3].mean(1))
    assert no_ffm["ce"].item() == pytest.approx(full["ce"].item(), rel=1e-6)
    assert no_ffm["cd"].item() == pytest.approx(full["cd"].item(), rel=1e-6)
    assert no_ffm["kd"].item() != pytest.approx(full["kd"].item(), rel=1e-3)
    both = mde(ffm=False, cd_weight=0.0)  # OKDDip's structure with a uniform target
    assert "cd" not in both.loss(both(images), target, kd_weight=0.5).terms


def test_mde_refuses_checkpoints_of_the_former_layout():
    cls = type(mde())
    cls.check_layout(2, "x.pt")
    with pytest.raises(
        ValueError, match="x.pt: written by layout 1 of method 'mde'.*auxiliary branches and a group leader"
    ):
        cls.check_layout(None, "x.pt")


def test_detach_teacher_flag_stops_gradient_into_the_gate():
    torch.manual_seed(0)
    images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for detach, expect_grad in ((False, True), (True, False)):
        method = create_method("one", "resnet8", 10, MethodConfig(detach_teacher=detach))
        out = method(images)
        # Only the KD term (the teacher CE would always train the gate).
        out = MethodOutput(out.logits.detach(), teacher_weights=out.teacher_weights, attention=out.attention)
        total, _ = method.online_kd(out, target, 1.0)
        method.zero_grad()
        (total - 0 * out.teacher_weights.sum()).backward()
        grad = method.gate.fc.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad


def test_float_zero_kd_weight_logs_no_kd():
    method = create_method("one", "resnet8", 10)
    logits = torch.randn(4, 3, 10)
    out = MethodOutput(logits, teacher_weights=torch.softmax(torch.randn(4, 3), -1))
    terms = method.loss(out, torch.randint(0, 10, (4,)), kd_weight=0.0)
    assert "kd" not in terms.terms and "teacher_ce" in terms.terms


def test_mde_leader_target_can_train_the_auxiliaries_as_in_okddip_code():
    """--no-detach-leader-target: L_kl2 = KL(mean of the auxiliaries || leader) also trains the auxiliaries."""
    torch.manual_seed(6)
    images, target = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    grads = {}
    for detach in (True, False):
        method = mde(detach_leader_target=detach, cd_weight=0.0)
        out = method(images)
        aux, leader = out.logits[:, :3], out.logits[:, 3]
        hand = sum(F.cross_entropy(out.logits[:, k], target) for k in range(4))
        hand = hand + F.cross_entropy(method.heads(out)["target"], target)
        hand = hand + sum(kl_batchmean(aux[:, i], method.heads(out)["target"]) for i in range(3))
        hand = hand + kl_batchmean(leader, aux.mean(1).detach() if detach else aux.mean(1))
        got, want = _grads(method, method.loss(out, target, kd_weight=1.0).total), _grads(method, hand)
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
        grads[detach] = got["net.branches.0.classifier.weight"]
    assert not torch.allclose(grads[True], grads[False])


def test_attention_diagnostics_by_hand():
    """okdfast.run.scoring.attention_sums: entropy, weights on right / wrong branches, and for one row per branch the
    weight a row gives its own branch (per-auxiliary targets that collapse onto themselves stop distilling)."""
    from okdfast.run.scoring import attention_sums

    correct = torch.tensor([[True, False, True, True]])  # the leader (last) is not attended to
    shared = attention_sums(torch.tensor([[0.5, 0.25, 0.25]]), correct)
    assert "attention_self" not in shared  # one row shared by all: no own branch
    assert shared["attention_correct_weight"].item() == pytest.approx(0.75)
    assert shared["attention_entropy"].item() == pytest.approx(1.5 * math.log(2) / math.log(3))
    rows = torch.tensor([[[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.0, 0.0, 1.0]]])  # (B, M, M)
    per_aux = attention_sums(rows, correct)
    assert per_aux["attention_self"].item() == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    uniform = attention_sums(torch.full((2, 3, 3), 1 / 3), correct.expand(2, -1))
    assert uniform["attention_self"].item() == pytest.approx(2 / 3)  # a sum over the batch: 1/3 per sample
