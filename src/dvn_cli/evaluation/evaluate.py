"""Evaluation: top-1 accuracy of any model on a split, and task x level rows with sizes and latency.

Works the same for a virtual network (``network(x, task, level)``), a compact plain model and a bundle's plain
networks (``model(x)``): each is passed as a function from a normalised batch to logits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..config import BackboneConfig, TaskSpec
from ..core.cost import LevelCost
from ..data.datasets import iterate_split, load_task, task_string
from ..deploy.prune import CompactModel
from ..errors import BadBudget, BadConfig, UnknownTask
from ..modelfile.bundle import Bundle
from ..modelfile.checkpoint import Checkpoint
from ..planning.budgets import describe_budget, level_costs, parse_budget, resolve_budget

__all__ = [
    "EvalOptions",
    "accuracy",
    "evaluate_rows",
    "latency_ms",
    "load_split",
    "predictions",
]

Forward = Callable[[torch.Tensor], torch.Tensor]


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
    """Top-1 accuracy (0..1) of ``forward`` on ``(images, labels)``."""
    if len(labels) == 0:
        return float("nan")
    preds = predictions(forward, images, spec, batch_size, device)
    return float((preds == labels).float().mean())


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
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``test`` or ``val`` images of a trained task; pass the run's ``val_fraction`` and ``seed`` so that
    ``val`` is carved exactly as training carved it."""
    if split not in ("test", "val"):
        raise BadConfig(f"unknown split {split!r}; use test or val")
    data = load_task(
        task_string(spec),
        data_root=data_root,
        channels=backbone.in_channels,
        size=backbone.input_size,
        val_fraction=val_fraction,
        seed=seed,
    )
    images, labels = data.split(split)
    return images[:limit], labels[:limit]


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate: tasks (default all), a budget (default every level), the split, a cap on images per
    task, and whether to time latency."""

    tasks: tuple[str, ...] | None = None
    budget: str | None = None
    split: str = "test"
    data_root: str | None = None
    limit: int | None = None
    latency: bool = False


def evaluate_rows(model: Checkpoint | CompactModel | Bundle, options: EvalOptions | None = None) -> list[dict]:
    """One row per evaluated (task, level): units, sizes, MACs, top-1 on the split and, on request, latency.

    A full checkpoint gives every task x level (or each task's level under ``options.budget``); a compact model
    its one (task, level); a bundle each (task, level) it holds, each run as its plain network.
    """
    options = options or EvalOptions()
    if isinstance(model, Bundle):
        return _bundle_rows(model, options)
    if isinstance(model, CompactModel):
        return _compact_rows(model, options)
    return _checkpoint_rows(model, options)


def _checkpoint_rows(checkpoint: Checkpoint, options: EvalOptions) -> list[dict]:
    network = checkpoint.network.eval()
    run = checkpoint.training.get("config", {})
    rows = []
    for name in options.tasks or network.task_names:
        t = network.task_index(name)
        spec = network.tasks[t]
        costs = level_costs(network, t)
        budget = options.budget
        levels = [resolve_budget(network, t, budget, costs)] if budget else range(1, network.units + 1)
        images, labels = load_split(
            spec, network.config, options.split, options.data_root, options.limit,
            val_fraction=run.get("val_fraction", 0.1), seed=run.get("seed", 0),
        )  # fmt: skip
        for level in levels:
            forward = partial(network, task=t, level=level)
            units = network.layout.level_units(t, level)
            rows.append(_row(forward, spec, level, units, costs[level - 1], images, labels, options, network.config))
    return rows


def _compact_rows(compact: CompactModel, options: EvalOptions) -> list[dict]:
    spec = compact.spec
    name = spec.task.name
    if options.tasks and list(options.tasks) != [name]:
        raise UnknownTask(f"{compact.path} holds only task {name!r}; evaluate the full checkpoint for other tasks")
    if options.budget:
        parsed = parse_budget(options.budget)
        too_big = {
            "level": parsed.value != spec.level,
            "params": spec.params_total > parsed.value,
            "bytes": spec.cost.bytes > parsed.value,
            "share": False,
        }[parsed.kind]
        if too_big:
            raise BadBudget(
                f"{compact.path} holds only {name} level {spec.level}, which does not meet budget "
                f"{describe_budget(parsed)}; use the full checkpoint for other levels"
            )
    images, labels = load_split(
        spec.task, spec.backbone, options.split, options.data_root, options.limit,
        val_fraction=spec.val_fraction, seed=spec.seed,
    )  # fmt: skip
    return [_row(compact.plain, spec.task, spec.level, spec.units, spec.cost, images, labels, options, spec.backbone)]


def _bundle_rows(bundle: Bundle, options: EvalOptions) -> list[dict]:
    if options.budget:
        raise BadBudget(f"{bundle.path} holds fixed levels {bundle.choices}; --budget applies to full checkpoints")
    rows = []
    for name in options.tasks or list(bundle.choices):
        plain = bundle.plain(name)
        spec, level = bundle.task_specs[name], bundle.choices[name]
        images, labels = load_split(
            spec, bundle.config, options.split, options.data_root, options.limit,
            val_fraction=bundle.split.get("val_fraction", 0.1), seed=bundle.split.get("seed", 0),
        )  # fmt: skip
        rows.append(
            _row(plain, spec, level, bundle.units(name), bundle.costs[name], images, labels, options, bundle.config)
        )
    return rows


def _row(
    forward: Forward,
    spec: TaskSpec,
    level: int,
    units: tuple[int, ...],
    cost: LevelCost,
    images: torch.Tensor,
    labels: torch.Tensor,
    options: EvalOptions,
    config: BackboneConfig,
) -> dict:
    """One evaluation row (DESIGN §4 schema); latency columns when ``options.latency``."""
    row = {
        "task": spec.name,
        "level": level,
        "units": list(units),
        **cost.to_dict(),
        "accuracy": round(accuracy(forward, images, labels, spec), 5),
        "split": options.split,
        "samples": len(labels),
    }
    if options.latency:
        row |= latency_row(forward, config)
    return row


def latency_row(forward: Forward, config: BackboneConfig) -> dict[str, float]:
    """Median ms per image at batch 1 and at batch 64 on random input of the model's shape."""
    shape = (config.in_channels, config.input_size, config.input_size)
    return {f"latency_b{batch}_ms": round(latency_ms(forward, torch.randn(batch, *shape)), 4) for batch in (1, 64)}
