"""SIGINT / SIGTERM during training: a flag the loop checks after each step, so it can checkpoint and exit cleanly
(exit status 128 + the signal). A second signal stops at once (KeyboardInterrupt). Under DDP the ranks agree on
the stop every few steps, so they all stop after the same step.

A signal sent to the whole process group (Ctrl-C, ``timeout``, SLURM, a container stop) also reaches the DataLoader
workers. Left alone, a worker dies of it (torch's worker handler re-raises SIGTERM), and torch's SIGCHLD handler
then raises "DataLoader worker ... is killed by signal" in the trainer, wherever it is. So processes forked while
training (the workers) start with SIGINT and SIGTERM blocked: the trainer alone takes the stop, checkpoints, and
shuts its workers down; a worker whose trainer died exits on its own (torch's watchdog).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from okdfast.utils.distributed import DistInfo

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active = 0  # StopRequested contexts open in this process


def _block_stop_signals_in_child() -> None:
    if _active:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


os.register_at_fork(after_in_child=_block_stop_signals_in_child)


class StopRequested:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step, so it can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        global _active
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        _active += 1
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active -= 1
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
