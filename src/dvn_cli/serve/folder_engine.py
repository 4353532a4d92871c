"""The engine of ``dvn serve`` for a shared export folder, without PyTorch: onnxruntime and numpy only.

``FolderEngine`` is what ``serve.app.Server`` runs for a folder ``dvn export --shared`` wrote: the folder read
and checked by ``modelfile.shared_folder.SharedFolder`` (untrusted input), every (task, level) run by ONE
``runtime.ort.SharedOrtRuntime`` (each block in memory once), images prepared by ``data.decode`` (PIL and
numpy: the pixels and float32 inputs ``dvn predict`` computes with torch), rows built by ``runtime.rows`` as ``dvn
predict --json`` builds them. A budget means what it means to ``dvn plan``: what every task served holds together,
each tensor counted once (the bytes of the weights file's tensors, or their parameters); with no validation accuracy
to plan with, the levels are chosen by ``planning.budget_rules.plan_held_levels``, and a budget that even the
smallest levels exceed is refused. A process serving a folder never imports torch (``tests/test_serve_folder.py``
serves one where ``import torch`` fails).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.sizes import LevelCost
from ..data.decode import RESIZE_METHODS, input_image, normalize_images
from ..errors import BadBudget, WrongFileFormat
from ..modelfile.shared_folder import MANIFEST_NAME
from ..planning.budget_rules import plan_held_levels
from ..runtime.images import ImageSet
from ..runtime.ort import SharedOrtRuntime
from ..runtime.rows import prediction_rows, softmax, top_classes

__all__ = ["FolderEngine", "FolderPair"]


@dataclass(frozen=True)
class FolderPair:
    """What serving one (task, level) takes from its manifest entry: classes in output order, how an image becomes
    its input, its cost (the counts ``dvn predict --budget`` compares, from the entry's spec) and ``k``, the
    network's number of units (a share is of every task at level ``k``)."""

    classes: tuple[str, ...]
    channels: int
    size: int
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cost: LevelCost
    k: int

    @classmethod
    def of(cls, entry: Mapping[str, Any], where: str) -> FolderPair:
        """The pair of a manifest entry (its ports and input shape already checked by ``SharedFolder``).

        Raises:
            WrongFileFormat: classes, resize method, statistics or counts that are missing or of the wrong kind.
        """
        pre, spec = entry["preprocess"], entry.get("spec")
        counts = spec if isinstance(spec, dict) else {}
        classes: Any = entry.get("classes")
        checks = {
            "classes": isinstance(classes, list) and len(classes) > 0 and all(isinstance(c, str) for c in classes),
            "preprocess.resize": pre.get("resize") in RESIZE_METHODS,
            "square preprocess.height and width": pre["height"] == pre["width"],
            "preprocess.mean": _numbers(pre.get("mean"), pre["channels"]),
            "preprocess.std": _numbers(pre.get("std"), pre["channels"]) and min(pre["std"]) > 0,
            "spec counts": all(
                type(counts.get(k)) is int and counts[k] >= 0 for k in ("params", "params_total", "macs")
            ),
            "spec k": type(counts.get("k")) is int and counts["k"] >= entry["level"],
        }
        wrong = next((what for what, ok in checks.items() if not ok), None)
        if wrong is not None:
            raise WrongFileFormat(
                f"{where} has no valid {wrong} for {entry['task']} level {entry['level']}; export again"
            )
        cost = LevelCost(counts["params"], counts["params_total"], counts["macs"])
        return cls(
            tuple(classes),
            pre["channels"],
            pre["height"],
            pre["resize"],
            tuple(pre["mean"]),
            tuple(pre["std"]),
            cost,
            counts["k"],
        )


def _numbers(values: Any, channels: int) -> bool:
    """A list of one finite number per channel (or one for all)."""
    return (
        isinstance(values, list)
        and len(values) in (1, channels)
        and all(type(v) in (int, float) and math.isfinite(v) for v in values)
    )


class FolderEngine:
    """The (task, level)s of a shared export folder, run by onnxruntime, and how they switch (``serve.engine.Engine``).

    Args:
        folder: the folder ``dvn export --shared`` wrote.

    Raises:
        MissingData, WrongFileFormat: what ``SharedFolder`` refuses; an entry ``FolderPair.of`` refuses; tasks
            whose inputs differ in channels or size. When a level starts running: a graph that is not the one its
            entry describes (``SharedOrtRuntime.session``).
    """

    plans = True  # ``fit``: fixed levels chosen jointly by the bytes they hold (no accuracy to plan with)
    shared = True

    def __init__(self, folder: str | os.PathLike) -> None:
        self.runtime = SharedOrtRuntime(folder)
        self.files = self.runtime.files
        where = str(self.files.folder / MANIFEST_NAME)
        self.pairs = {pair: FolderPair.of(entry, where) for pair, entry in self.files.models.items()}
        if not self.pairs:
            raise WrongFileFormat(f"{where} lists no models")
        shapes = {(p.channels, p.size) for p in self.pairs.values()}
        if len(shapes) > 1:
            raise WrongFileFormat(f"{where}: its models take inputs of different shapes {sorted(shapes)}; export again")
        (self.shape,) = shapes
        self.tasks = list(dict.fromkeys(task for task, _ in self.pairs))
        self.choices: dict[str, int] = {}

    def levels(self, task: str) -> dict[int, LevelCost]:
        """The levels the folder holds of ``task`` and their costs."""
        return {level: pair.cost for (name, level), pair in self.pairs.items() if name == task}

    def plan(self, budget: str | None) -> tuple[dict[str, int], int]:
        """The levels ``budget`` picks for every task together (``budget_rules.plan_held_levels``: what they hold,
        each tensor once, within it), and the bytes they hold; every task's largest level without one.

        Raises:
            BadBudget: a budget that does not parse, a level, a share of a folder without every task's top level,
                or a budget that every task's smallest level together exceeds.
        """
        if budget is None:
            choices = {task: max(self.levels(task)) for task in self.tasks}
            return choices, self._held_bytes(choices)
        levels = {task: sorted(self.levels(task)) for task in self.tasks}
        return plan_held_levels(budget, levels, self._held_bytes, self._held_params, self._full_params)

    def fit(self, budget: int) -> tuple[dict[str, int], int]:
        """The running levels for ``budget`` bytes: ``plan`` of that many bytes."""
        return self.plan(f"{budget}B")

    def _held_bytes(self, choices: dict[str, int]) -> int:
        return self.files.held_bytes(choices.items())

    def _held_params(self, choices: dict[str, int]) -> int:
        return self.files.held_params(choices.items())

    def _full_params(self) -> int:
        """Parameters of every task at level ``k`` (what a share is of), when the folder holds those levels."""
        k = max(pair.k for pair in self.pairs.values())
        if any((task, k) not in self.pairs for task in self.tasks):
            raise BadBudget(
                f"a share is of every task at its top level ({k}), which {self.files.folder} does not hold: "
                "give bytes (2MB) or parameters (250k)"
            )
        return self._held_params(dict.fromkeys(self.tasks, k))

    def switch(self, choices: dict[str, int]) -> None:
        """Run ``choices``: each level's session is made (its graph checked, its tensors read) before it serves, then
        the sessions and tensors of the levels no longer running are released."""
        for task, level in choices.items():
            self.runtime.session(task, level)
        self.runtime.keep(choices.items())
        self.choices = dict(choices)

    def held_bytes(self) -> int:
        """Bytes of the tensors the runtime holds (each once): after a switch, the running levels' only."""
        return sum(array.nbytes for array in self.runtime.arrays.values())

    def decode(self, sources: Mapping[Any, bytes], on_skipped: Callable[[Any, str], None]) -> ImageSet:
        resizes = [pair.resize for pair in self.pairs.values()]
        return ImageSet.decode(sources, self.shape, resizes, input_image, on_skipped)

    def classify(self, images: ImageSet, running: dict[str, int], top: int) -> list[dict[str, Any]]:
        tops: dict[tuple[Any, str], list[dict[str, Any]]] = {}
        for task, level in running.items():
            pair = self.pairs[task, level]
            batch = np.stack([images.by_resize[pair.resize][name] for name in images.readable])
            logits = self.runtime.run(task, level, normalize_images(batch, pair.mean, pair.std))
            if logits.shape != (len(batch), len(pair.classes)):
                raise WrongFileFormat(
                    f"{task} level {level} of {self.files.folder} gives {logits.shape[-1]} scores per image for "
                    f"{len(pair.classes)} classes; export again"
                )
            for name, classes in zip(images.readable, top_classes(softmax(logits), pair.classes, top), strict=True):
                tops[name, task] = classes
        return prediction_rows(images.readable, running, tops)
