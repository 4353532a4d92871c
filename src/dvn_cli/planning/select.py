"""Which (task, level)s of a model file ``--task`` and ``--budget`` pick, for every kind of file.

A checkpoint holds every level, so a budget resolves against the network's own level costs (``budgets.
resolve_budget``); the other kinds hold fixed levels, and a budget picks the largest held level that meets it
(``budget_rules.held_level``). A budget in bytes counts them at the export's storage precision: on a
checkpoint's unit blocks (``resolve_budget``); the other kinds record float32 sizes only, so at fp16 or int8 a
budget in bytes is refused for them rather than counted wrongly.

Tasks that run AT ONCE share one budget instead (``shared_levels``, what ``dvn serve`` switches to): what they hold
together, each shared block once, as ``dvn plan`` counts it; a checkpoint with validation accuracy is planned by
``dvn plan``'s joint plan, any other file by ``budget_rules.plan_held_levels`` over the levels it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.sizes import BYTES_PER_PARAM, check_precision
from ..errors import BadBudget, BadConfig
from ..modelfile.base import ModelFile
from ..modelfile.checkpoint import Checkpoint
from .budget_rules import held_level, parse_budget, plan_held_levels
from .budgets import resolve_budget
from .memory import memory_model
from .plan import plan_for_budget

__all__ = ["file_level", "select_pairs", "shared_levels"]


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


def shared_levels(model: ModelFile, tasks: Sequence[str], budget: str) -> tuple[dict[str, int], int]:
    """The levels one shared budget picks for ``tasks`` of ``model`` running at once, and the float32 bytes they
    hold together (each shared block once, as ``SharedRuntime`` holds them).

    A checkpoint with validation accuracy gets ``dvn plan``'s joint plan (``plan_for_budget``); any other file
    (a bundle, a checkpoint without accuracy, a compact model) its held levels chosen by
    ``budget_rules.plan_held_levels`` under the same limit. A share is of every task at its top level; a file
    without unit blocks (a compact model) does not hold that, and refuses one.

    Raises:
        BadBudget: a budget that does not parse, a level, or one that even the smallest levels exceed.
        BadConfig, UnknownTask: tasks listed twice or unknown.
    """
    source = model.unit_source() if model.holds_unit_blocks else None
    if source is not None and source.fixed is None and source.training.get("val_accuracy"):
        plan = plan_for_budget(source.network, source.training, budget, tasks, label=source.label)
        return dict(plan.choices), plan.memory_bytes
    levels = {name: model.levels(name) for name, _ in select_pairs(model, tasks, None)}
    if source is not None:
        network, params = source.network, memory_model(source.network)

        def held_params(choices: dict[str, int]) -> int:
            return params.memory({network.task_index(task): level for task, level in choices.items()})

        def full_params() -> int:
            return held_params(dict.fromkeys(levels, network.units))

    else:

        def held_params(choices: dict[str, int]) -> int:  # one plain model per (task, level): nothing shared
            return sum(model.cost_of(task, level).params_total for task, level in choices.items())

        def full_params() -> int:
            raise BadBudget(
                f"a share is of the full network, which {model.label} does not hold: give bytes (2MB) or "
                "parameters (250k)"
            )

    def held_bytes(choices: dict[str, int]) -> int:
        return BYTES_PER_PARAM * held_params(choices)

    return plan_held_levels(budget, levels, held_bytes, held_params, full_params)
