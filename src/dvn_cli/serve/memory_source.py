"""How much memory a server may still take, and the budget it should run at (``dvn serve --budget auto``).

A ``MemorySource`` answers one question, the bytes this process may still allocate: under a cgroup v2 memory limit
that is ``memory.max - memory.current`` (the tightest over the process's cgroup and its parents), else the kernel's
``MemAvailable``. A source is a plain function so that tests and benchmarks inject their own (``file_memory``: a
number of bytes in a file they rewrite).

``AutoBudget`` turns a reading into the budget the server should plan for, with hysteresis: the model may use what
it holds plus what is free, less the reserve; it SHRINKS as soon as what it holds no longer fits, but GROWS only to
a plan that fits with ``margin`` to spare, so a reading that wobbles around one plan's size does not flap the
levels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadBudget, BadConfig
from ..planning.budget_rules import parse_budget

__all__ = [
    "AutoBudget",
    "MemorySource",
    "cgroup_available",
    "file_memory",
    "meminfo_available",
    "reserve_bytes",
    "system_memory",
]

MemorySource = Callable[[], int]
"""Bytes the process may still allocate; raises ``BadConfig`` when it cannot tell."""


def cgroup_available(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """``memory.max - memory.current`` of the tightest limited cgroup (v2) holding this process; None: no limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)  # v2: the one "0::/path" line
    if relative is None:
        return None
    folder = (root / relative.lstrip("/")).resolve()
    tightest = None
    while folder == root or root in folder.parents:
        try:
            limit = (folder / "memory.max").read_text().strip()
            if limit != "max":
                left = int(limit) - int((folder / "memory.current").read_text())
                tightest = left if tightest is None else min(tightest, left)
        except (OSError, ValueError):
            pass  # the root cgroup has no memory.max; a controller may be off in one level
        if folder == root:
            break
        folder = folder.parent
    return None if tightest is None else max(tightest, 0)


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int:
    """The kernel's estimate of the memory that can be allocated without swapping (``MemAvailable``), in bytes."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    raise BadConfig(f"cannot read MemAvailable from {path}; --budget auto needs Linux memory accounting")


def system_memory() -> int:
    """The memory this process may still take: its cgroup limit's room where one is set, else ``MemAvailable``."""
    limited = cgroup_available()
    return limited if limited is not None else meminfo_available()


def file_memory(path: str | os.PathLike) -> MemorySource:
    """A source that reads a whole number of bytes from ``path`` at each reading (tests and benchmarks write it,
    by renaming a new file over it: a reading of half a number is an error, said once, and the levels stay)."""
    path = Path(path)

    def read() -> int:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise BadConfig(f"cannot read a number of bytes from {path}: {exc}") from None

    return read


@dataclass(frozen=True)
class AutoBudget:
    """The budget to plan for at each memory reading.

    Args:
        reserve: bytes left free for the rest of the device.
        margin: a larger plan is taken only when it fits with this share to spare (hysteresis).
    """

    reserve: int = 0
    margin: float = 0.1

    def __post_init__(self) -> None:
        if self.reserve < 0 or not 0 <= self.margin < 1:
            raise BadConfig(f"a reserve must be >= 0 and a margin in [0, 1), got {self.reserve} and {self.margin}")

    def room(self, available: int, held: int) -> int:
        """Bytes the model may hold: what it holds now and what is free, less the reserve."""
        return held + available - self.reserve

    def budget(self, available: int, held: int) -> tuple[int, bool]:
        """(bytes to plan for, whether the levels MUST shrink): the room when what is held no longer fits, else
        the room less the margin (a plan of that size or smaller changes nothing unless it is larger than held)."""
        room = self.room(available, held)
        if room < held:
            return room, True
        return int(room * (1 - self.margin)), False


def reserve_bytes(text: str) -> int:
    """``--reserve``: a number of bytes as a budget writes them (``500MB``, ``1GiB``; ``0B`` for none)."""
    stripped = str(text).strip()
    if stripped.rstrip("bB").strip() in ("0", "0.0"):
        return 0
    try:
        budget = parse_budget(stripped)
    except BadBudget:
        budget = None
    if budget is None or budget.kind != "bytes":
        shown = stripped if len(stripped) <= 40 else f"{stripped[:24]}…"
        raise BadConfig(f"--reserve {shown!r} is not a size in bytes; write e.g. 500MB, 1GiB or 1TB")
    return int(budget.value)
