"""``--loader torch``: the reference. :class:`~okdfast.data.loader.EpochLoader` (a torch DataLoader whose workers
gather, crop, flip and normalise whole batches on the CPU, pinned when CUDA is present) with its batches brought to
the training device, dtype and memory format, so that it yields what every other loader yields.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from okdfast.data.base import Delivery, PlannedLoader
from okdfast.data.loader import EpochLoader


class TorchLoader(PlannedLoader):
    """Wraps an :class:`EpochLoader`: same plan, same batches, delivered (``non_blocking`` copy from pinned memory)."""

    name = "torch"

    def __init__(self, loader: EpochLoader, delivery: Delivery) -> None:
        super().__init__(loader.plan, delivery)
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        for x, y in self.loader.batches():  # the repeat check is ours
            yield self.delivery.images(x), self.delivery.labels(y)
