"""Decoding an image file into a model's input with PIL and numpy only: what a deployment without PyTorch runs.

``read_image`` is the one decoder of image files (training, streaming workers, ``dvn eval``, ``dvn predict`` and
``dvn serve`` all read through it) and ``input_image`` the one preparation of a single image as a model input
(``data.pixels.load_image`` is it as a tensor), so ``dvn predict`` and the torch-free server of a shared export
folder (``serve/folder_engine.py``) see the same pixels. ``normalize_images`` is the numpy twin of
``data.batches.normalize_batch``: the same float32 values, bit for bit (``tests/test_serve_folder.py``).

Image files are untrusted input: ``oversized_image`` refuses, from its header alone, an image that declares more
than ``MAX_IMAGE_PIXELS`` (a decompression bomb declares billions in a few bytes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

__all__ = [
    "MAX_IMAGE_PIXELS",
    "RESIZE_METHODS",
    "image_mode",
    "input_image",
    "normalize_images",
    "oversized_image",
    "read_image",
]

MAX_IMAGE_PIXELS = 8192 * 8192
"""The most pixels (width x height) an image file may declare; a larger one is refused from its header, before
decoding (a decompression bomb declares billions in a few bytes). Below PIL's own warning threshold (89.5M), so
PIL never warns. Whatever decodes images for a model (``dvn predict``, a server) bounds them with this."""

RESIZE_METHODS = ("bilinear", "pad")
"""How images of another size reach a task's input size (``TaskSpec.resize``; see ``input_image``)."""


def read_image(path: Path | IO[bytes], mode: str, size: int | None) -> np.ndarray | None:
    """One image (a file, or an open binary stream) as a uint8 array ``(size, size[, 3])`` (its own size when
    ``size`` is None), or None when PIL cannot read it.

    The one decoder of folder images: training in memory, streaming workers, ``dvn eval``, ``dvn predict`` and
    ``dvn serve`` all read through it, so all see the same pixels. The resize is PIL's bilinear filter (what
    ``torchvision.transforms.v2.Resize`` runs on a PIL image), as the export manifest documents.
    """
    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft(mode, (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = _eight_bit(im)
            if im is None:
                return None
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL's modes of 16-bit greyscale (PNG, TIFF; ``I`` is how other Pillow versions open a 16-bit PNG). PIL's own
``convert`` clips them to 0..255, which binarises an image whose values span 0..65535."""


def _eight_bit(im: Image.Image) -> Image.Image | None:
    """``im`` with 8 bits per channel: 16-bit greyscale scaled by 255/65535 (rounded), as every 8-bit mode is read
    unscaled; a float image (``F``) read as 0..1 when its values lie there, else None (its range is unknown)."""
    if im.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            return None
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), mode="L")
    return im


def image_mode(channels: int) -> str:
    """The PIL mode folder images are read in for a model of ``channels`` input channels."""
    return "L" if channels == 1 else "RGB"


def oversized_image(source: Path | IO[bytes], name: Any = None, limit: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why the image ``source`` must not be decoded (its header declares more than ``limit`` pixels), or None.

    Only the header is read (PIL decodes nothing on open). A file PIL cannot open is not judged here: the
    decoder reports it.
    """
    name = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file's name
            with Image.open(source) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # more than twice PIL's own limit, itself above ``limit``
        return f"{name} declares more than {limit:,} pixels (a decompression bomb?), more than dvn decodes"
    except (OSError, ValueError, SyntaxError):  # a file PIL cannot open: the decoder reports it
        return None
    if width * height > limit:
        return f"{name} declares {width}x{height} pixels, more than the {limit:,} dvn decodes"
    return None


def input_image(source: Path | IO[bytes], channels: int, size: int, resize: str) -> np.ndarray | None:
    """One image file (or binary stream) as a model input, uint8 ``(channels, size, size)``, converted as its task's
    training images were; None when PIL cannot read it.

    ``bilinear`` (folder tasks): read in the model's mode and resized by PIL, as folders are read for training.
    ``pad`` (datasets of small images): read at its own size, then zero-padded, centred, when no larger than the
    input, as ``data.pixels.convert_images`` pads a dataset; a larger one is resized with the antialiased bilinear
    filter of ``convert_images`` (torch's ``interpolate``: the same weights, summed in numpy's order, so a rare
    pixel may differ by one grey level).
    """
    array = read_image(source, image_mode(channels), size if resize == "bilinear" else None)
    if array is None:
        return None
    image = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
    _, h, w = image.shape
    if h <= size and w <= size and (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        return np.pad(image, ((0, 0), (top, size - h - top), (left, size - w - left)))
    if (h, w) == (size, size):
        return image.copy()  # contiguous, and writable (PIL's array is not)
    resized = _resize_axis(_resize_axis(image.astype(np.float32), size, axis=2), size, axis=1)  # width, then height
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Antialiased bilinear resampling of float32 ``x`` along ``axis`` (torch's ``interpolate(...,
    mode="bilinear", antialias=True, align_corners=False)``): a triangle filter widened by the scale when
    shrinking, its weights normalised per output pixel."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    starts, weights = _aa_weights(in_size, out_size)
    moved = np.moveaxis(x, axis, -1)
    out = np.zeros((*moved.shape[:-1], out_size), dtype=np.float32)
    for j in range(weights.shape[1]):  # weights past a pixel's window are 0
        out += moved[..., np.minimum(starts + j, in_size - 1)] * weights[:, j]
    return np.moveaxis(out, -1, axis)


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index, float32 weights) of each output pixel, computed in float32 as torch computes them."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1 else f32(1.0)
    starts, rows = [], []
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        first = max(int(float(center - support) + 0.5), 0)
        count = min(int(float(center + support) + 0.5), in_size) - first
        w = [f32(max(0.0, 1.0 - abs(f32(float(f32(j + first) - center) + 0.5) * invscale))) for j in range(count)]
        total = f32(sum(w, f32(0.0)))
        starts.append(first)
        rows.append([f32(v / total) for v in w] if total != 0 else w)
    weights = np.zeros((out_size, max(map(len, rows))), dtype=np.float32)
    for i, row in enumerate(rows):
        weights[i, : len(row)] = row
    return np.array(starts), weights


def normalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``data.batches.normalize_batch`` without torch: uint8 ``(B, C, H, W)`` -> float32 ``(x / 255 - mean) / std``
    (statistics of one channel serve every channel), computed in float32 step by step as torch does."""
    c = images.shape[1]
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    if len(mean32) == 1 and c > 1:
        mean32, std32 = np.repeat(mean32, c), np.repeat(std32, c)
    scale = (np.float32(1.0) / (np.float32(255.0) * std32)).reshape(1, c, 1, 1)
    shift = (-mean32 / std32).reshape(1, c, 1, 1)
    return images.astype(np.float32) * scale + shift
