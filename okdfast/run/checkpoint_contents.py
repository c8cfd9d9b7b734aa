"""What a training checkpoint holds, and how a run is restored from one (or refused, with the reason).

A checkpoint (format 2) holds the modules' and optimizer's states, the scheduler, the scaler, the RNG streams, the
loop's position (:class:`RunState`), the run's config, the metrics rows of every finished epoch (so a resume
rebuilds metrics.jsonl / metrics.csv exactly) and a fingerprint of the data set it was trained on (so a resume on
other data is refused). Restoring checks, before it changes anything, that the layout is this okdfast's, that the
weights are finite and that they fit the network the config builds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from okdfast.config import TrainConfig
from okdfast.data import DatasetSplits
from okdfast.errors import CheckpointError, DataError
from okdfast.methods import Method
from okdfast.run.checkpoint_file import nonfinite_tensors
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
    """Name, sizes, classes, the sha256 of every image and label of both splits (``sha256``: one changed pixel
    shows), and ``digest``, the sampled digest earlier checkpoints hold (labels and every len/64-th image)."""
    digest, full = hashlib.sha1(), hashlib.sha256()
    for split in (splits.train, splits.test):
        labels, images = np.ascontiguousarray(split.labels, np.int64), np.ascontiguousarray(split.images)
        digest.update(labels.tobytes())
        digest.update(np.ascontiguousarray(images[:: max(1, len(split) // 64)]).tobytes())
        full.update(labels.tobytes())
        full.update(memoryview(images).cast("B"))  # no copy; about 0.1 s for CIFAR's 184 MB
    return {
        "name": splits.name,
        "num_classes": splits.num_classes,
        "train": len(splits.train),
        "test": len(splits.test),
        "digest": digest.hexdigest(),
        "sha256": full.hexdigest(),
    }


def check_same_data(stored: dict[str, Any] | None, splits: DatasetSplits, where: str) -> None:
    """Refuse to continue a run on data other than its own (``stored``: the checkpoint's fingerprint; the keys it
    holds are compared, so an earlier checkpoint, without ``sha256``, is checked on its sampled digest)."""
    if not stored:
        return  # a format-1 checkpoint: nothing recorded
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}: its data fingerprint is a {type(stored).__name__}, not what okdfast writes")
    now = data_fingerprint(splits)
    differ = [
        f"{key} {_short(now[key])} (the run: {_short(stored[key])})"
        for key in now
        if key in stored and stored[key] != now[key]
    ]
    if differ:
        raise DataError(
            f"{where}: the data set read now is not the one the run was trained on ({'; '.join(differ)}; read from "
            f"{splits.source}); point --data-dir at the run's data, or start a new run"
        )


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text[:80]


def check_state(payload: dict[str, Any], epochs: int, where: str) -> None:
    """The loop's position, the best epoch and the metrics history of a checkpoint, checked before anything uses
    them (a CheckpointError naming the key): a hand-edited or foreign file is refused, not reported as epoch 99."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}; okdfast writes its checkpoints whole: use the run's own last.pt "
                               "or best.pt, or start a new run")  # fmt: skip

    state, names = payload["state"], [f.name for f in fields(RunState)]
    unknown = sorted(str(key)[:40] for key in state if key not in names)
    if unknown:
        raise bad(f"its state has keys okdfast does not write ({', '.join(unknown[:5])})")
    values = RunState().as_dict() | state
    for name in ("epoch", "step_in_epoch", "global_step", "best_epoch"):
        if not _is_int(values[name]):
            raise bad(f"its state {name!r} is {_kind(values[name])}, not an integer")
    epoch = values["epoch"]
    if not 0 <= epoch <= epochs:
        raise bad(f"its state says epoch {epoch}, outside the run's 0..{epochs} epochs")
    if values["step_in_epoch"] < 0 or (epoch == epochs and values["step_in_epoch"]) or values["global_step"] < 0:
        raise bad(f"its state says step {values['step_in_epoch']} of epoch {epoch}, {values['global_step']} in all")
    if values["best_epoch"] != -1 and not 0 <= values["best_epoch"] < epoch:
        raise bad(f"its best epoch {values['best_epoch']} is not one of the {epoch} epochs done")
    if isinstance(values["best_value"], bool) or not isinstance(values["best_value"], int | float):
        raise bad(f"its best value is {_kind(values['best_value'])}, not a number")
    sums = values["partial_sums"]
    if not isinstance(sums, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in sums.items()):
        raise bad(f"its partial-epoch sums are {_kind(sums)}, not a mapping of names to numbers")
    history = payload.get("history")
    if history is not None:
        if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
            raise bad(f"its metrics history is {_kind(history)}, not a list of rows")
        done = [row.get("epoch") for row in history]
        if not all(_is_int(e) for e in done) or done != sorted(set(done)) or (done and not 0 <= done[-1] < epoch):
            raise bad(f"its metrics history has rows of epochs {str(done)[:80]}, not of the {epoch} epochs done")
        try:  # the rows are rewritten into metrics.jsonl
            json.dumps(history, allow_nan=True)
        except (TypeError, ValueError):
            raise bad("its metrics history holds values that are not plain numbers, text or lists") from None
    if payload.get("data") is not None and not isinstance(payload["data"], dict):
        raise bad(f"its data fingerprint is {_kind(payload['data'])}, not a mapping")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)  # a bool too: metrics rows hold flags such as 'partial'


def _kind(value: Any) -> str:
    shown = repr(value)
    return f"the {type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


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
    """Load ``payload`` (from :func:`okdfast.run.checkpoint_file.load_checkpoint`) into the run's objects."""
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
