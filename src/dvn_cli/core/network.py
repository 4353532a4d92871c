"""DeepVirtualNetwork: one physical backbone, per-task unit orders, private batch norms and one head per task.

``network(x, task, level)`` runs the virtual network of ``task`` at ``level``: the units ``order_task[:level]``
of every layer, that (task, level)'s batch norm and the task's head. Tasks may be given by name or index.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeAlias, TypeVar

import torch
from torch import nn

from ..config import BackboneConfig, TaskSpec
from ..errors import BadConfig, UnknownTask
from .backbones import build_features
from .layers import UnitLinear
from .units import UnitLayout, make_orders

__all__ = ["DeepVirtualNetwork", "TaskLevels", "build_network"]

TaskLevels: TypeAlias = Mapping[str, int] | Mapping[int, int] | Mapping[str | int, int]
"""One level per task, tasks by name or index (``resolve_pairs`` reads it; a ``Mapping`` is invariant in its
keys, so a ``dict[str, int]`` is no ``Mapping[str | int, int]``)."""

_Key = TypeVar("_Key", bound=Hashable)


class DeepVirtualNetwork(nn.Module):
    """Several tasks, each at ``k`` nested levels, on one set of physical weights.

    Args:
        config: the physical backbone.
        tasks: one spec per task, in the order of ``orders``.
        orders: one permutation of ``0..k-1`` per task.
        order_rule: the name of the rule that produced ``orders`` (recorded in checkpoints).
    """

    def __init__(
        self,
        config: BackboneConfig,
        tasks: Sequence[TaskSpec],
        orders: Sequence[Sequence[int]],
        order_rule: str = "nearest",
    ) -> None:
        super().__init__()
        if not tasks:
            raise BadConfig("no tasks: a network has at least one")
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise BadConfig(f"duplicate task name(s): {', '.join(duplicates)}")
        self.config = config
        self.tasks = tuple(tasks)
        self._index = {name: i for i, name in enumerate(names)}  # task name -> index, in task order
        self.order_rule = order_rule
        self.layout = UnitLayout(orders, config.units)
        if self.layout.num_tasks != len(self.tasks):
            raise BadConfig(f"{self.layout.num_tasks} orders given for {len(self.tasks)} tasks")
        self.features = build_features(config, self.layout)
        self.heads = nn.ModuleList(
            UnitLinear(self.features.out_features, task.num_classes, self.layout) for task in self.tasks
        )

    @property
    def units(self) -> int:
        return self.layout.units

    @property
    def task_names(self) -> list[str]:
        return list(self._index)

    def head(self, task: int) -> UnitLinear:
        """The head of task index ``task``."""
        head = self.heads[task]
        assert isinstance(head, UnitLinear)  # __init__ fills heads with nothing else
        return head

    def task_index(self, task: int | str) -> int:
        """Index of a task given by name or index; unknown ones raise ``UnknownTask``."""
        if isinstance(task, str):
            if task not in self._index:
                raise UnknownTask(f"unknown task {task!r}; this network has: {', '.join(self._index)}")
            return self._index[task]
        self.layout.check(task, 1)
        return task

    def resolve_pairs(
        self, pairs: Iterable[tuple[int | str, int]], one_level_per_task: bool = False
    ) -> list[tuple[int, int]]:
        """``(task index, level)`` of each ``(task name or index, level)``, checked before anything runs.

        A level outside ``1..k`` and an unknown task are refused; so is a pair given twice, or with
        ``one_level_per_task`` (plans, bundles) a task given twice.
        """
        resolved = []
        for task, level in pairs:
            t = self.task_index(task)
            try:
                index = None if isinstance(level, bool) else operator.index(level)  # ints, never floats or bools
            except TypeError:
                index = None
            if index is None or not 1 <= index <= self.units:
                raise BadConfig(f"level {level} does not exist: {self.task_names[t]} has levels 1..{self.units}")
            resolved.append((t, index))
        if one_level_per_task:
            tasks_twice = _repeated([t for t, _ in resolved])
            if tasks_twice:
                names = ", ".join(self.task_names[t] for t in tasks_twice)
                raise BadConfig(f"task(s) listed more than once: {names}; each task gets one level")
        pairs_twice = _repeated(resolved)
        if pairs_twice:
            names = ", ".join(f"{self.task_names[t]} level {level}" for t, level in pairs_twice)
            raise BadConfig(f"(task, level) listed more than once: {names}")
        return resolved

    def forward(self, x: torch.Tensor, task: int | str, level: int, masked: bool = False) -> torch.Tensor:
        """Logits of (task, level). ``masked`` runs the full-width reference path instead of the gather path."""
        t = self.task_index(task)
        self.layout.check(t, level)
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise BadConfig(
                f"input of shape {tuple(x.shape)} does not match the network's (B, {self.config.in_channels}, H, W)"
            )
        features = self.features(x, t, level, masked)  # (B, w_last*l/k), or (B, w_last) masked
        return self.heads[t](features, t, level, masked)  # (B, classes_t)


def _repeated(keys: list[_Key]) -> list[_Key]:
    """The keys listed more than once, each once, in the order they first appear."""
    return list(dict.fromkeys(key for key in keys if keys.count(key) > 1))


def build_network(
    config: BackboneConfig,
    tasks: Sequence[TaskSpec],
    order_rule: str = "nearest",
    order_table: Sequence[Sequence[int]] | None = None,
) -> DeepVirtualNetwork:
    """A fresh DVN whose orders come from ``order_rule`` (or ``order_table`` with rule ``table``)."""
    orders = make_orders(order_rule, len(tasks), config.units, order_table)
    return DeepVirtualNetwork(config, tasks, orders, order_rule)
