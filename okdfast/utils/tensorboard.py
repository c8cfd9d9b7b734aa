"""TensorBoard scalars of a run (``--tensorboard``), written beside the CSV/JSONL that are always written.

The per-epoch events of a run are in ``RUN_DIR/tensorboard``; ``tensorboard --logdir runs`` shows every run. Every
numeric column of the per-epoch row becomes a scalar at step = epoch, grouped by what it is:

    train/<term>   the loss terms (train_loss, train_ce, train_kd, train_teacher_ce, train_cd, ...)
    test/<metric>  acc_branch_k, acc_branch_mean, acc_ensemble, acc_<head>, diversity_kl, disagreement, ce_ensemble
    opt/<name>     lr, kd_weight
    speed/<name>   images_per_sec, epoch_seconds

The loss terms are also written per step, under ``RUN_DIR/tensorboard/steps`` (TensorBoard lists it as a run of its
own, ``<run>/tensorboard/steps``): ``train_step/<term>`` at step = the global optimizer step, every
``okdfast.run.progress.TENSORBOARD_EVERY`` steps, the mean over those steps (summed on the device: one host sync per
point, none per step). Two event files, because TensorBoard's purge works on one step axis per file.

A resumed run reopens the writers with ``purge_step`` = the first epoch (the first step) it will redo, so
TensorBoard drops the events of an epoch that was cut short and logged again. Only rank 0 writes (the caller
creates no writer elsewhere). TensorBoard is optional: without it ``--tensorboard`` fails at start-up with a
one-line install hint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)"


def scalar_tag(name: str) -> str | None:
    """The TensorBoard tag of a metrics-row column, or None for bookkeeping columns (epoch, partial)."""
    if name in ("epoch", "partial"):
        return None
    if name.startswith("train_"):
        return f"train/{name[len('train_') :]}"
    if name.startswith("test_"):
        return f"test/{name[len('test_') :]}"
    if name in ("lr", "kd_weight"):
        return f"opt/{name}"
    if name in ("images_per_sec", "epoch_seconds"):
        return f"speed/{name}"
    return f"test/{name}"


def tensorboard_available() -> bool:
    """Whether the tensorboard package is installed (checked by config validation, before any work is done)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardWriter:
    """``log_epoch(row)`` writes every numeric column of one metrics row at step = ``row['epoch']``."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch imports tensorboard lazily; a missing package surfaces here
            raise ImportError(INSTALL_HINT) from error
        self._summary_writer = SummaryWriter
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step or None)
        self._steps: Any = None  # the per-step writer, opened at the first point

    def where(self) -> str:
        """The log line that says where the events go and how to look at them."""
        runs = self.log_dir.parent.parent
        return (
            f"TensorBoard: per-epoch scalars in {self.log_dir}, per-step loss terms in {self.log_dir / 'steps'}; "
            f"view with: tensorboard --logdir {runs} (then open http://localhost:6006)"
        )

    def log_steps(self, step: int, terms: dict[str, float], first_step: int = 0) -> None:
        """The loss terms at optimizer step ``step`` (``train_step/<term>``); ``first_step``: the global step this
        process started from (a resumed run drops the points a kill left after its checkpoint)."""
        if self._steps is None:
            purge = first_step + 1 if first_step > 0 else None
            self._steps = self._summary_writer(log_dir=str(self.log_dir / "steps"), purge_step=purge)
        for name, value in terms.items():
            self._steps.add_scalar(f"train_step/{name}", float(value), global_step=step)

    def log_epoch(self, row: dict[str, Any]) -> list[str]:
        """Writes the row's scalars and flushes (one small write per epoch); returns the tags written."""
        step = int(row["epoch"])
        tags = []
        for name, value in row.items():
            tag = scalar_tag(name)
            if tag is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self._writer.add_scalar(tag, float(value), global_step=step)
            tags.append(tag)
        self._writer.flush()
        return tags

    def close(self) -> None:
        self._writer.close()
        if self._steps is not None:
            self._steps.close()


def open_tensorboard(run_dir: str | Path, resume_epoch: int = 0) -> TensorBoardWriter:
    """The run's writer; raises ImportError with the install hint when tensorboard is missing."""
    return TensorBoardWriter(run_dir, purge_step=resume_epoch if resume_epoch > 0 else None)
