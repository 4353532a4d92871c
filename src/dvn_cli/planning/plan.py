"""Plans: one level for each of several tasks that run AT THE SAME TIME on one device under one shared budget.

Deep Virtual Networks (Kim et al., CVPR 2019) store the physical weights once; every virtual network is a view of
them. Tasks that run together therefore pay for a shared unit once, and a plan may give one task a larger level
for little extra memory when its units overlap those of the others.

Shared memory of a set of choices ``{task: level}`` (at most one level per task), in parameters (counted by
``memory.MemoryModel``, which also counts it in bytes stored at a precision):

- every ``UnitConv2d`` layer with split input stores the UNION over the chosen (task, level)s of the unit-pair
  blocks ``W[out(u_o), in(u_i)]`` with ``u_o, u_i`` in that choice's units ``S = order_t[:l]``. This is the union
  of the ``S_t x S_t`` blocks, NOT ``U x U`` for the union ``U`` of the unit sets: a cross block between a unit only
  task A uses and a unit only task B uses is stored by nobody. One block holds ``(C_out/k) * (C_in/k) * kh * kw``
  weights;
- the stem convolution, whose image input is never split, stores the union of the chosen OUTPUT units, each a
  block of ``(C_out/k) * C_in * kh * kw`` weights;
- each choice adds its own private parts: the affine parameters of its (task, level) batch norms, and its task's
  head sliced to its level (``classes * C_last*l/k`` weights plus ``classes`` biases). Running statistics are not
  counted, as in ``cost.level_cost``.

So the shared memory of a single choice is exactly that (task, level)'s ``params_total``, and
``separate_params`` (the sum of each choice's ``params_total``) is what separate stand-alone models would need.

``plan_levels`` searches every combination of levels exhaustively (depth-first, pruning partial plans that
already exceed the budget or cannot beat the best score): the answer is the exact optimum. It maximises the
weighted sum of validation accuracies; ties (within 1e-12) go to the smaller memory, then to the smaller levels.
More than ``MAX_COMBINATIONS`` combinations is refused rather than approximated.

A plan's budget is a parameter count (``250k``), bytes (``2MB``) or a share (``40%``). Bytes are counted at the
plan's storage precision (``precision``, default fp32: 4 bytes per parameter) as ``dvn export --shared
--precision`` stores them (``memory.py``), so a budget in bytes fits larger levels at int8; parameters and
shares count parameters at every precision.
A share is of the FULL plan: the shared memory of every listed task at its top level (all physical weights, plus
each listed task's top-level batch norms and head). For one task this is the same as a share in
``budgets.resolve_budget``. A level budget has no meaning for several tasks and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.cost import level_cost
from ..core.network import DeepVirtualNetwork, TaskLevels
from ..core.sizes import BYTES_PER_PARAM, check_precision
from ..errors import BadBudget, BadConfig
from .budget_rules import Limit, shared_limit
from .budgets import Budget, format_bytes, format_count
from .memory import MemoryModel, memory_model

__all__ = [
    "MAX_COMBINATIONS",
    "Limit",
    "Plan",
    "accuracy_from_training",
    "plan_budget_params",
    "plan_for_budget",
    "plan_levels",
    "plan_limit",
    "separate_params",
    "shared_memory_params",
]

MAX_COMBINATIONS = 1_000_000
"""The most level combinations ``plan_levels`` searches (k^T, or (k+1)^T when tasks may be left out)."""

_SCORE_RTOL = 1e-12


def _task_indices(network: DeepVirtualNetwork, tasks: Sequence[int | str]) -> list[int]:
    indices = [network.task_index(t) for t in tasks]
    twice = sorted({network.task_names[i] for i in indices if indices.count(i) > 1})
    if twice:
        raise BadConfig(f"task(s) listed more than once: {', '.join(twice)}; a plan gives each task one level")
    return indices


def shared_memory_params(network: DeepVirtualNetwork, choices: TaskLevels) -> int:
    """Parameters stored when the chosen (task, level)s run at the same time, shared units counted once.

    Args:
        network: the DVN.
        choices: one level per task (name or index); see the module docstring for what is counted.

    Returns:
        The parameter count; float32 bytes are ``4 *`` it.
    """
    return memory_model(network).memory(dict(network.resolve_pairs(choices.items(), one_level_per_task=True)))


def separate_params(network: DeepVirtualNetwork, choices: TaskLevels) -> int:
    """Parameters that separate stand-alone models of the chosen (task, level)s would store together.

    Args:
        network: the DVN.
        choices: one level per task (name or index).

    Returns:
        The sum of each choice's ``params_total``.
    """
    pairs = network.resolve_pairs(choices.items(), one_level_per_task=True)
    return sum(level_cost(network, t, level).params_total for t, level in pairs)


def plan_budget_params(network: DeepVirtualNetwork, budget: Budget | str, tasks: Sequence[int | str]) -> int:
    """The parameter limit a plan budget stands for.

    Args:
        network: the DVN.
        budget: parameters (``250k``), bytes (``2MB``) or a share (``40%``) of the full plan of ``tasks``.
        tasks: the tasks of the plan (names or indices), needed for a share.

    Returns:
        The largest whole number of parameters within the budget.

    Raises:
        BadBudget: a level budget, or a budget that does not parse.
    """
    limit = plan_limit(network, budget, tasks)
    return limit.amount // BYTES_PER_PARAM if limit.in_bytes else limit.amount  # float32: 4 bytes per parameter


def plan_limit(network: DeepVirtualNetwork, budget: Budget | str, tasks: Sequence[int | str]) -> Limit:
    """What a plan budget limits (``budget_rules.shared_limit``, the one rule): bytes for a budget in bytes
    (counted at the plan's precision), else parameters, a share being of every listed task at its top level.

    Raises:
        BadBudget: a level budget, or a budget that does not parse.
    """

    def full() -> int:
        return memory_model(network).memory(dict.fromkeys(_task_indices(network, tasks), network.units))

    return shared_limit(budget, full)


@dataclass
class Plan:
    """One level per task for tasks that run together.

    Args:
        choices: task name -> chosen level, in the order the tasks were listed (left-out tasks absent).
        memory_params: shared memory of the choices, in parameters.
        separate_params: what separate stand-alone models of the choices would store.
        score: the weighted sum of the chosen levels' accuracies that the plan maximises.
        accuracy: task name -> validation accuracy of its chosen level.
        budget_params: the parameter limit the plan was made for; for a limit in bytes at fp32 the same limit
            in parameters (``bytes // 4``), at fp16 and int8 None (bytes then stand for no parameter count).
        units: task name -> the units its chosen level uses, in the task's order.
        left_out: tasks that got no level (only when the plan was allowed to leave tasks out).
        precision: the storage precision the bytes below count at (``memory.MemoryModel.at``).
        memory_bytes: shared memory of the choices, in bytes stored at ``precision``.
        separate_bytes: ``separate_params`` in bytes: each choice alone at ``precision``.
        budget_bytes: the byte limit the plan was made for (None for a limit in parameters).
    """

    choices: dict[str, int]
    memory_params: int
    separate_params: int
    score: float
    accuracy: dict[str, float]
    budget_params: int | None = None
    units: dict[str, list[int]] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    precision: str = "fp32"
    memory_bytes: int = 0
    separate_bytes: int = 0
    budget_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "choices": dict(self.choices),
            "units": {name: list(units) for name, units in self.units.items()},
            "accuracy": dict(self.accuracy),
            "score": self.score,
            "memory_params": self.memory_params,
            "memory_bytes": self.memory_bytes,
            "separate_params": self.separate_params,
            "separate_bytes": self.separate_bytes,
            "saved_params": self.separate_params - self.memory_params,
            "budget_params": self.budget_params,
            "budget_bytes": self.budget_bytes,
            "precision": self.precision,
            "left_out": list(self.left_out),
        }


def accuracy_from_training(training: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """Validation accuracy per (task name, level) from a checkpoint's training summary.

    Args:
        training: the summary ``train.fit`` stores, whose ``val_accuracy`` maps a task name to one accuracy per
            level (level 1 first).

    Returns:
        ``{(task, level): accuracy}``; empty when the summary holds no validation accuracy. An accuracy that is not
        a finite number (NaN: a run of an older dvn that held out no validation image) is unknown, so left out: a
        plan then refuses that task rather than rank its levels by NaN, whose comparisons are all false (which
        once made level 1 win under a 100% budget).
    """
    per_task = training.get("val_accuracy") or {}
    return {
        (str(name), level): float(acc)
        for name, accs in per_task.items()
        for level, acc in enumerate(accs, start=1)
        if acc is not None and math.isfinite(float(acc))
    }


@dataclass(frozen=True)
class _Option:
    level: int  # 0: the task is left out
    blocks: tuple[int, ...]  # per block group
    extras: int
    score: float


def _task_options(
    model: MemoryModel,
    t: int,
    name: str,
    k: int,
    accuracy: Mapping[tuple[str, int], float],
    weight: float,
    require_all: bool,
) -> list[_Option]:
    options = [] if require_all else [_Option(0, (0,) * len(model.groups), 0, 0.0)]
    for level in range(1, k + 1):
        if (name, level) not in accuracy:
            raise BadConfig(
                f"no accuracy for {name} at level {level}: a plan needs the validation accuracy of every level of "
                "every planned task (a checkpoint's training summary holds them)"
            )
        blocks = tuple(g.blocks[t, level] for g in model.groups)
        options.append(_Option(level, blocks, model.extras[t, level], weight * float(accuracy[name, level])))
    return options


def _check_weights(names: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise BadConfig(f"weight given for task(s) not in the plan: {', '.join(unknown)}")
    for name, w in weights.items():
        if not (math.isfinite(float(w)) and float(w) >= 0):
            raise BadConfig(f"weight {w} of task {name} must be a finite number >= 0")
    return {name: float(weights.get(name, 1.0)) for name in names}


def _search(model: MemoryModel, options: list[list[_Option]], budget: int) -> tuple[_Option, ...] | None:
    """Exhaustive depth-first search for the best combination of options within ``budget`` (None if none fits)."""
    block_sizes = [g.block_size for g in model.groups]
    min_extras = [min(o.extras for o in opts) for opts in options]
    max_scores = [max(o.score for o in opts) for opts in options]
    rest_extras = [sum(min_extras[i:]) for i in range(len(options) + 1)]
    rest_scores = [sum(max_scores[i:]) for i in range(len(options) + 1)]
    best: list[Any] = [None, -math.inf, 0]  # combination, score, memory

    def visit(i: int, used: tuple[int, ...], extras: int, score: float, picked: tuple[_Option, ...]) -> None:
        memory = extras + sum(p * bits.bit_count() for p, bits in zip(block_sizes, used, strict=True))
        if memory + rest_extras[i] > budget:
            return  # shared blocks only grow as tasks are added
        if best[0] is not None:
            tol = _SCORE_RTOL * max(1.0, abs(best[1]))
            if score + rest_scores[i] < best[1] - tol:
                return  # cannot beat (or tie) the best plan so far
        if i == len(options):
            if best[0] is None or score > best[1] + tol or (abs(score - best[1]) <= tol and memory < best[2]):
                best[:] = [picked, score, memory]
            return
        for option in options[i]:  # levels ascending: among exact ties the smaller levels are kept
            merged = tuple(a | b for a, b in zip(used, option.blocks, strict=True))
            visit(i + 1, merged, extras + option.extras, score + option.score, (*picked, option))

    visit(0, (0,) * len(model.groups), 0, 0.0, ())
    return best[0]


def plan_levels(
    network: DeepVirtualNetwork,
    budget: int | Limit,
    tasks: Sequence[int | str],
    accuracy: Mapping[tuple[str, int], float],
    weights: Mapping[str, float] | None = None,
    require_all: bool = True,
    precision: str = "fp32",
) -> Plan:
    """The levels that maximise the weighted accuracy of tasks running together within a shared budget.

    Args:
        network: the DVN.
        budget: the most the plan may store: parameters (an int, see ``plan_budget_params``) or a ``Limit``
            (``plan_limit``), whose bytes count at ``precision``.
        tasks: the tasks that run together (names or indices), each at most once.
        accuracy: validation accuracy per (task name, level), for every level of every listed task.
        weights: task name -> weight of its accuracy in the score (missing tasks weigh 1).
        require_all: every task must get a level; otherwise a task may be left out (it then scores 0).
        precision: the storage precision bytes count at (``core.sizes.STORAGE_PRECISIONS``).

    Returns:
        The best plan.

    Raises:
        BadBudget: ``require_all`` and even every task at level 1 does not fit.
        BadConfig: no tasks, a task listed twice, a missing accuracy, a bad weight, too many combinations, or an
            unknown precision.
    """
    limit = budget if isinstance(budget, Limit) else Limit(budget)
    indices = _task_indices(network, tasks)
    if not indices:
        raise BadConfig("a plan needs at least one task")
    names = [network.task_names[t] for t in indices]
    k = network.units
    combinations = (k if require_all else k + 1) ** len(indices)
    if combinations > MAX_COMBINATIONS:
        raise BadConfig(
            f"a plan of {len(indices)} tasks at {k} levels has {combinations:,} combinations, more than the "
            f"{MAX_COMBINATIONS:,} searched exhaustively; plan fewer tasks at once"
        )
    task_weights = _check_weights(names, weights)
    params = memory_model(network)
    stored = params.at(check_precision(precision))
    model = stored if limit.in_bytes else params
    options = [
        _task_options(model, t, name, k, accuracy, task_weights[name], require_all)
        for t, name in zip(indices, names, strict=True)
    ]
    if require_all:
        _check_smallest(params, stored, indices, names, limit, precision)
    best = _search(model, options, limit.amount)
    picked = dict(zip(indices, best, strict=True)) if best is not None else {}
    choices = {t: o.level for t, o in picked.items() if o.level > 0}
    return Plan(
        choices={network.task_names[t]: level for t, level in choices.items()},
        memory_params=params.memory(choices),
        separate_params=separate_params(network, choices),
        score=sum(o.score for o in picked.values()),
        accuracy={network.task_names[t]: float(accuracy[network.task_names[t], lv]) for t, lv in choices.items()},
        budget_params=_params_limit(limit, precision),
        units={network.task_names[t]: list(network.layout.level_units(t, lv)) for t, lv in choices.items()},
        left_out=[network.task_names[t] for t in indices if t not in choices],
        precision=precision,
        memory_bytes=stored.memory(choices),
        separate_bytes=sum(stored.memory({t: lv}) for t, lv in choices.items()),
        budget_bytes=int(limit.amount) if limit.in_bytes else None,
    )


def _params_limit(limit: Limit, precision: str) -> int | None:
    if not limit.in_bytes:
        return int(limit.amount)
    return int(limit.amount) // BYTES_PER_PARAM if precision == "fp32" else None


def _check_smallest(
    params: MemoryModel, stored: MemoryModel, indices: list[int], names: list[str], limit: Limit, precision: str
) -> None:
    """Refuse, naming what it needs, a limit below every task at level 1."""
    smallest = dict.fromkeys(indices, 1)
    need_params, need_bytes = params.memory(smallest), stored.memory(smallest)
    if (need_bytes if limit.in_bytes else need_params) <= limit.amount:
        return
    at = "" if precision == "fp32" else f" at {precision}"
    if limit.in_bytes:
        asked, needed = (
            f"{format_bytes(limit.amount)}{at}",
            f"{format_bytes(need_bytes)} ({format_count(need_params)} parameters)",
        )
    else:
        asked, needed = (
            f"{format_count(limit.amount)} parameters",
            f"{format_count(need_params)} parameters ({format_bytes(need_bytes)}{at})",
        )
    raise BadBudget(
        f"budget of {asked} fits no plan of {', '.join(names)}: with every task at level 1 they need {needed}"
    )


def plan_for_budget(
    network: DeepVirtualNetwork,
    training: Mapping[str, Any],
    budget: Budget | str,
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
    label: str = "the checkpoint",
    precision: str = "fp32",
) -> Plan:
    """The levels of ``tasks`` that one shared budget plans, on the validation accuracy of a training summary.

    The one orchestration of a shared budget: ``dvn plan``, ``SharedRuntime.set_budget``/``for_budget`` and
    ``dvn predict --budgets`` all plan through it. A budget in bytes counts them at ``precision``.

    Raises:
        BadConfig: ``training`` holds no validation accuracy to plan with, or an unknown precision.
        BadBudget: a budget no plan fits, or one that does not parse.
    """
    check_precision(precision)
    accuracy = accuracy_from_training(training)
    if not accuracy:
        raise BadConfig(f"{label} has no validation accuracy to plan with; train it with dvn train")
    return plan_levels(network, plan_limit(network, budget, tasks), tasks, accuracy, weights, precision=precision)
