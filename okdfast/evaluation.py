"""Honest evaluation of a multi-branch model: every branch, the branch mean, the ensemble, the method's own heads
(ONE's gate; OKDDip's and MDE's leader and auxiliary ensemble; MDE's FFM target) and the diversity between branches.

The metrics themselves; ``python -m okdfast.evaluate RUN_DIR/best.pt`` (okdfast/evaluate.py) evaluates a checkpoint.

Definitions (all accuracies are top-1 in %, error = 100 - accuracy):
- acc_branch_k: branch k alone; acc_branch_mean: the mean of the K branch accuracies (the paper's "average").
- acc_ensemble: argmax of the mean of the K branch softmax probabilities.
- acc_<head>: argmax of one of the method's head logits (``Method.heads``): acc_gate (ONE), acc_leader and
  acc_aux_ensemble (the mean of the auxiliary logits; OKDDip, MDE), acc_target (MDE's FFM target).
- acc_aux_mean: the mean of the auxiliary branches' accuracies (methods with a leader).
- diversity_kl: mean over the ordered pairs j != k of KL(p_j || p_k) (T = 1), averaged over samples, and
  disagreement: mean over the pairs of the fraction of samples whose two branches predict differently; both over
  the auxiliary branches of a method with a leader (the leader learns from them, not with them), else over all K.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from okdfast.methods import Method
from okdfast.utils.distributed import all_reduce_sum


def diversity_sums(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over samples of the mean pairwise KL, of the mean pairwise disagreement) of (B, M, C) logits, M >= 2."""
    count = logits.shape[1]
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(-1)  # (B, M)
    cross = torch.einsum("bjc,bkc->bjk", p, log_p)  # (B, M, M)
    kl_sum = (neg_entropy.sum(-1) * count - cross.sum(dim=(1, 2))).sum() / (count * (count - 1))
    predictions = logits.argmax(dim=-1)
    differ = predictions.unsqueeze(2) != predictions.unsqueeze(1)  # (B, M, M), diagonal False
    return kl_sum, differ.sum(dim=(1, 2)).float().sum() / (count * (count - 1))


def batch_statistics(logits: Tensor, heads: dict[str, Tensor], target: Tensor, diverse: slice) -> Tensor:
    """Sums over one batch, as one float64 vector (so a single all-reduce serves every metric):
    [n, correct_branch_0..K-1, correct_ensemble, correct_head per head, kl_pairs_sum, disagree_pairs_sum,
    ce_ensemble_sum]; the diversity over the branches in ``diverse``."""
    logits = logits.float()
    predictions = logits.argmax(dim=-1)  # (B, K)
    correct = (predictions == target.unsqueeze(1)).sum(dim=0)  # (K,)
    ensemble_prob = torch.softmax(logits, dim=-1).mean(dim=1)
    parts = [torch.tensor([float(target.numel())], device=logits.device), correct.float()]
    parts.append((ensemble_prob.argmax(dim=-1) == target).sum().reshape(1).float())
    parts += [(head.float().argmax(dim=-1) == target).sum().reshape(1).float() for head in heads.values()]
    chosen = logits[:, diverse]
    zero = torch.zeros((), device=logits.device)
    kl_sum, disagree_sum = diversity_sums(chosen) if chosen.shape[1] > 1 else (zero, zero)
    ce_ensemble = -torch.log(ensemble_prob.gather(1, target.unsqueeze(1)).clamp_min(1e-12)).sum()
    parts += [kl_sum.reshape(1), disagree_sum.reshape(1), ce_ensemble.reshape(1)]
    return torch.cat(parts).double()


def metrics_from_sums(sums: Tensor, num_branches: int, head_names: list[str], aux_branches: int | None) -> dict:
    n = float(sums[0])
    branch_acc = [100.0 * float(c) / n for c in sums[1 : 1 + num_branches]]
    rest = [float(v) for v in sums[1 + num_branches :]]
    metrics = {f"acc_branch_{k}": acc for k, acc in enumerate(branch_acc)}
    metrics["acc_branch_mean"] = sum(branch_acc) / num_branches
    if aux_branches is not None:
        metrics["acc_aux_mean"] = sum(branch_acc[:aux_branches]) / aux_branches
    if num_branches > 1:
        metrics["acc_ensemble"] = 100.0 * rest[0] / n
    for i, name in enumerate(head_names):
        metrics[f"acc_{name}"] = 100.0 * rest[1 + i] / n
    if num_branches > 1:
        metrics["diversity_kl"] = rest[-3] / n
        metrics["disagreement"] = rest[-2] / n
    metrics["test_ce_ensemble"] = rest[-1] / n
    return metrics


@torch.no_grad()
def evaluate(
    method: Method,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    autocast: Any = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 of every branch, branch mean, ensemble and heads, plus diversity; sums all-reduced across ranks."""
    was_training = method.training
    method.eval()
    sums: Tensor | None = None
    head_names: list[str] = []
    diverse = slice(0, method.aux_branches)
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        with autocast or nullcontext():
            output = method(images)
            heads = method.heads(output)
        head_names = list(heads)
        stats = batch_statistics(output.logits, heads, target, diverse)
        sums = stats if sums is None else sums + stats
    method.train(was_training)
    if sums is None:
        raise ValueError("evaluate() got an empty loader")
    all_reduce_sum(sums)
    return metrics_from_sums(sums.cpu(), method.config.num_branches, head_names, method.aux_branches)
