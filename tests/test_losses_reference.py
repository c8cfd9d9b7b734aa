"""The loss references (okdfast/ops/reference.py) on hand-computable inputs and against plain torch compositions."""

import math

import pytest
import torch
import torch.nn.functional as F

from okdfast.ops.reference import (
    classifier_diversity_loss_reference,
    online_kd_loss_reference,
    online_kd_rows_reference,
)


def test_uniform_logits_give_log_c_per_branch_and_zero_kd():
    logits = torch.zeros(5, 3, 4)
    target = torch.tensor([0, 1, 2, 3, 0])
    loss = online_kd_loss_reference(logits, target)
    assert loss.item() == pytest.approx(3 * math.log(4), rel=1e-6)  # KD of identical distributions is 0


def test_kl_term_by_hand():
    # student softmax([log 3, 0]) = [3/4, 1/4]; teacher uniform [1/2, 1/2]; T = 1:
    # KL(q || p) = 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4) = 1/2 log(4/3)
    student = torch.tensor([[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])
    teacher = torch.zeros(1, 2)
    loss = online_kd_loss_reference(student, torch.tensor([0]), teacher, temperature=1.0, ce_weight=0.0)
    assert loss.item() == pytest.approx(2 * 0.5 * math.log(4 / 3), rel=1e-6)
    # T = 2 rescales logits by 1/2 and multiplies the KL by T^2 = 4: softmax([log 3 / 2, 0]) = [sqrt3, 1]/(1+sqrt3)
    p0 = math.sqrt(3) / (1 + math.sqrt(3))
    kl = 0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0))
    loss_t2 = online_kd_loss_reference(student, torch.tensor([0]), teacher, temperature=2.0, ce_weight=0.0)
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
    loss = online_kd_loss_reference(logits, target)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_peer_mode_equals_explicit_pairwise_loop():
    torch.manual_seed(1)
    logits = torch.randn(6, 4, 5)
    target = torch.randint(0, 5, (6,))
    loss = online_kd_loss_reference(logits, target, mode="peer", ce_weight=0.0, temperature=2.0)
    expected = 0.0
    for k in range(4):
        for j in range(4):
            if j != k:
                expected += (
                    4.0
                    * F.kl_div(
                        F.log_softmax(logits[:, k] / 2, -1), F.softmax(logits[:, j] / 2, -1), reduction="batchmean"
                    )
                    / 3
                )
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_per_branch_teacher_and_teacher_ce():
    torch.manual_seed(2)
    logits = torch.randn(4, 3, 6)
    teacher = torch.randn(4, 3, 6)
    target = torch.randint(0, 6, (4,))
    rows = online_kd_rows_reference(logits, target, teacher, temperature=1.0)
    expected_kd = sum(
        F.kl_div(F.log_softmax(logits[:, k], -1), F.softmax(teacher[:, k], -1), reduction="none").sum(-1)
        for k in range(3)
    )
    assert torch.allclose(rows.kd, expected_kd, atol=1e-6)
    expected_tce = sum(F.cross_entropy(teacher[:, k], target, reduction="none") for k in range(3))
    assert torch.allclose(rows.teacher_ce, expected_tce, atol=1e-6)


def test_ignore_index_label_smoothing_and_reductions():
    torch.manual_seed(3)
    logits = torch.randn(5, 2, 7)
    target = torch.tensor([1, -100, 3, 6, -100])
    valid = target != -100
    rows = online_kd_loss_reference(logits, target, kd_weight=0.0, label_smoothing=0.1, reduction="none")
    expected = sum(
        F.cross_entropy(logits[:, k], target, label_smoothing=0.1, reduction="none", ignore_index=-100)
        for k in range(2)
    )
    assert torch.allclose(rows, expected, atol=1e-6)
    assert torch.all(rows[~valid] == 0)
    mean = online_kd_loss_reference(logits, target, kd_weight=0.0, label_smoothing=0.1)
    assert mean.item() == pytest.approx(rows.sum().item() / valid.sum().item(), rel=1e-6)
    total = online_kd_loss_reference(logits, target, kd_weight=0.0, label_smoothing=0.1, reduction="sum")
    assert total.item() == pytest.approx(rows.sum().item(), rel=1e-6)


def test_detach_teacher_controls_gradient_into_teacher():
    logits = torch.randn(3, 2, 4)
    teacher = torch.randn(3, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2])
    loss = online_kd_loss_reference(logits, target, teacher, ce_weight=0.0)
    assert not loss.requires_grad  # the only path into the teacher is the detached KL target
    loss = online_kd_loss_reference(logits, target, teacher, ce_weight=0.0, detach_teacher=False)
    (grad,) = torch.autograd.grad(loss, teacher)
    assert grad.abs().sum() > 0


def test_classifier_diversity_by_hand():
    w = torch.randn(1, 5, 8)
    same = w.repeat(3, 1, 1)
    assert classifier_diversity_loss_reference(same).item() == pytest.approx(1.0, abs=1e-6)
    assert classifier_diversity_loss_reference(torch.cat([w, -w])).item() == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(4).reshape(4, 1, 4).repeat(1, 3, 1)  # branch k's class vectors all along axis k
    assert classifier_diversity_loss_reference(eye).item() == pytest.approx(0.0, abs=1e-7)
    # Two branches at 60 degrees for every class: cos^2 = 1/4; scale does not matter.
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.5, math.sqrt(3) / 2]]]) * 7.0
    assert classifier_diversity_loss_reference(torch.cat([a, b])).item() == pytest.approx(0.25, abs=1e-6)
