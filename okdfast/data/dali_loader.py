"""``--loader dali``: an NVIDIA DALI pipeline fed by the epoch plan, with DALI's PyTorch iterator.

    external_source (per batch: images uint8 (B, 32, 32, 3) or encoded PNG bytes, labels, crop anchors, flips)
      [-> decoders.image (PNG files; "mixed" = nvImageCodec on the GPU)]
      -> .gpu() on CUDA
      -> slice(anchor = (top - 4, left - 4), shape (32, 32), out_of_bounds_policy="pad", fill 0)   the padded crop
      -> crop_mirror_normalize(mirror = flip, mean 255 m, std 255 s, layout CHW or HWC, FLOAT / FLOAT16)
    DALIGenericIterator -> (images, labels) torch tensors on the device

The host side only gathers the plan's images (one numpy fancy index per batch) and the parameters; cropping,
flipping, normalising and the layout change run in DALI's worker threads on the CPU (``device_id=None``: no GPU
needed) or as GPU kernels on CUDA, overlapped with training by DALI's prefetch queue.

The randomness is the plan's (:class:`~okdfast.data.plan.EpochPlan`), not DALI's random operators, so this loader
yields the torch loader's batches (equal up to float rounding: DALI computes ``(v - 255 m) / (255 s)``, the
reference ``(v / 255 - m) / s``; the tests bound the difference by fp32 rounding), is deterministic under a seed,
resumes mid-epoch and shards like ``DistributedSampler``.

CINIC-10 read from its folders can be decoded by DALI (``files=``: the PNGs of every row, in the rows' order, as
``DatasetSplits.files`` lists them): each batch's files are read as bytes and decoded by ``fn.decoders.image``.

DALI pipelines cannot restart mid-epoch: an epoch left unfinished (a ``break``, ``max_steps``, the islice of a
mid-epoch resume) makes the next ``__iter__`` build a fresh pipeline (tens of ms).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from okdfast.data.arrays import ArrayDataset
from okdfast.data.base import Delivery, PlannedLoader
from okdfast.data.plan import EpochPlan
from okdfast.data.transforms import PADDING

INSTALL_HINT = "needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or pip install 'okdfast[dali]')"


def import_dali() -> Any:
    """The ``nvidia.dali`` module, or an ImportError whose message is the one line saying what to install."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        raise ImportError(f"--loader dali {INSTALL_HINT}") from None
    return dali


class _PlanSource:
    """DALI's external source: ``iter()`` starts the epoch the loader is at *when DALI asks* (at a reset)."""

    def __init__(self, loader: DaliLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self.loader._batches()


class DaliLoader(PlannedLoader):
    """DALI pipeline over uint8 arrays (or PNG files) following the epoch plan."""

    name = "dali"

    def __init__(
        self,
        dataset: ArrayDataset,
        plan: EpochPlan,
        mean: Sequence[float],
        std: Sequence[float],
        delivery: Delivery,
        *,
        num_threads: int = 2,
        prefetch: int = 2,
        files: Sequence[str | Path] | None = None,
    ) -> None:
        super().__init__(plan, delivery)
        self.dali = import_dali()
        if delivery.device.type not in ("cpu", "cuda"):
            raise ValueError(f"--loader dali runs on cpu or cuda, not {delivery.device}")
        if files is not None and len(files) != len(dataset):
            raise ValueError(f"files: {len(files)} paths for {len(dataset)} images")
        self.dataset = dataset
        self.files = [str(f) for f in files] if files is not None else None
        self.mean = [255.0 * float(m) for m in mean]
        self.std = [255.0 * float(s) for s in std]
        self.num_threads = max(1, int(num_threads))
        self.prefetch = max(1, int(prefetch))
        self._iterator: Any = None
        self._pending = False  # an epoch was started and not run to its end
        self._fresh = False  # built and never iterated

    # ---------------------------------------------------------------------------------------------- host side
    def _batches(self) -> Iterator[tuple[Any, ...]]:
        order, params = self.plan.order()
        order = order.numpy()
        bs = self.plan.batch_size
        for b in range(len(self.plan)):
            index = order[b * bs : (b + 1) * bs]
            if self.files is not None:
                images: Any = [np.fromfile(self.files[i], dtype=np.uint8) for i in index]
            else:
                images = self.dataset.images[index]
            labels = self.dataset.labels[index]
            n = len(index)
            if params is None:  # evaluation: a plain crop at the image itself, no mirror
                anchor = np.zeros((n, 2), dtype=np.float32)
                mirror = np.zeros(n, dtype=np.int32)
            else:
                top, left, flip = (p[b * bs : (b + 1) * bs].numpy() for p in params)
                anchor = np.stack([top - PADDING, left - PADDING], axis=1).astype(np.float32)
                mirror = flip.astype(np.int32)
            yield images, labels, anchor, mirror

    # ------------------------------------------------------------------------------------------------ pipeline
    def _build(self) -> None:
        dali = self.dali
        fn, types = dali.fn, dali.types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        on_gpu = self.delivery.device.type == "cuda"
        device_id = (self.delivery.device.index or 0) if on_gpu else None
        out_dtype = types.FLOAT16 if self.delivery.dtype == torch.float16 else types.FLOAT
        layout = "HWC" if self.delivery.channels_last else "CHW"
        source = _PlanSource(self)
        encoded = self.files is not None

        @dali.pipeline_def(
            batch_size=self.plan.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            prefetch_queue_depth=self.prefetch,
            seed=self.plan.seed,
        )
        def pipeline():  # type: ignore[no-untyped-def]
            images, labels, anchor, mirror = fn.external_source(
                source=source,
                num_outputs=4,
                batch=True,
                cycle="raise",
                layout=[None if encoded else "HWC", None, None, None],
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.INT32],
            )
            if encoded:
                images = fn.decoders.image(images, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            elif on_gpu:
                images = images.gpu()
            if on_gpu:
                labels = labels.gpu()
            h, w = self.dataset.images.shape[1:3]
            images = fn.slice(
                images,
                anchor,
                np.array([h, w], dtype=np.float32),
                axes=[0, 1],
                normalized_anchor=False,
                normalized_shape=False,
                out_of_bounds_policy="pad",
                fill_values=0,
            )
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, mean=self.mean, std=self.std, output_layout=layout, dtype=out_dtype
            )
            return images, labels

        pipe = pipeline()
        pipe.build()
        self._iterator = DALIGenericIterator(
            pipe,
            ["images", "labels"],
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=False,
            prepare_first_batch=False,  # DALI starts reading only when iterated: set_epoch before that counts
        )
        self._fresh = True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        if self._iterator is None or self._pending:
            self._build()  # a pipeline cannot restart mid-epoch
        elif not self._fresh:
            self._iterator.reset()  # re-enters the source: the plan of the current epoch
        self._fresh = False
        self._pending = True
        return self._deliver()

    def _deliver(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d = self.delivery
        for out in self._iterator:
            x, y = out[0]["images"], out[0]["labels"]
            if d.channels_last:
                x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W) view with channels-last strides
            yield d.images(x), d.labels(y)
        self._pending = False
