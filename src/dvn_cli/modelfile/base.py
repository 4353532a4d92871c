"""One reader for every dvn model file: ``open_model(path)`` and the ``ModelFile`` interface.

A checkpoint (``dvn-checkpoint``: every task at every level), a compact model (``dvn-compact``: one (task, level)
as a plain network) and a bundle (``dvn-bundle``: one level per task, shared unit blocks stored once) answer the
same questions: which (task, level)s they hold, the plain network, spec and cost of one of them, how the
training run split its data, and what the run reported. Commands ask these questions and never ask which kind
of file they hold. A new kind registers its reader under its format name with ``register_model_file``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import BadBudget, BadConfig, UnknownTask
from ..fsutil import sha256_file
from .container import read_metadata

if TYPE_CHECKING:
    from ..config import TaskSpec
    from ..core.cost import LevelCost
    from ..core.plain import PlainNetwork
    from .compact import CompactSpec

__all__ = ["MODEL_FILES", "DataSplit", "ModelFile", "open_model", "register_model_file"]

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DataSplit:
    """How the training run carved its validation images, so that ``eval --split val`` carves the same ones."""

    val_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DataSplit:
        values = values or {}
        return cls(float(values.get("val_fraction", 0.1)), int(values.get("seed", 0)))


class ModelFile(ABC):
    """What every dvn model file answers. Tasks are names; levels are ``1..k``."""

    format: ClassVar[str]  # the format name in the file's metadata
    kind: ClassVar[str]  # what messages call it: "checkpoint", "compact model", "bundle"
    path: Path | None
    split: DataSplit  # the training run's validation split settings
    training: dict[str, Any]  # the training run's summary (empty when the file does not carry it)
    _sha256: str | None = None  # the file's sha256, computed on first use

    @abstractmethod
    def pairs(self) -> list[tuple[str, int]]:
        """Every (task, level) the file holds, in task order, levels ascending."""

    @abstractmethod
    def task_spec(self, task: str) -> TaskSpec:
        """Classes, normalisation and resize of a task the file holds."""

    @abstractmethod
    def spec_of(self, task: str, level: int) -> CompactSpec:
        """Plain backbone, task, units and cost of one (task, level): what a compact model of it records."""

    @abstractmethod
    def plain_of(self, task: str, level: int) -> PlainNetwork:
        """One (task, level) as an ordinary network in eval mode."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``dvn info`` shows, as plain data."""

    # ------------------------------------------------------------------ shared behaviour

    @property
    def label(self) -> str:
        """How messages name this file."""
        return str(self.path) if self.path is not None else f"this {self.kind}"

    @property
    def file_sha256(self) -> str:
        """sha256 of the file's bytes ("" for a model that was never written)."""
        if self.path is None or not self.path.is_file():
            return ""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(task for task, _ in self.pairs()))

    def levels(self, task: str) -> list[int]:
        """Levels of ``task`` the file holds."""
        self.check_task(task)
        return [level for name, level in self.pairs() if name == task]

    def cost_of(self, task: str, level: int) -> LevelCost:
        return self.spec_of(task, level).cost

    def forward(self, task: str, level: int) -> Forward:
        """A function from a preprocessed batch to logits of (task, level)."""
        return self.plain_of(task, level)

    def check_task(self, task: str) -> None:
        if task not in self.task_names():
            raise UnknownTask(f"unknown task {task!r}; {self.label} has: {', '.join(self.task_names())}")

    def check_pair(self, task: str, level: int, verb: str = "use") -> None:
        """Refuse a (task, level) the file does not hold, saying what it holds."""
        if (task, level) not in self.pairs():
            held = ", ".join(f"{name} level {lv}" for name, lv in self.pairs())
            raise UnknownTask(f"{self.label} holds only {held}; {verb} the full checkpoint for other levels")

    def resolve_budget(self, task: str, budget: str) -> int:
        """The level of ``task`` a budget selects; a file of fixed levels keeps its level if it meets the budget."""
        from ..planning.budgets import describe_budget, parse_budget

        self.check_task(task)
        parsed = parse_budget(budget)
        (level,) = self.levels(task)
        cost = self.cost_of(task, level)
        too_big = {
            "level": parsed.value != level,
            "params": cost.params_total > parsed.value,
            "bytes": cost.bytes > parsed.value,
            "share": False,  # a share of the full network, which this file does not hold: nothing to compare
        }[parsed.kind]
        if too_big:
            raise BadBudget(
                f"{self.label} holds only {task} level {level}, which does not meet budget {describe_budget(parsed)}; "
                f"a {self.format} file holds fixed levels: use the full checkpoint for other levels"
            )
        return level

    def select(self, tasks: Sequence[str] | None = None, budget: str | None = None) -> list[tuple[str, int]]:
        """The (task, level)s that ``--task`` and ``--budget`` pick: every held level, or one level per task."""
        names = list(tasks) if tasks else self.task_names()
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise BadConfig(f"task(s) listed more than once: {', '.join(twice)}")
        for name in names:
            self.check_task(name)
        if budget is None:
            return [(name, level) for name in names for level in self.levels(name)]
        return [(name, self.resolve_budget(name, budget)) for name in names]


MODEL_FILES: dict[str, Callable[[Path], ModelFile]] = {}
"""Format name -> reader of that kind of model file."""


def register_model_file(fmt: str, reader: Callable[[Path], ModelFile]) -> None:
    """Make ``open_model`` read files of format ``fmt`` with ``reader(path)``; names are unique."""
    if fmt in MODEL_FILES:
        raise ValueError(f"model file format {fmt!r} is already registered")
    MODEL_FILES[fmt] = reader


def open_model(path: str | os.PathLike, formats: Sequence[str] | None = None) -> ModelFile:
    """Read any dvn model file (or only those of ``formats``), refusing other files in one line."""
    from . import bundle, checkpoint, compact  # noqa: F401  (each registers its reader)

    path = Path(path)
    meta = read_metadata(path, tuple(formats) if formats else tuple(MODEL_FILES))
    return MODEL_FILES[meta["format"]](path)
