"""Per-dataset normalisation constants and class counts (docs/METHOD.md section 4).

The synthetic data sets have no published constants: their mean/std are measured on the generated training
images with :func:`compute_mean_std`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetStats:
    num_classes: int
    mean: RGB  # per channel, on images scaled to [0, 1]
    std: RGB


STATS: dict[str, DatasetStats] = {
    "cifar10": DatasetStats(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetStats(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cinic10": DatasetStats(10, (0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)),
}


def dataset_stats(name: str) -> DatasetStats:
    """The published constants of ``name`` (``cifar10``, ``cifar100``, ``cinic10``)."""
    if name not in STATS:
        raise ValueError(f"no published mean/std for {name!r}; known: {', '.join(STATS)}")
    return STATS[name]


def compute_mean_std(images: np.ndarray) -> tuple[RGB, RGB]:
    """Per-channel mean and std of uint8 ``images`` (N, H, W, 3), on the [0, 1] scale (float64 accumulation)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"images: expected uint8, got {images.dtype}")
    # Exact and cheap: moments from the 256-bin histogram of each channel instead of a float copy of the images.
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        m = float(hist @ values / hist.sum())
        mean.append(m)
        std.append(float(np.sqrt(hist @ (values - m) ** 2 / hist.sum())))
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
