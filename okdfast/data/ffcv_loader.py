"""``--loader ffcv``: the arrays written once as an FFCV ``.beton`` per data set and split, read by FFCV's Loader.

    image: SimpleRGBImageDecoder -> ToTensor -> ToDevice(non_blocking) -> PlannedAugment
           (``native_augment=True``: RandomHorizontalFlip -> RandomTranslate(4) before ToTensor, normalise after)
    label: IntDecoder -> ToTensor -> ToDevice(non_blocking) -> ToLong

The ``.beton`` (raw RGB, 3.4 KiB per 32x32 image: 170 MB for CIFAR-100's training split) is named by a hash of
the arrays' contents (``okdfast-ffcv-<name>-<split>-<hash>.beton``), so a changed source gives a new file; the stale
files of the same data set and split are removed when a new one is written. It lies next to the data: the first
writable folder of ``--data-dir`` / ``$OKDFAST_DATA`` / ``./data``, else ``~/.cache/okdfast/ffcv``. Writing
CIFAR-100's 50k + 10k images took 9 s on 2 busy cores (CINIC-10's 180k + 90k: 16 s); FFCV compiles its pipeline with
numba on the first epoch (about a second per loader).

Order and augmentation follow the :class:`~okdfast.data.plan.EpochPlan`, so this loader yields the torch loader's
batches: a custom ``TraversalOrder`` hands FFCV the plan's order (its own RANDOM order would be another
permutation, and its distributed mode another sharding), and ``PlannedAugment`` -- an FFCV operation that receives
the batch's sample ids -- looks up each sample's crop corner and flip in the epoch's table and runs the shared
fused crop/flip/normalise (``okdfast.data.gpu_loader.Augmenter``: the Triton kernel on CUDA) on the device, writing
each batch once in the model's dtype and memory format. FFCV's own ``RandomHorizontalFlip`` / ``RandomTranslate``
(``native_augment=True``) draw from numba's per-thread RNG, which nothing seeds: that path is offered for speed
comparisons but is not reproducible.

FFCV reuses its buffers for the next batches; the two last operations return fresh tensors, so a batch stays valid
after the loop moves on (on CUDA they are allocated on FFCV's side stream and marked as used on the consumer's).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from okdfast.data.arrays import ArrayDataset
from okdfast.data.base import Delivery, PlannedLoader
from okdfast.data.gpu_loader import Augmenter
from okdfast.data.locate import search_roots
from okdfast.data.plan import EpochPlan
from okdfast.data.transforms import PADDING
from okdfast.utils.atomic_files import atomic_output

INSTALL_HINT = (
    "needs FFCV: apt-get install -y libopencv-dev libturbojpeg0-dev pkg-config, "
    "then pip install ffcv numba opencv-python-headless (or pip install 'okdfast[ffcv]')"
)
BETON_VERSION = 1
USER_CACHE = Path("~/.cache/okdfast/ffcv")
_WRITER_LOCK = threading.Lock()  # the Process swap below is process-wide


def import_ffcv() -> Any:
    """The ``ffcv`` module, or an ImportError whose message is the one line saying what to install."""
    try:
        import ffcv
        import ffcv.loader  # noqa: F401
    except ImportError:
        raise ImportError(f"--loader ffcv {INSTALL_HINT}") from None
    return ffcv


# ---------------------------------------------------------------------------------------------------------------
# the .beton cache
# ---------------------------------------------------------------------------------------------------------------
def fingerprint(dataset: ArrayDataset) -> str:
    """A hash of the images, labels and class count (blake2b: about 1 GB/s, 0.15 s for CIFAR-100's train split)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"v{BETON_VERSION} {dataset.images.shape} {dataset.num_classes}".encode())
    h.update(memoryview(dataset.images).cast("B"))
    h.update(memoryview(dataset.labels).cast("B"))
    return h.hexdigest()


def default_cache_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The first existing, writable folder of the data search roots (``--data-dir``, ``$OKDFAST_DATA``,
    ``./data``, ...), else ``~/.cache/okdfast/ffcv``."""
    for root in search_roots(data_dir):
        folder = root.parent if root.is_file() else root
        if folder.is_dir() and os.access(folder, os.W_OK):
            return folder
    return USER_CACHE.expanduser()


def beton_path(dataset: ArrayDataset, name: str, split: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"okdfast-ffcv-{name}-{split}-{fingerprint(dataset)}.beton"


def ensure_beton(dataset: ArrayDataset, name: str, split: str, cache_dir: str | os.PathLike[str]) -> Path:
    """The ``.beton`` of ``dataset``: reused when one with the same content hash exists, else written (atomically:
    to a temporary name, then renamed) and the stale ones of the same ``name`` and ``split`` removed.

    FFCV's writer forks one process per worker; a fork of a process that already runs threads (DALI's, numba's, a
    DataLoader's pin-memory thread, CUDA's) can deadlock in the child, and the processes' start-up costs more than
    the work (raw 32x32 images only need copying). So the one worker runs as a thread in this
    process: ``ffcv.writer.Process`` is swapped for ``threading.Thread`` while the file is written.
    """
    import_ffcv()
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(cache_dir)
    except OSError:
        cache_dir = USER_CACHE.expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
    path = beton_path(dataset, name, split, cache_dir)
    if path.is_file():
        return path
    print(f"okdfast: writing {path} ({len(dataset)} images, once)", flush=True)
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    with atomic_output(path) as tmp, _WRITER_LOCK, mock.patch.object(ffcv.writer, "Process", threading.Thread):
        ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=1).from_indexed_dataset(dataset, chunksize=1000)
    for stale in cache_dir.glob(f"okdfast-ffcv-{name}-{split}-*.beton"):
        if stale.name != path.name:  # another content of the same data set and split
            stale.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# FFCV operations and order (defined on first use: ffcv is optional)
# ---------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _ffcv_classes() -> tuple[type, type, type]:
    import_ffcv()
    from ffcv.pipeline.operation import Operation
    from ffcv.traversal_order.base import TraversalOrder

    class PlanOrder(TraversalOrder):
        """The owner's current epoch order (the plan's, sharded and padded like DistributedSampler)."""

        owner: FfcvLoader

        def sample_order(self, epoch: int) -> Sequence[int]:
            return self.owner._order

    class PlannedAugment(Operation):
        """uint8 (B, H, W, C) batch on the device -> crop/flip (the plan's, looked up by sample id) + normalise."""

        def __init__(self, owner: FfcvLoader, augment: bool) -> None:
            super().__init__()
            self.owner = owner
            self.augment = augment

        def generate_code(self) -> Any:
            owner, augment = self.owner, self.augment

            def planned_augment(images: torch.Tensor, dst: Any, indices: np.ndarray) -> torch.Tensor:
                index = torch.arange(images.shape[0], device=images.device)
                if augment:
                    p = owner._table[torch.from_numpy(indices.astype(np.int64))].t().contiguous()  # (3, B)
                    p = p.to(images.device, non_blocking=True)
                    x = owner.augmenter(images, index, p[0], p[1], p[2].bool())
                else:
                    x = owner.augmenter(images, index)
                return owner._hand_over(x)

            planned_augment.with_indices = True
            return planned_augment

        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, None]:
            h, w, c = previous_state.shape
            return replace(previous_state, shape=(c, h, w), dtype=self.owner.delivery.dtype), None

    class ToLong(Operation):
        """(B, 1) labels -> a fresh (B,) int64 tensor (FFCV's buffer is reused for later batches)."""

        def __init__(self, owner: FfcvLoader) -> None:
            super().__init__()
            self.owner = owner

        def generate_code(self) -> Any:
            owner = self.owner

            def to_long(labels: torch.Tensor, dst: Any) -> torch.Tensor:
                return owner._hand_over(labels.reshape(-1).to(torch.int64, copy=True))

            return to_long

        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, None]:
            return replace(previous_state, shape=(), dtype=torch.int64), None

    return PlanOrder, PlannedAugment, ToLong


# ---------------------------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------------------------
class FfcvLoader(PlannedLoader):
    """FFCV's Loader over a ``.beton``, ordered and augmented by the epoch plan."""

    name = "ffcv"

    def __init__(
        self,
        beton: str | os.PathLike[str],
        num_images: int,
        plan: EpochPlan,
        mean: Sequence[float],
        std: Sequence[float],
        delivery: Delivery,
        *,
        num_workers: int = 2,
        batches_ahead: int = 3,
        native_augment: bool = False,
    ) -> None:
        super().__init__(plan, delivery)
        import_ffcv()
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor

        plan_order, planned_augment, to_long = _ffcv_classes()
        self.num_images = num_images
        self.native_augment = native_augment and plan.augment
        self.augmenter = Augmenter(mean, std, delivery)
        self._table = torch.zeros((num_images, 3), dtype=torch.int64)  # (top, left, flip) of each sample
        self._consumer: Any = None
        self._set_epoch_order()
        device = delivery.device
        image_ops: list[Any] = [SimpleRGBImageDecoder()]
        if self.native_augment:
            image_ops += [RandomHorizontalFlip(), RandomTranslate(padding=PADDING)]
        image_ops += [
            ToTensor(),
            ToDevice(device, non_blocking=True),
            planned_augment(self, plan.augment and not self.native_augment),
        ]
        label_ops = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True), to_long(self)]
        self._loader = Loader(
            str(beton),
            batch_size=plan.batch_size,
            num_workers=max(1, num_workers),
            order=OrderOption.SEQUENTIAL,
            drop_last=plan.drop_last,
            os_cache=True,
            batches_ahead=batches_ahead,
            pipelines={"image": image_ops, "label": label_ops},
        )
        if self._loader.reader.num_samples != num_images:
            raise ValueError(f"{beton}: holds {self._loader.reader.num_samples} images, expected {num_images}")
        order = plan_order(self._loader)
        order.owner = self
        self._loader.traversal_order = order
        self._loader.first_traversal_order = self._order  # what FFCV's len() counts

    def _set_epoch_order(self) -> None:
        order, params = self.plan.order()
        self._order = order.numpy().astype(np.uint64)
        if params is not None:
            self._table[order] = torch.stack([params[0], params[1], params[2].to(torch.int64)], dim=1)

    def _hand_over(self, x: torch.Tensor) -> torch.Tensor:
        # Made on FFCV's side stream; the consumer's stream must finish with it before its memory is reused.
        if x.is_cuda and self._consumer is not None:
            x.record_stream(self._consumer)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        self._set_epoch_order()
        if self.delivery.device.type == "cuda":
            self._consumer = torch.cuda.current_stream(self.delivery.device)
        self._loader.next_epoch = self.epoch
        return iter(self._loader)
