"""Evaluation: top-1 accuracy of any model on a split, and task x level rows with sizes and latency.

Works the same for a virtual network (``network(x, task, level)``) and for a compact plain model (``model(x)``):
both are passed as a function from a normalised batch to logits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from .budgets import describe_budget, level_costs, parse_budget, resolve_budget
from .bundle import Bundle
from .checkpoint import Checkpoint
from .config import BackboneConfig, TaskSpec
from .cost import LevelCost
from .data import iterate_split, load_task, task_string
from .errors import BadBudget, BadConfig, UnknownTask
from .prune import CompactModel

__all__ = [
    "accuracy",
    "evaluate_bundle",
    "evaluate_checkpoint",
    "evaluate_compact",
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
    training: dict,
    split: str,
    data_root: str | None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``test`` or ``val`` images of a trained task, carved exactly as training carved them."""
    if split not in ("test", "val"):
        raise BadConfig(f"unknown split {split!r}; use test or val")
    cfg = training.get("config", {})
    data = load_task(
        task_string(spec),
        data_root=data_root,
        channels=backbone.in_channels,
        size=backbone.input_size,
        val_fraction=cfg.get("val_fraction", 0.1),
        seed=cfg.get("seed", 0),
    )
    images, labels = data.split(split)
    return images[:limit], labels[:limit]


def evaluate_checkpoint(
    checkpoint: Checkpoint,
    tasks: list[str] | None = None,
    budget: str | None = None,
    split: str = "test",
    data_root: str | None = None,
    limit: int | None = None,
    latency: bool = False,
) -> list[dict]:
    """One row per (task, level): units, sizes, MACs, top-1 on ``split`` and, on request, latency.

    Args:
        checkpoint: a loaded DVN.
        tasks: task names (default: all).
        budget: a budget string; each task is evaluated at the level it selects (default: every level).
        split: ``test`` (for reporting) or ``val``.
        data_root: dataset folder.
        limit: evaluate at most this many images per task.
        latency: add median milliseconds per image at batch 1 and 64.
    """
    network = checkpoint.network.eval()
    config = network.config
    rows = []
    for name in tasks or network.task_names:
        t = network.task_index(name)
        spec = network.tasks[t]
        costs = level_costs(network, t)
        levels = [resolve_budget(network, t, budget, costs)] if budget else range(1, network.units + 1)
        images, labels = load_split(spec, config, checkpoint.training, split, data_root, limit)
        for level in levels:
            forward = partial(network, task=t, level=level)
            units = network.layout.level_units(t, level)
            rows.append(
                _row(forward, spec, level, units, costs[level - 1], images, labels, split, config if latency else None)
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
    split: str,
    latency_config: BackboneConfig | None,
) -> dict:
    """One evaluation row (DESIGN §4 schema); latency columns when ``latency_config`` is given."""
    row = {
        "task": spec.name,
        "level": level,
        "units": list(units),
        **cost.to_dict(),
        "accuracy": round(accuracy(forward, images, labels, spec), 5),
        "split": split,
        "samples": len(labels),
    }
    if latency_config is not None:
        row |= latency_row(forward, latency_config)
    return row


def evaluate_compact(
    compact: CompactModel,
    tasks: list[str] | None = None,
    budget: str | None = None,
    split: str = "test",
    data_root: str | None = None,
    limit: int | None = None,
    latency: bool = False,
) -> list[dict]:
    """The single row of a compact model, in the same schema as ``evaluate_checkpoint``'s rows."""
    spec = compact.spec
    name = spec.task.name
    if tasks and tasks != [name]:
        raise UnknownTask(f"{compact.path} holds only task {name!r}; evaluate the full checkpoint for other tasks")
    if budget:
        parsed = parse_budget(budget)
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
    training = {"config": {"val_fraction": spec.val_fraction, "seed": spec.seed}}
    images, labels = load_split(spec.task, spec.backbone, training, split, data_root, limit)
    latency_config = spec.backbone if latency else None
    return [_row(compact.plain, spec.task, spec.level, spec.units, spec.cost, images, labels, split, latency_config)]


def evaluate_bundle(
    bundle: Bundle,
    tasks: list[str] | None = None,
    budget: str | None = None,
    split: str = "test",
    data_root: str | None = None,
    limit: int | None = None,
    latency: bool = False,
) -> list[dict]:
    """One row per (task, level) of a bundle, each run as its plain network (``evaluate_checkpoint``'s schema)."""
    if budget:
        raise BadBudget(f"{bundle.path} holds fixed levels {bundle.choices}; --budget applies to full checkpoints")
    rows = []
    for name in tasks or list(bundle.choices):
        plain = bundle.plain(name)
        spec, level = bundle.task_specs[name], bundle.choices[name]
        images, labels = load_split(spec, bundle.config, {"config": bundle.split}, split, data_root, limit)
        latency_config = bundle.config if latency else None
        rows.append(
            _row(plain, spec, level, bundle.units(name), bundle.costs[name], images, labels, split, latency_config)
        )
    return rows


def latency_row(forward: Forward, config: BackboneConfig) -> dict[str, float]:
    """Median ms per image at batch 1 and at batch 64 on random input of the model's shape."""
    shape = (config.in_channels, config.input_size, config.input_size)
    return {f"latency_b{batch}_ms": round(latency_ms(forward, torch.randn(batch, *shape)), 4) for batch in (1, 64)}
