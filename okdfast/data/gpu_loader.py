"""``--loader gpu``: the whole data set as uint8 on the training device, augmented there in batches (airbench's way).

CIFAR-100's 50k training images are 150 MiB as uint8 (CINIC-10's 180k train+valid: 530 MiB), a rounding error on a
GPU's memory, so they are copied to the device once and every batch is cut from them on the device: no workers,
no pinned host buffers, no host-to-device copy per batch. Per epoch the host draws the :class:`EpochPlan` (one
permutation and the crop corners and flips of every position, from the same seeded CPU generators as the torch
loader: milliseconds per epoch) and sends it to the device in one copy
of 25 bytes per image. Per batch the device runs two launches: the fused Triton kernel ``okdfast.kernels.augment``
(gather + crop + flip + normalise + cast + layout, reading each uint8 once and writing the batch once) and the label
gather.

Because the plan is the torch loader's, the two loaders yield the same batches: bit for bit on the CPU (the same
functions run) and on CUDA (the kernel's normalisation is a lookup in a table the CPU computed with the reference's
ops). Determinism, mid-epoch resume and ``DistributedSampler``-equivalent sharding come with the plan: under torchrun
every rank holds the whole data set and reads its own shard.

On the CPU the loader works on CPU tensors with the PyTorch path of the same augmentation (``crop_flip`` +
``normalize`` in the main process, no workers). ``--loader auto`` picks the torch loader there, whose workers
prepare batches beside the step (the measurement is in ``okdfast.data.factory``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from okdfast.data.arrays import ArrayDataset
from okdfast.data.base import Delivery, PlannedLoader
from okdfast.data.plan import EpochPlan
from okdfast.data.registry import DatasetSplits
from okdfast.data.transforms import PADDING, crop_flip_normalize, normalize_lut
from okdfast.ops.dispatch import triton_runs_on

# Share of the device's total memory the data set may take for --loader auto to choose gpu (the model, its
# activations and the optimizer state need the rest).
DEVICE_MEMORY_SHARE = 0.25


class Augmenter:
    """Applies crop/flip/normalise to uint8 (N, H, W, C) images already on the device; the gpu and ffcv loaders'
    one implementation. ``__call__(images, index, top, left, flip)``; ``top is None``: normalise only."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], delivery: Delivery) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.delivery = delivery
        self.triton = triton_runs_on(delivery.device)  # CUDA; CPU only in the interpreter (ops.dispatch)
        self.lut = normalize_lut(self.mean, self.std, delivery.dtype, delivery.device) if self.triton else None

    def __call__(
        self,
        images: torch.Tensor,
        index: torch.Tensor,
        top: torch.Tensor | None = None,
        left: torch.Tensor | None = None,
        flip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        d = self.delivery
        if self.triton:
            from okdfast.kernels.augment import crop_flip_normalize as fused  # imported late: TRITON_INTERPRET

            return fused(images, index, top, left, flip, self.lut, channels_last=d.channels_last, padding=PADDING)
        return crop_flip_normalize(
            images, index, top, left, flip, self.mean, self.std, dtype=d.dtype, channels_last=d.channels_last
        )


def device_bytes(splits: DatasetSplits) -> int:
    """Bytes the gpu loader keeps on the device: both splits' uint8 images and int64 labels."""
    return sum(d.images.nbytes + d.labels.nbytes for d in (splits.train, splits.test))


def fits_on_device(splits: DatasetSplits, device: torch.device, share: float = DEVICE_MEMORY_SHARE) -> bool:
    """Whether the data set takes at most ``share`` of the device's memory and half of what is free now."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    need = device_bytes(splits)
    return need <= share * total and need <= 0.5 * free


class GpuLoader(PlannedLoader):
    """The data set resident on ``delivery.device``; batches cut, augmented and normalised there."""

    name = "gpu"

    def __init__(
        self,
        dataset: ArrayDataset,
        plan: EpochPlan,
        mean: Sequence[float],
        std: Sequence[float],
        delivery: Delivery,
    ) -> None:
        super().__init__(plan, delivery)
        images, labels = dataset.tensors()
        self.images = images.to(delivery.device)  # (N, H, W, C) uint8: copied once
        self.labels = labels.to(delivery.device)  # (N,) int64
        self.augment = Augmenter(mean, std, delivery)

    def _epoch_on_device(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        order, params = self.plan.order()
        dev = self.delivery.device
        if dev.type == "cpu":
            return order, params
        if params is None:
            return order.to(dev, non_blocking=True), None
        packed = torch.stack([order, params[0], params[1], params[2].to(torch.int64)]).to(dev)  # one copy
        return packed[0], (packed[1], packed[2], packed[3].bool())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        order, params = self._epoch_on_device()
        bs = self.plan.batch_size
        for b in range(len(self.plan)):
            s = slice(b * bs, (b + 1) * bs)
            index = order[s]
            if params is None:
                x = self.augment(self.images, index)
            else:
                x = self.augment(self.images, index, params[0][s], params[1][s], params[2][s])
            yield x, self.labels[index]
