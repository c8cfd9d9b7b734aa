"""``synthetic``: a learnable, seeded, CIFAR-shaped data set generated in memory (no files, no network).

Each class is a pair (palette, texture). The texture is a fixed 32-periodic low-frequency field (a sum of three
plane waves with integer frequencies of 1-3 cycles per image, unique per class); the palette gives a foreground
and a background colour. Classes ``c`` and ``c + P`` share a palette (``P = round(sqrt(C))`` palettes), so the
mean colour only tells the palette group apart and a classifier has to read the texture. Every image draws its
own circular shift of the texture (any of the 32x32 positions), threshold (how much is foreground), edge
sharpness, colour jitter, contrast, brightness and pixel noise, and a distractor: another class's texture at its
own shift, mixed in at a random weight up to ``DISTRACTOR_MAX`` of the class's own (so accuracy saturates below
100% slowly, as on real data). The class signal is spatial but position-free, so the random crop (4-px padding)
and horizontal flip keep it; a texture's mirror image is never another class's texture.

So a small CNN learns it in a few hundred steps, well above chance, while a classifier of the mean colour stays near
chance: ``pytest -m slow tests/test_data.py -k learnable`` checks the 10-class set (it must pass 40% at step 300).
The images are generated vectorised over images (numpy), in well under a second for the default sizes.
``synthetic100`` is the 100-class variant (10000 / 2000 images by default).

Seeds: ``seed`` fixes the classes and the images; the class structure, the training set and the test set come
from independent streams of ``numpy.random.default_rng([seed, stream])``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from okdfast.data.arrays import ArrayDataset
from okdfast.data.registry import DatasetSplits, register_dataset
from okdfast.data.stats import compute_mean_std

_FREQS = [(kx, ky) for kx in range(-3, 4) for ky in range(0, 4) if (ky > 0 or kx > 0)]  # half-plane: no duplicates
_WAVES = 3  # plane waves per texture
DISTRACTOR_MAX = 0.8  # largest weight of the other class's texture mixed into an image
NOISE_STD = 0.08  # pixel noise on the [0, 1] scale


def _class_structure(rng: np.random.Generator, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(textures (C, 32, 32) float32 zero-mean unit-std, fg (P, 3), bg (P, 3)) colours in [0, 1]."""
    coords = np.arange(32, dtype=np.float64) / 32.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    textures = np.empty((num_classes, 32, 32), dtype=np.float32)
    used: set[tuple[tuple[int, int], ...]] = set()
    for c in range(num_classes):
        while True:  # a frequency set no other class has, nor its mirror image (the flip augmentation makes it)
            picks = tuple(sorted(_FREQS[i] for i in rng.choice(len(_FREQS), size=_WAVES, replace=False)))
            mirror = tuple(sorted((-kx, ky) if ky > 0 else (kx, ky) for kx, ky in picks))
            if (picks not in used and mirror not in used) or len(used) >= math.comb(len(_FREQS), _WAVES):
                used.update((picks, mirror))
                break
        field = np.zeros((32, 32))
        for kx, ky in picks:
            field += rng.uniform(0.6, 1.0) * np.cos(2 * np.pi * (kx * xx + ky * yy) + rng.uniform(0, 2 * np.pi))
        textures[c] = (field - field.mean()) / field.std()
    n_palettes = max(2, round(math.sqrt(num_classes)))
    fg = rng.uniform(0.15, 0.9, size=(n_palettes, 3))
    bg = rng.uniform(0.1, 0.85, size=(n_palettes, 3))
    return textures, fg, bg


def _render(
    rng: np.random.Generator, labels: np.ndarray, textures: np.ndarray, fg: np.ndarray, bg: np.ndarray
) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images of ``labels``; every nuisance factor is drawn per image from ``rng``."""
    n = labels.shape[0]
    ar = np.arange(32)
    dy, dx = rng.integers(0, 32, size=(2, n))
    rows = (ar[None, :] + dy[:, None]) % 32  # (N, 32): a circular shift keeps the periodic texture whole
    cols = (ar[None, :] + dx[:, None]) % 32
    field = textures[labels[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, 32, 32)
    # A distractor: another class's texture, at its own shift, mixed in with a random weight below the class's.
    other = (labels + rng.integers(1, textures.shape[0], size=n)) % textures.shape[0]
    dy, dx = rng.integers(0, 32, size=(2, n))
    rows = (ar[None, :] + dy[:, None]) % 32
    cols = (ar[None, :] + dx[:, None]) % 32
    weight = rng.uniform(0.0, DISTRACTOR_MAX, size=(n, 1, 1)).astype(np.float32)
    field = field + weight * textures[other[:, None, None], rows[:, :, None], cols[:, None, :]]
    threshold = rng.uniform(-0.6, 0.6, size=(n, 1, 1)).astype(np.float32)
    sharpness = rng.uniform(1.5, 5.0, size=(n, 1, 1)).astype(np.float32)
    mask = 1.0 / (1.0 + np.exp(-sharpness * (field - threshold)))  # (N, 32, 32) soft foreground
    palette = labels % fg.shape[0]
    fg_i = (fg[palette] + rng.normal(0, 0.07, size=(n, 3))).astype(np.float32)[:, None, None, :]
    bg_i = (bg[palette] + rng.normal(0, 0.07, size=(n, 3))).astype(np.float32)[:, None, None, :]
    img = bg_i + mask[..., None] * (fg_i - bg_i)  # (N, 32, 32, 3)
    contrast = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1)).astype(np.float32)
    img = (img - 0.5) * contrast + 0.5 + brightness
    img += np.float32(NOISE_STD) * rng.standard_normal(size=img.shape, dtype=np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def make_synthetic(
    num_classes: int = 10, train_size: int = 5000, test_size: int = 1000, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) with balanced classes (sizes divisible by ``num_classes`` are exactly balanced)."""
    checks = (("num_classes", num_classes, 2), ("train_size", train_size, 1), ("test_size", test_size, 1))
    for arg, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg}={value!r}: must be an int >= {low}")
    textures, fg, bg = _class_structure(np.random.default_rng([seed, 0]), num_classes)
    out = []
    for stream, n in ((1, train_size), (2, test_size)):
        rng = np.random.default_rng([seed, stream])
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        out.append(ArrayDataset(_render(rng, labels, textures, fg, bg), labels, num_classes))
    return out[0], out[1]


def load_synthetic(
    name: str, *, seed: int = 0, num_classes: int = 10, train_size: int = 5000, test_size: int = 1000
) -> DatasetSplits:
    train, test = make_synthetic(num_classes, train_size, test_size, seed)
    mean, std = compute_mean_std(train.images)
    source = f"synthetic(seed={seed}, num_classes={num_classes}, train={train_size}, test={test_size})"
    return DatasetSplits(train, test, num_classes, mean, std, name, source)


@register_dataset("synthetic")
def build_synthetic(
    roots: list[Path],
    *,
    download: bool = False,
    seed: int = 0,
    num_classes: int = 10,
    train_size: int = 5000,
    test_size: int = 1000,
) -> DatasetSplits:
    return load_synthetic("synthetic", seed=seed, num_classes=num_classes, train_size=train_size, test_size=test_size)


@register_dataset("synthetic100")
def build_synthetic100(
    roots: list[Path], *, download: bool = False, seed: int = 0, train_size: int = 10000, test_size: int = 2000
) -> DatasetSplits:
    return load_synthetic("synthetic100", seed=seed, num_classes=100, train_size=train_size, test_size=test_size)
