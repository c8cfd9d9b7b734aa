"""The in-memory data set every reader produces: uint8 images (N, 32, 32, 3) HWC and int64 labels (N,).

CIFAR-10 (60k images) is 184 MB and CINIC-10 (270k) 830 MB in this form, so whole data sets live in memory and
the loaders gather batches from them with one indexing operation; there is no per-file I/O while training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SHAPE = (32, 32, 3)


class ArrayDataset(Dataset):
    """``images`` uint8 (N, 32, 32, 3) HWC and ``labels`` int64 (N,) in [0, num_classes), held as numpy arrays.

    ``dataset[i]`` is ``(image (32, 32, 3) uint8 ndarray, label int)``; the loaders never call it, they gather
    whole batches from :attr:`images` (see ``okdfast.data.loader``).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise TypeError(f"images: expected dtype uint8, got {images.dtype} (scale to 0..255 and cast first)")
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images: expected shape (N, 32, 32, 3) HWC, got {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels: expected shape ({images.shape[0]},) to match images, got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.size else 0
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels: values must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
        # torch.from_numpy (used by the loaders) needs C-contiguous, writable memory.
        if not images.flags.c_contiguous or not images.flags.writeable:
            images = np.array(images, order="C", copy=True)
        if not labels.flags.c_contiguous or not labels.flags.writeable:
            labels = np.array(labels, order="C", copy=True)
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, num_classes={self.num_classes}, images={self.images.shape} uint8)"

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy torch views ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``."""
        return torch.from_numpy(self.images), torch.from_numpy(self.labels)

    def class_counts(self) -> np.ndarray:
        """(num_classes,) int64: how many images each class has."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, n: int, seed: int = 0, *, stratified: bool = True) -> ArrayDataset:
        """``n`` images drawn without replacement, a pure function of ``(n, seed)``, in their original order.

        ``stratified``: each class gets its share of ``n`` in proportion to its size (largest remainders get the
        leftover), so a balanced data set stays balanced.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"subset: n={n!r} must be a non-negative int")
        if n > len(self):
            raise ValueError(f"subset: n={n} exceeds the {len(self)} images available")
        rng = np.random.default_rng([seed, n, len(self)])
        if not stratified or n == len(self):
            index = rng.choice(len(self), size=n, replace=False)
        else:
            counts = self.class_counts()
            share = counts * (n / len(self))
            take = np.floor(share).astype(np.int64)
            # Leftover slots go to the largest fractional parts; the random key breaks ties reproducibly.
            leftover = n - int(take.sum())
            order = np.lexsort((rng.random(len(counts)), -(share - take)))
            take[order[:leftover]] += 1
            parts = []
            for c in np.flatnonzero(take):
                members = np.flatnonzero(self.labels == c)
                parts.append(rng.choice(members, size=int(take[c]), replace=False))
            index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        index = np.sort(index)
        return ArrayDataset(self.images[index], self.labels[index], self.num_classes)
