"""What a training checkpoint holds, and how a run is restored from one (or refused, with the reason).

A checkpoint (format 2) holds the modules' and optimizer's states, the scheduler, the scaler, the RNG streams, the
loop's position (:class:`RunState`), the run's config, the metrics rows of every finished epoch (so a resume
rebuilds metrics.jsonl / metrics.csv exactly) and a fingerprint of the data set it was trained on (so a resume on
other data is refused). Restoring checks, before it changes anything, that the layout is this okdfast's, that the
weights are finite and that they fit the network the config builds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from okdfast.config import TrainConfig
from okdfast.data import DatasetSplits
from okdfast.errors import CheckpointError, DataError
from okdfast.methods import Method
from okdfast.utils.checkpoint import nonfinite_tensors
from okdfast.utils.seeding import capture_rng_state, restore_rng_state

CHECKPOINT_FORMAT = 2


@dataclass
class RunState:
    """What a checkpoint restores besides the modules: where we are and the best result so far."""

    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # optimizer steps done inside the current (unfinished) epoch
    global_step: int = 0
    best_value: float = float("-inf")
    best_epoch: int = -1
    partial_sums: dict[str, float] = field(default_factory=dict)  # train-term sums of the unfinished epoch

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def data_fingerprint(splits: DatasetSplits) -> dict[str, Any]:
    """Name, sizes, classes and a digest of the labels and a sample of the images of both splits."""
    digest = hashlib.sha1()
    for split in (splits.train, splits.test):
        digest.update(np.ascontiguousarray(split.labels).tobytes())
        step = max(1, len(split) // 64)
        digest.update(np.ascontiguousarray(split.images[::step]).tobytes())
    return {
        "name": splits.name,
        "num_classes": splits.num_classes,
        "train": len(splits.train),
        "test": len(splits.test),
        "digest": digest.hexdigest(),
    }


def check_same_data(stored: dict[str, Any] | None, splits: DatasetSplits, where: str) -> None:
    """Refuse to continue a run on data other than its own (``stored``: the checkpoint's fingerprint)."""
    if not stored:
        return  # a format-1 checkpoint: nothing recorded
    now = data_fingerprint(splits)
    differ = [f"{key} {now[key]} (the run: {stored.get(key)})" for key in now if stored.get(key) != now[key]]
    if differ:
        raise DataError(
            f"{where}: the data set read now is not the one the run was trained on ({'; '.join(differ)}; read from "
            f"{splits.source}); point --data-dir at the run's data, or start a new run"
        )


def checkpoint_payload(
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: RunState,
    config: TrainConfig,
    *,
    history: list[dict[str, Any]],
    data: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "layout_version": method.layout_version,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": state.as_dict(),
        "rng": capture_rng_state(),
        "config": config.to_dict(),
        "history": history,
        "data": data,
    }


def restore_checkpoint(
    payload: dict[str, Any],
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    where: str,
) -> RunState:
    """Load ``payload`` (from :func:`okdfast.utils.checkpoint.load_checkpoint`) into the run's objects."""
    load_weights(payload, method, where)
    try:
        state = RunState(**payload["state"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler") is not None:
            scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{where}: the optimizer / scheduler / RNG states do not fit this run ({error}); "
                              "the file was not written by this run's okdfast") from None  # fmt: skip
    return state


def load_weights(payload: dict[str, Any], method: Method, where: str) -> None:
    """The network's weights from a checkpoint: layout, finiteness and fit checked first."""
    try:
        type(method).check_layout(payload.get("layout_version"), where)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    bad = nonfinite_tensors(payload["model"])
    if bad:
        raise CheckpointError(
            f"{where}: the weights hold NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}), so no learning rate "
            "can continue from them: the file was damaged or written by a run that had diverged; use an earlier "
            "checkpoint (best.pt, a copy) or start the run again"
        )
    try:
        method.load_state_dict(payload["model"])
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:400]
        raise CheckpointError(f"{where}: the weights do not fit the network its config builds ({detail})") from None
