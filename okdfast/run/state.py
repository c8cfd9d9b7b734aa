"""One training run's state: what the set-up builds and the epochs use (:class:`Training`), what the run writes when
it starts (config, environment, session, the header of train.log) and its summary when it ends.

``okdfast.train`` builds a Training in its set-up and passes it through the epoch loop; the files themselves are
written by :class:`okdfast.run.folder.RunFolder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from okdfast.config import TrainConfig
from okdfast.methods import Method, MethodConfig
from okdfast.ops.dispatch import fused_enabled
from okdfast.ops.fused_default import measured_here
from okdfast.run.assemble import data_record, resolved_config, tail_notes
from okdfast.run.checkpoint_contents import RunState, checkpoint_payload
from okdfast.run.epoch import best_of
from okdfast.run.folder import RunFolder, record_start
from okdfast.run.precision import amp_notes
from okdfast.run.resume import Start
from okdfast.run.step import TrainStep
from okdfast.utils.distributed import DistInfo, parameter_divergence
from okdfast.utils.environment import environment_manifest
from okdfast.utils.nan_guard import NonFiniteGuard
from okdfast.utils.tensorboard import open_tensorboard


@dataclass
class Training:
    config: TrainConfig  # every default made concrete
    mcfg: MethodConfig
    start: Start  # what this start is (okdfast.run.resume): new run or continuation, the checkpoint, the folder
    dist_info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    splits: Any  # okdfast.data.DatasetSplits
    data: dict[str, Any]  # the data set's fingerprint (checked on resume)
    train_loader: Any
    test_loader: Any
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    step: TrainStep
    state: RunState
    guard: NonFiniteGuard
    num_params: int
    metrics_log: Any = None  # okdfast.utils.metrics_log.MetricsLog on rank 0
    tensorboard: Any = None

    @property
    def folder(self) -> RunFolder:
        return self.start.folder

    def log(self, message: str) -> None:
        self.folder.log(message)  # printed now; in train.log once the folder exists

    def save(self, improved: bool = False) -> None:
        """last.pt (and best.pt when ``improved``), with the metrics history and the data fingerprint."""
        if self.dist_info.is_main:
            rows = self.metrics_log.history if self.metrics_log is not None else []
            parts = (self.method, self.optimizer, self.scheduler, self.scaler, self.state, self.config)
            self.folder.save_checkpoint(checkpoint_payload(*parts, history=rows, data=self.data), best=improved)

    def open_folder(self) -> None:
        """Everything is ready: from here on the run folder is written (a start that failed before left nothing).
        config.yaml / environment.json / sessions.jsonl, the header of train.log, the metrics files."""
        start, folder, state = self.start, self.folder, self.state
        history: list[dict[str, Any]] = []
        if start.payload is not None:
            stored = start.payload.get("history")
            history = list(stored) if stored is not None else folder.rows_before(state.epoch)  # format 1
        removed = folder.create()
        if removed:
            self.log(
                f"removed {len(removed)} temporary file(s) of writes a kill cut short: "
                f"{', '.join(p.name for p in removed)}"
            )
        if self.dist_info.is_main:
            self.record_start()
        for line in self.header():
            self.log(line)
        self.metrics_log = folder.metrics(history) if self.dist_info.is_main else None
        if self.config.tensorboard and self.dist_info.is_main:
            self.tensorboard = open_tensorboard(folder.path, state.epoch)

    def record_start(self) -> None:
        start, state, world = self.start, self.state, self.dist_info.world_size
        resolved = resolved_config(
            self.config, self.mcfg, self.amp_dtype, self.splits, self.data, world, self.num_params
        )
        resumed_from = None
        if start.resumed:
            resumed_from = {
                "checkpoint": str(start.checkpoint),
                "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch,
            }
        record_start(
            self.folder,
            new_run=start.new_run,
            resolved=resolved,
            environment=environment_manifest(self.device),
            resumed_from=resumed_from,
            changes=start.changes,
            world_size=world,
        )
        if start.checkpoint is not None and self.folder.repair_best(start.checkpoint, state.as_dict()):
            self.log(f"relinked {self.folder.best} to {self.folder.last}: a kill had fallen between writing the two")

    def fused_loss_text(self) -> str:
        """'on' / 'off' for the log line; with 'auto', how many GPU verdicts decide where MDE's head runs it."""
        config = self.config
        text = "on" if fused_enabled(config.fused_loss, self.device) else "off"
        measured = measured_here("mde_head", self.device) if config.method == "mde" else 0
        if text == "on" and config.fused_loss == "auto" and measured:
            text += (
                f" (MDE's head: where the {measured} verdicts for this GPU in okdfast/ops/fused_verdicts.json allow)"
            )
        return text

    def header(self) -> list[str]:
        """The first lines of train.log: what is trained on what, how; notes on the schedule and the batches."""
        config, splits, start, state = self.config, self.splits, self.start, self.state
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off"
        lines = [
            f"{config.method} | {config.arch} K={self.mcfg.num_branches} | {splits.name} ({splits.source}: "
            f"{len(splits.train)} train / {len(splits.test)} test) | {self.num_params / 1e6:.3f}M params | device "
            f"{self.device} | amp {amp} | channels-last {'on' if config.channels_last else 'off'} | compile "
            f"{config.compile} | branches {config.branch_impl} | fused loss {self.fused_loss_text()} | run folder "
            f"{self.folder}"
        ]
        lines += amp_notes(config.amp, self.device) + config.milestone_notes() + tail_notes(self.train_loader.plan)
        if start.resumed:
            lines.append(f"resumed from {start.checkpoint}: epoch {state.epoch}, step {state.step_in_epoch} of it")
        for name, (before, now) in start.changes.items():
            lines.append(
                f"--{name.replace('_', '-')} {now} for this session (the run started with {before}; sessions.jsonl)"
            )
        return lines

    def summary(self, last_metrics: dict[str, Any], interrupted: bool) -> dict[str, Any]:
        """summary.json: the last and best epochs, the speed, the data trained on."""
        state, log_rows = self.state, (self.metrics_log.rows if self.metrics_log is not None else [])
        summary = {
            "run_dir": str(self.folder),
            "finished": state.epoch >= self.config.epochs,
            "interrupted": interrupted,
            "epochs_done": state.epoch,
            "global_step": state.global_step,
            "parameters": self.num_params,
            # A run resumed after it had finished trains nothing: its last epoch is the logged one.
            "last": last_metrics or (log_rows[-1] if log_rows else {}),
            "nonfinite_skipped_steps": int(self.guard.skipped_steps),
            "data": data_record(self.splits),  # the file, its sha256, partial or lossy: never taken for the official
        }
        if self.dist_info.enabled:
            summary["ddp_max_param_divergence"] = parameter_divergence(self.method)
        if log_rows:
            summary["best"] = best_of(self.metrics_log.history or log_rows)
            full_epochs = self.metrics_log.history
            if full_epochs:
                speeds = sorted(r["images_per_sec"] for r in full_epochs)
                summary["images_per_sec_median"] = speeds[len(full_epochs) // 2]
        return summary
