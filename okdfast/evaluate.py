"""Honest evaluation of a multi-branch model: every branch, the branch mean, the ensemble, the method's own head
(ONE's gate, MDE's FFM, OKDDip's leader) and the diversity between branches.

    python -m okdfast.evaluate RUN_DIR/best.pt [--data-dir DIR] [--device cpu]

Definitions (all accuracies are top-1 in %, error = 100 - accuracy):
- acc_branch_k: branch k alone; acc_branch_mean: the mean of the K branch accuracies (the paper's "average").
- acc_ensemble: argmax of the mean of the K branch softmax probabilities.
- acc_<head>: argmax of the method's head logits, where it has one.
- diversity_kl: mean over the K(K-1) ordered pairs j != k of KL(p_j || p_k) (T = 1), averaged over samples.
- disagreement: mean over the K(K-1)/2 pairs of the fraction of samples whose two branches predict differently.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from okdfast.methods import Method
from okdfast.utils.distributed import all_reduce_sum


def batch_statistics(logits: Tensor, head: Tensor | None, target: Tensor) -> Tensor:
    """Sums over one batch, as one float64 vector (so a single all-reduce serves every metric):
    [n, correct_branch_0..K-1, correct_ensemble, correct_head, kl_pairs_sum, disagree_pairs_sum, ce_ensemble_sum]."""
    logits = logits.float()
    num_branches = logits.shape[1]
    log_p = torch.log_softmax(logits, dim=-1)  # (B, K, C)
    p = log_p.exp()
    predictions = logits.argmax(dim=-1)  # (B, K)
    correct = (predictions == target.unsqueeze(1)).sum(dim=0)  # (K,)
    ensemble_prob = p.mean(dim=1)
    correct_ensemble = (ensemble_prob.argmax(dim=-1) == target).sum()
    correct_head = (head.argmax(dim=-1) == target).sum() if head is not None else torch.zeros((), device=logits.device)
    ce_ensemble = -torch.log(ensemble_prob.gather(1, target.unsqueeze(1)).clamp_min(1e-12)).sum()
    if num_branches > 1:
        neg_entropy = (p * log_p).sum(-1)  # (B, K)
        cross = torch.einsum("bjc,bkc->bjk", p, log_p)  # (B, K, K)
        kl_sum = (neg_entropy.sum(-1) * num_branches - cross.sum(dim=(1, 2))).sum() / (
            num_branches * (num_branches - 1)
        )
        differ = predictions.unsqueeze(2) != predictions.unsqueeze(1)  # (B, K, K), diagonal False
        disagree_sum = differ.sum(dim=(1, 2)).float().sum() / (num_branches * (num_branches - 1))
    else:
        kl_sum = disagree_sum = torch.zeros((), device=logits.device)
    n = torch.tensor(float(target.numel()), device=logits.device)
    parts = [n.reshape(1), correct.float(), correct_ensemble.reshape(1).float(), correct_head.reshape(1).float()]
    parts += [kl_sum.reshape(1), disagree_sum.reshape(1), ce_ensemble.reshape(1)]
    return torch.cat(parts).double()


def metrics_from_sums(sums: Tensor, num_branches: int, head_name: str | None) -> dict[str, float]:
    n = float(sums[0])
    branch_acc = [100.0 * float(c) / n for c in sums[1 : 1 + num_branches]]
    rest = sums[1 + num_branches :]
    metrics = {f"acc_branch_{k}": acc for k, acc in enumerate(branch_acc)}
    metrics["acc_branch_mean"] = sum(branch_acc) / num_branches
    if num_branches > 1:
        metrics["acc_ensemble"] = 100.0 * float(rest[0]) / n
    if head_name:
        metrics[f"acc_{head_name}"] = 100.0 * float(rest[1]) / n
    if num_branches > 1:
        metrics["diversity_kl"] = float(rest[2]) / n
        metrics["disagreement"] = float(rest[3]) / n
    metrics["test_ce_ensemble"] = float(rest[4]) / n
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
    """Top-1 of every branch, branch mean, ensemble and head, plus diversity; sums all-reduced across ranks."""
    was_training = method.training
    method.eval()
    sums: Tensor | None = None
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        with autocast or nullcontext():
            output = method(images)
        stats = batch_statistics(output.logits, output.head if method.has_head else None, target)
        sums = stats if sums is None else sums + stats
    method.train(was_training)
    if sums is None:
        raise ValueError("evaluate() got an empty loader")
    all_reduce_sum(sums)
    head_name = method.head_name if method.has_head else None
    return metrics_from_sums(sums.cpu(), method.config.num_branches, head_name)


def main(argv: list[str] | None = None) -> dict[str, float]:
    from okdfast.train import build_eval_from_checkpoint  # the loop owns how a run is rebuilt from its config

    parser = argparse.ArgumentParser(prog="python -m okdfast.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a last.pt or best.pt written by okdfast.train")
    parser.add_argument("--data-dir", default=None, help="where the data set lies (default: the run's own)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    metrics = build_eval_from_checkpoint(
        args.checkpoint, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
