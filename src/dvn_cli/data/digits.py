"""The UCI hand-written digits (``digits``): 1,797 real images of 8x8, from the file scikit-learn's wheel ships.

The data is the test part of the UCI "Optical Recognition of Handwritten Digits" set (Alpaydin and Kaynak,
1998; CC BY 4.0): 32x32 bitmaps of digits written by 13 people, each 4x4 block counted into one pixel of 0..16.
scikit-learn (BSD-3) ships it as ``sklearn/datasets/data/digits.csv.gz``: one row per image, 64 pixels then the
label. ``dvn data prepare --datasets digits`` copies that file (checked by sha256) into
``<data root>/digits/raw/``; training reads the copy, so dvn never imports scikit-learn.

The set has no split of its own: a stratified ``DIGITS_TEST_FRACTION`` of each class, drawn with the fixed seed
``DIGITS_TEST_SEED`` (independent of ``--seed``), is the test split (359 images), the rest the training split
(1,438; the run's validation split is carved from it). Writers are not recorded, so test images may share a
writer with training images. Images are brought to MNIST's form: pixel values scaled to 0..255, upsampled
bilinearly to 20x20 and centred in 28x28 (MNIST's digits fill a 20x20 box), so they enter a model as MNIST does.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DIGITS_FILE",
    "DIGITS_FOLDER",
    "DIGITS_SHA256",
    "DIGITS_TEST_FRACTION",
    "DIGITS_TEST_SEED",
    "load_digits",
    "sklearn_digits_file",
]

DIGITS_FILE = "digits.csv.gz"
DIGITS_FOLDER = "digits/raw"
DIGITS_SHA256 = {DIGITS_FILE: "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"}
"""sha256 of ``digits.csv.gz`` as scikit-learn ships it (the same file since scikit-learn 0.x)."""
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0
_IMAGES, _PIXELS, _CLASSES = 1797, 64, 10
_BOX, _SIZE = 20, 28  # MNIST's: digits fill a 20x20 box centred in 28x28


def sklearn_digits_file() -> Path | None:
    """Where the installed scikit-learn keeps ``digits.csv.gz`` (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "data" / DIGITS_FILE


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(1797, 64)`` in 0..16 and labels ``(1797,)`` of the CSV, refusing a file of another shape."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (_IMAGES, _PIXELS + 1) or table.min() < 0 or table[:, :_PIXELS].max() > 16:
        raise OSError(f"{path} is not the digits table (shape {table.shape})")
    return table[:, :_PIXELS], table[:, _PIXELS].astype(np.int64)


def _test_mask(labels: np.ndarray) -> np.ndarray:
    """True for the test images: a stratified ``DIGITS_TEST_FRACTION`` of each class, fixed seed."""
    import torch

    generator = torch.Generator().manual_seed(DIGITS_TEST_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(_CLASSES):
        members = np.flatnonzero(labels == c)
        n_test = round(len(members) * DIGITS_TEST_FRACTION)
        mask[members[torch.randperm(len(members), generator=generator)[:n_test].numpy()]] = True
    return mask


def load_digits(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The training or test split as uint8 ``(N, 1, 28, 28)``, int64 labels and the class names ``0..9``.

    ``download`` is ignored: the file comes from ``dvn data prepare`` (a missing file is an ``OSError``, which
    the registry turns into a message naming that command).
    """
    import torch  # here, so that ``dvn data prepare`` (which imports this module for its constants) needs none
    import torch.nn.functional as F

    pixels, labels = _read(Path(root) / DIGITS_FOLDER / DIGITS_FILE)
    keep = _test_mask(labels) != train
    images = torch.from_numpy(pixels[keep] * (255.0 / 16.0)).float().view(-1, 1, 8, 8)
    images = F.interpolate(images, size=(_BOX, _BOX), mode="bilinear", align_corners=False)  # (N, 1, 20, 20)
    margin = (_SIZE - _BOX) // 2
    images = F.pad(images.round().clamp(0, 255), (margin,) * 4)  # (N, 1, 28, 28)
    return images.to(torch.uint8).contiguous(), torch.from_numpy(labels[keep]), tuple(str(c) for c in range(10))
