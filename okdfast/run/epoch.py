"""One epoch of training steps and what is kept of it: the loss-term sums, the epoch's metrics row, its log line.

The steps accumulate their loss terms on the device (no host sync per step); the non-finite guard is checked every
``--nan-check-every`` steps; a signal or ``--max-steps`` ends the epoch after the current step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch

from okdfast.config import TrainConfig
from okdfast.methods import Method
from okdfast.run.checkpoint_contents import RunState
from okdfast.run.progress import EpochProgress
from okdfast.run.signals import StopRequested, should_stop
from okdfast.run.step import TrainStep
from okdfast.utils.distributed import DistInfo
from okdfast.utils.nan_guard import NonFiniteGuard


def train_one_epoch(
    step: TrainStep,
    loader: Any,
    state: RunState,
    *,
    config: TrainConfig,
    device: torch.device,
    kd_weight: float,
    stop: StopRequested,
    guard: NonFiniteGuard,
    dist_info: DistInfo,
    progress: EpochProgress,
) -> tuple[dict[str, float], int, float, bool]:
    """One epoch (or what is left of it after a mid-epoch resume).

    Returns (sums of the loss terms over the steps, images seen, seconds, interrupted).
    """
    step.method.train()
    sums: dict[str, torch.Tensor] = {}
    images_seen, steps_done_here = 0, 0
    batches: Iterator = iter(loader)
    if state.step_in_epoch:  # mid-epoch resume: the order of epoch e is a pure function of (seed, e)
        batches = islice(batches, state.step_in_epoch, None)
    kd_weight_t = torch.tensor(kd_weight, dtype=torch.float32, device=device)  # a tensor: no recompile per epoch
    scaler = step.scaler
    start = time.perf_counter()
    interrupted = False
    for images, target in progress.wrap(batches):  # delivered by the loader: on `device`, in the run's layout
        scale_before = scaler._scale.clone() if scaler is not None and scaler._scale is not None else None
        total, terms = step(images, target, kd_weight_t)
        terms = {"loss": total.detach(), **terms}
        guard.record(state.global_step, terms)
        if scale_before is not None:
            guard.record_scaler_skip(scale_before, scaler._scale)
        for name, value in terms.items():  # accumulated on the device: no host sync per step
            sums[name] = sums[name] + value.float() if name in sums else value.float().clone()
        images_seen += target.numel() * dist_info.world_size
        steps_done_here += 1
        state.step_in_epoch += 1
        state.global_step += 1
        if state.global_step % config.nan_check_every == 0:
            guard.check()
        lr = float(step.optimizer.param_groups[0]["lr"])
        progress.update(steps_done_here, total, lr, images_seen, time.perf_counter() - start, terms)
        if should_stop(stop, dist_info, state.global_step):
            interrupted = True
            break
        if config.max_steps is not None and state.global_step >= config.max_steps:
            break
    guard.check()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    host_sums = {name: float(value) for name, value in sums.items()}
    host_sums["steps"] = float(steps_done_here)
    if steps_done_here:
        host_sums |= {f"probe_{k}": v for k, v in gradient_probe(step.method, images, target, kd_weight_t).items()}
    return host_sums, images_seen, seconds, interrupted


def gradient_probe(method: Method, images: torch.Tensor, target: torch.Tensor, kd_weight: torch.Tensor) -> dict:
    """cd_grad_ratio: ||d(lambda CD)/dW|| / ||d(task loss)/dW|| on the auxiliary classifiers' weights W, from one
    eval-mode forward of the epoch's last batch (no statistics updated, nothing stepped); {} without a CD term."""
    cd_loss = getattr(method, "cd_loss", None)
    if cd_loss is None:
        return {}
    was_training = method.training
    method.eval()
    try:
        with torch.enable_grad():
            output = method(images)
            cd = cd_loss(output, target)
            if cd is None:
                return {}
            total = method.loss(output, target, kd_weight).total
            params = classifier_parameters(method)
            grad_total = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
            grad_cd = torch.autograd.grad(cd, params, allow_unused=True)
    finally:
        method.train(was_training)
    chosen = method.diversified_classifiers()
    square_cd, square_task = 0.0, 0.0
    for g_total, g_cd in zip(grad_total, grad_cd):
        g_total = torch.zeros(()) if g_total is None else g_total.float()
        g_cd = torch.zeros(()) if g_cd is None else g_cd.float()
        if method.net.branch_impl == "grouped":  # one (K, C, D) tensor: the auxiliaries' slice
            g_total, g_cd = g_total[chosen], g_cd[chosen] if g_cd.dim() else g_cd
        square_cd += float(g_cd.square().sum())
        square_task += float((g_total - g_cd).square().sum())
    return {"cd_grad_ratio": (square_cd / square_task) ** 0.5 if square_task > 0 else float("nan")}


def classifier_parameters(method: Method) -> list[torch.Tensor]:
    """The classifier weight parameters of the auxiliary branches (one grouped tensor, or one per branch)."""
    net = method.net
    if net.branch_impl == "grouped":
        return [net.branches.classifier.weight]
    return [branch.classifier.weight for branch in net.branches[method.diversified_classifiers()]]


def merge_sums(previous: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Sums of two parts of an epoch, in a fixed order (the first part's, then new names as they came): the log and
    metrics.csv list the loss terms in the same order in every process."""
    names = list(previous) + [name for name in new if name not in previous]
    merged = {name: previous.get(name, 0.0) + new.get(name, 0.0) for name in names}
    return merged | {name: value for name, value in new.items() if name.startswith("probe_")}  # the latest probe


def epoch_row(
    epoch: int,
    lr: float,
    kd_weight: float,
    epoch_done: bool,
    sums: dict[str, float],
    images: int,
    seconds: float,
    test_metrics: dict[str, float],
) -> dict[str, Any]:
    """The epoch's metrics row (metrics.jsonl / metrics.csv): the schedule, the mean loss terms, each weighted
    term's share of the loss (share_<term>: its weighted sum over the summed weighted terms), the gradient probe
    (cd_grad_ratio), the speed, the test metrics; ``partial`` when the epoch was cut short."""
    sums = dict(sums)
    steps = max(sums.pop("steps", 0.0), 1.0)
    probes = {name[len("probe_") :]: sums.pop(name) for name in list(sums) if name.startswith("probe_")}
    parts = {name[len("part_") :]: sums.pop(name) for name in list(sums) if name.startswith("part_")}
    row: dict[str, Any] = {"epoch": epoch, "lr": lr, "kd_weight": kd_weight, "partial": not epoch_done}
    row |= {f"train_{name}": value / steps for name, value in sums.items()}
    total = sum(parts.values())
    row |= {f"share_{name}": value / total if total else float("nan") for name, value in parts.items()}
    row |= probes
    row |= {"images_per_sec": images / max(seconds, 1e-9), "epoch_seconds": seconds}
    return row | test_metrics


def best_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For every accuracy column, its best value and the epoch it was reached (the paper's 'best epoch')."""
    best: dict[str, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("acc_") and (key not in best or value > best[key]["value"]):
                best[key] = {"value": value, "epoch": row["epoch"]}
    return best


def format_row(row: dict[str, Any], method: Method) -> str:
    """The epoch's log line: the loss terms, the branch mean, the ensemble, the method's head, speed."""
    parts = [f"epoch {row['epoch']:3d}", f"lr {row['lr']:.4g}", f"loss {row.get('train_loss', float('nan')):.4f}"]
    parts += [f"{k[6:]} {row[k]:.4f}" for k in row if k.startswith("train_") and k != "train_loss"]
    if "share_cd" in row:
        parts.append(f"cd share {100 * row['share_cd']:.2f}%")
    parts += [f"branch-mean {row['acc_branch_mean']:.2f}%"]
    if "acc_ensemble" in row:
        parts.append(f"ensemble {row['acc_ensemble']:.2f}%")
    if method.head_name:
        parts.append(f"{method.head_name} {row[f'acc_{method.head_name}']:.2f}%")
    if "disagreement" in row:
        parts.append(f"disagree {row['disagreement']:.3f}")
    parts.append(f"{row['images_per_sec']:.0f} img/s")
    return " | ".join(parts)
