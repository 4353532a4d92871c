"""What training and evaluation ask of a task, however its images are held: ``Task``, and ``EpochStream``, what
its training stream shares.

A task is held in memory as uint8 tensors (``datasets.TaskData``) or read from disk batch by batch
(``streaming.StreamedTask``); both answer the same questions through this base, so the training loop, validation
and ``dvn eval`` never ask which. Their training streams (``batches.TaskBatches``, ``streaming.StreamBatches``)
share ``EpochStream``: full batches, epochs counted in batches, a state that refuses other data.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from ..config import TaskSpec
from ..errors import BadConfig, MissingData

__all__ = ["SPLITS", "EpochStream", "Task", "check_batch_size", "check_split"]

SPLITS = ("train", "val", "test")


def check_split(name: str) -> str:
    """``name`` when it is a split, else a one-line ``BadConfig``."""
    if name not in SPLITS:
        raise BadConfig(f"unknown split {name!r}; use train, val or test")
    return name


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise BadConfig(f"batch size {batch_size} must be at least 1")
    return batch_size


class EpochStream(ABC):
    """What both training streams share: an infinite stream of full batches (a split smaller than ``batch_size``
    is yielded whole) at ``(epoch, position)``, whose saved state must come from the same number of images.

    Args:
        spec: the task's spec (its name is what errors say).
        num_images: images in the training split.
        batch_size: images per batch.
    """

    def __init__(self, spec: TaskSpec, num_images: int, batch_size: int) -> None:
        check_batch_size(batch_size)
        if num_images == 0:
            raise MissingData(f"task {spec.name!r} has no training images")
        self.spec, self.num_images = spec, num_images
        self.batch_size = min(batch_size, num_images)
        self.batches_per_epoch = num_images // self.batch_size
        self.epoch = 0
        self.position = 0

    def __iter__(self) -> EpochStream:
        return self

    @abstractmethod
    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next normalised ``(images, labels)`` training batch."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """All a resumed stream needs to continue with the same batches."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output; ints may also come as 0-d tensors (safetensors)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the stream holds besides its state (a streamed task's decoding workers)."""

    def _check_state(self, state: dict[str, Any]) -> None:
        """Refuse a saved state of another training split (other data, ``--limit`` or ``--seed``)."""
        num_images = int(state["num_images"])
        if num_images != self.num_images:
            raise BadConfig(
                f"task {self.spec.name!r} has {self.num_images} training images, the saved state "
                f"{num_images}; resume with the same data, --limit and --seed"
            )


class Task(ABC):
    """One task as training and evaluation see it, held in memory or streamed from disk.

    Subclasses hold ``spec`` (name, classes, normalisation, source, resize), ``augment`` (a policy name of
    ``batches.AUGMENT_POLICIES``) and ``skipped`` (the files of a folder task that could not be read).
    """

    spec: TaskSpec
    augment: str
    skipped: tuple[str, ...]

    @abstractmethod
    def split_size(self, name: str) -> int:
        """Images in split ``name`` (train, val or test)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images its batches hold: the model's input shape."""

    @abstractmethod
    def batches(
        self, name: str, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(images, labels)`` batches of images ``[start, stop)`` of split ``name``, in order (for
        evaluation)."""

    @abstractmethod
    def train_batches(self, batch_size: int, *, seed: int, task_index: int) -> EpochStream:
        """The task's seeded, resumable stream of augmented, normalised training batches."""

    def with_augment(self, policy: str) -> Task:
        """The same task (its images shared, not copied) whose training stream augments with ``policy``."""
        other = copy.copy(self)
        other.augment = policy
        return other

    def storage(self) -> dict[str, Any]:
        """How the task is read, for ``summary``."""
        return {"storage": "memory"}

    def summary(self) -> dict[str, Any]:
        """A row for tables and JSON: sizes of the splits, classes, shape, normalisation, how it is read."""
        return {
            "task": self.spec.name,
            "source": self.spec.source,
            "classes": self.spec.num_classes,
            **{name: self.split_size(name) for name in SPLITS},
            "shape": list(self.shape),
            "resize": self.spec.resize,
            "mean": list(self.spec.mean),
            "std": list(self.spec.std),
            "augment": self.augment,
            "skipped": len(self.skipped),
            **self.storage(),
        }
