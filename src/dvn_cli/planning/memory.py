"""The memory a set of (task, level)s stores: unit blocks once, private parts per choice; in parameters, or in
bytes at a storage precision.

The one home of that count: plans (``plan.py``) search it, budgets (``budgets.resolve_budget``) compare one
(task, level) with a budget in bytes through it. In bytes it counts what ``dvn export --shared --precision P``
stores (``core.sizes.stored_bytes``): the convolutions' unit blocks at P, at int8 a float32 scale per output
channel of each block, batch norms and heads float32 (docs/design.md §4 "Bytes at a precision").
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import BackboneConfig, TaskSpec
from ..core.layers import LevelBatchNorm2d, UnitConv2d
from ..core.network import DeepVirtualNetwork
from ..core.sizes import stored_bytes

__all__ = ["BlockGroup", "MemoryModel", "TaskLevel", "memory_model"]

TaskLevel = tuple[int, int]


@dataclass(frozen=True)
class BlockGroup:
    """Layers whose (task, level)s use the same blocks: their block sizes add up, their unions are one.

    ``block_size`` is what one block of the group costs in the model's unit (parameters or bytes); ``block_rows``
    the output channels of one block of each layer, summed (int8 stores a scale for each).
    """

    block_size: int
    block_rows: int
    blocks: dict[TaskLevel, int]  # (task, level) -> bit set of the blocks it uses


@dataclass(frozen=True)
class MemoryModel:
    """Shared memory of choices ``{task index: level}``: the union of their blocks plus each one's extras.

    Counted in parameters (``memory_model``), or in bytes stored at a precision (``at``).
    """

    groups: tuple[BlockGroup, ...]
    extras: dict[TaskLevel, int]  # (task, level) -> private batch-norm affine params + head weights and bias

    def memory(self, choices: Mapping[int, int]) -> int:
        shared = 0
        for group in self.groups:
            used = 0
            for t, level in choices.items():
                used |= group.blocks[t, level]
            shared += group.block_size * used.bit_count()
        return shared + sum(self.extras[t, level] for t, level in choices.items())

    def at(self, precision: str) -> MemoryModel:
        """The same model counting bytes stored at ``precision`` (``core.sizes.stored_bytes``, which is linear)."""
        groups = tuple(
            BlockGroup(stored_bytes(g.block_size, g.block_rows, 0, precision), g.block_rows, g.blocks)
            for g in self.groups
        )
        return MemoryModel(groups, {key: stored_bytes(0, 0, n, precision) for key, n in self.extras.items()})


def memory_model(network: DeepVirtualNetwork) -> MemoryModel:
    """The memory model of ``network``'s shape, in parameters (each shape is walked once; a runtime re-plans on
    every switch)."""
    return _shape_memory_model(network.config, network.tasks, network.layout.orders)


@functools.lru_cache(maxsize=64)
def _shape_memory_model(
    config: BackboneConfig, tasks: tuple[TaskSpec, ...], orders: tuple[tuple[int, ...], ...]
) -> MemoryModel:
    """Walk the unit layers once: per-layer block sizes and the blocks of every (task, level), plus extras.

    The model depends on shapes only (a frozen config, the tasks' classes, the orders), so it is counted on a
    network built on the ``meta`` device.
    """
    with torch.device("meta"):
        network = DeepVirtualNetwork(config, tasks, orders)
    layout, k = network.layout, network.units
    task_levels = [(t, level) for t in range(layout.num_tasks) for level in range(1, k + 1)]
    groups: dict[tuple[int, ...], tuple[int, int]] = {}
    extras = dict.fromkeys(task_levels, 0)
    for module in network.modules():
        if isinstance(module, UnitConv2d):
            grid = module.grid
            key = tuple(grid.bits(layout.level_units(t, lv)) for t, lv in task_levels)
            size, rows = groups.get(key, (0, 0))
            groups[key] = (size + grid.block_params, rows + grid.out_channels // grid.units)
        elif isinstance(module, LevelBatchNorm2d):
            for t, level in task_levels:
                extras[t, level] += sum(p.numel() for p in module.norm(t, level).parameters())
    for t, level in task_levels:
        head = network.head(t)
        out_features, in_features = head.active_shape(t, level)
        extras[t, level] += out_features * in_features + (head.bias.numel() if head.bias is not None else 0)
    return MemoryModel(
        groups=tuple(
            BlockGroup(size, rows, dict(zip(task_levels, key, strict=True))) for key, (size, rows) in groups.items()
        ),
        extras=extras,
    )
