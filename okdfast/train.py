"""Train a multi-branch network with online knowledge distillation: MDE (Li et al., ACCV 2020) and its baselines.

Single process (CPU or one GPU):
    python -m okdfast.train --method mde --arch resnet32 --dataset cifar100 --epochs 300 --amp
    python -m okdfast.train --dataset synthetic --arch resnet8 --epochs 2          # offline smoke run
Several GPUs on one node (DDP; the global batch is batch-size x processes):
    torchrun --standalone --nproc_per_node=4 -m okdfast.train --method mde --amp
Resume an interrupted run (exactly, in --deterministic mode), with the run's own config:
    python -m okdfast.train --out runs/my_run --resume auto

The loop reads top to bottom: config -> distributed setup -> what this start is (okdfast.resume) -> data -> method
(network + heads) -> optimizer -> resume -> run folder (okdfast.run_folder) -> epochs of (train, evaluate, log,
checkpoint) -> summary. Errors the user can fix (okdfast.errors.UserError) end the CLI with one line, not a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import islice
from typing import Any

import torch
from torch import nn

from okdfast.checkpointing import RunState, check_same_data, checkpoint_payload, data_fingerprint, load_weights
from okdfast.checkpointing import restore_checkpoint as restore_from_payload
from okdfast.config import TrainConfig, parse_config
from okdfast.data import build_data_loaders, build_loaders, load_dataset
from okdfast.errors import EXIT_USER_ERROR, ConfigError, UserError
from okdfast.evaluate import evaluate
from okdfast.methods import Method, MethodConfig, create_method, list_methods, method_class, sigmoid_rampup
from okdfast.models import list_models
from okdfast.precision import amp_notes, resolve_amp
from okdfast.progress import EpochProgress
from okdfast.resume import Start, plan_start
from okdfast.run_checks import check_best_metric, check_for_device
from okdfast.run_folder import ENVIRONMENT, RunFolder
from okdfast.signals import StopRequested, should_stop
from okdfast.step import TrainStep, build_optimizer
from okdfast.utils.checkpoint import load_checkpoint
from okdfast.utils.distributed import DistInfo, cleanup_distributed, setup_distributed
from okdfast.utils.environment import environment_manifest
from okdfast.utils.nan_guard import NonFiniteGuard
from okdfast.utils.seeding import seed_everything
from okdfast.utils.sync_batchnorm import convert_sync_batchnorm
from okdfast.utils.tensorboard import open_tensorboard

__all__ = ["RunState", "main", "method_config", "resolve_amp", "run"]


# ----------------------------------------------------------------------------------------------------------- setup
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
        branch_impl=config.branch_impl,
    )


# ----------------------------------------------------------------------------------------------------------- train
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
    for images, target in progress.wrap(batches):
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
        lr = float(step.optimizer.param_groups[0]["lr"])
        progress.update(steps_done_here, total, lr, images_seen, time.perf_counter() - start)
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


def merge_sums(previous: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Sums of two parts of an epoch, in a fixed order (the first part's, then new names as they came): the log and
    metrics.csv list the loss terms in the same order in every process."""
    names = list(previous) + [name for name in new if name not in previous]
    return {name: previous.get(name, 0.0) + new.get(name, 0.0) for name in names}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    """The CLI (``python -m okdfast.train`` and the ``okdfast-train`` console script); ``run`` returns the summary.

    A :class:`~okdfast.errors.UserError` (a bad value, path, data set, checkpoint, a full disk, a diverged run)
    prints one line and exits with status 2; anything else is a bug and keeps its traceback."""
    config, args = parse_config(argv)
    if args.list_archs or args.list_methods:
        if args.list_archs:
            print("\n".join(list_models()))
        if args.list_methods:
            print("\n".join(list_methods()))
        return
    try:
        run(config, explicit=args.explicit)
    except UserError as error:
        print(f"okdfast.train: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print("okdfast.train: stopped at once (a second signal, or one before training started): nothing was saved "
              "since the last checkpoint; continue with --resume auto", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(130) from None


def run(config: TrainConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train with a validated config; returns the summary (also written to RUN_DIR/summary.json).

    ``explicit``: the fields the command line set (``parse_config``'s); None for a library caller, whose every set
    field counts (a resumed run refuses values that contradict its own config, ``okdfast.resume``)."""
    config.validate()  # a library caller's config is checked as the command line's is
    dist_info, device = setup_distributed(config.device)
    try:
        start = plan_start(config, explicit, writer=dist_info.is_main)
        return _run(start, dist_info, device)
    finally:
        cleanup_distributed()


def _run(start: Start, dist_info: DistInfo, device: torch.device) -> dict[str, Any]:
    config = start.config.resolve_speed_defaults(device.type)
    mcfg = method_config(config)
    # The run's config with every default made concrete: what the checkpoint and config.yaml record.
    config = dataclasses.replace(config, branches=mcfg.num_branches, rampup_epochs=mcfg.rampup_epochs)
    folder: RunFolder = start.folder
    log = folder.log  # printed now; written into train.log once the folder exists
    check_for_device(config, device, dist_info.world_size)
    seed_everything(config.seed, config.deterministic)
    amp_dtype = resolve_amp(config.amp, device)

    # data: each rank takes its DistributedSampler-style shard of every global batch
    splits = load_dataset(
        config.dataset, config.data_dir, download=config.download, subset=config.subset, seed=config.data_seed
    )
    data = data_fingerprint(splits)
    if start.payload is not None:
        check_same_data(start.payload.get("data"), splits, f"--resume {start.checkpoint}")
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
        min_last_batch=2,  # BatchNorm cannot train on one image: a tail of one is dropped (logged below)
    )

    # method: network + heads
    method: Method = create_method(config.method, config.arch, splits.num_classes, mcfg)
    check_best_metric(config, method, torch.device("cpu"))
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

    state, history = RunState(), []
    if start.payload is not None:
        state = restore_from_payload(
            start.payload, method, optimizer, scheduler, scaler, f"--resume {start.checkpoint}"
        )
        history = start.payload.get("history")
        history = list(history) if history is not None else folder.rows_before(state.epoch)  # format 1
    guard = NonFiniteGuard(device, first_step=state.global_step)

    # Everything is ready: from here on the run folder is written (a start that failed above left nothing).
    num_params = sum(p.numel() for p in method.parameters())
    removed = folder.create()
    if removed:
        log(
            f"removed {len(removed)} temporary file(s) of writes a kill cut short: {', '.join(p.name for p in removed)}"
        )
    if dist_info.is_main:
        record_start(folder, start, config, mcfg, amp_dtype, splits, data, dist_info, num_params, device, state)
        if start.checkpoint is not None and folder.repair_best(start.checkpoint, state.as_dict()):
            log(f"relinked {folder.best} to {folder.last}: a kill had fallen between writing the two")
    log(
        f"{config.method} | {config.arch} K={mcfg.num_branches} | {splits.name} ({splits.source}: "
        f"{len(splits.train)} train / {len(splits.test)} test) | {num_params / 1e6:.3f}M params | device {device} "
        f"| amp {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'} | channels-last "
        f"{'on' if config.channels_last else 'off'} | compile {config.compile} | run folder {folder}"
    )
    for note in amp_notes(config.amp, device) + config.milestone_notes() + tail_notes(train_loader.plan):
        log(note)
    if start.resumed:
        log(f"resumed from {start.checkpoint}: epoch {state.epoch}, step {state.step_in_epoch} of it")
    for name, (before, now) in start.changes.items():
        log(f"--{name.replace('_', '-')} {now} for this session (the run started with {before}; sessions.jsonl)")

    metrics_log = folder.metrics(history) if dist_info.is_main else None
    tensorboard = open_tensorboard(folder.path, state.epoch) if config.tensorboard and dist_info.is_main else None
    last_metrics: dict[str, Any] = {}
    finished = state.epoch >= config.epochs
    interrupted = False

    def save(improved: bool = False) -> None:
        if dist_info.is_main:
            rows = metrics_log.history if metrics_log is not None else []
            payload = checkpoint_payload(method, optimizer, scheduler, scaler, state, config, history=rows, data=data)
            folder.save_checkpoint(payload, best=improved)

    with StopRequested() as stop:
        while state.epoch < config.epochs:
            epoch = state.epoch
            train_loader.set_epoch(epoch)
            kd_weight = config.alpha * sigmoid_rampup(epoch, mcfg.rampup_epochs)
            lr = float(optimizer.param_groups[0]["lr"])
            progress = EpochProgress(
                progress=config.progress,
                log_every=config.log_every,
                is_main=dist_info.is_main,
                log=log,
                epoch=epoch,
                total=len(train_loader),
                done=state.step_in_epoch,
            )
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
                progress=progress,
            )
            sums = merge_sums(state.partial_sums, sums)
            epoch_done = state.step_in_epoch >= len(train_loader)
            reached_max = config.max_steps is not None and state.global_step >= config.max_steps
            if interrupted or (reached_max and not epoch_done):
                state.partial_sums = sums
                save()
                if interrupted:
                    log(
                        f"stopped by signal {stop.signum} at epoch {epoch} step {state.step_in_epoch}; "
                        f"saved {folder.last}; continue with --resume auto"
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
                with warnings.catch_warnings():  # a resume at an epoch's last step has made no optimizer step yet
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
                    scheduler.step()
                state.epoch += 1
                state.step_in_epoch = 0
                state.partial_sums = {}
                value = test_metrics[config.best_metric]  # a metric of this method: checked at the start
                improved = value > state.best_value
                if improved:
                    state.best_value, state.best_epoch = value, epoch
                save(improved)
            if reached_max:
                break
        finished = state.epoch >= config.epochs
    if tensorboard is not None:
        tensorboard.close()

    summary = {
        "run_dir": str(folder),
        "finished": finished,
        "interrupted": interrupted,
        "epochs_done": state.epoch,
        "global_step": state.global_step,
        "parameters": num_params,
        # A run resumed after it had finished trains nothing: its last epoch is the logged one.
        "last": last_metrics or (metrics_log.rows[-1] if metrics_log is not None and metrics_log.rows else {}),
        "nonfinite_skipped_steps": int(guard.skipped_steps),
        "data": data_record(splits),  # the file, its sha256, partial or lossy: never mistaken for the official set
    }
    if dist_info.enabled:
        summary["ddp_max_param_divergence"] = parameter_divergence(method, device)
    if metrics_log is not None and metrics_log.rows:
        summary["best"] = best_of(metrics_log.history or metrics_log.rows)
        full_epochs = metrics_log.history
        if full_epochs:
            summary["images_per_sec_median"] = sorted(r["images_per_sec"] for r in full_epochs)[len(full_epochs) // 2]
    if dist_info.is_main:
        folder.write_summary(summary)
    if interrupted and stop.signum is not None:
        raise SystemExit(128 + stop.signum)
    return summary


def record_start(
    folder: RunFolder,
    start: Start,
    config: TrainConfig,
    mcfg: MethodConfig,
    amp_dtype: torch.dtype | None,
    splits: Any,
    data: dict[str, Any],
    dist_info: DistInfo,
    num_params: int,
    device: torch.device,
    state: RunState,
) -> None:
    """config.yaml and environment.json for a new run (written once); a sessions.jsonl line for every start."""
    environment = environment_manifest(device)
    if start.new_run:
        resolved = config.to_dict() | {
            "branches": mcfg.num_branches,
            "milestones_epochs": config.resolved_milestones(),
            "rampup_epochs": mcfg.rampup_epochs,
            "amp_dtype": str(amp_dtype),
            "num_classes": splits.num_classes,
            "data_source": splits.source,
            "data": data,
            "data_file": data_record(splits),
            "world_size": dist_info.world_size,
            "parameters": num_params,
        }
        folder.write_config(resolved)
    if start.new_run or not folder.has(ENVIRONMENT):  # also when a kill cut the first session's write short
        folder.write_environment(environment)
    folder.append_session(
        {
            "session": folder.sessions() + 1,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": (
                {"checkpoint": str(start.checkpoint), "epoch": state.epoch, "step_in_epoch": state.step_in_epoch}
                if start.resumed
                else None
            ),
            "changed": {name: {"run": before, "now": now} for name, (before, now) in start.changes.items()},
            "world_size": dist_info.world_size,
            "environment": environment,
        }
    )


def data_record(splits: Any) -> dict[str, Any]:
    """What the run trained on (okdfast.data.provenance): path, sha256, partial / lossy and a label for titles."""
    if splits.provenance is not None:
        return splits.provenance.to_dict() | {"subset": splits.source.rpartition("[subset ")[2].rstrip("]") or None}
    return {"source": splits.source, "official": False, "label": f"{splits.name} (generated, not a real data set)"}


def tail_notes(plan: Any) -> list[str]:
    """What was done with an epoch's last batch that BatchNorm could not train on (a log line), if anything."""
    dropped = plan.dropped_per_epoch
    if not dropped:
        return []
    return [
        f"the last batch of every epoch would hold {dropped} image ({plan.num_samples} = "
        f"{plan.num_samples // plan.batch_size} x {plan.batch_size} + {dropped} per process): BatchNorm cannot "
        "train on one image, so it is left out of that epoch (the shuffle changes every epoch, so a different image "
        "each time); pick a --batch-size that leaves a larger tail to keep it"
    ]


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
    """Rebuild a run's method and test set from a checkpoint's own config and evaluate it (messages name
    ``okdfast.evaluate``, the command that asked)."""
    where = "okdfast.evaluate"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{where} --batch-size {batch_size}: must be an integer >= 1")
    payload = load_checkpoint(checkpoint, where=where)
    config = TrainConfig.from_dict(payload["config"], f"{where} {checkpoint}")
    if data_dir is not None:
        config.data_dir = data_dir
    _, torch_device = setup_distributed(device)
    splits = load_dataset(config.dataset, config.data_dir, subset=config.subset, seed=config.data_seed)
    check_same_data(payload.get("data"), splits, f"{where} {checkpoint}")
    _, test_loader = build_loaders(
        splits, batch_size=config.batch_size, eval_batch_size=batch_size, num_workers=config.workers, seed=config.seed
    )
    method = create_method(config.method, config.arch, splits.num_classes, method_config(config))
    load_weights(payload, method, f"{where} {checkpoint}")
    return evaluate(method.to(torch_device), test_loader, torch_device)


if __name__ == "__main__":
    main()
