"""Evaluation: top-1 accuracy of any model on a split, and task x level rows with sizes and latency.

Works the same for every model file (``modelfile.ModelFile``): a checkpoint's virtual networks
(``network(x, task, level)``), a compact model and a bundle's plain networks (``model(x)``), each passed as a
function from a normalised batch to logits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..config import BackboneConfig, TaskSpec
from ..data.batches import iterate_split, normalize_batch
from ..data.datasets import load_task
from ..data.registry import task_string
from ..data.streaming import open_task
from ..errors import BadConfig, MissingData
from ..modelfile.base import ModelFile
from ..modelfile.spec import CompactSpec, DataSplit
from ..planning.select import select_pairs
from ..runtime.runner import Forward, ModelRunner

__all__ = [
    "EvalOptions",
    "accuracy",
    "count_correct",
    "evaluate_rows",
    "latency_ms",
    "load_split",
    "predictions",
]

SPLITS = ("test", "val")


@torch.no_grad()
def predictions(
    forward: Forward, images: torch.Tensor, spec: TaskSpec, batch_size: int = 500, device: str = "cpu"
) -> torch.Tensor:
    """Predicted class of every image (uint8 ``(N, C, H, W)``), normalised with the task's statistics."""
    labels = torch.zeros(len(images), dtype=torch.int64)
    out = [forward(x.to(device)).argmax(1).cpu() for x, _ in iterate_split(images, labels, spec, batch_size)]
    return torch.cat(out) if out else labels


def accuracy(
    forward: Forward,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: TaskSpec,
    batch_size: int = 500,
    device: str = "cpu",
) -> float:
    """Top-1 accuracy (0..1) of ``forward`` on ``(images, labels)`` (``count_correct`` over batches of them)."""
    if batch_size < 1:
        raise BadConfig(f"batch size {batch_size} must be at least 1")
    batches = zip(images.split(batch_size), labels.split(batch_size), strict=True)
    (correct,), seen = count_correct([forward], batches, spec, device)
    return correct / seen if seen else float("nan")


@torch.no_grad()
def count_correct(
    forwards: Sequence[Forward],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    spec: TaskSpec,
    device: str | torch.device = "cpu",
) -> tuple[list[int], int]:
    """Correct top-1 predictions of each of ``forwards`` over uint8 ``(images, labels)`` batches, and the number
    of images: one pass over the data for several models (a streamed split is read once for every level)."""
    correct, seen = [0] * len(forwards), 0
    for images, labels in batches:
        x = normalize_batch(images, spec).to(device)
        for i, forward in enumerate(forwards):
            correct[i] += int((forward(x).argmax(1).cpu() == labels).sum())
        seen += len(labels)
    return correct, seen


@torch.no_grad()
def latency_ms(forward: Forward, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds per IMAGE of ``forward`` on ``example`` (one batch), after warm-up."""
    for _ in range(warmup):
        forward(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(example)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / example.shape[0]


def load_split(
    spec: TaskSpec,
    backbone: BackboneConfig,
    split: str,
    data_root: str | None,
    limit: int | None = None,
    *,
    data_split: DataSplit | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``test`` or ``val`` images of a trained task; ``data_split`` is the run's, so that ``val`` is carved
    exactly as training carved it."""
    if split not in SPLITS:
        raise BadConfig(f"unknown split {split!r}; use test or val")
    data_split = data_split or DataSplit()
    data = load_task(
        task_string(spec),
        data_root=data_root,
        channels=backbone.in_channels,
        size=backbone.input_size,
        val_fraction=data_split.val_fraction,
        seed=data_split.seed,
    )
    images, labels = data.split(split)
    return images[:limit], labels[:limit]


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate: tasks (default all), a budget (default every level), the split, a cap on images per
    task, whether to time latency, and the worker processes that read a streamed folder task."""

    tasks: tuple[str, ...] | None = None
    budget: str | None = None
    split: str = "test"
    data_root: str | None = None
    limit: int | None = None
    latency: bool = False
    workers: int = 2

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise BadConfig(f"unknown split {self.split!r}; use test or val")
        if self.limit is not None and self.limit < 1:
            raise BadConfig(f"limit {self.limit} leaves nothing to evaluate; give at least 1 image per task")


def evaluate_rows(model: ModelFile, options: EvalOptions | None = None) -> list[dict]:
    """One row per evaluated (task, level): units, sizes, MACs, top-1 on the split and, on request, latency.

    Every (task, level) the file holds, or under ``options.budget`` one level per task (``planning.select``);
    a checkpoint runs its virtual networks, a bundle its shared runtime, a compact model its plain network
    (``runtime.runner.ModelRunner``).
    """
    options = options or EvalOptions()
    pairs = select_pairs(model, options.tasks, options.budget)
    runner = ModelRunner(model)
    rows = []
    for task in dict.fromkeys(name for name, _ in pairs):
        levels = [level for name, level in pairs if name == task]
        specs = {level: model.spec_of(task, level) for level in levels}
        backbone = specs[levels[0]].backbone  # every level shares the input shape
        data = open_task(
            task_string(model.task_spec(task)),
            data_root=options.data_root,
            channels=backbone.in_channels,
            size=backbone.input_size,
            val_fraction=model.split.val_fraction,
            seed=model.split.seed,
            workers=options.workers,
        )  # a large folder task streams: its split is read batch by batch, once for all levels
        forwards = [runner.forward(task, level) for level in levels]
        batches = data.batches(options.split, 500, stop=options.limit)
        correct, samples = count_correct(forwards, batches, specs[levels[0]].task)
        if samples == 0:
            raise MissingData(f"{task} has no {options.split} images: nothing to evaluate")
        for level, forward, right in zip(levels, forwards, correct, strict=True):
            rows.append(_row(forward, specs[level], right, samples, options, model.stored_bytes(task, level)))
    return rows


def _row(
    forward: Forward, spec: CompactSpec, correct: int, samples: int, options: EvalOptions, stored_bytes: int
) -> dict:
    """One evaluation row (docs/design.md §4 schema); latency columns when ``options.latency``. ``bytes`` is what
    the file stores for the (task, level) (``ModelFile.stored_bytes``: fewer than float32 in an fp16 or int8 shared
    export)."""
    row = {
        "task": spec.task.name,
        "level": spec.level,
        "units": list(spec.units),
        **spec.cost.to_dict(),
        "bytes": stored_bytes,
        "accuracy": round(correct / samples, 5),
        "split": options.split,
        "samples": samples,
    }
    if options.latency:
        row |= latency_row(forward, spec.backbone)
    return row


def latency_row(forward: Forward, config: BackboneConfig) -> dict[str, float]:
    """Median ms per image at batch 1 and at batch 64 on random input of the model's shape."""
    shape = (config.in_channels, config.input_size, config.input_size)
    return {f"latency_b{batch}_ms": round(latency_ms(forward, torch.randn(batch, *shape)), 4) for batch in (1, 64)}
