"""Batches: whole-batch normalisation and augmentation of uint8 images, and the seeded stream of training batches.

A training step never touches PIL or per-sample Python code: a batch is gathered, augmented and normalised as
whole tensors (docs/design.md §7). Every random draw comes from a generator seeded from the run's seed and the
task's index (``seeded_generator``), so a stream can be saved and resumed exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TaskSpec
from ..errors import BadConfig
from .task import EpochStream, check_batch_size

__all__ = [
    "AUGMENT_POLICIES",
    "TaskBatches",
    "augment_batch",
    "iterate_split",
    "mixed_seed",
    "normalize_batch",
    "seeded_generator",
]

AUGMENT_POLICIES: dict[str, tuple[int, bool]] = {
    "none": (0, False),
    "digits": (2, False),  # random translation by up to 2 pixels, never flipped (a flipped 2 is no 2)
    "clothes": (2, True),  # translation by up to 2 pixels and mirroring: a mirrored shirt is still a shirt
    "natural": (4, True),  # pad 4 + random crop + horizontal flip, the CIFAR recipe
}
"""Augmentation policy name -> (padding of the random crop, horizontal flip)."""


def mixed_seed(*entropy: int) -> int:
    """One 63-bit seed from several integers, well mixed (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from several integers (``mixed_seed``)."""
    return torch.Generator().manual_seed(mixed_seed(*entropy))


def normalize_batch(images: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` -> float32 ``(x / 255 - mean) / std`` with the task's statistics."""
    c = images.shape[1]
    mean = torch.tensor(spec.mean, dtype=torch.float32)
    std = torch.tensor(spec.std, dtype=torch.float32)
    if len(mean) == 1 and c > 1:
        mean, std = mean.expand(c), std.expand(c)
    if len(mean) != c or len(std) != c:
        raise BadConfig(f"task {spec.name!r} has statistics for {len(spec.mean)} channels, images have {c}")
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1)
    shift = (-mean / std).view(1, c, 1, 1)
    return images.to(torch.float32, copy=True).mul_(scale).add_(shift)


def augment_batch(images: torch.Tensor, policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a whole uint8 batch at once: zero-pad, random crop back to size, optional horizontal flip.

    Each sample gets its own offsets (and flip), drawn from ``generator``; one gather applies them all.

    Args:
        images: uint8 ``(B, C, H, W)``.
        policy: ``none``, ``digits`` (pad 2 + random crop) or ``natural`` (pad 4 + random crop + flip).
        generator: CPU generator of the random draws.

    Returns:
        uint8 ``(B, C, H, W)``; ``images`` itself for ``none``.
    """
    if policy not in AUGMENT_POLICIES:
        raise BadConfig(f"unknown augmentation policy {policy!r}; known: {', '.join(AUGMENT_POLICIES)}")
    pad, flip = AUGMENT_POLICIES[policy]
    b, c, h, w = images.shape
    if b == 0 or (pad == 0 and not flip):
        return images
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    rows = dy + torch.arange(h)  # (B, H)
    cols = dx + torch.arange(w)  # (B, W)
    if flip:
        flipped = torch.rand(b, 1, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    padded = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))  # (B, C, H, W+2p)
    return padded.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))  # (B, C, H, W)


def iterate_split(
    images: torch.Tensor, labels: torch.Tensor, spec: TaskSpec, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(x, y)`` batches of a split in order, without augmentation (for evaluation)."""
    check_batch_size(batch_size)
    for i in range(0, len(labels), batch_size):
        yield normalize_batch(images[i : i + batch_size], spec), labels[i : i + batch_size]


class TrainImages(Protocol):
    """What a training stream reads of a task held in memory (``datasets.TaskData`` is one)."""

    spec: TaskSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    augment: str


class TaskBatches(EpochStream):
    """Infinite, seeded, resumable stream of augmented, normalised training batches of one task.

    Every epoch is a fresh permutation of the training split drawn from the stream's own generator, seeded
    from ``(seed, task_index)``; the same generator draws the augmentation. Only full batches are yielded
    (a split smaller than ``batch_size`` is yielded whole). ``state_dict()`` captures everything needed to
    continue with exactly the same batches.

    Args:
        data: the task's data.
        batch_size: images per batch.
        seed: run seed.
        task_index: position of the task in the run, so tasks get independent streams.
        augment: apply the task's augmentation policy (``data.augment``); False gives ``none``.
    """

    def __init__(
        self, data: TrainImages, batch_size: int, *, seed: int = 0, task_index: int = 0, augment: bool = True
    ) -> None:
        super().__init__(data.spec, len(data.train_labels), batch_size)
        self.data = data
        self.policy = data.augment if augment else "none"
        self.generator = seeded_generator(seed, task_index)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()
        self._perm = torch.randperm(self.num_images, generator=self.generator)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._start_epoch()
        start = self.position * self.batch_size
        idx = self._perm[start : start + self.batch_size]
        self.position += 1
        images = augment_batch(self.data.train_images[idx], self.policy, self.generator)
        return normalize_batch(images, self.data.spec), self.data.train_labels[idx]

    def close(self) -> None:
        """Nothing to release: the images are the task's, held in memory."""

    def state_dict(self) -> dict[str, Any]:
        """Generator states (uint8 tensors) and ``epoch``, ``position``, ``num_images`` (ints)."""
        return {
            "epoch_generator_state": self._epoch_state.clone(),
            "generator_state": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "num_images": self.num_images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.generator.set_state(state["epoch_generator_state"].to(torch.uint8).cpu())
        self._start_epoch()
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
