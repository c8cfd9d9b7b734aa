"""Honest evaluation of a multi-branch model: every branch, the branch mean, the ensemble, the method's own heads
(ONE's gate; OKDDip's and MDE's leader and auxiliary ensemble; MDE's FFM target), the diversity between branches,
and the diagnostics of MDE's mechanisms, measured for every method so that an ablation compares the same quantities.

The metrics themselves; ``python -m okdfast.evaluate RUN_DIR/best.pt`` (okdfast/evaluate.py) evaluates a checkpoint.

Definitions (all accuracies are top-1 in %, error = 100 - accuracy; "the auxiliaries" are the K-1 branches before
a two-level method's leader, and all K branches for the other methods):
- acc_branch_k: branch k alone; acc_branch_mean: the mean of the K branch accuracies (the paper's "average").
- acc_ensemble: argmax of the mean of the K branch softmax probabilities.
- acc_<head>: argmax of one of the method's head logits (``Method.heads``): acc_gate (ONE), acc_leader and
  acc_aux_ensemble (the mean of the auxiliary logits; OKDDip, MDE), acc_target (MDE's FFM target);
  target_gain = acc_target - acc_aux_ensemble (what the FFM's attention adds over the plain mean).
- acc_aux_mean: the mean of the auxiliary branches' accuracies (methods with a leader).
- diversity_kl: mean over the ordered pairs j != k of KL(p_j || p_k) (T = 1), averaged over samples, and
  disagreement: mean over the pairs of the fraction of samples whose two branches predict differently; both over the
  auxiliaries; diversity_kl_all / disagreement_all over all K branches (methods with a leader).
- aux_corr: the mean over the auxiliary pairs of the correlation of their tempered (T of the method) non-target
  probabilities, per sample (what MDE's prediction-space CD lowers; ``okdfast.ops.reference``).
- classifier_abscos / classifier_cos2: the mean over the auxiliary pairs and classes of |cos| and cos^2 between
  their classifier weight rows (what the weight-space CD forms lower).
- attention_entropy: the normalised entropy H(a) / log M of the method's attention over M branches (1: uniform),
  attention_on_correct / attention_on_wrong: its mean weight on a branch that is right / wrong on the sample
  (ONE's gate, OKDDip's peer attention, MDE's FFM); attention_self, for one attention row per branch (OKDDip's,
  MDE's per-auxiliary targets): the mean weight a row gives its own branch (1/M uniform, 1: no distillation from
  the others).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from okdfast.methods import Method
from okdfast.ops.reference import classifier_diversity_reference, nontarget_correlation_rows
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


def attention_sums(attention: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """Sums over a batch of the attention diagnostics: ``attention`` (B, M) or (B, R, M) weights over the first M
    branches, ``correct`` (B, K) whether each branch is right."""
    a = attention.float().reshape(attention.shape[0], -1, attention.shape[-1])  # (B, R, M)
    count = a.shape[-1]
    entropy = -(a * a.clamp_min(1e-12).log()).sum(-1) / math.log(count) if count > 1 else torch.zeros_like(a[..., 0])
    right = correct[:, None, :count].float().expand_as(a)
    own = {"attention_self": torch.diagonal(a, dim1=1, dim2=2).mean(dim=1).sum()} if a.shape[1] == count > 1 else {}
    return own | {
        "attention_entropy": entropy.mean(dim=1).sum(),
        "attention_correct_weight": (a * right).sum() / a.shape[1],
        "attention_correct_count": right.sum() / a.shape[1],
        "attention_wrong_weight": (a * (1 - right)).sum() / a.shape[1],
        "attention_wrong_count": (1 - right).sum() / a.shape[1],
    }


def batch_sums(
    method: Method, logits: Tensor, heads: dict[str, Tensor], target: Tensor, attention: Tensor | None
) -> dict[str, Tensor]:
    """Named sums over one batch (all reduced together across ranks): counts of correct predictions, the diversity
    sums over the auxiliaries (and over all branches for a method with a leader), the attention's sums."""
    logits = logits.float()
    predictions = logits.argmax(dim=-1)  # (B, K)
    correct = predictions == target.unsqueeze(1)  # (B, K)
    ensemble_prob = torch.softmax(logits, dim=-1).mean(dim=1)
    sums = {"n": torch.tensor(float(target.numel()), device=logits.device)}
    sums |= {f"correct_branch_{k}": c for k, c in enumerate(correct.sum(dim=0).float())}
    sums["correct_ensemble"] = (ensemble_prob.argmax(dim=-1) == target).sum().float()
    sums |= {f"correct_{name}": (head.float().argmax(dim=-1) == target).sum().float() for name, head in heads.items()}
    aux = logits[:, method.diversified_classifiers()]
    if aux.shape[1] > 1:
        sums["kl_pairs"], sums["disagree_pairs"] = diversity_sums(aux)
        if logits.shape[-1] >= 3:
            sums["aux_corr"] = nontarget_correlation_rows(aux, target, method.config.temperature).sum()
    if method.aux_branches is not None:
        sums["kl_pairs_all"], sums["disagree_pairs_all"] = diversity_sums(logits)
    if attention is not None:
        sums |= attention_sums(attention, correct)
    sums["ce_ensemble"] = -torch.log(ensemble_prob.gather(1, target.unsqueeze(1)).clamp_min(1e-12)).sum()
    return sums


def metrics_from_sums(
    sums: dict[str, float], num_branches: int, head_names: list[str], aux_branches: int | None
) -> dict:
    n = sums["n"]
    branch_acc = [100.0 * sums[f"correct_branch_{k}"] / n for k in range(num_branches)]
    metrics = {f"acc_branch_{k}": acc for k, acc in enumerate(branch_acc)}
    metrics["acc_branch_mean"] = sum(branch_acc) / num_branches
    if aux_branches is not None:
        metrics["acc_aux_mean"] = sum(branch_acc[:aux_branches]) / aux_branches
    if num_branches > 1:
        metrics["acc_ensemble"] = 100.0 * sums["correct_ensemble"] / n
    for name in head_names:
        metrics[f"acc_{name}"] = 100.0 * sums[f"correct_{name}"] / n
    if "acc_target" in metrics and "acc_aux_ensemble" in metrics:
        metrics["target_gain"] = metrics["acc_target"] - metrics["acc_aux_ensemble"]
    if "kl_pairs" in sums:
        metrics["diversity_kl"] = sums["kl_pairs"] / n
        metrics["disagreement"] = sums["disagree_pairs"] / n
    if "kl_pairs_all" in sums:
        metrics["diversity_kl_all"] = sums["kl_pairs_all"] / n
        metrics["disagreement_all"] = sums["disagree_pairs_all"] / n
    if "aux_corr" in sums:
        metrics["aux_corr"] = sums["aux_corr"] / n
    if "attention_entropy" in sums:
        metrics["attention_entropy"] = sums["attention_entropy"] / n
        if "attention_self" in sums:
            metrics["attention_self"] = sums["attention_self"] / n
        for side in ("correct", "wrong"):
            count = sums[f"attention_{side}_count"]
            metrics[f"attention_on_{side}"] = sums[f"attention_{side}_weight"] / count if count else float("nan")
    metrics["test_ce_ensemble"] = sums["ce_ensemble"] / n
    return metrics


@torch.no_grad()
def classifier_similarity(method: Method) -> dict[str, float]:
    """classifier_abscos / classifier_cos2 of the auxiliary classifiers (none for a single branch)."""
    chosen = method.diversified_classifiers()
    weights = method.net.classifier_weights(chosen).detach().float()
    if weights.shape[0] < 2:
        return {}
    return {
        "classifier_abscos": float(classifier_diversity_reference(weights, "abscos")),
        "classifier_cos2": float(classifier_diversity_reference(weights, "cos2")),
    }


def prediction_arrays(batches: list[dict[str, Tensor]]) -> dict[str, Any]:
    """The per-image predictions of :func:`evaluate` (``predictions=``) as numpy arrays, in test-set order:
    labels (N,), branches (K, N), ensemble (N,), head_<name> (N,) (uint8 where C <= 256, else int16)."""
    import numpy as np

    joined = {key: torch.cat([b[key] for b in batches], dim=-1).numpy() for key in batches[0]}
    dtype = np.uint8 if int(max(v.max() for v in joined.values())) < 256 else np.int16
    out = {key: value.astype(dtype) for key, value in joined.items()}
    out["image_index"] = np.arange(out["labels"].shape[0], dtype=np.int64)
    return out


@torch.no_grad()
def evaluate(
    method: Method,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    autocast: Any = None,
    predictions: list[dict[str, Tensor]] | None = None,
) -> dict[str, float]:
    """Top-1 of every branch, branch mean, ensemble and heads, diversity and the mechanism diagnostics; sums
    all-reduced across ranks. ``loader``: a test loader of :func:`okdfast.data.build_data_loaders`, which
    delivers its batches on the method's device and in its memory format (no copy here). ``predictions``: a list
    that receives each batch's argmax of every branch, the ensemble and every head, on the CPU
    (:func:`prediction_arrays` joins them; the caller's rank's test images)."""
    was_training = method.training
    method.eval()
    total: dict[str, Tensor] | None = None
    head_names: list[str] = []
    for images, target in loader:  # delivered on the method's device, in its memory format
        with autocast or nullcontext():
            output = method(images)
            heads = method.heads(output)
        head_names = list(heads)
        sums = batch_sums(method, output.logits, heads, target, output.attention)
        total = sums if total is None else {key: total[key] + value for key, value in sums.items()}
        if predictions is not None:
            logits = output.logits.float()
            batch = {
                "labels": target,
                "branches": logits.argmax(-1).T,
                "ensemble": logits.softmax(-1).mean(1).argmax(-1),
            }
            batch |= {f"head_{name}": head.float().argmax(-1) for name, head in heads.items()}
            predictions.append({key: value.to("cpu", torch.int64) for key, value in batch.items()})
    method.train(was_training)
    if total is None:
        raise ValueError("evaluate() got an empty loader")
    names = list(total)
    stacked = torch.stack([total[name].double().reshape(()) for name in names])
    all_reduce_sum(stacked)
    host = dict(zip(names, stacked.cpu().tolist()))
    metrics = metrics_from_sums(host, method.config.num_branches, head_names, method.aux_branches)
    return metrics | classifier_similarity(method)
