"""A task loaded into memory: uint8 tensors at the model's input shape, split into train, validation and test.

Every task of a multi-task run is read ONCE into memory at the model's input shape (channels and size) as uint8
tensors ``(N, C, H, W)`` (``load_task``); batches are then augmented and normalised as whole tensors
(``data/batches.py``). A task is a registered dataset (``data/registry.py``) or a folder of class sub-folders
(``data/folders.py``); images are decoded and converted by ``data/pixels.py``. Each task keeps its own
normalisation (per-channel mean/std of its training images) in its ``TaskSpec``. A folder too large for memory
streams instead (``data/streaming.py``), answering the same questions as ``TaskData``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import settings
from ..config import TaskSpec
from ..errors import BadConfig, MissingData
from .batches import TaskBatches, seeded_generator
from .folders import FOLDER_SIZE_RANGE, NativeSplits, first_image_size, load_folder
from .pixels import channel_stats, convert_images
from .registry import DATASETS, load_registered, parse_task, unknown_task
from .task import Task, check_batch_size, check_split

__all__ = ["TaskData", "carve_validation", "check_load_arguments", "load_task", "native_shape"]


def native_shape(task: str, data_root: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """The ``(channels, size)`` a task's images have natively, for choosing a default input shape.

    Registered datasets give their own shape (mnist-likes ``(1, 28)``, cifar/svhn ``(3, 32)``). A folder gives
    3 channels and the shorter side of its first readable image, clipped to 32..64 (32 when it has none).

    Args:
        task: a dataset name or ``name=path/to/folder``.
        data_root: unused for folders; kept so callers treat every task alike.
    """
    name, folder = parse_task(task)
    if folder is None:
        if name not in DATASETS:
            raise unknown_task(name)
        info = DATASETS[name]
        return info.channels, info.size
    if not folder.is_dir():
        raise MissingData(f"folder {folder} for task {name!r} not found; pass {name}=path/to/an/existing/folder")
    low, high = FOLDER_SIZE_RANGE
    size = first_image_size(folder)
    return 3, low if size is None else min(max(size, low), high)


@dataclass
class TaskData(Task):
    """One task's images in memory at the model's input shape.

    Args:
        spec: name, classes, normalisation, source and resize method of the task.
        train_images: uint8 ``(N, C, H, W)``.
        train_labels: int64 ``(N,)``.
        val_images: uint8, carved from the training split (or the folder's ``val/``).
        val_labels: int64.
        test_images: uint8, the dataset's own test split (a fixed 20% carve for a plain folder).
        test_labels: int64.
        augment: augmentation policy name (see ``AUGMENT_POLICIES``).
        skipped: the files of a folder task that PIL could not read (``summary`` counts them).
    """

    spec: TaskSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    augment: str = "none"
    skipped: tuple[str, ...] = ()

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``train``, ``val`` or ``test``."""
        check_split(name)
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    def split_size(self, name: str) -> int:
        return len(self.split(name)[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return c, h, w

    def batches(
        self, name: str, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(images, labels)`` batches of images ``[start, stop)`` of split ``name``, in order (for
        evaluation; a streamed task answers the same, reading from disk)."""
        check_batch_size(batch_size)
        images, labels = self.split(name)
        images, labels = images[start:stop], labels[start:stop]
        for i in range(0, len(labels), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]

    def train_batches(self, batch_size: int, *, seed: int, task_index: int) -> TaskBatches:
        """The task's seeded, resumable stream of training batches."""
        return TaskBatches(self, batch_size, seed=seed, task_index=task_index)


def check_load_arguments(
    channels: int, size: int, val_fraction: float, limit: int | None, val_limit: int | None
) -> None:
    """Refuse load settings no task can be read with (``load_task`` and streamed tasks alike)."""
    if not 0.0 <= val_fraction < 1.0:
        raise BadConfig(f"val fraction {val_fraction} must be in [0, 1)")
    for label, value in (("limit", limit), ("val limit", val_limit)):
        if value is not None and value < 1:
            raise BadConfig(f"{label} {value} must be at least 1")
    if channels not in (1, 3):
        raise BadConfig(f"input channels {channels} not supported; use 1 or 3")
    if size < 1:
        raise BadConfig(f"input size {size} must be positive")


def carve_validation(
    n: int, *, val_fraction: float, seed: int, limit: int | None, val_limit: int | None, own_val: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Which of ``n`` training images become validation images and which stay for training (sorted indices).

    A seeded random ``val_fraction`` is held out unless the task has its own validation split (``own_val``;
    then the first index is None); ``limit`` keeps the first ``limit`` of the rest in the same seeded
    permutation, ``val_limit`` the first of the held-out ones.
    """
    perm = torch.randperm(n, generator=seeded_generator(seed, 0x5EED))
    val_idx = None
    if not own_val:
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        val_idx = perm[:n_val][:val_limit].sort().values
        perm = perm[n_val:]
    return val_idx, perm[:limit].sort().values


def load_task(
    task: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    channels: int,
    size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    val_limit: int | None = None,
    download: bool = False,
) -> TaskData:
    """Load one task into memory at the input shape ``(channels, size, size)``.

    The validation split is a seeded random ``val_fraction`` of the training split (unless a folder has its
    own ``val/``); ``limit`` then keeps the first ``limit`` training images of a seeded permutation. The test
    split is never limited. Normalisation statistics come from the (limited) training images after conversion.

    Args:
        task: a registered dataset name or ``name=path/to/folder``.
        data_root: where torchvision datasets live; default ``$DVN_DATA_ROOT`` or ``data``.
        channels: model input channels (1 or 3).
        size: model input height and width.
        val_fraction: share of the training split held out for validation, in [0, 1).
        seed: seed of the validation carve and of ``limit``'s choice.
        limit: at most this many training images.
        val_limit: at most this many validation images (first of the carve), for quick runs.
        download: let torchvision download missing files.

    Returns:
        The task's ``TaskData``.
    """
    check_load_arguments(channels, size, val_fraction, limit, val_limit)
    name, folder = parse_task(task)
    root = Path(data_root if data_root is not None else settings.data_root()).expanduser()
    if folder is None:
        if name not in DATASETS:
            raise unknown_task(name)
        info = DATASETS[name]
        train_x, train_y, classes = load_registered(info, root, True, download)
        test_x, test_y, _ = load_registered(info, root, False, download)
        splits = NativeSplits((train_x, train_y), (test_x, test_y), None, classes)
        source, augment = name, info.augment
    else:
        splits = load_folder(name, folder, channels, size)
        source, augment = str(folder), "natural"

    train_x, train_y = splits.train
    own_val = splits.val is not None
    val_idx, train_idx = carve_validation(
        len(train_y), val_fraction=val_fraction, seed=seed, limit=limit, val_limit=val_limit, own_val=own_val
    )
    if splits.val is not None:  # the folder's own val/
        val_x, val_y = splits.val[0][:val_limit], splits.val[1][:val_limit]
    else:
        assert val_idx is not None  # carve_validation holds images out unless the task has its own val split
        val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[train_idx], train_y[train_idx]
    if len(train_y) == 0:
        raise MissingData(f"task {name!r} has no training images left after the validation split")

    train_x, resize = convert_images(train_x, channels, size)
    val_x, _ = convert_images(val_x, channels, size)
    test_x, _ = convert_images(splits.test[0], channels, size)
    if folder is not None:
        resize = "bilinear"  # PIL resized every image, whatever its size
    mean, std = channel_stats(train_x)
    spec = TaskSpec(name=name, classes=splits.classes, mean=mean, std=std, source=source, resize=resize)
    test_y = splits.test[1].to(torch.int64)
    return TaskData(spec, train_x, train_y, val_x, val_y, test_x, test_y, augment=augment, skipped=splits.skipped)
