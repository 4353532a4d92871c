"""What a dvn file holds, as plain dicts for ``dvn info`` (tables) and ``dvn info --json``."""

from __future__ import annotations

from typing import Any

from ..core.cost import stored_params
from ..deploy.prune import CompactModel
from ..modelfile.checkpoint import Checkpoint, sha256_file
from ..planning.budgets import level_costs

__all__ = ["describe_checkpoint", "describe_compact"]


def describe_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    """Tasks, orders, per-level sizes and validation accuracy, training summary and format of a checkpoint."""
    network = checkpoint.network
    training = checkpoint.training
    val = training.get("val_accuracy", {})
    levels = []
    for t, spec in enumerate(network.tasks):
        for level, cost in enumerate(level_costs(network, t), start=1):
            accs = val.get(spec.name)
            levels.append(
                {
                    "task": spec.name,
                    "level": level,
                    "units": list(network.layout.level_units(t, level)),
                    **cost.to_dict(),
                    "val_accuracy": accs[level - 1] if accs else None,
                }
            )
    return {
        "file": str(checkpoint.path),
        "format": checkpoint.meta["format"],
        "version": checkpoint.meta["version"],
        "bytes": checkpoint.path.stat().st_size,
        "sha256": sha256_file(checkpoint.path),
        "backbone": checkpoint.meta["backbone"],
        "units": network.units,
        "order_rule": network.order_rule,
        "stored_params": stored_params(network),
        "tasks": [
            {
                "name": s.name,
                "classes": list(s.classes),
                "source": s.source,
                "order": list(order),
                "mean": list(s.mean),
                "std": list(s.std),
                "resize": s.resize,
            }
            for s, order in zip(network.tasks, network.layout.orders, strict=True)
        ],
        "levels": levels,
        "training": {k: v for k, v in training.items() if k not in ("val_accuracy", "data")},
    }


def describe_compact(compact: CompactModel) -> dict[str, Any]:
    """Where a compact model came from (task, level, units, source hash) and what it costs."""
    spec = compact.spec
    return {
        "file": str(compact.path),
        "format": "dvn-compact",
        "bytes": compact.path.stat().st_size,
        "sha256": sha256_file(compact.path),
        **spec.to_dict(),
        "bytes_float32": spec.cost.bytes,
    }
