"""Fused uint8 gather + random crop (zero padding) + horizontal flip + normalise + cast + layout: one launch per batch.

The math (reference: ``okdfast.data.transforms.crop_flip_normalize``, the same signature), images uint8 (N, H, W, C)
HWC, for output image b, channel c, row i, column j, with P the padding:

    si = i + top[b] - P                                    source row (crop corner top in 0..2P of the padded image)
    sj = (W - 1 - j if flip[b] else j) + left[b] - P       source column: torchvision's crop, then flip
    v  = images[index[b], si, sj, c]   (0 when (si, sj) falls in the padding)
    out[b, c, i, j] = lut[c, v]        lut = okdfast.data.transforms.normalize_lut: (v / 255 - mean[c]) / std[c]

Normalising a byte is a lookup in a (C, 256) table computed on the CPU by the reference's own ops and already cast
to the output dtype, so the kernel does no float arithmetic at all: its output equals the reference bit for bit in
fp32, bf16 and fp16 (a computed ``(v * (1/255) - m) / s`` would be contracted to an FMA by the compiler and differ
in the last bit).

Bytes per 32x32x3 image: read 3 KiB of uint8 once (index, crop and flip are 25 bytes), write 12 KiB of fp32 (6 KiB
of bf16) once; the 3 KiB table stays in L1. The unfused PyTorch chain (row gather, zero-bordered planar canvas,
column gather, uint8 -> fp32, *1/255, -mean, /std) moves about 100 KiB per image over 8 launches. At batch 512 a
launch moves 7.5 MiB, so on an H200 (4.8 TB/s) the kernel is launch-bound (a few microseconds) rather than
bandwidth-bound; what matters is that the whole augmentation is one launch and that no intermediate is written.

Layout: each program writes BLOCK consecutive elements of one output image in the output's *memory* order (c
fastest for channels-last, j fastest for contiguous NCHW), so stores are coalesced; the addresses come from the
output's strides, so any layout with those orders works. Reads hit one 3 KiB image, L1/L2-resident. Row offsets
(index * H*W*C, b * stride_b) are int64; every load and store is masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# launch heuristics
# ---------------------------------------------------------------------------------------------------------------
BLOCK = 1024  # output elements per program: 32x32x3 -> 3 programs per image, 8 per thread at 4 warps
NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _crop_flip_lut_kernel(
    images_ptr,  # [N, H, W, C] uint8, contiguous
    index_ptr,  # [B] int64 rows of images
    top_ptr,  # [B] int64 crop corner (row) in the padded image, 0..2*PAD (unused when not AUGMENT)
    left_ptr,  # [B] int64 crop corner (column)
    flip_ptr,  # [B] bool (as uint8) flip after the crop
    lut_ptr,  # [C, 256] output dtype, normalised value of every byte per channel
    out_ptr,  # [B, C, H, W] output dtype, strides below (contiguous or channels-last)
    stride_ob,
    stride_oc,
    stride_oh,
    stride_ow,
    H: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    PAD: tl.constexpr,
    AUGMENT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # element of image b, in output memory order
    valid = o < H * W * C
    if CHANNELS_LAST:  # memory order (i, j, c)
        c = o % C
        j = (o // C) % W
        i = o // (C * W)
    else:  # memory order (c, i, j)
        j = o % W
        i = (o // W) % H
        c = o // (W * H)
    row = tl.load(index_ptr + b).to(tl.int64)
    if AUGMENT:
        top = tl.load(top_ptr + b).to(tl.int32)
        left = tl.load(left_ptr + b).to(tl.int32)
        flip = tl.load(flip_ptr + b) != 0
        si = i + top - PAD
        sj = tl.where(flip, (W - 1) - j, j) + left - PAD
    else:
        si = i
        sj = j
    inside = valid & (si >= 0) & (si < H) & (sj >= 0) & (sj < W)
    src = row * (H * W * C) + (si * (W * C) + sj * C + c).to(tl.int64)
    v = tl.load(images_ptr + src, mask=inside, other=0).to(tl.int32)  # the padding reads as byte 0, as in torchvision
    y = tl.load(lut_ptr + c * 256 + v, mask=valid, other=0)
    dst = b.to(tl.int64) * stride_ob + c * stride_oc + i * stride_oh + j * stride_ow
    tl.store(out_ptr + dst, y, mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------------------------
def _checked_inputs(images, index, top, left, flip, lut, padding):
    """The launcher's inputs validated (so the kernel never reads out of bounds) and made contiguous: -> index, top,
    left, flip (the last three None when not augmenting). Index and crop values are checked on the host only for
    CPU tensors, to avoid a device sync (the loaders build them from a permutation)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or not images.is_contiguous():
        raise ValueError(f"images: expected contiguous uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    n, _, _, c = images.shape
    b = index.shape[0]
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"index: expected int64 (B,), got {index.dtype} {tuple(index.shape)}")
    if top is not None:
        for name, t, dtype in (("top", top, torch.int64), ("left", left, torch.int64), ("flip", flip, torch.bool)):
            if t is None or t.shape != (b,) or t.dtype != dtype or t.device != images.device:
                raise ValueError(
                    f"{name}: expected {dtype} ({b},) on {images.device}, got {t if t is None else t.dtype}"
                )
        top, left, flip = top.contiguous(), left.contiguous(), flip.contiguous()
    index = index.contiguous()
    if lut.shape != (c, 256) or not lut.is_contiguous():
        raise ValueError(f"lut: expected a contiguous ({c}, 256) table (normalize_lut), got {tuple(lut.shape)}")
    for name, t in (("index", index), ("lut", lut)):
        if t.device != images.device:
            raise ValueError(f"{name}: on {t.device}, images on {images.device}")
    if index.device.type == "cpu" and b and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"index: values must lie in [0, {n})")
    if top is not None and top.device.type == "cpu" and b:
        if int(top.min()) < 0 or int(top.max()) > 2 * padding or int(left.min()) < 0 or int(left.max()) > 2 * padding:
            raise ValueError(f"top/left: crop corners must lie in [0, {2 * padding}]")
    return index, top, left, flip


def _output(out, shape, lut, device, channels_last):
    """``out`` checked, or a new (B, C, H, W) tensor in lut's dtype (channels-last strides when asked)."""
    if out is None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=lut.dtype, device=device, memory_format=memory_format)
    if out.shape != shape or out.dtype != lut.dtype or out.device != device:
        raise ValueError(f"out: expected {lut.dtype} {shape} on {device}, got {out.dtype} {out.shape}")
    return out


def crop_flip_normalize(
    images: torch.Tensor,
    index: torch.Tensor,
    top: torch.Tensor | None,
    left: torch.Tensor | None,
    flip: torch.Tensor | None,
    lut: torch.Tensor,
    *,
    channels_last: bool = False,
    padding: int = 4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """images uint8 (N, H, W, C) contiguous, index (B,) int64, top/left (B,) int64 and flip (B,) bool (or all None:
    no augmentation), lut (C, 256) from ``normalize_lut`` in the output dtype -> (B, C, H, W) in lut's dtype,
    channels-last strides when ``channels_last`` (or written into ``out``, any strides). Arguments are validated
    first (:func:`_checked_inputs`).
    """
    index, top, left, flip = _checked_inputs(images, index, top, left, flip, lut, padding)
    augment = top is not None
    _, h, w, c = images.shape
    b = index.shape[0]
    out = _output(out, (b, c, h, w), lut, images.device, channels_last)
    if b == 0:
        return out
    # Memory order of the output decides which index is fastest inside a program (coalesced stores).
    cl_order = out.stride(1) < out.stride(3)
    dummy = index  # an unused pointer argument when not augmenting
    grid = (b, triton.cdiv(h * w * c, BLOCK))
    _crop_flip_lut_kernel[grid](
        images,
        index,
        top if augment else dummy,
        left if augment else dummy,
        flip.view(torch.uint8) if augment else dummy,
        lut,
        out,
        *out.stride(),
        H=h,
        W=w,
        C=c,
        PAD=padding,
        AUGMENT=augment,
        CHANNELS_LAST=cl_order,
        BLOCK_SIZE=BLOCK,
        num_warps=NUM_WARPS,
    )
    return out


def bytes_moved(batch: int, image_shape: Sequence[int], out_dtype: torch.dtype) -> int:
    """Bytes one launch reads and writes (the table and the 25 bytes of parameters per image left out)."""
    h, w, c = image_shape
    return batch * h * w * c * (1 + torch.empty((), dtype=out_dtype).element_size())
