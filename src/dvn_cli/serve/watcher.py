"""``dvn serve --budget auto``: the running levels follow the memory a ``memory.MemorySource`` reads.

Every ``--poll`` seconds ``MemoryWatcher`` reads the source and turns the reading into a budget (``memory.
AutoBudget``: what is held and free, less the reserve): it shrinks at once to the plan that fits when what is held no
longer fits, and grows only to a plan that fits with the margin to spare. A room nothing fits leaves the levels
running, ``met`` false, and is said once, naming the memory seen, what is held, the reserve and the margin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import BadBudget, DvnError
from ..planning.budget_rules import format_bytes
from .engine import Engine, one_line
from .memory_source import AutoBudget, MemorySource

__all__ = ["MemoryWatcher"]

SwitchTo = Callable[[dict[str, int], str], Awaitable[float]]
"""How the watcher switches: ``switch(choices, budget)`` runs ``choices``, planned for ``budget`` ("auto: 5B")."""


class MemoryWatcher:
    """The levels of ``engine`` for the memory ``memory`` reads, and the loop that follows it.

    Args:
        engine: what runs the levels (one that ``plans``).
        auto: the reserve and margin.
        memory: the bytes the process may still take.
        log: where a switch that fails, or a room nothing fits, is said (once).
    """

    def __init__(self, engine: Engine, auto: AutoBudget, memory: MemorySource, log: Callable[[str], None]) -> None:
        self.engine, self.auto, self.memory, self.log = engine, auto, memory, log
        self.met = True  # whether the levels fit the last reading
        self._stuck = ""  # the last message, said once

    def first(self) -> tuple[dict[str, int], str]:
        """The levels to start with, nothing held yet, and the budget they are planned for (``auto: 5B``).

        Raises:
            BadBudget: a room nothing fits (``fit``).
        """
        available = self.memory()
        budget, shrink = self.auto.budget(available, 0)
        choices, _ = self.fit(available, 0, budget, shrink)
        return choices, f"auto: {budget}B"

    def fit(self, available: int, held: int, budget: int, shrink: bool) -> tuple[dict[str, int], int]:
        """``engine.fit`` for the bytes ``--budget auto`` leaves (``AutoBudget.budget``: what is ``held`` and
        ``available``, less the reserve, and less the margin unless it must ``shrink``), or a ``BadBudget`` naming
        each of those."""
        seen = f"{format_bytes(available)} free"
        seen += f" and {format_bytes(held)} held" if held else ""
        less = [f"--reserve {format_bytes(self.auto.reserve)}"] if self.auto.reserve else []
        less += [] if shrink or not self.auto.margin else [f"the {self.auto.margin:.0%} margin"]
        seen += f", less {' and '.join(less)}," if less else ""
        if budget < 1:
            raise BadBudget(f"--budget auto: {seen} leaves no room for any level")
        try:
            return self.engine.fit(budget)
        except BadBudget as exc:
            raise BadBudget(f"--budget auto: {seen} leaves {format_bytes(budget)}: {one_line(exc)}") from None

    async def watch(self, poll_s: float, switch: SwitchTo) -> None:
        """Follow the memory every ``poll_s`` seconds until cancelled; an error is said once and the levels stay."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.follow(switch)
            except DvnError as exc:  # ``fit``'s words already start so
                message = one_line(exc)
                self._say_once(message if message.startswith("--budget auto") else f"--budget auto: {message}")

    async def follow(self, switch: SwitchTo) -> None:
        """One reading: shrink to what fits the room (a room nothing fits: the levels keep running, ``met`` false),
        or grow to a plan that fits it with the margin to spare."""
        available = await asyncio.to_thread(self.memory)
        held = self.engine.held_bytes()
        budget, shrink = self.auto.budget(available, held)
        try:
            choices, planned = await asyncio.to_thread(self.fit, available, held, budget, shrink)
        except BadBudget:
            if not shrink:  # what runs fits the room; only nothing smaller than it fits the margin: no switch
                self.met, self._stuck = True, ""
                return
            self.met = False
            raise
        self.met, self._stuck = True, ""
        if choices == self.engine.choices or (not shrink and planned <= held):
            return
        await switch(choices, f"auto: {budget}B")

    def _say_once(self, message: str) -> None:
        if message != self._stuck:
            self._stuck = message
            self.log(message)
