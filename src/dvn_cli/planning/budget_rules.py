"""Budgets without a network (no torch): the forms a user writes, and the level a budget picks among fixed levels.

The four forms (``3``, ``250k``, ``40%``, ``2MB``) are described in ``planning/budgets.py``, which resolves them
against a network's own level costs. A file of fixed levels (a bundle, a compact model, a shared export) holds only
some levels and no network: ``held_level`` picks the largest held level whose cost meets the budget. Its one rule
serves ``dvn predict --budget`` on any model file (``planning.select.file_level``) and the torch-free server of a
shared export folder (``deploy/serve_folder.py``), which reads the costs from the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from ..core.sizes import LevelCost
from ..errors import BadBudget

__all__ = [
    "FORMS",
    "MAX_BUDGET",
    "Budget",
    "BudgetKind",
    "describe_budget",
    "fit_held_levels",
    "held_level",
    "parse_budget",
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


def fit_held_levels(
    levels: Mapping[str, Sequence[int]], held_bytes: Callable[[dict[str, int]], int], budget: int
) -> tuple[dict[str, int], int]:
    """The levels of tasks running at once, among fixed held ones, whose blocks together fit ``budget`` bytes.

    For files without validation accuracy to plan with (a shared export folder under ``dvn serve --budget auto``):
    start from every task's largest level and, while the union does not fit, step down the task at the highest
    level (ties: the step that frees the most bytes). ``held_bytes(choices)`` counts a block shared by two tasks
    once, as the runtime holds it.

    Returns:
        The choices and the bytes they hold.

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
