"""How far a run is and how long it will take: the progress inside an epoch, the whole run's ETA, each epoch's wall
time, the line a run ends with.

Inside an epoch: a tqdm bar on a terminal, otherwise a log line every ``--log-every`` seconds (so a run whose output
goes to a file or a pipe still shows that it is alive and how fast it goes). ``--progress on`` forces the bar,
``off`` shows neither, ``auto`` (default) picks the bar only on a terminal. Both count the whole epoch, also after a
mid-epoch resume (step 15/66, not 4/55), and both carry the run's ETA.

The run's ETA (:class:`RunClock`): the steps left times the seconds per step of the last full epoch this process
trained (of the epoch so far before the first one ends), plus the evaluations left times the last one's time.
Only this process's own timings count: a resumed run on another machine estimates from its own speed.

With ``--tensorboard`` the loss terms also go to TensorBoard every :data:`TENSORBOARD_EVERY` steps, as their mean
over those steps: the terms are summed on the device, so there is one host sync per window, never one per step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

TENSORBOARD_EVERY = 20  # steps per TensorBoard point of the loss terms (one host sync each)
BAR_EVERY = 20  # steps between the bar's postfix updates (each one a host sync for the loss)


def wants_bar(progress: str, is_main: bool) -> bool:
    return is_main and (progress == "on" or (progress == "auto" and sys.stderr.isatty()))


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``5 h 12 min``, ``2 d 3 h``: two units at most, rounded down."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def clock_time(seconds_from_now: float) -> str:
    """The local time ``seconds_from_now`` from now: ``14:05``, or ``Tue 14:05`` on another day."""
    now, then = time.localtime(), time.localtime(time.time() + seconds_from_now)
    return time.strftime("%H:%M" if then[:3] == now[:3] else "%a %H:%M", then)


class RunClock:
    """The whole run's clock: its ETA, each epoch's wall time, the time this process took.

    ``begin_epoch()`` before an epoch's steps, ``end_training(seconds, steps)`` after them, ``epoch_line(...)``
    once its evaluation is done."""

    def __init__(self, *, epochs: int, steps_per_epoch: int, global_step: int, max_steps: int | None = None) -> None:
        self.started = time.perf_counter()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.total_steps = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
        self.first_global_step = global_step
        self.seconds_per_step: float | None = None  # of the last full epoch this process trained
        self.seconds_per_evaluation: float | None = None  # evaluation, logging and checkpoint of the last epoch
        self._epoch_started: float | None = None
        self._training_ended: float | None = None
        self._train_seconds = 0.0

    def begin_epoch(self) -> None:
        now = time.perf_counter()
        if self._training_ended is not None:
            self.seconds_per_evaluation = now - self._training_ended
        self._epoch_started, self._training_ended = now, None

    def end_training(self, seconds: float, steps: int, full_epoch: bool) -> None:
        self._training_ended, self._train_seconds = time.perf_counter(), seconds
        if full_epoch and steps > 0:
            self.seconds_per_step = seconds / steps

    def seconds_left(self, global_step: int, evaluations_left: int, seconds_per_step: float | None = None) -> float:
        """The run's time left from ``global_step``; ``seconds_per_step``: the rate to use before a full epoch."""
        rate = self.seconds_per_step if self.seconds_per_step is not None else seconds_per_step
        if rate is None:
            return float("nan")
        evaluation = self.seconds_per_evaluation or 0.0
        return max(self.total_steps - global_step, 0) * rate + max(evaluations_left, 0) * evaluation

    def evaluations_left(self, epoch: int, done: bool) -> int:
        """Epoch ends still to come (each evaluates) when ``epoch`` is the current one, ``done`` its evaluation."""
        last_epoch = -(-self.total_steps // self.steps_per_epoch)  # the epochs --max-steps lets the run reach
        return last_epoch - epoch - (1 if done else 0)

    def eta(self, global_step: int, epoch: int, seconds_per_step: float | None = None) -> str:
        """``run 5 h 12 min left (about 14:05)``, or ``run time left: after the first steps``."""
        left = self.seconds_left(global_step, self.evaluations_left(epoch, done=False), seconds_per_step)
        if left != left:  # NaN: no rate yet
            return "run time left: known after the first steps"
        return f"run {format_duration(left)} left (about {clock_time(left)})"

    def epoch_line(self, epoch: int, global_step: int) -> str:
        """The end of epoch ``epoch``'s log line: ``took 1 min 5 s (train 1 min 0 s, test 5 s) | 4/300 epochs, 5 h 20
        min left (about 14:05)``."""
        now = time.perf_counter()
        wall = now - self._epoch_started if self._epoch_started is not None else self._train_seconds
        test = now - self._training_ended if self._training_ended is not None else 0.0
        line = f"took {format_duration(wall)} (train {format_duration(self._train_seconds)}, test "
        line += f"{format_duration(test)})"
        done_epochs = global_step // self.steps_per_epoch
        if global_step >= self.total_steps:
            return f"{line} | {done_epochs}/{self.epochs} epochs, the last of this run"
        # The evaluation just timed stands for the ones to come until a whole epoch end (with its checkpoint) is.
        evaluation = self.seconds_per_evaluation if self.seconds_per_evaluation is not None else test
        rate = self.seconds_per_step
        if rate is None and global_step > self.first_global_step:
            rate = self._train_seconds / max(global_step - self.first_global_step, 1)
        if rate is None:
            return line
        left = max(self.total_steps - global_step, 0) * rate + self.evaluations_left(epoch, done=True) * evaluation
        return f"{line} | {done_epochs}/{self.epochs} epochs, {format_duration(left)} left (about {clock_time(left)})"

    def taken(self) -> float:
        """Seconds since this process's run started."""
        return time.perf_counter() - self.started


def end_line(
    summary: dict[str, Any], head: str | None, seconds: float, resumed: bool, tensorboard: bool = False
) -> str:
    """The line a run ends with: how long it took, the reported head's best and last accuracy, where the files are.

    ``head``: the method's reported head (``leader``, ``gate``), None for the branch mean."""
    name = head or "branch_mean"
    key = f"acc_{name}"
    took = format_duration(seconds) + (" (this session)" if resumed else "")
    if summary.get("finished"):
        state = f"finished {summary['epochs_done']} epochs in {took}"
    elif summary.get("interrupted"):
        state = f"stopped after {took} at epoch {summary['epochs_done']} (continue with --resume auto)"
    else:
        state = f"stopped at step {summary['global_step']} (--max-steps) after {took}"
    parts = [state]
    best, last = summary.get("best", {}).get(key), summary.get("last", {}).get(key)
    if best is not None and last is not None:
        label = name.replace("_", " ")
        parts.append(
            f"{label}: best {best['value']:.2f}% (epoch {best['epoch']}), last {last:.2f}% (epoch "
            f"{summary['last'].get('epoch')})"
        )
    folder = summary["run_dir"]
    files = f"files in {folder}: train.log, metrics.csv, summary.json, best.pt, last.pt"
    if tensorboard:
        files += ", tensorboard/"
    parts.append(f"{files} (python -m okdfast.evaluate {folder}/best.pt)")
    return " | ".join(parts)


class EpochProgress:
    """``wrap(batches)`` once per epoch, then ``update(...)`` after every step.

    ``total``: the epoch's steps; ``done``: those a resumed epoch already took (the bar and the lines count from
    there); ``clock``: the run's, for the ETA; ``tensorboard``: a writer for the per-step loss terms (rank 0)."""

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
        clock: RunClock | None = None,
        global_step: int = 0,
        tensorboard: Any = None,
    ) -> None:
        self.bar_on = wants_bar(progress, is_main)
        self.lines_every = log_every if (is_main and progress != "off" and not self.bar_on) else 0.0
        self.log = log
        self.epoch, self.total, self.done = epoch, total, done
        self.clock, self.first_global_step = clock, global_step
        self.tensorboard = tensorboard if is_main else None
        self.bar: Any = None
        self._last_line = time.perf_counter()
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0

    def wrap(self, batches: Iterable) -> Iterable:
        if not self.bar_on:
            return batches
        from tqdm import tqdm

        self.bar = tqdm(batches, total=self.total, initial=self.done, desc=f"epoch {self.epoch}", leave=False,
                        dynamic_ncols=True)  # fmt: skip
        return self.bar

    def eta(self, steps: int, elapsed: float) -> str:
        if self.clock is None:
            return ""
        return self.clock.eta(self.first_global_step + steps, self.epoch, elapsed / max(steps, 1))

    def update(
        self,
        steps: int,
        loss: torch.Tensor,
        lr: float,
        images: int,
        elapsed: float,
        terms: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """After step ``steps`` of this process's part of the epoch (a host sync only when something is shown)."""
        if self.tensorboard is not None and terms:
            self._to_tensorboard(terms, self.first_global_step + steps)
        if self.bar is not None and steps % BAR_EVERY == 0:
            postfix = dict(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{images / elapsed:.0f}")
            if self.clock is not None:
                postfix["run_left"] = self.eta(steps, elapsed).removeprefix("run ").split(" left")[0]
            self.bar.set_postfix(postfix)
        if self.lines_every > 0 and time.perf_counter() - self._last_line >= self.lines_every:
            self._last_line = time.perf_counter()
            line = (
                f"epoch {self.epoch} step {self.done + steps}/{self.total} | loss {loss.item():.4f} | lr {lr:.4g} | "
                f"{images / max(elapsed, 1e-9):.0f} img/s"
            )
            self.log(f"{line} | {self.eta(steps, elapsed)}" if self.clock is not None else line)

    def _to_tensorboard(self, terms: dict[str, torch.Tensor], global_step: int) -> None:
        """Sum the terms on the device; every TENSORBOARD_EVERY steps write their mean (one sync) at the global
        step."""
        for name, value in terms.items():
            if name.startswith("part_"):  # a term's weighted part: the epoch row turns them into shares
                continue
            value = value.detach().float()
            self._window[name] = self._window[name] + value if name in self._window else value.clone()
        self._window_steps += 1
        if global_step % TENSORBOARD_EVERY == 0:
            names = list(self._window)
            means = (torch.stack([self._window[n] for n in names]) / self._window_steps).tolist()
            self.tensorboard.log_steps(global_step, dict(zip(names, means)), first_step=self.first_global_step)
            self._window, self._window_steps = {}, 0


class RunProgress:
    """A run's progress, made once per process (:meth:`of`): its clock, an :class:`EpochProgress` per epoch
    (:meth:`epoch`), each epoch's line end (:meth:`epoch_line`) and the run's last line (:meth:`end_line`)."""

    def __init__(self, config: Any, *, steps_per_epoch: int, global_step: int, is_main: bool, log: Callable,
                 tensorboard: Any = None, head: str | None = None, resumed: bool = False) -> None:  # fmt: skip
        self.config, self.is_main, self.log, self.tensorboard = config, is_main, log, tensorboard
        self.steps_per_epoch, self.head, self.resumed = steps_per_epoch, head, resumed
        self.clock = RunClock(
            epochs=config.epochs, steps_per_epoch=steps_per_epoch, global_step=global_step, max_steps=config.max_steps
        )

    @classmethod
    def of(cls, t: Any) -> RunProgress:
        """The progress of an ``okdfast.run.state.Training``; says where --tensorboard writes and how to open it."""
        if t.tensorboard is not None:
            t.log(t.tensorboard.where())
        return cls(t.config, steps_per_epoch=len(t.train_loader), global_step=t.state.global_step,
                   is_main=t.dist_info.is_main, log=t.log, tensorboard=t.tensorboard, head=t.method.head_name,
                   resumed=t.start.resumed)  # fmt: skip

    def epoch(self, epoch: int, state: Any) -> EpochProgress:
        """The progress of epoch ``epoch`` from where ``state`` (a RunState) stands; starts the epoch's clock."""
        self.clock.begin_epoch()
        return EpochProgress(progress=self.config.progress, log_every=self.config.log_every, is_main=self.is_main,
                             log=self.log, epoch=epoch, total=self.steps_per_epoch, done=state.step_in_epoch,
                             clock=self.clock, global_step=state.global_step, tensorboard=self.tensorboard)  # fmt: skip

    def end_training(self, sums: dict[str, float], seconds: float) -> None:
        """After the epoch's steps (``sums['steps']`` of them this process ran), before its evaluation."""
        steps = int(sums.get("steps", 0))
        self.clock.end_training(seconds, steps, full_epoch=steps == self.steps_per_epoch)

    def epoch_line(self, epoch: int, global_step: int) -> str:
        return self.clock.epoch_line(epoch, global_step)

    def end_line(self, summary: dict[str, Any]) -> str:
        return end_line(summary, self.head, self.clock.taken(), self.resumed, self.tensorboard is not None)
