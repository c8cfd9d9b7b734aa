"""What every loader delivers, and the epoch bookkeeping they share.

Every loader of ``okdfast.data.factory`` (gpu, dali, ffcv, torch) is an iterable of ``(images, labels)``:

- ``images`` (B, C, H, W) on :attr:`Delivery.device`, normalised, in :attr:`Delivery.dtype`, channels-last strides
  when :attr:`Delivery.channels_last` (the model's memory format), with the paper's augmentation on training batches;
- ``labels`` (B,) int64 on the same device;

and offers ``set_epoch(e)`` (the shuffle and augmentation of epoch ``e``), ``len()`` (batches per epoch),
``num_samples`` (images per epoch on this rank, before ``drop_last``), ``batch_size`` and ``plan`` (the
:class:`~okdfast.data.plan.EpochPlan`: which images, in which order, with which crop and flip).

The gpu, dali and torch loaders apply the same plan, so they yield the same batches (bit for bit for gpu and
torch, to float rounding for DALI's normalisation); ffcv applies it too (its traversal order and augmentation are
driven by the plan), unless asked for FFCV's own random flip/translate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from okdfast.data.plan import EpochPlan, FollowsPlan


@dataclass(frozen=True)
class Delivery:
    """Where and how batches arrive: the training device, the model's memory format and the input dtype."""

    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Bring a (B, C, H, W) batch to the delivery's device, dtype and layout; no copy for what already is."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x.contiguous(memory_format=self.memory_format)

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        y = y.to(self.device, non_blocking=True)
        return y if y.dtype == torch.int64 else y.to(torch.int64)


class PlannedLoader(FollowsPlan):
    """Base of the loaders that follow an :class:`EpochPlan` and deliver to a :class:`Delivery`."""

    name = "planned"

    def __init__(self, plan: EpochPlan, delivery: Delivery) -> None:
        self.plan = plan
        self.delivery = delivery

    @property
    def device(self) -> torch.device:
        return self.delivery.device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        d = self.delivery
        return (
            f"{type(self).__name__}(batches={len(self)}, batch_size={self.batch_size}, "
            f"images={self.num_samples}, device={d.device}, dtype={d.dtype}, channels_last={d.channels_last})"
        )
