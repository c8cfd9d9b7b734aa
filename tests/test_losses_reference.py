"""The loss references (okdfast/ops/reference.py) on hand-computable inputs and against plain torch compositions:
they are the spec, so they are checked against something independent of them."""

import math

import pytest
import torch
import torch.nn.functional as F

from okdfast.ops.online_kd_options import OnlineKDOptions
from okdfast.ops.reference import (
    CD_FORMS,
    classifier_diversity_reference,
    online_kd_reference,
    online_kd_rows_reference,
    teacher_rows,
)


def loss_of(logits, target, teacher=None, weights=None, **options):
    return online_kd_reference(logits, target, teacher, weights, OnlineKDOptions(**options))[0]


def test_uniform_logits_give_log_c_per_branch_and_zero_kd():
    logits = torch.zeros(5, 3, 4)
    target = torch.tensor([0, 1, 2, 3, 0])
    assert loss_of(logits, target).item() == pytest.approx(3 * math.log(4), rel=1e-6)  # KD of equal distributions: 0


def test_kl_term_by_hand():
    # student softmax([log 3, 0]) = [3/4, 1/4]; teacher uniform [1/2, 1/2]; T = 1:
    # KL(q || p) = 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4) = 1/2 log(4/3)
    student = torch.tensor([[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])
    teacher = torch.zeros(1, 2)
    loss = loss_of(student, torch.tensor([0]), teacher, temperature=1.0, ce_weight=0.0)
    assert loss.item() == pytest.approx(2 * 0.5 * math.log(4 / 3), rel=1e-6)
    # T = 2 rescales logits by 1/2 and multiplies the KL by T^2 = 4: softmax([log 3 / 2, 0]) = [sqrt3, 1]/(1+sqrt3)
    p0 = math.sqrt(3) / (1 + math.sqrt(3))
    kl = 0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0))
    loss_t2 = loss_of(student, torch.tensor([0]), teacher, temperature=2.0, ce_weight=0.0)
    assert loss_t2.item() == pytest.approx(2 * 4 * kl, rel=1e-6)


def test_defaults_equal_plain_torch_composition():
    torch.manual_seed(0)
    logits = torch.randn(7, 3, 10, requires_grad=True)
    target = torch.randint(0, 10, (7,))
    teacher = logits.mean(1).detach()
    expected = sum(F.cross_entropy(logits[:, k], target) for k in range(3)) + sum(
        9.0 * F.kl_div(F.log_softmax(logits[:, k] / 3, -1), F.softmax(teacher / 3, -1), reduction="batchmean")
        for k in range(3)
    )
    loss = loss_of(logits, target)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_peer_mode_equals_explicit_pairwise_loop():
    torch.manual_seed(1)
    logits = torch.randn(6, 4, 5)
    target = torch.randint(0, 5, (6,))
    loss = loss_of(logits, target, mode="peer", ce_weight=0.0, temperature=2.0)
    expected = 0.0
    for k in range(4):
        for j in range(4):
            if j != k:
                kl = F.kl_div(
                    F.log_softmax(logits[:, k] / 2, -1), F.softmax(logits[:, j] / 2, -1), reduction="batchmean"
                )
                expected += 4.0 * kl / 3
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_per_branch_teacher_and_teacher_ce():
    torch.manual_seed(2)
    logits = torch.randn(4, 3, 6)
    teacher = torch.randn(4, 3, 6)
    target = torch.randint(0, 6, (4,))
    rows = online_kd_rows_reference(
        logits, target, teacher, None, OnlineKDOptions(temperature=1.0, teacher_ce_weight=1)
    )
    expected_kd = sum(
        F.kl_div(F.log_softmax(logits[:, k], -1), F.softmax(teacher[:, k], -1), reduction="none").sum(-1)
        for k in range(3)
    )
    assert torch.allclose(rows.kd, expected_kd, atol=1e-6)
    expected_tce = sum(F.cross_entropy(teacher[:, k], target, reduction="none") for k in range(3))
    assert torch.allclose(rows.teacher_ce, expected_tce, atol=1e-6)
    first_only = OnlineKDOptions(teacher_ce_weight=1.0, teacher_ce_rows=(0,))
    only_first = online_kd_rows_reference(logits, target, teacher, None, first_only)
    assert torch.allclose(only_first.teacher_ce, F.cross_entropy(teacher[:, 0], target, reduction="none"), atol=1e-6)
    no_weight = online_kd_rows_reference(logits, target, teacher, None, OnlineKDOptions())
    assert torch.equal(no_weight.teacher_ce, torch.zeros(4))  # a term without weight is not computed, logs 0


@pytest.mark.parametrize("shape", [(4, 3), (4, 1, 3), (4, 3, 3), (3, 3), (1, 3, 3)])
def test_teacher_weights_build_the_teachers_they_describe(shape):
    torch.manual_seed(4)
    z = torch.randn(4, 3, 5)
    w = torch.softmax(torch.randn(*shape), -1)
    t = teacher_rows(z, None, w)
    if len(shape) == 2 and shape[0] == 4 or shape == (4, 1, 3):  # one shared teacher per sample
        assert t.shape == (4, 1, 5)
        assert torch.allclose(t[:, 0], torch.einsum("bj,bjc->bc", w.reshape(4, 3), z), atol=1e-6)
    else:
        w3 = w.reshape(-1, 3, 3).expand(4, 3, 3)
        assert t.shape == (4, 3, 5)
        for k in range(3):
            assert torch.allclose(t[:, k], sum(w3[:, k, j, None] * z[:, j] for j in range(3)), atol=1e-6)


def test_ignore_index_label_smoothing_and_reductions():
    torch.manual_seed(3)
    logits = torch.randn(5, 2, 7)
    target = torch.tensor([1, -100, 3, 6, -100])
    valid = target != -100
    rows = loss_of(logits, target, kd_weight=0.0, label_smoothing=0.1, reduction="none")
    expected = sum(
        F.cross_entropy(logits[:, k], target, label_smoothing=0.1, reduction="none", ignore_index=-100)
        for k in range(2)
    )
    assert torch.allclose(rows, expected, atol=1e-6)
    assert torch.all(rows[~valid] == 0)
    mean = loss_of(logits, target, kd_weight=0.0, label_smoothing=0.1)
    assert mean.item() == pytest.approx(rows.sum().item() / valid.sum().item(), rel=1e-6)
    total = loss_of(logits, target, kd_weight=0.0, label_smoothing=0.1, reduction="sum")
    assert total.item() == pytest.approx(rows.sum().item(), rel=1e-6)


def test_detach_controls_the_gradient_into_the_teacher_row_by_row():
    torch.manual_seed(5)
    logits = torch.randn(3, 3, 4)
    teacher = torch.randn(3, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2])
    assert not loss_of(logits, target, teacher, ce_weight=0.0).requires_grad  # the only path is the detached target
    (grad,) = torch.autograd.grad(loss_of(logits, target, teacher, ce_weight=0.0, detach_teacher=False), teacher)
    assert grad.abs().sum() > 0
    # per-branch weights with row 2 detached: the KL of branch 2 sends nothing into its target's mixture
    z = logits.clone().requires_grad_()
    w = torch.softmax(torch.randn(3, 3, 3), -1).requires_grad_()
    loss = loss_of(z.detach(), target, None, w, ce_weight=0.0, detach_teacher=False, detached_teacher_rows=(2,))
    (gw,) = torch.autograd.grad(loss, w)
    assert gw[:, 2].abs().max() == 0 and gw[:, :2].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# the CD loss: three forms, each by hand and against float64 finite differences
# ---------------------------------------------------------------------------------------------------------------


def test_cd_frobenius_by_hand():
    # W_1 = [[1, 0]], W_2 = [[0, 2]] (C = 1, D = 2): W_1^T W_2 = [[0, 2], [0, 0]], norm 2
    w = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    assert classifier_diversity_reference(w, "frobenius").item() == pytest.approx(2.0)
    # three classifiers: the sum over the 3 pairs of ||W_i^T W_j||_F = |w_i| |w_j| for rank-one rows
    w3 = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    expected = 3 * 1 + 3 * math.sqrt(2) + 1 * math.sqrt(2)
    assert classifier_diversity_reference(w3, "frobenius").item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    wr = torch.randn(4, 5, 6)
    loop = sum(torch.linalg.matrix_norm(wr[i].T @ wr[j]) for i in range(4) for j in range(i + 1, 4))
    assert classifier_diversity_reference(wr, "frobenius").item() == pytest.approx(loop.item(), rel=1e-5)


def test_cd_cosine_forms_by_hand():
    w = torch.randn(1, 5, 8)
    same = w.repeat(3, 1, 1)
    for form in ("abscos", "cos2"):
        assert classifier_diversity_reference(same, form).item() == pytest.approx(1.0, abs=1e-6)
        assert classifier_diversity_reference(torch.cat([w, -w]), form).item() == pytest.approx(1.0, abs=1e-6)
        eye = torch.eye(4).reshape(4, 1, 4).repeat(1, 3, 1)  # classifier i's class vectors all along axis i
        assert classifier_diversity_reference(eye, form).item() == pytest.approx(0.0, abs=1e-7)
    # Two classifiers at 60 degrees for every class: |cos| = 1/2, cos^2 = 1/4; the scale does not matter.
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.5, math.sqrt(3) / 2]]]) * 7.0
    assert classifier_diversity_reference(torch.cat([a, b]), "abscos").item() == pytest.approx(0.5, abs=1e-6)
    assert classifier_diversity_reference(torch.cat([a, b]), "cos2").item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("form", CD_FORMS)
def test_cd_gradcheck_float64(form):
    torch.manual_seed(1)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: classifier_diversity_reference(x, form), (w,), eps=1e-6, atol=1e-6)


def test_cd_rejects_unknown_form():
    with pytest.raises(ValueError, match="form='l1'"):
        classifier_diversity_reference(torch.randn(2, 3, 4), "l1")
