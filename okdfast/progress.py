"""Progress inside an epoch: a tqdm bar on a terminal, otherwise a log line every ``--log-every`` seconds (so a run
whose output goes to a file or a pipe still shows that it is alive and how fast it goes).

``--progress on`` forces the bar, ``off`` shows neither, ``auto`` (default) picks the bar only on a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch


def wants_bar(progress: str, is_main: bool) -> bool:
    return is_main and (progress == "on" or (progress == "auto" and sys.stderr.isatty()))


class EpochProgress:
    """``wrap(batches)`` once per epoch, then ``update(...)`` after every step."""

    def __init__(
        self,
        *,
        progress: str,
        log_every: float,
        is_main: bool,
        log: Callable[[str], None],
        epoch: int,
        total: int,
        done: int = 0,
    ) -> None:
        self.bar_on = wants_bar(progress, is_main)
        self.lines_every = log_every if (is_main and progress != "off" and not self.bar_on) else 0.0
        self.log = log
        self.epoch, self.total, self.done = epoch, total, done
        self.bar: Any = None
        self._last_line = time.perf_counter()

    def wrap(self, batches: Iterable) -> Iterable:
        if not self.bar_on:
            return batches
        from tqdm import tqdm

        self.bar = tqdm(batches, total=self.total - self.done, desc=f"epoch {self.epoch}", leave=False,
                        dynamic_ncols=True)  # fmt: skip
        return self.bar

    def update(self, steps: int, loss: torch.Tensor, lr: float, images: int, elapsed: float) -> None:
        """After step ``steps`` of this process's part of the epoch (a host sync only when something is shown)."""
        if self.bar is not None and steps % 20 == 0:
            self.bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{images / elapsed:.0f}")
        if self.lines_every > 0 and time.perf_counter() - self._last_line >= self.lines_every:
            self._last_line = time.perf_counter()
            self.log(
                f"epoch {self.epoch} step {self.done + steps}/{self.total} | loss {loss.item():.4f} | lr {lr:.4g} | "
                f"{images / max(elapsed, 1e-9):.0f} img/s"
            )
