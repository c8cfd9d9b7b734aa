"""The epoch plan every loader follows: which images, in which order, with which crop and flip, for each epoch.

Determinism (what exact checkpoint-resume relies on): the batches of epoch ``e`` are a pure function of
``(seed, e)`` and the settings. The main process plans the epoch (:class:`EpochPlan`): one permutation from a
generator seeded by ``(seed, e, "shuffle")`` and the crop corners and flips of every position of that permutation
from one seeded by ``(seed, e, "augment")``; a loader only applies them (:mod:`okdfast.data.transforms`). So the
result does not depend on the epochs run before in the process, on worker counts, or on the global torch RNG.

Distributed: ``rank, world_size`` shard the training epoch like ``DistributedSampler`` (every rank draws the same
permutation, pads it by repeating its head to a multiple of ``world_size``, and takes positions
``rank::world_size``); the test plan is sharded ``rank::world_size`` without padding, so summing correct counts
and sizes over ranks gives the exact test accuracy.

Every loader of ``okdfast.data.factory`` (gpu, dali, ffcv, torch) follows the plans :func:`build_plans` makes and
shares :class:`FollowsPlan`, so they all yield the batches of the torch reference (``okdfast.data.loader``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from okdfast.data.registry import DatasetSplits
from okdfast.data.transforms import sample_crop_flip

_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def stream_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator whose state is a pure function of ``(seed, epoch, stream)`` (SeedSequence mixing)."""
    hi, lo = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(hi) << 32) | int(lo))


class BatchPlan(NamedTuple):
    """One batch as the main process sends it to a worker (numpy: pickles as bytes, no shared-memory handles)."""

    index: np.ndarray  # (B,) int64 rows of the data set
    top: np.ndarray | None  # (B,) int64 crop corners in the padded image; None: no augmentation
    left: np.ndarray | None  # (B,) int64
    flip: np.ndarray | None  # (B,) bool


class EpochPlan(Sampler[BatchPlan]):
    """The batches one rank sees in an epoch: a pure function of ``(seed, epoch)`` and the settings."""

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        self.num_images = num_images
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        if world_size == 1:
            self.num_samples = num_images
        elif pad:
            self.num_samples = math.ceil(num_images / world_size)
        else:
            self.num_samples = len(range(rank, num_images, world_size))

    @property
    def dropped_per_epoch(self) -> int:
        """Images of this rank's epoch left out by ``drop_last`` (a different tail each epoch: the order changes)."""
        return self.num_samples % self.batch_size if self.drop_last else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def order(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """(image indices (num_samples,) of this rank in order, their (top, left, flip) or None)."""
        n = self.num_images
        if self.shuffle:
            order = torch.randperm(n, generator=stream_generator(self.seed, self.epoch, _SHUFFLE_STREAM))
        else:
            order = torch.arange(n)
        if self.world_size > 1 and self.pad:
            total = self.num_samples * self.world_size  # DistributedSampler: repeat the head to fill the tail
            order = torch.cat([order] * math.ceil(total / n))[:total]
        params = None
        if self.augment:  # drawn for every position of the (padded) epoch, then sharded with it
            params = sample_crop_flip(len(order), stream_generator(self.seed, self.epoch, _AUGMENT_STREAM))
        if self.world_size > 1:
            keep = slice(self.rank, None, self.world_size)
            order = order[keep]
            params = None if params is None else (params[0][keep], params[1][keep], params[2][keep])
        return order, params

    def __iter__(self) -> Iterator[BatchPlan]:
        order, params = self.order()
        for b in range(len(self)):
            s = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if params is None:
                yield BatchPlan(order[s].numpy(), None, None, None)
            else:
                yield BatchPlan(order[s].numpy(), params[0][s].numpy(), params[1][s].numpy(), params[2][s].numpy())


class FollowsPlan:
    """What every loader that follows an :class:`EpochPlan` shares: epoch selection, lengths, the repeat warning.

    Subclasses set ``self.plan`` and call :meth:`_begin_epoch` at the start of ``__iter__``.
    """

    plan: EpochPlan
    _warned: bool = False
    _last_epoch: int | None = None

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def num_samples(self) -> int:
        """Images per epoch on this rank (before ``drop_last``)."""
        return self.plan.num_samples

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch: epoch={epoch!r} must be a non-negative int")
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.plan)

    def _begin_epoch(self) -> None:
        """Warns once when a shuffled epoch is replayed without ``set_epoch``."""
        if self.plan.shuffle and self._last_epoch == self.epoch and not self._warned:
            self._warned = True
            warnings.warn(
                f"this loader was already iterated with epoch {self.epoch}: it repeats that epoch's order and "
                "augmentation; call set_epoch(epoch) before each epoch",
                stacklevel=3,
            )
        self._last_epoch = self.epoch


def check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an int >= {low}")


def build_plans(
    splits: DatasetSplits,
    *,
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    augment: bool = True,
    drop_last: bool = False,
    distributed: tuple[int, int] | None = None,
    min_last_batch: int = 1,
) -> tuple[EpochPlan, EpochPlan]:
    """The (train, test) plans every loader follows, after checking the arguments (the loaders are built from them by
    :func:`okdfast.data.factory.build_data_loaders`).

    ``min_last_batch``: a last training batch smaller than this is dropped (``drop_last`` for that data size only;
    the plan's ``dropped_per_epoch`` says how many images). The training loop passes 2: BatchNorm cannot train
    on a batch of one image.
    """
    check_int("batch_size", batch_size, 1)
    check_int("min_last_batch", min_last_batch, 1)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    check_int("eval_batch_size", eval_batch_size, 1)
    check_int("seed", seed, 0)
    rank, world_size = distributed if distributed is not None else (0, 1)
    check_int("world_size", world_size, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"distributed=({rank!r}, {world_size}): rank must be an int in [0, world_size)")
    if len(splits.train) == 0 or len(splits.test) == 0:
        raise ValueError(f"{splits.name}: empty split (train {len(splits.train)}, test {len(splits.test)} images)")
    shard = {"seed": seed, "rank": rank, "world_size": world_size}
    train_plan = EpochPlan(len(splits.train), batch_size, shuffle=True, augment=augment, drop_last=drop_last, **shard)
    if 0 < train_plan.num_samples % batch_size < min_last_batch and train_plan.num_samples > batch_size:
        train_plan.drop_last = True
    test_plan = EpochPlan(len(splits.test), eval_batch_size, shuffle=False, augment=False, pad=False, **shard)
    if len(train_plan) == 0:
        raise ValueError(
            f"batch_size={batch_size} with drop_last=True leaves no batch of the {train_plan.num_samples} training "
            f"images per rank; lower batch_size or set drop_last=False"
        )
    return train_plan, test_plan
