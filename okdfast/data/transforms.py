"""The paper's augmentation, batched: random crop 32 with 4-px zero padding + horizontal flip + normalisation.

Per image (docs/METHOD.md section 4; torchvision ``v2.RandomCrop(32, padding=4)``, ``v2.RandomHorizontalFlip()``,
``v2.ToDtype(float32, scale=True)``, ``v2.Normalize(mean, std)``), with the crop's top-left corner
``(top, left)`` in the padded 40x40 image, each uniform over 0..8 (81 positions), and ``flip`` with probability 1/2:

    out[c, i, j] = (img[i + top - 4, j' + left - 4, c] / 255 - mean[c]) / std[c],  j' = 31 - j if flip else j
    (0 where the source pixel falls in the padding; the crop comes before the flip, as in torchvision)

:func:`crop_flip` does this for a whole batch without per-image Python and before any float work: the vertical
crop gathers whole source rows (96 bytes, as 12 int64 words) and zeroes the rows in the padding; the rows land in
a zero-bordered planar canvas (the HWC -> CHW transpose happens in this copy); one ``torch.gather`` along W does
the horizontal crop and the flip (a ``torch.where`` on the column index). Per image that moves 3 KiB in, 3.75 KiB
through the canvas and 3 KiB out as uint8; :func:`normalize` then writes 12 KiB of float32 (row gathers rather than
a per-pixel advanced index, which was several times slower).

The per-image references (:func:`reference_crop_flip`, :func:`reference_augment`) are the torchvision functional
composition with explicit parameters; the tests check the batched version against them bit for bit, and
:func:`reference_pipeline` is the random torchvision pipeline itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PADDING = 4
SIZE = 32


def sample_crop_flip(
    n: int, generator: torch.Generator, padding: int = PADDING
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top (n,) int64, left (n,) int64, flip (n,) bool): crop corners uniform over 0..2*padding, flips p=1/2."""
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return top, left, flip


def crop_flip(
    images: torch.Tensor,
    index: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    padding: int = PADDING,
) -> torch.Tensor:
    """Gather, crop and flip a batch: images uint8 (N, H, W, C) HWC, index/top/left/flip (B,) -> uint8 (B, C, H, W).

    ``top``/``left`` are the crop corners in the zero-padded image (0..2*padding); ``index`` picks the images.
    """
    n, h, w, c = images.shape
    b = index.shape[0]
    # 1. Vertical crop: gather whole source rows (W*C bytes each, moved as int64 words when the layout allows),
    #    then zero the rows that fall in the padding. (B, H, W*C)
    rows = torch.arange(h, device=images.device)[None, :] + (top[:, None] - padding)  # (B, H) source row
    row_inside = ((rows >= 0) & (rows < h))[:, :, None]
    rows = rows.clamp(0, h - 1)
    flat = images.reshape(n, h, w * c)
    try:
        x = flat.view(torch.int64)[index[:, None], rows].mul_(row_inside).view(torch.uint8)
    except RuntimeError:  # W*C not a multiple of 8 or a misaligned view: byte-wise gather
        x = flat[index[:, None], rows].mul_(row_inside)
    # 2. HWC -> CHW into a canvas with `padding` zero columns on each side. (B, C, H, W + 2*padding)
    canvas = x.new_zeros((b, c, h, w + 2 * padding))
    canvas[..., padding : padding + w] = x.view(b, h, w, c).permute(0, 3, 1, 2)
    # 3. Horizontal crop and flip in one gather along W: output column j reads canvas column left + j (no flip)
    #    or left + W-1-j (flip), torchvision's crop-then-flip.
    ar = torch.arange(w, device=images.device)[None, :]
    cols = torch.where(flip[:, None], (w - 1) - ar, ar) + left[:, None]  # (B, W)
    return torch.gather(canvas, 3, cols[:, None, None, :].expand(b, c, h, w))


def gather(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (B, C, H, W) of the images ``index``, no augmentation (the test split)."""
    return images[index].permute(0, 3, 1, 2).contiguous()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, the same float ops as torchvision v2 (bit-equal)."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.to(torch.float32).mul_(1.0 / 255).sub_(m).div_(s)


def normalize_lut(
    mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """(C, 256) ``dtype``: ``lut[c, v]`` is :func:`normalize` of the byte ``v`` in channel ``c``, cast to ``dtype``.

    A uint8 pixel has 256 values, so normalising is a table lookup; the table is computed on the CPU with the very
    ops of :func:`normalize`, which is what lets the fused kernel (``okdfast.kernels.augment``) match it bit for bit
    without doing any float arithmetic of its own (no FMA contraction can change a rounding).
    """
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, len(mean), 1, 256)
    return normalize(values, mean, std).reshape(len(mean), 256).to(dtype).to(device or "cpu")


def crop_flip_normalize(
    images: torch.Tensor,
    index: torch.Tensor,
    top: torch.Tensor | None,
    left: torch.Tensor | None,
    flip: torch.Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    padding: int = PADDING,
) -> torch.Tensor:
    """uint8 (N, H, W, C) -> ``dtype`` (B, C, H, W) normalised, channels-last strides when asked; ``top is None``:
    no crop/flip (the test split). The PyTorch reference (and CPU path) of ``okdfast.kernels.augment``, same signature.
    """
    x = gather(images, index) if top is None else crop_flip(images, index, top, left, flip, padding)
    x = normalize(x, mean, std)
    if dtype != torch.float32:
        x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------------------------------------
# per-image references (torchvision)
# ---------------------------------------------------------------------------------------------------------------
def reference_crop_flip(image: torch.Tensor, top: int, left: int, flip: bool, padding: int = PADDING) -> torch.Tensor:
    """One image uint8 (H, W, C) -> uint8 (C, H, W) via torchvision.transforms.v2.functional pad, crop, hflip."""
    from torchvision.transforms.v2 import functional as tf

    img = image.permute(2, 0, 1)
    h, w = img.shape[-2:]
    img = tf.pad(img, [padding], fill=0)
    img = tf.crop(img, int(top), int(left), h, w)
    return tf.horizontal_flip(img) if flip else img


def reference_augment(
    image: torch.Tensor, top: int, left: int, flip: bool, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """One image uint8 (H, W, C) -> float32 (C, H, W): :func:`reference_crop_flip`, ToDtype(scale), Normalize."""
    from torchvision.transforms.v2 import functional as tf

    img = tf.to_dtype(reference_crop_flip(image, top, left, flip), torch.float32, scale=True)
    return tf.normalize(img, list(mean), list(std))


def reference_pipeline(mean: Sequence[float], std: Sequence[float], *, train: bool = True) -> torch.nn.Module:
    """The torchvision v2 pipeline on one uint8 (C, H, W) image (random with the global torch RNG)."""
    from torchvision.transforms import v2

    steps = [v2.RandomCrop(SIZE, padding=PADDING), v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
