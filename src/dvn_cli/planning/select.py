"""Which (task, level)s of a model file ``--task`` and ``--budget`` pick, for every kind of file.

A checkpoint holds every level, so a budget resolves against the network's own level costs (``budgets.
resolve_budget``); the other kinds hold fixed levels, and a budget picks the largest held level that meets it
(``budget_rules.held_level``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import BadConfig
from ..modelfile.base import ModelFile
from ..modelfile.checkpoint import Checkpoint
from .budget_rules import held_level
from .budgets import resolve_budget

__all__ = ["file_level", "select_pairs"]


def file_level(model: ModelFile, task: str, budget: str) -> int:
    """The level of ``task`` that ``budget`` selects in ``model``."""
    if isinstance(model, Checkpoint):
        return resolve_budget(model.shape, task, budget)
    model.check_task(task)
    costs = {level: model.cost_of(task, level) for level in model.levels(task)}
    return held_level(costs, budget, task, model.label, model.format)


def select_pairs(
    model: ModelFile, tasks: Sequence[str] | None = None, budget: str | None = None
) -> list[tuple[str, int]]:
    """The (task, level)s that ``--task`` and ``--budget`` pick: every held level, or one level per task."""
    names = list(tasks) if tasks else model.task_names()
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BadConfig(f"task(s) listed more than once: {', '.join(twice)}")
    for name in names:
        model.check_task(name)
    if budget is None:
        return [(name, level) for name in names for level in model.levels(name)]
    return [(name, file_level(model, name, budget)) for name in names]
