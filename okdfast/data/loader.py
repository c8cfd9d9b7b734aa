"""The plain torch DataLoader path, the reference every other loader matches: whole batches gathered, augmented and
normalised from in-memory uint8 arrays by DataLoader workers, following an :class:`~okdfast.data.plan.EpochPlan`
(each batch travels to a worker as ``(indices, top, left, flip)`` and the worker only applies them; the DataLoader
gets a private generator for its worker seeds, which nothing uses).

Built only by :func:`okdfast.data.factory.build_data_loaders` (``--loader torch``), which wraps it in
:class:`~okdfast.data.torch_loader.TorchLoader` to bring its batches to the training device and layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from okdfast.data.arrays import ArrayDataset
from okdfast.data.plan import BatchPlan, EpochPlan, FollowsPlan
from okdfast.data.transforms import PADDING, crop_flip, gather, normalize


class _BatchSource(Dataset):
    """Applies a :class:`BatchPlan`: gather (+ crop/flip) from uint8 (N, 32, 32, 3), normalise, look up labels."""

    def __init__(self, dataset: ArrayDataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.images, self.labels = dataset.tensors()  # zero-copy; forked workers share the pages
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, batch: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(batch.index)
        if batch.top is None:
            x = gather(self.images, index)
        else:
            top, left, flip = (torch.from_numpy(a) for a in (batch.top, batch.left, batch.flip))
            x = crop_flip(self.images, index, top, left, flip, PADDING)
        return normalize(x, self.mean, self.std), self.labels[index]


def _as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # Module-level (not a lambda) so that spawn-started workers can pickle it.
    return batch


class EpochLoader(FollowsPlan):
    """Iterable of ``(images float32 (B, 3, 32, 32) normalised, labels int64 (B,))`` on the CPU.

    ``set_epoch(e)`` selects the shuffle and augmentation of epoch ``e`` (a pure function of ``(seed, e)``);
    ``len(loader)`` is the number of batches.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        plan: EpochPlan,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.plan = plan
        self._loader = DataLoader(
            _BatchSource(dataset, mean, std),
            batch_size=None,  # the plan yields whole batches
            sampler=plan,
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,  # workers are stateless: the plan carries the epoch
            generator=torch.Generator().manual_seed(plan.seed),  # keeps the global RNG untouched
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        return self.batches()

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches without the repeat check (for a loader that wraps this one and checks itself)."""
        return iter(self._loader)
