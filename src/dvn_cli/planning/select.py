"""Which (task, level)s of a model file ``--task`` and ``--budget`` pick, for every kind of file.

A checkpoint holds every level, so a budget resolves against the network's own level costs (``budgets.
resolve_budget``); the other kinds hold fixed levels, and a budget picks the largest held level that meets it
(``budget_rules.held_level``). A budget in bytes counts them at the export's storage precision: on a
checkpoint's unit blocks (``resolve_budget``); the other kinds record float32 sizes only, so at fp16 or int8 a
budget in bytes is refused for them rather than counted wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.sizes import check_precision
from ..errors import BadBudget, BadConfig
from ..modelfile.base import ModelFile
from ..modelfile.checkpoint import Checkpoint
from .budget_rules import held_level, parse_budget
from .budgets import resolve_budget

__all__ = ["file_level", "select_pairs"]


def file_level(model: ModelFile, task: str, budget: str, precision: str = "fp32") -> int:
    """The level of ``task`` that ``budget`` selects in ``model``; a budget in bytes counts at ``precision``."""
    check_precision(precision)
    if isinstance(model, Checkpoint):
        return resolve_budget(model.shape, task, budget, precision=precision)
    model.check_task(task)
    if precision != "fp32" and parse_budget(budget).kind == "bytes":
        raise BadBudget(
            f"a budget in bytes at {precision} is counted on a checkpoint's unit blocks; {model.label} is a "
            f"{model.format}: give a level or parameters, or export from the checkpoint"
        )
    costs = {level: model.cost_of(task, level) for level in model.levels(task)}
    stored = {level: model.stored_bytes(task, level) for level in costs}
    return held_level(costs, budget, task, model.label, model.format, stored)


def select_pairs(
    model: ModelFile, tasks: Sequence[str] | None = None, budget: str | None = None, precision: str = "fp32"
) -> list[tuple[str, int]]:
    """The (task, level)s that ``--task`` and ``--budget`` pick: every held level, or one level per task (a budget
    in bytes counted at the storage ``precision``)."""
    names = list(tasks) if tasks else model.task_names()
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BadConfig(f"task(s) listed more than once: {', '.join(twice)}")
    for name in names:
        model.check_task(name)
    if budget is None:
        return [(name, level) for name in names for level in model.levels(name)]
    return [(name, file_level(model, name, budget, precision)) for name in names]
