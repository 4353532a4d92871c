"""Budgets without a network (no torch): the forms a user writes, and the level a budget picks among fixed levels.

The four forms (``3``, ``250k``, ``40%``, ``2MB``) are described in ``planning/budgets.py``, which resolves them
against a network's own level costs. A file of fixed levels (a bundle, a compact model, a shared export) holds only
some levels and no network: ``held_level`` picks the largest held level whose cost meets the budget. Its one rule
serves ``dvn predict --budget`` on any model file (``planning.select.file_level``) and the torch-free server of a
shared export folder (``serve/folder_engine.py``), which reads the costs from the manifest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Literal

from ..core.sizes import LevelCost
from ..errors import BadBudget

__all__ = [
    "FORMS",
    "MAX_BUDGET",
    "Budget",
    "BudgetKind",
    "Limit",
    "describe_budget",
    "fit_held_levels",
    "format_bytes",
    "format_count",
    "held_level",
    "parse_budget",
    "plan_held_levels",
    "shared_limit",
]

BudgetKind = Literal["level", "params", "share", "bytes"]

FORMS = "use a level (3), parameters (250k, 1.2M), a share (40%) or bytes (2MB)"

_COUNT_SUFFIXES = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
_BYTE_SUFFIXES = {  # keys lower-case: byte suffixes are matched case-insensitively
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}
MAX_BUDGET = 10**18
"""The largest number a budget may stand for (parameters, bytes or a level): far beyond any device, and what a
float holds exactly; a larger number (400 digits, which no float holds) is refused in one line."""
_BUDGET_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<suffix>[A-Za-z%]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed budget.

    Args:
        kind: ``level``, ``params``, ``share`` (percent) or ``bytes``.
        value: the level, the parameter count, the percentage (0..100] or the byte count.
        text: what the user wrote, stripped.
    """

    kind: BudgetKind
    value: float
    text: str


def _shown(text: str) -> str:
    """What the user wrote, quoted, cut short when it is long (a message stays one readable line)."""
    return repr(text) if len(text) <= 40 else f"{text[:24]!r}… ({len(text)} characters)"


def _bad(text: str) -> BadBudget:
    return BadBudget(f"bad budget {_shown(text)}: {FORMS}")


def parse_budget(text: str) -> Budget:
    """Parse a budget string into a ``Budget``; anything else raises ``BadBudget`` naming the accepted forms.

    Args:
        text: ``3``, ``250k``, ``1.2M``, ``40%``, ``2MB``, ``1.5MiB``, ... (see the module docstring).

    Returns:
        The budget, its value converted to a level, a parameter count, a percentage or a byte count.
    """
    stripped = str(text).strip()
    match = _BUDGET_RE.match(stripped)
    if match is None:
        raise _bad(stripped)
    number, suffix = Decimal(match["number"]), match["suffix"]
    scale = 100 if suffix == "%" else _COUNT_SUFFIXES.get(suffix) or _BYTE_SUFFIXES.get(suffix.lower(), 1)
    if number * scale > MAX_BUDGET:
        raise BadBudget(f"bad budget {_shown(stripped)}: the largest budget is 10^18 (parameters, bytes or a level)")
    if suffix == "":
        if "." in match["number"] or number < 1:
            raise _bad(stripped)
        return Budget("level", float(number), stripped)
    if number <= 0:
        raise _bad(stripped)
    if suffix == "%":
        if number > 100:
            raise BadBudget(f"bad budget {_shown(stripped)}: a share must be above 0% and at most 100%")
        return Budget("share", float(number), stripped)
    if suffix in _COUNT_SUFFIXES:
        return Budget("params", float(number * _COUNT_SUFFIXES[suffix]), stripped)
    if suffix.lower() in _BYTE_SUFFIXES:
        return Budget("bytes", float(number * _BYTE_SUFFIXES[suffix.lower()]), stripped)
    if suffix == "m":
        raise BadBudget(f"bad budget {_shown(stripped)}: write millions with a capital M (1.2M); {FORMS}")
    raise _bad(stripped)


def _scaled(n: float, units: tuple[tuple[int, str, int], ...]) -> str:
    """``n`` in the largest unit it reaches, moving up one unit when rounding would show 1000 of it."""
    i = max((i for i, (scale, _, _) in enumerate(units) if abs(n) >= scale), default=0)
    if i + 1 < len(units) and round(abs(n) / units[i][0], units[i][2]) >= 1000:
        i += 1
    scale, name, digits = units[i]
    return f"{n / scale:.{digits}f}{name}"


def format_count(n: float) -> str:
    """A parameter count for people: ``950``, ``44.2k``, ``1.20M``, ``3.10G``."""
    return _scaled(n, ((1, "", 0), (10**3, "k", 1), (10**6, "M", 2), (10**9, "G", 2)))


def format_bytes(n: float) -> str:
    """A byte count in decimal units for people: ``123 B``, ``176.9 kB``, ``2.8 MB``, ``1.2 GB``."""
    return _scaled(n, ((1, " B", 0), (10**3, " kB", 1), (10**6, " MB", 1), (10**9, " GB", 1)))


def describe_budget(budget: Budget) -> str:
    """The budget as a phrase: ``250k parameters``, ``40%``, ``2MB``, ``level 3``."""
    if budget.kind == "level":
        return f"level {int(budget.value)}"
    if budget.kind == "params":
        return f"{budget.text} parameters"
    return budget.text


def held_level(
    costs: Mapping[int, LevelCost],
    budget: Budget | str,
    task: str,
    label: str,
    kind: str,
    stored: Mapping[int, int],
) -> int:
    """The largest level of ``costs`` (the levels a file holds of ``task``) that meets ``budget``.

    A level budget must name a held level; a share meets every level (it is a share of the full network, which the
    file does not hold); a budget in bytes compares ``stored``, the bytes the file stores per level
    (``ModelFile.stored_bytes``: the float32 cost, fewer in a shared export at fp16 or int8). ``label`` and
    ``kind`` (the file and its format) name the file when no level fits.

    Raises:
        BadBudget: the budget does not parse, or no held level meets it.
    """
    parsed = budget if isinstance(budget, Budget) else parse_budget(budget)

    def meets(level: int) -> bool:
        cost = costs[level]
        return {
            "level": parsed.value == level,
            "params": cost.params_total <= parsed.value,
            "bytes": stored[level] <= parsed.value,
            "share": True,  # a share of the full network, which this file does not hold: nothing to compare
        }[parsed.kind]

    held = sorted(costs)
    fitting = [level for level in held if meets(level)]
    if not fitting:
        levels = f"level {held[0]}, which does" if len(held) == 1 else f"levels {', '.join(map(str, held))}, which do"
        raise BadBudget(
            f"{label} holds only {task} {levels} not meet budget {describe_budget(parsed)}; a {kind} "
            "file holds fixed levels: use the full checkpoint for other levels"
        )
    return max(fitting)


@dataclass(frozen=True)
class Limit:
    """The most a plan may store: ``amount`` parameters, or bytes at the plan's precision when ``in_bytes``."""

    amount: int
    in_bytes: bool = False


def shared_limit(budget: Budget | str, full_params: Callable[[], int]) -> Limit:
    """What one budget for tasks that run at once limits, whichever way the levels are then chosen (``dvn plan``'s
    joint plan, ``plan_held_levels`` over fixed levels): bytes for a budget in bytes, else parameters, a share
    being of ``full_params()`` (every task at its top level). Whole numbers, floored: the decimal the user typed,
    not its float approximation.

    Raises:
        BadBudget: a level budget (it means nothing for several tasks at once), or a budget that does not parse.
    """
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    value = Fraction(repr(budget.value))
    if budget.kind == "level":
        raise BadBudget(
            f"budget {budget.text!r} is a level, which means nothing for several tasks at once: "
            "give parameters (250k, 1.2M), a share (40%) or bytes (2MB)"
        )
    if budget.kind == "bytes":
        return Limit(math.floor(value), in_bytes=True)
    if budget.kind == "params":
        return Limit(math.floor(value))
    return Limit(math.floor(value * full_params() / 100))


Counter = Callable[[dict[str, int]], int]
"""What (task -> level) choices running at once hold, each shared part counted once: bytes or parameters."""


def plan_held_levels(
    budget: Budget | str,
    levels: Mapping[str, Sequence[int]],
    held_bytes: Counter,
    held_params: Counter,
    full_params: Callable[[], int],
) -> tuple[dict[str, int], int]:
    """The levels one shared budget picks for tasks running at once when there is no validation accuracy to plan
    with (a shared export folder, a bundle, a checkpoint without it): what ``dvn plan`` limits (``shared_limit``:
    the shared bytes, or parameters, of every task, each shared part counted once), filled by
    ``fit_held_levels``. Both engines of ``dvn serve`` choose through it or ``dvn plan``'s joint plan.

    Args:
        budget: parameters, bytes or a share (of ``full_params()``); a level is refused.
        levels: task -> the levels it may run at.
        held_bytes, held_params: what choices hold together, each shared part once.
        full_params: the parameters of every task at its top level (asked only for a share; it may refuse).

    Returns:
        The choices and the bytes they hold.

    Raises:
        BadBudget: a budget that does not parse, a level, or one that even every task's smallest level exceeds.
    """
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    limit = shared_limit(budget, full_params)
    count = held_bytes if limit.in_bytes else held_params
    smallest = {task: min(held) for task, held in levels.items()}
    if count(smallest) > limit.amount:
        need_bytes, need_params = held_bytes(smallest), held_params(smallest)
        asked = format_bytes(limit.amount) if limit.in_bytes else f"{format_count(limit.amount)} parameters"
        at = ", ".join(f"{task} {level}" for task, level in smallest.items())
        raise BadBudget(
            f"budget {budget.text} ({asked}) fits no plan of {', '.join(levels)}: at their smallest levels "
            f"({at}) they need {format_bytes(need_bytes)} ({format_count(need_params)} parameters)"
        )
    choices, _ = fit_held_levels(levels, count, limit.amount)
    return choices, held_bytes(choices)


def fit_held_levels(
    levels: Mapping[str, Sequence[int]], held_bytes: Counter, budget: int
) -> tuple[dict[str, int], int]:
    """The levels of tasks running at once, among fixed held ones, whose blocks together fit ``budget`` bytes (or
    parameters, when ``held_bytes`` counts those).

    For files without validation accuracy to plan with (``plan_held_levels``): start from every task's largest
    level and, while the union does not fit, step down the task at the highest level (ties: the step that frees
    the most). ``held_bytes(choices)`` counts a block shared by two tasks once, as the runtime holds it.

    Returns:
        The choices and what they hold.

    Raises:
        BadBudget: even every task's smallest level does not fit.
    """
    choices = {task: max(held) for task, held in levels.items()}
    used = held_bytes(choices)
    while used > budget:
        lower = [task for task in choices if choices[task] > min(levels[task])]
        if not lower:
            raise BadBudget(f"{budget} bytes do not hold even every task's smallest level ({used} bytes)")
        top = max(choices[task] for task in lower)
        steps = [_step_down(choices, task, levels[task]) for task in lower if choices[task] == top]
        used, choices = min(((held_bytes(step), step) for step in steps), key=lambda counted: counted[0])
    return choices, used


def _step_down(choices: dict[str, int], task: str, held: Sequence[int]) -> dict[str, int]:
    return {**choices, task: max(level for level in held if level < choices[task])}
