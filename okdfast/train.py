"""Train a multi-branch network with online knowledge distillation: MDE (Li et al., ACCV 2020) and its baselines.

Single process (CPU or one GPU):
    python -m okdfast.train --method mde --arch resnet32 --dataset cifar100 --epochs 300 --amp
    python -m okdfast.train --dataset synthetic --arch resnet8 --epochs 2          # offline smoke run
Several GPUs on one node (DDP; the global batch is batch-size x processes):
    torchrun --standalone --nproc_per_node=4 -m okdfast.train --method mde --amp
Resume an interrupted run (exactly, in --deterministic mode):
    python -m okdfast.train --out runs/my_run --resume auto

The loop reads top to bottom: config -> distributed setup -> data -> method (network + heads) -> optimizer ->
resume -> epochs of (train, evaluate, log, checkpoint) -> summary.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from okdfast.config import TrainConfig, parse_config
from okdfast.data import build_data_loaders, build_loaders, load_dataset
from okdfast.evaluate import evaluate
from okdfast.methods import Method, MethodConfig, create_method, list_methods, method_class, sigmoid_rampup
from okdfast.models import list_models
from okdfast.step import TrainStep, build_optimizer
from okdfast.utils.checkpoint import atomic_save, safe_load
from okdfast.utils.distributed import DistInfo, cleanup_distributed, setup_distributed
from okdfast.utils.environment import environment_manifest
from okdfast.utils.metrics_log import MetricsLog
from okdfast.utils.nan_guard import NonFiniteGuard
from okdfast.utils.seeding import capture_rng_state, restore_rng_state, seed_everything
from okdfast.utils.sync_batchnorm import convert_sync_batchnorm
from okdfast.utils.tensorboard import open_tensorboard

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------- setup
def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 where the device supports it, else fp16 (CUDA only); CPU autocast runs bf16."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def method_config(config: TrainConfig) -> MethodConfig:
    branches = config.branches if config.branches is not None else method_class(config.method).default_branches
    return MethodConfig(
        num_branches=branches,
        temperature=config.temperature,
        alpha=config.alpha,
        rampup_epochs=config.resolved_rampup(),
        detach_teacher=config.detach_teacher,
        cd_weight=config.cd_weight,
        cd_form=config.cd_form,
        ffm=config.ffm == "on",
        target_ce=config.target_ce,
        detach_leader_target=config.detach_leader_target,
        label_smoothing=config.label_smoothing,
        fused_loss=config.fused_loss,
    )


def default_run_dir(config: TrainConfig, branches: int) -> Path:
    return Path("runs") / f"{config.method}_{config.arch}_{config.dataset}_k{branches}_s{config.seed}"


@dataclass
class RunState:
    """What a checkpoint restores besides the modules: where we are and the best result so far."""

    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # optimizer steps done inside the current (unfinished) epoch
    global_step: int = 0
    best_value: float = float("-inf")
    best_epoch: int = -1
    partial_sums: dict[str, float] = field(default_factory=dict)  # train-term sums of the unfinished epoch


class StopRequested:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step, so it can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class RunLog:
    """Prints on rank 0 and appends the same lines to RUN_DIR/train.log."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "train.log"

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        with self.path.open("a") as handle:
            handle.write(message + "\n")


# ------------------------------------------------------------------------------------------------------ checkpoint
def checkpoint_payload(
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: RunState,
    config: TrainConfig,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "layout_version": method.layout_version,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": {
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "best_value": state.best_value,
            "best_epoch": state.best_epoch,
            "partial_sums": state.partial_sums,
        },
        "rng": capture_rng_state(),
        "config": config.to_dict(),
    }


def restore_checkpoint(
    path: Path,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> RunState:
    payload = safe_load(path, map_location=device)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {path}: checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}")
    type(method).check_layout(payload.get("layout_version"), f"--resume {path}")
    method.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    restore_rng_state(payload["rng"])
    return RunState(**payload["state"])


def resolve_resume(config: TrainConfig, run_dir: Path) -> Path | None:
    last = run_dir / "last.pt"
    if config.resume is None:
        if last.exists():
            raise FileExistsError(
                f"run folder {run_dir} already holds {last.name}: pass --resume auto to continue it, "
                "or --out NEW_FOLDER to start a new run"
            )
        return None
    if config.resume == "auto":
        return last if last.exists() else None
    return Path(config.resume)


# ----------------------------------------------------------------------------------------------------------- train
def _progress(iterable: Any, total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


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
    show_progress: bool,
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
    bar = _progress(batches, len(loader) - state.step_in_epoch, show_progress, f"epoch {state.epoch}")
    kd_weight_t = torch.tensor(kd_weight, dtype=torch.float32, device=device)  # a tensor: no recompile per epoch
    scaler = step.scaler
    start = time.perf_counter()
    interrupted = False
    for images, target in bar:
        images = images.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        scale_before = scaler._scale.clone() if scaler is not None and scaler._scale is not None else None
        total, terms = step(images, target, kd_weight_t)
        terms = {"loss": total.detach(), **terms}
        guard.record(state.global_step, terms)
        if scale_before is not None:
            guard.record_scaler_skip(scale_before, scaler._scale)

        # Accumulate on the device: no host sync per step.
        for name, value in terms.items():
            sums[name] = sums[name] + value.float() if name in sums else value.float().clone()
        images_seen += target.numel() * dist_info.world_size
        steps_done_here += 1
        state.step_in_epoch += 1
        state.global_step += 1
        if state.global_step % config.nan_check_every == 0:
            guard.check()
        if show_progress and steps_done_here % 20 == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{total.item():.3f}",
                lr=f"{step.optimizer.param_groups[0]['lr']:.3g}",
                img_s=f"{images_seen / elapsed:.0f}",
            )
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
    return host_sums, images_seen, seconds, interrupted


def should_stop(stop: StopRequested, dist_info: DistInfo, global_step: int, every: int = 10) -> bool:
    """Single process: whether a signal arrived. Under DDP the ranks agree every ``every`` steps (one tiny
    all-reduce), so they all stop after the same step and no rank waits forever in a gradient all-reduce."""
    if not dist_info.enabled:
        return stop.signum is not None
    if global_step % every:
        return False
    flag = torch.tensor([1.0 if stop.signum is not None else 0.0])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def merge_sums(previous: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    return {k: previous.get(k, 0.0) + new.get(k, 0.0) for k in set(previous) | set(new)}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    """The CLI (``python -m okdfast.train`` and the ``okdfast-train`` console script); ``run`` returns the summary."""
    config, args = parse_config(argv)
    if args.list_archs or args.list_methods:
        if args.list_archs:
            print("\n".join(list_models()))
        if args.list_methods:
            print("\n".join(list_methods()))
        return
    run(config)


def run(config: TrainConfig) -> dict[str, Any]:
    """Train with a resolved config; returns the summary (also written to RUN_DIR/summary.json)."""
    dist_info, device = setup_distributed(config.device)
    try:
        return _run(config, dist_info, device)
    finally:
        cleanup_distributed()


def _run(config: TrainConfig, dist_info: DistInfo, device: torch.device) -> dict[str, Any]:
    config = config.resolve_speed_defaults(device.type)
    mcfg = method_config(config)
    run_dir = Path(config.out) if config.out else default_run_dir(config, mcfg.num_branches)
    resume_path = resolve_resume(config, run_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, dist_info.is_main)
    seed_everything(config.seed, config.deterministic)
    amp_dtype = resolve_amp(config.amp, device)
    if config.batch_size % dist_info.world_size:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch: it must divide evenly over the "
            f"{dist_info.world_size} processes"
        )

    # data: each rank takes its DistributedSampler-style shard of every global batch
    splits = load_dataset(
        config.dataset, config.data_dir, download=config.download, subset=config.subset, seed=config.data_seed
    )
    distributed = (dist_info.rank, dist_info.world_size) if dist_info.enabled else None
    # Batches arrive on `device`, normalised, in the model's memory format (--loader; okdfast.data.factory).
    train_loader, test_loader = build_data_loaders(
        splits,
        loader=config.loader,
        device=device,
        batch_size=config.batch_size // dist_info.world_size,
        eval_batch_size=config.eval_batch_size,
        num_workers=config.workers,
        seed=config.seed,
        distributed=distributed,
        channels_last=bool(config.channels_last),
        data_dir=config.data_dir,
        verbose=dist_info.is_main,
    )

    # method: network + heads
    method: Method = create_method(config.method, config.arch, splits.num_classes, mcfg)
    if dist_info.enabled and (config.sync_bn is None or config.sync_bn):
        method = convert_sync_batchnorm(method, device)  # type: ignore[assignment]
    method = method.to(device)
    if config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None
        )

    # optimizer and the step (forward + loss compiled together when asked)
    optimizer = build_optimizer(
        method.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        implementation=config.optimizer_impl,
        device=device,
        lr_as_tensor=config.cuda_graphs,
    )
    scheduler: torch.optim.lr_scheduler.LRScheduler = (  # stepped once per epoch
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
        if config.lr_schedule == "cosine"
        else torch.optim.lr_scheduler.MultiStepLR(optimizer, config.resolved_milestones(), gamma=config.lr_gamma)
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step = TrainStep(
        method,
        model,
        optimizer,
        scaler,
        device=device,
        amp_dtype=amp_dtype,
        compile_mode=config.compile,
        cuda_graphs=config.cuda_graphs,
        full_batch=config.batch_size // dist_info.world_size,
    )
    guard = NonFiniteGuard(device)

    state = RunState()
    if resume_path is not None:
        state = restore_checkpoint(resume_path, method, optimizer, scheduler, scaler, device)
        log(f"resumed from {resume_path}: epoch {state.epoch}, step {state.step_in_epoch} of it")

    num_params = sum(p.numel() for p in method.parameters())
    if dist_info.is_main:
        resolved = config.to_dict() | {
            "branches": mcfg.num_branches,
            "milestones_epochs": config.resolved_milestones(),
            "rampup_epochs": mcfg.rampup_epochs,
            "amp_dtype": str(amp_dtype),
            "num_classes": splits.num_classes,
            "data_source": splits.source,
            "world_size": dist_info.world_size,
            "parameters": num_params,
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (run_dir / "environment.json").write_text(json.dumps(environment_manifest(device), indent=2))
    log(
        f"{config.method} | {config.arch} K={mcfg.num_branches} | {splits.name} ({splits.source}: "
        f"{len(splits.train)} train / {len(splits.test)} test) | {num_params / 1e6:.3f}M params | device {device} "
        f"| amp {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'} | channels-last "
        f"{'on' if config.channels_last else 'off'} | compile {config.compile} | run folder {run_dir}"
    )

    metrics_log = MetricsLog(run_dir, resume_epoch=state.epoch) if dist_info.is_main else None
    tensorboard = open_tensorboard(run_dir, state.epoch) if config.tensorboard and dist_info.is_main else None
    show_progress = dist_info.is_main and (
        config.progress == "on" or (config.progress == "auto" and sys.stderr.isatty())
    )
    last_metrics: dict[str, Any] = {}
    finished = state.epoch >= config.epochs
    interrupted = False

    with StopRequested() as stop:
        while state.epoch < config.epochs:
            epoch = state.epoch
            train_loader.set_epoch(epoch)
            kd_weight = config.alpha * sigmoid_rampup(epoch, mcfg.rampup_epochs)
            lr = float(optimizer.param_groups[0]["lr"])
            sums, images, seconds, interrupted = train_one_epoch(
                step,
                train_loader,
                state,
                config=config,
                device=device,
                kd_weight=kd_weight,
                stop=stop,
                guard=guard,
                dist_info=dist_info,
                show_progress=show_progress,
            )
            sums = merge_sums(state.partial_sums, sums)
            epoch_done = state.step_in_epoch >= len(train_loader)
            reached_max = config.max_steps is not None and state.global_step >= config.max_steps
            if interrupted or (reached_max and not epoch_done):
                state.partial_sums = sums
                if dist_info.is_main:
                    atomic_save(
                        checkpoint_payload(method, optimizer, scheduler, scaler, state, config), run_dir / "last.pt"
                    )
                if interrupted:
                    log(
                        f"stopped by signal {stop.signum} at epoch {epoch} step {state.step_in_epoch}; "
                        f"saved {run_dir / 'last.pt'}; continue with --resume auto"
                    )
                    break
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else None
            test_metrics = evaluate(method, test_loader, device, autocast=autocast, channels_last=config.channels_last)
            steps = max(sums.pop("steps", 0.0), 1.0)
            row: dict[str, Any] = {"epoch": epoch, "lr": lr, "kd_weight": kd_weight, "partial": not epoch_done}
            row |= {f"train_{name}": value / steps for name, value in sums.items()}
            row |= {"images_per_sec": images / max(seconds, 1e-9), "epoch_seconds": seconds}
            row |= test_metrics
            last_metrics = row
            if metrics_log is not None:
                metrics_log.append(row)
            if tensorboard is not None:
                tensorboard.log_epoch(row)
            log(format_row(row, method))

            if epoch_done:
                scheduler.step()
                state.epoch += 1
                state.step_in_epoch = 0
                state.partial_sums = {}
                value = test_metrics.get(config.best_metric)
                if value is None:
                    raise ValueError(f"--best-metric {config.best_metric}: choose one of {sorted(test_metrics)}")
                improved = value > state.best_value
                if improved:
                    state.best_value, state.best_epoch = value, epoch
                if dist_info.is_main:
                    payload = checkpoint_payload(method, optimizer, scheduler, scaler, state, config)
                    atomic_save(payload, run_dir / "last.pt")
                    if improved:
                        atomic_save(payload, run_dir / "best.pt")
            if reached_max:
                break
        finished = state.epoch >= config.epochs
    if tensorboard is not None:
        tensorboard.close()

    summary = {
        "run_dir": str(run_dir),
        "finished": finished,
        "interrupted": interrupted,
        "epochs_done": state.epoch,
        "global_step": state.global_step,
        "parameters": num_params,
        # A run resumed after it had finished trains nothing: its last epoch is the logged one.
        "last": last_metrics or (metrics_log.rows[-1] if metrics_log is not None and metrics_log.rows else {}),
        "nonfinite_skipped_steps": int(guard.skipped_steps),
    }
    if dist_info.enabled:
        summary["ddp_max_param_divergence"] = parameter_divergence(method, device)
    if metrics_log is not None and metrics_log.rows:
        summary["best"] = best_of(metrics_log.rows)
        full_epochs = [r for r in metrics_log.rows if not r.get("partial")]
        if full_epochs:
            summary["images_per_sec_median"] = sorted(r["images_per_sec"] for r in full_epochs)[len(full_epochs) // 2]
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if interrupted and stop.signum is not None:
        raise SystemExit(128 + stop.signum)
    return summary


def parameter_divergence(method: nn.Module, device: torch.device) -> float:
    """Largest |p_rank - p_rank0| over all parameters and buffers and all ranks (0.0 when DDP kept them equal)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in method.state_dict().values() if t.is_floating_point()])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    divergence = (flat - reference).abs().max().reshape(1)
    torch.distributed.all_reduce(divergence, op=torch.distributed.ReduceOp.MAX)
    return float(divergence)


def best_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For every accuracy column, its best value and the epoch it was reached (the paper's 'best epoch')."""
    best: dict[str, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("acc_") and (key not in best or value > best[key]["value"]):
                best[key] = {"value": value, "epoch": row["epoch"]}
    return best


def format_row(row: dict[str, Any], method: Method) -> str:
    parts = [f"epoch {row['epoch']:3d}", f"lr {row['lr']:.4g}", f"loss {row.get('train_loss', float('nan')):.4f}"]
    parts += [f"{k[6:]} {row[k]:.4f}" for k in row if k.startswith("train_") and k != "train_loss"]
    parts += [f"branch-mean {row['acc_branch_mean']:.2f}%"]
    if "acc_ensemble" in row:
        parts.append(f"ensemble {row['acc_ensemble']:.2f}%")
    if method.head_name:
        parts.append(f"{method.head_name} {row[f'acc_{method.head_name}']:.2f}%")
    if "disagreement" in row:
        parts.append(f"disagree {row['disagreement']:.3f}")
    parts.append(f"{row['images_per_sec']:.0f} img/s")
    return " | ".join(parts)


def build_eval_from_checkpoint(
    checkpoint: str, *, data_dir: str | None = None, device: str = "auto", batch_size: int = 500
) -> dict[str, float]:
    """Rebuild a run's method and test set from a checkpoint's own config and evaluate it."""
    payload = safe_load(checkpoint)
    config = TrainConfig(**payload["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    _, torch_device = setup_distributed(device)
    splits = load_dataset(config.dataset, config.data_dir, subset=config.subset, seed=config.data_seed)
    _, test_loader = build_loaders(
        splits, batch_size=config.batch_size, eval_batch_size=batch_size, num_workers=config.workers, seed=config.seed
    )
    method = create_method(config.method, config.arch, splits.num_classes, method_config(config)).to(torch_device)
    type(method).check_layout(payload.get("layout_version"), checkpoint)
    method.load_state_dict(payload["model"])
    return evaluate(method, test_loader, torch_device)


if __name__ == "__main__":
    main()
