"""The training run, read top to bottom: what this start is (okdfast.run.resume) -> distributed set-up -> data ->
method (network + heads, okdfast.run.assemble) -> optimizer and step -> restore a checkpoint -> the run folder
(okdfast.run.folder owns every file a run writes) -> epochs of (train steps, evaluate, log, checkpoint;
okdfast.run.epoch) -> summary. ``okdfast.train`` is its command line.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from okdfast.config import TrainConfig
from okdfast.data import build_data_loaders, load_dataset
from okdfast.data.locate import download_by_default
from okdfast.methods import sigmoid_rampup
from okdfast.run.assemble import build_method, build_training, method_config
from okdfast.run.checkpoint_contents import RunState, check_same_data, data_fingerprint
from okdfast.run.checkpoint_contents import restore_checkpoint as restore_from_payload
from okdfast.run.device_checks import check_for_device
from okdfast.run.epoch import epoch_row, format_row, merge_sums, train_one_epoch
from okdfast.run.precision import resolve_amp
from okdfast.run.predictions import write_predictions
from okdfast.run.progress import RunProgress
from okdfast.run.resume import Start, plan_start
from okdfast.run.scoring import evaluate
from okdfast.run.signals import StopRequested
from okdfast.run.state import Training
from okdfast.utils.distributed import DistInfo, cleanup_distributed, setup_distributed
from okdfast.utils.nan_guard import NonFiniteGuard
from okdfast.utils.seeding import seed_everything

__all__ = ["run", "set_up"]


def run(config: TrainConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train with a validated config; returns the summary (also written to RUN_DIR/summary.json).

    ``explicit``: the fields the command line set (``parse_config``'s); None for a library caller, whose every set
    field counts (a resumed run refuses values that contradict its own config, ``okdfast.run.resume``)."""
    config.validate()  # a library caller's config is checked as the command line's is
    dist_info, device = setup_distributed(config.device)
    try:
        start = plan_start(config, explicit, writer=dist_info.is_main)
        if explicit is not None and "download" not in explicit:  # the CLI, told neither --download nor --no-download
            start.config.download = download_by_default(start.config.dataset, start.config.data_dir)
        training = set_up(start, dist_info, device)
        progress = RunProgress.of(training)  # the ETA, each epoch's time, the last line; says where TensorBoard is
        with StopRequested() as stop:
            last_metrics, interrupted = train_epochs(training, stop, progress)
        return finish(training, last_metrics, interrupted, stop, progress)
    finally:
        cleanup_distributed()


def set_up(start: Start, dist_info: DistInfo, device: torch.device) -> Training:
    """Config -> data -> method -> optimizer and step -> restored state -> the run folder, in that order (the RNG
    streams are drawn in this order, so a run is reproducible)."""
    config = start.config.resolve_speed_defaults(device.type)
    mcfg = method_config(config)
    # The run's config with every default made concrete: what the checkpoint and config.yaml record.
    config = dataclasses.replace(config, branches=mcfg.num_branches, rampup_epochs=mcfg.rampup_epochs)
    check_for_device(config, device, dist_info.world_size)
    seed_everything(config.seed, config.deterministic)
    amp_dtype = resolve_amp(config.amp, device)

    # data: each rank takes its DistributedSampler-style shard of every global batch, on `device`, normalised
    splits = load_dataset(
        config.dataset, config.data_dir, download=config.download, subset=config.subset, seed=config.data_seed
    )
    data = data_fingerprint(splits)
    if start.payload is not None:
        check_same_data(start.payload.get("data"), splits, f"--resume {start.checkpoint}")
    train_loader, test_loader = build_data_loaders(
        splits,
        loader=config.loader,
        device=device,
        batch_size=config.batch_size // dist_info.world_size,
        eval_batch_size=config.eval_batch_size,
        num_workers=config.workers,
        seed=config.seed,
        distributed=(dist_info.rank, dist_info.world_size) if dist_info.enabled else None,
        channels_last=bool(config.channels_last),
        data_dir=config.data_dir,
        verbose=dist_info.is_main,
        min_last_batch=2,  # BatchNorm cannot train on one image: a tail of one is dropped (logged)
    )

    method, model = build_method(config, mcfg, splits.num_classes, dist_info, device)
    optimizer, scheduler, scaler, step = build_training(config, method, model, amp_dtype, dist_info, device)
    state = RunState()
    if start.payload is not None:
        state = restore_from_payload(
            start.payload, method, optimizer, scheduler, scaler, f"--resume {start.checkpoint}"
        )
    training = Training(
        config=config,
        mcfg=mcfg,
        start=start,
        dist_info=dist_info,
        device=device,
        amp_dtype=amp_dtype,
        splits=splits,
        data=data,
        train_loader=train_loader,
        test_loader=test_loader,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        step=step,
        state=state,
        guard=NonFiniteGuard(device, first_step=state.global_step),
        num_params=sum(p.numel() for p in method.parameters()),
    )
    training.open_folder()
    return training


def train_epochs(t: Training, stop: StopRequested, run_progress: RunProgress) -> tuple[dict[str, Any], bool]:
    """Epochs until the last one, a signal or --max-steps: (the last epoch's row, interrupted by a signal)."""
    config, state = t.config, t.state
    last_metrics: dict[str, Any] = {}
    while state.epoch < config.epochs:
        epoch = state.epoch
        t.train_loader.set_epoch(epoch)
        kd_weight = config.alpha * sigmoid_rampup(epoch, config.rampup_epochs)
        lr = float(t.optimizer.param_groups[0]["lr"])
        progress = run_progress.epoch(epoch, state)
        sums, images, seconds, interrupted = train_one_epoch(
            t.step,
            t.train_loader,
            state,
            config=config,
            device=t.device,
            kd_weight=kd_weight,
            stop=stop,
            guard=t.guard,
            dist_info=t.dist_info,
            progress=progress,
        )
        run_progress.end_training(sums, seconds)
        sums = merge_sums(state.partial_sums, sums)
        epoch_done = state.step_in_epoch >= len(t.train_loader)
        reached_max = config.max_steps is not None and state.global_step >= config.max_steps
        if interrupted or (reached_max and not epoch_done):
            state.partial_sums = sums
            t.save()
            if interrupted:
                t.log(
                    f"stopped by signal {stop.signum} at epoch {epoch} step {state.step_in_epoch}; saved "
                    f"{t.folder.last}; continue with --resume auto"
                )
                return last_metrics, True
        autocast = torch.autocast(t.device.type, dtype=t.amp_dtype) if t.amp_dtype is not None else None
        predictions: list = []
        test_metrics = evaluate(
            t.method,
            t.test_loader,
            autocast=autocast,
            predictions=predictions,
        )
        if t.dist_info.is_main and t.dist_info.world_size == 1:  # per-image predictions (okdfast/run/predictions.py)
            write_predictions(t.folder.path, epoch, predictions)
        last_metrics = epoch_row(epoch, lr, kd_weight, epoch_done, sums, images, seconds, test_metrics)
        log_epoch(t, last_metrics, run_progress)
        if epoch_done:
            end_epoch(t, test_metrics)
        if reached_max:
            break
    return last_metrics, False


def log_epoch(t: Training, row: dict[str, Any], progress: RunProgress) -> None:
    if t.metrics_log is not None:
        t.metrics_log.append(row)
    if t.tensorboard is not None:
        t.tensorboard.log_epoch(row)
    t.log(f"{format_row(row, t.method)} | {progress.epoch_line(row['epoch'], t.state.global_step)}")


def end_epoch(t: Training, test_metrics: dict[str, float]) -> None:
    """Step the lr schedule, move to the next epoch, keep the best epoch, checkpoint (last.pt, best.pt)."""
    state = t.state
    with warnings.catch_warnings():  # a resume at an epoch's last step has made no optimizer step yet
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
        t.scheduler.step()
    epoch = state.epoch
    state.epoch += 1
    state.step_in_epoch = 0
    state.partial_sums = {}
    value = test_metrics[t.config.best_metric]  # a metric of this method: checked at the start
    improved = value > state.best_value
    if improved:
        state.best_value, state.best_epoch = value, epoch
    t.save(improved)


def finish(t: Training, last: dict[str, Any], interrupted: bool, stop: StopRequested, progress: RunProgress) -> dict:
    """Write summary.json, log the last line (time taken, the reported head's best and last accuracy, where the
    files are); a run stopped by a signal exits with 128 + its number (after its checkpoint)."""
    if t.tensorboard is not None:
        t.tensorboard.close()
    summary = t.summary(last, interrupted)
    if t.dist_info.is_main:
        t.folder.write_summary(summary)
    t.log(progress.end_line(summary))
    if interrupted and stop.signum is not None:
        raise SystemExit(128 + stop.signum)
    return summary
