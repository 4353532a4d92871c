"""The multi-task loss of one step: every task, every level, top level first (docs/design.md §6).

loss = sum_t sum_l lambda_l * CE(f(x_t; t, l), y_t)  [+ distill * KL(top level || level l) for l < k]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core.network import DeepVirtualNetwork

__all__ = ["multitask_loss", "summed", "task_loss", "task_losses"]


def multitask_loss(
    network: DeepVirtualNetwork, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], **options: Any
) -> tuple[torch.Tensor, list[float]]:
    """The summed loss of one step and each task's share of it; ``options`` are ``task_losses``'."""
    losses = task_losses(network, batches, **options)
    return summed(losses), [float(task_loss.detach()) for task_loss in losses]


def summed(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """The step's loss: the tasks' losses added in task order (the one place they are added)."""
    total = torch.zeros((), device=losses[0].device)
    for task_loss in losses:
        total = total + task_loss
    return total


def task_losses(
    network: DeepVirtualNetwork,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    level_weights: Sequence[float] | None = None,
    distill: float = 0.0,
    label_smoothing: float = 0.0,
    masked: bool = False,
    levels: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Each task's loss over ``levels`` (top first; default all; ``training.levels``).

    Args:
        network: the DVN being trained.
        batches: one ``(images, labels)`` minibatch per task, in task order.
        level_weights: ``lambda_l`` for levels ``1..k`` (default all 1).
        distill: weight of distillation from the task's top level into its lower levels (0 = off).
        label_smoothing: passed to the cross-entropy.
        masked: run the full-width reference path (for benchmarks and tests).
        levels: the levels run, top first (default all).
    """
    return [
        task_loss(network, task, images, labels, level_weights, distill, label_smoothing, masked, levels)
        for task, (images, labels) in enumerate(batches)
    ]


def task_loss(
    network: DeepVirtualNetwork,
    task: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    level_weights: Sequence[float] | None = None,
    distill: float = 0.0,
    label_smoothing: float = 0.0,
    masked: bool = False,
    levels: Sequence[int] | None = None,
) -> torch.Tensor:
    """Task ``task``'s loss over ``levels`` on one minibatch; the arguments are ``task_losses``'."""
    k = network.units
    weights = level_weights or [1.0] * k
    total = torch.zeros((), device=images.device)
    top_probs = None
    for level in levels or range(k, 0, -1):  # top level first, so it can teach the lower ones
        logits = network(images, task, level, masked=masked)  # (B, classes_t)
        loss = weights[level - 1] * F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if level == k:
            top_probs = logits.detach().softmax(-1)
        elif distill > 0:
            if top_probs is None:
                raise ValueError(f"distillation teaches from the top level {k}; levels {levels} must start with it")
            loss = loss + distill * F.kl_div(logits.log_softmax(-1), top_probs, reduction="batchmean")
        total = total + loss
    return total
