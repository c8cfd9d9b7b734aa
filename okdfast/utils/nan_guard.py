"""Stops a run whose loss went non-finite, naming the step and the term, without a host sync every step.

Each step records on the device whether any loss term is non-finite and, for the first such step, which terms;
``check()`` (every ``check_every`` steps and at the end of an epoch) reads that back once and raises
:class:`NonFiniteLossError`. Steps whose *gradients* overflowed under an fp16 GradScaler are skipped by the scaler
and only counted (the loss itself was finite); a non-finite *loss* is always an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The run diverged (or started from non-finite weights or data); the last good checkpoint is untouched."""


class NonFiniteGuard:
    """``first_step``: the global step this process starts at; a loss that is non-finite at once points at the
    weights or the data it started from, not at the learning rate, and the message says so."""

    def __init__(self, device: torch.device, check_every: int = 50, first_step: int = 0) -> None:
        self.device = device
        self.check_every = check_every
        self.first_step_of_session = first_step
        self.names: list[str] | None = None
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_terms: Tensor | None = None
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, step: int, terms: dict[str, Tensor]) -> None:
        """``terms``: the step's scalar loss terms ('loss' included). No host sync."""
        if self.names is None:
            self.names = list(terms)
            self.first_terms = torch.zeros(len(self.names), dtype=torch.bool, device=self.device)
        values = torch.stack([terms[name].detach().float().reshape(()) for name in self.names])
        bad = ~torch.isfinite(values)
        is_first = bad.any() & ~self.seen
        self.first_step = torch.where(is_first, torch.full_like(self.first_step, step), self.first_step)
        self.first_terms = torch.where(is_first, bad, self.first_terms)
        self.seen = self.seen | bad.any()

    def record_scaler_skip(self, scale_before: Tensor, scale_after: Tensor) -> None:
        """A GradScaler lowers its scale exactly when it skipped the step for inf/NaN gradients."""
        self.skipped_steps += (scale_after < scale_before).to(torch.int64)

    def check(self) -> None:
        if not bool(self.seen):
            return
        bad_terms = [n for n, b in zip(self.names or [], self.first_terms.tolist()) if b]  # type: ignore[union-attr]
        step = int(self.first_step)
        head = (
            f"non-finite loss at optimizer step {step} (terms: {', '.join(bad_terms)}); the run is stopped and no "
            "checkpoint was written after it: the last good one is untouched."
        )
        if step == self.first_step_of_session:
            raise NonFiniteLossError(
                f"{head} It was non-finite at the first step of this process, before any update: the weights it "
                "started from (the checkpoint resumed) or the input data are not finite, which no --lr fixes. "
                "Check the data set's files, and resume from another checkpoint or start the run again."
            )
        raise NonFiniteLossError(f"{head} Try a lower --lr, --amp bf16 instead of fp16, or --amp off.")
