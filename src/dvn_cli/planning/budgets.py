"""Budgets: what a user asks for (``3``, ``250k``, ``40%``, ``2MB``) and the level of a task it resolves to.

A budget is one of four kinds (docs/design.md §4):

- a LEVEL: a plain positive integer, ``3``. It must exist (``1..k``).
- PARAMETERS: a number with a suffix ``k``/``K`` (thousand), ``M`` (million) or ``G`` (billion): ``250k``,
  ``1.2M``. A lower-case ``m`` is refused (it reads as milli). A plain integer is a level, never a count.
- a SHARE of the full network: ``40%`` with ``0 < x <= 100``.
- BYTES of stored weights: ``123B``, ``500kB``, ``2MB``, ``1GB`` (decimal, 1000^n) or ``800KiB``, ``1.5MiB``,
  ``1GiB``, ``1TiB`` (binary, 1024^n; ``1TB`` decimal). Byte suffixes are case-insensitive (``2mb`` and
  ``500KB`` are decimal bytes too).

Whitespace is tolerated around the number and between number and suffix (``250 k``).

What a budget is compared against, for a (task, level), comes from ``cost.level_cost``:

- parameters against ``params_total``: conv and linear weights plus that (task, level)'s batch-norm affine
  parameters and its head's bias, i.e. everything a stand-alone model of it stores besides batch-norm running
  statistics (what ``prune-level`` writes, less those statistics);
- a share against ``params_total`` of the TOP level of the same task (``100%`` is always level k);
- bytes against what ``dvn export --shared --precision P`` stores of that (task, level) alone
  (``memory.MemoryModel.at``, ``core.sizes.stored_bytes``): at fp32 (the default) ``LevelCost.bytes =
  4 * params_total``; at fp16 and int8 its convolution blocks at 2 or 1 bytes (int8 plus a float32 scale per
  output channel of each block), batch norms and head at 4.

A non-level budget resolves to the LARGEST level that fits; when none fits, the error names the smallest level
and its size in the budget's own unit. Reading a budget (``parse_budget``, ``describe_budget``) and the rule for a
file's fixed levels (``held_level``) need no network: they live in ``planning/budget_rules.py``, without torch.
"""

from __future__ import annotations

from ..core.cost import LevelCost, level_cost
from ..core.network import DeepVirtualNetwork
from ..core.sizes import check_precision
from ..errors import BadBudget
from .budget_rules import Budget, BudgetKind, describe_budget, format_bytes, format_count, parse_budget
from .memory import memory_model

__all__ = [
    "Budget",
    "BudgetKind",
    "describe_budget",
    "format_bytes",
    "format_count",
    "level_costs",
    "parse_budget",
    "resolve_budget",
]

# A share is a decimal the user typed; a level fits it when within this relative slack, so that a share printed
# with full float precision (e.g. by ``eval --json``) still selects its own level.
_SHARE_RTOL = 1e-9


def level_costs(network: DeepVirtualNetwork, task: int | str) -> list[LevelCost]:
    """``cost.level_cost`` of every level of ``task``; element ``l - 1`` is level ``l``."""
    return [level_cost(network, task, level) for level in range(1, network.units + 1)]


def _as_budget(budget: Budget | str) -> Budget:
    return budget if isinstance(budget, Budget) else parse_budget(budget)


def _fits(budget: Budget, size: int, top: LevelCost) -> bool:
    """Whether a level of ``size`` (bytes for a budget in bytes, else ``params_total``) fits ``budget``."""
    if budget.kind != "share":
        return size <= budget.value
    allowed = budget.value / 100 * top.params_total
    return size <= allowed + _SHARE_RTOL * top.params_total


def _size_in_unit(budget: Budget, size: int, top: LevelCost, precision: str) -> str:
    if budget.kind == "params":
        return f"{format_count(size)} parameters"
    if budget.kind == "bytes":
        return format_bytes(size) + ("" if precision == "fp32" else f" at {precision}")
    return f"{100 * size / top.params_total:.1f}% of the full network"


def resolve_budget(
    network: DeepVirtualNetwork,
    task: int | str,
    budget: Budget | str,
    costs: list[LevelCost] | None = None,
    precision: str = "fp32",
) -> int:
    """The level of ``task`` that ``budget`` selects.

    Args:
        network: the DVN.
        task: task name or index.
        budget: a ``Budget`` or a budget string.
        costs: ``level_costs(network, task)`` if the caller has them already (saves the counting forwards).
        precision: the storage precision a budget in bytes counts at (``core.sizes.STORAGE_PRECISIONS``).

    Returns:
        The level itself for a level budget, else the largest level whose size fits the budget.

    Raises:
        BadBudget: the budget does not parse, the level does not exist, or no level fits.
        BadConfig: an unknown precision.
    """
    check_precision(precision)
    budget = _as_budget(budget)
    t = network.task_index(task)
    name, k = network.task_names[t], network.units
    if budget.kind == "level":
        level = int(budget.value)
        if not 1 <= level <= k:
            raise BadBudget(f"level {level} does not exist: {name} has levels 1..{k}")
        return level
    costs = level_costs(network, t) if costs is None else costs
    top = costs[-1]
    if budget.kind == "bytes":
        stored = memory_model(network).at(precision)
        sizes = [stored.memory({t: level}) for level in range(1, k + 1)]
    else:
        sizes = [cost.params_total for cost in costs]
    fitting = [level for level, size in enumerate(sizes, start=1) if _fits(budget, size, top)]
    if not fitting:
        raise BadBudget(
            f"budget {describe_budget(budget)} fits no level of {name}: "
            f"the smallest, level 1, has {_size_in_unit(budget, sizes[0], top, precision)}"
        )
    return max(fitting)
