"""Folder tasks: a folder of class sub-folders (torchvision ``ImageFolder`` layout), listed, split and read.

``folder_layout`` lists the files by split and class before any is read; ``carve_folder`` keeps the readable ones
and carves the test split where the folder has none, the same way whether the task is held in memory
(``load_folder``) or streamed (``data/streaming.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadConfig, MissingData
from .pixels import image_mode, read_image

__all__ = [
    "FOLDER_SIZE_RANGE",
    "FOLDER_TEST_FRACTION",
    "FOLDER_TEST_SEED",
    "FolderLayout",
    "FolderSplits",
    "NativeSplits",
    "carve_folder",
    "first_image_size",
    "folder_layout",
    "load_folder",
]

FOLDER_TEST_FRACTION = 0.2
FOLDER_TEST_SEED = 0  # fixed, independent of --seed, so every run of a folder task sees the same test split
FOLDER_SIZE_RANGE = (32, 64)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _stack(arrays: list[np.ndarray], labels: list[int], channels: int, size: int):
    if not arrays:
        return torch.empty(0, channels, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(labels, dtype=torch.int64)


@dataclass
class NativeSplits:
    """Native-shape splits returned by the loaders, before the val carve and conversion."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # files of a folder task that could not be read as images


PerClass = dict[int, list[Path]]


@dataclass(frozen=True)
class FolderLayout:
    """The image files of a folder task by split and class (label -> files), before any file is read.

    ``val`` and ``test`` are None where the folder has no such sub-folder (``test`` is then carved).
    """

    train_root: Path
    classes: tuple[str, ...]
    train: PerClass
    val: PerClass | None
    test: PerClass | None

    def files(self) -> list[Path]:
        """Every file, train then val then test, class by class."""
        return [f for split in (self.train, self.val, self.test) if split for files in split.values() for f in files]


def folder_layout(name: str, folder: Path) -> FolderLayout:
    """List ``folder``: class sub-folders, or ``train/`` (+ ``test/``, ``val/``) of them; refuses bad layouts."""
    if not folder.is_dir():
        raise MissingData(f"folder {folder} for task {name!r} not found; pass {name}=path/to/an/existing/folder")
    has_splits = (folder / "train").is_dir()
    train_root = folder / "train" if has_splits else folder
    class_dirs = _class_dirs(train_root)
    if not class_dirs:
        raise MissingData(
            f"{train_root} has no class sub-folders; put each class's images in its own sub-folder "
            f"(e.g. {train_root / 'cat' / '1.png'})"
        )
    if len(class_dirs) < 2:
        raise BadConfig(
            f"{train_root} has only one class sub-folder ({class_dirs[0].name!r}); a task needs at least 2 classes"
        )
    classes = tuple(d.name for d in class_dirs)
    index = {c: i for i, c in enumerate(classes)}

    def list_split(root: Path) -> PerClass:
        found = _class_dirs(root)
        extra = sorted({d.name for d in found} - set(classes))
        if extra:
            raise BadConfig(f"{root} has classes not in {train_root}: {', '.join(extra)}")
        return {index[d.name]: _image_files(d) for d in found}

    train = list_split(train_root)
    val = test = None
    if has_splits:
        val_dir = next((folder / v for v in ("val", "valid", "validation") if (folder / v).is_dir()), None)
        val = list_split(val_dir) if val_dir is not None else None
        test = list_split(folder / "test") if (folder / "test").is_dir() else None
    return FolderLayout(train_root, classes, train, val, test)


Items = tuple[list[Any], list[int]]


@dataclass
class FolderSplits:
    """The readable items of a folder task's splits, each as ``(items, labels)`` in class order."""

    train: Items
    val: Items | None
    test: Items
    skipped: tuple[str, ...]  # the files that could not be read, in listing order


def carve_folder(layout: FolderLayout, read: Callable[[list[Path]], list[Any]]) -> FolderSplits:
    """Keep the readable files of every split and, without a ``test/`` folder, carve the test split.

    ``read(files)`` gives one item per file (an image, or where a streamed task keeps it), None where the file
    cannot be read; unreadable files are skipped and listed (``skipped``). Without ``test/``, a stratified 20% of
    each class becomes the test split (fixed seed, independent of ``--seed``). In memory or streamed, a folder task
    gets the same files in every split.
    """
    skipped: list[str] = []

    def keep(per_class: PerClass, *, require_all: bool) -> dict[int, list[Any]]:
        kept = {}
        for c, files in per_class.items():
            items = read(files)
            good = [item for item in items if item is not None]
            skipped.extend(str(f) for f, item in zip(files, items, strict=True) if item is None)
            if require_all and not good:
                folder = layout.train_root / layout.classes[c]
                raise MissingData(f"class folder {folder} has no readable images; add images or remove the folder")
            kept[c] = good
        return kept

    def flatten(per_class: dict[int, list[Any]]) -> Items:
        order = sorted(per_class)
        return [a for c in order for a in per_class[c]], [c for c in order for _ in per_class[c]]

    train_pc = keep(layout.train, require_all=True)
    val = flatten(keep(layout.val, require_all=False)) if layout.val is not None else None
    if layout.test is not None:
        test = flatten(keep(layout.test, require_all=False))
        return FolderSplits(flatten(train_pc), val, test, tuple(skipped))
    generator = torch.Generator().manual_seed(FOLDER_TEST_SEED)
    test_pc: dict[int, list[Any]] = {}
    for c, items in train_pc.items():
        n = len(items)
        n_test = min(n - 1, max(1, round(n * FOLDER_TEST_FRACTION))) if n >= 2 else 0
        perm = torch.randperm(n, generator=generator).tolist()
        test_pc[c] = [items[i] for i in sorted(perm[:n_test])]
        train_pc[c] = [items[i] for i in sorted(perm[n_test:])]
    return FolderSplits(flatten(train_pc), val, flatten(test_pc), tuple(skipped))


def load_folder(name: str, folder: Path, channels: int, size: int) -> NativeSplits:
    """Read a folder task into memory at the input shape (``folder_layout``, ``carve_folder``)."""
    layout = folder_layout(name, folder)
    mode = image_mode(channels)
    parts = carve_folder(layout, lambda files: [read_image(f, mode, size) for f in files])
    val = _stack(*parts.val, channels, size) if parts.val is not None else None
    train, test = _stack(*parts.train, channels, size), _stack(*parts.test, channels, size)
    return NativeSplits(train, test, val, layout.classes, parts.skipped)


def first_image_size(folder: Path) -> int | None:
    for path in _image_files(folder):
        try:
            with Image.open(path) as im:
                return min(im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return None
