"""Pixels: decoding image files, converting uint8 images to a model's input shape, and their statistics.

The one decoder of image files (``read_image``, in ``data/decode.py`` with the torch-free preprocessing a shared
export's server runs) and the one converter of channels and sizes (``convert_images``): training in memory,
streaming workers, ``dvn eval`` and ``dvn predict`` all go through them, so all see the same pixels
(docs/design.md §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F

from ..errors import BadConfig
from .decode import image_mode, input_image, read_image

__all__ = ["channel_stats", "convert_images", "image_mode", "load_image", "read_image", "stats_from_sums"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")
_CHUNK = 4096  # images converted per float step, to bound memory


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, on pixel values scaled to 0..1.

    Uses a 256-bin histogram per channel, so it needs no float copy of the images.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.

    Returns:
        ``stats_from_sums`` of the images' pixel sums.
    """
    values = torch.arange(256, dtype=torch.int64)
    sums, squares = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256)
        sums.append(int((counts * values).sum()))
        squares.append(int((counts * values * values).sum()))
    return stats_from_sums(sums, squares, images[:, 0].numel())


def stats_from_sums(
    sums: Sequence[int], squares: Sequence[int], pixels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (pixel values scaled to 0..1) from exact integer sums of uint8 pixel values.

    The one formula of a task's normalisation, whether its images are in memory or streamed (then the sums are
    gathered image by image). Integer arithmetic until the last division, so both give the same numbers.

    Args:
        sums: per channel, the sum of the pixel values (0..255).
        squares: per channel, the sum of their squares.
        pixels: pixels per channel (images x height x width).

    Returns:
        ``(mean, std)`` rounded to 4 decimals; a constant channel gets std 1 (no scaling).
    """
    n = max(int(pixels), 1)
    means, stds = [], []
    for total, total_sq in zip(sums, squares, strict=True):
        mean = int(total) / (255 * n)
        std = ((int(total_sq) * n - int(total) ** 2) / (255 * n) ** 2) ** 0.5
        means.append(round(mean, 4))
        stds.append(round(std, 4) if std >= 1.0 / 255.0 else 1.0)
    return tuple(means), tuple(stds)


def convert_images(images: torch.Tensor, channels: int, size: int) -> tuple[torch.Tensor, str]:
    """Bring uint8 images to ``channels`` and ``size`` x ``size``.

    Grey to RGB repeats the channel; RGB to grey uses the luminance weights (0.299, 0.587, 0.114).
    Images smaller than ``size`` are zero-padded, centred (``pad``); others are resized bilinearly with
    antialiasing (``bilinear``; a no-op when the size already matches).

    Args:
        images: uint8 tensor ``(N, C, H, W)`` with C in {1, 3}.
        channels: target channel count, 1 or 3.
        size: target height and width.

    Returns:
        ``(images, resize)``: the converted uint8 tensor and the resize method used.
    """
    n, c, h, w = images.shape
    if channels not in (1, 3) or c not in (1, 3):
        raise BadConfig(f"cannot convert {c}-channel images to {channels} channels; use 1 or 3")
    if c == 1 and channels == 3:
        images = images.expand(n, 3, h, w).contiguous()
    elif c == 3 and channels == 1:
        weights = torch.tensor(_LUMA).view(1, 3, 1, 1)
        grey = torch.empty(n, 1, h, w, dtype=torch.uint8)
        for i in range(0, n, _CHUNK):
            chunk = images[i : i + _CHUNK].float()
            grey[i : i + _CHUNK] = (chunk * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        images = grey
    if h <= size and w <= size and (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top)), "pad"
    if (h, w) == (size, size):
        return images, "bilinear"
    out = torch.empty(n, channels, size, size, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        chunk = images[i : i + _CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out, "bilinear"


def load_image(path: Path | IO[bytes], channels: int, size: int, resize: str) -> torch.Tensor | None:
    """One image file (or binary stream) as a model input, uint8 ``(channels, size, size)``: ``decode.input_image``
    (read, then padded or resized as its task's training images were) as a tensor; None when PIL cannot read it."""
    image = input_image(path, channels, size, resize)
    return None if image is None else torch.from_numpy(image)
