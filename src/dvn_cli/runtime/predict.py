"""``dvn predict``: the top classes of image files, with any model file.

Images are converted and normalised per task as that task's training images were (``data.pixels.load_image``,
``normalize_batch``). A checkpoint or a bundle runs every chosen (task, level) at once from one store of unit
blocks (``runtime.shared.SharedRuntime``); a compact model runs its plain network, a shared export its onnxruntime
sessions. ``predict_under_budgets`` runs the images under several shared budgets in turn, switching one runtime's
levels between them, as a device whose free memory changes would.

Image files are untrusted input: which files are read, and which are skipped and why, is ``runtime.images``'s
(``ImageSet``, ``image_files``; an image declaring more than ``MAX_IMAGE_PIXELS`` is refused from its header by
``oversized_image``). Every file skipped is reported, with why, to the caller's ``on_skipped``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.batches import normalize_batch
from ..data.decode import MAX_IMAGE_PIXELS, oversized_image
from ..data.pixels import load_image
from ..errors import BadBudget, BadConfig
from ..modelfile.base import ModelFile
from ..planning.plan import plan_budget_params
from ..planning.select import select_pairs
from .images import ImageSet, OnSkipped, image_files
from .rows import prediction_rows, top_classes
from .runner import ModelRunner
from .shared import SharedRuntime

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageSet",
    "OnSkipped",
    "Predictions",
    "classify",
    "image_files",
    "image_inputs",
    "oversized_image",
    "predict_images",
    "predict_under_budgets",
]

BATCH_SIZE = 64


@dataclass
class Predictions:
    """What ``predict_images`` found: one row per (readable image, task[, budget]), the files it skipped, and,
    under several budgets, one entry per switch of the runtime."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    switches: list[dict[str, Any]] = field(default_factory=list)


def predict_images(
    model: ModelFile,
    paths: Sequence[str | os.PathLike],
    tasks: Sequence[str] | None = None,
    budget: str | None = None,
    top: int = 5,
    on_skipped: OnSkipped | None = None,
) -> Predictions:
    """The ``top`` classes and probabilities of every image for every chosen task.

    Args:
        model: any model file.
        paths: image files and folders of them.
        tasks: the tasks to run (default: all the file holds).
        budget: what ``--budget`` picks per task (``planning.select``); without one, each task's largest level.
        top: how many classes per image and task (fewer when the task has fewer).
        on_skipped: called with each file skipped (not a regular file, too many pixels, not an image) and why.

    Returns:
        Rows ``{"image", "task", "level", "top": [{"class", "probability"}, ...]}``, image by image, and the
        skipped files.

    Raises:
        MissingData, BadConfig: a missing or unusable path, ``top < 1``, or no readable image at all.
    """
    _check_top(top)
    choices: dict[str, int] = {}
    for task, level in select_pairs(model, tasks, budget):
        choices[task] = max(level, choices.get(task, 0))
    specs = {task: model.spec_of(task, level) for task, level in choices.items()}
    images = ImageSet.read(paths, *image_inputs(specs), load_image, on_skipped)
    forwards = ModelRunner(model).forwards(choices)
    return Predictions(classify(images, specs, forwards, choices, top), images.skipped)


def predict_under_budgets(
    model: ModelFile,
    paths: Sequence[str | os.PathLike],
    budgets: Sequence[str],
    tasks: Sequence[str] | None = None,
    top: int = 5,
    on_skipped: OnSkipped | None = None,
    on_switch: Callable[[dict[str, Any]], None] | None = None,
) -> Predictions:
    """Every image under each shared budget in turn, from ONE runtime that re-plans and switches between them.

    The memory a device grants changes while it runs: each budget re-plans the levels of the tasks running at once
    (``SharedRuntime.set_budget``, the plan of ``dvn plan``), reads only the blocks the new levels lack and
    releases the rest. A budget no plan fits is reported (``on_switch`` gets its ``error``) and the images run
    under the levels already running, as the runtime keeps serving its previous choice; their rows say so
    (``"met": False``), so that no row claims a budget it was not run under.

    Returns:
        Rows as ``predict_images`` gives, each with its ``budget`` and whether its levels meet it (``met``);
        ``switches``: per budget the ``choices``, the shared ``memory_bytes``, the time ``load_ms`` (the first) or
        ``switch_ms`` (the others), or the ``error``.

    Raises:
        BadConfig, BadBudget: a file without unit blocks or validation accuracy, no budget, a budget that does not
            parse or is a level, or a FIRST budget no plan fits (nothing runs yet to keep serving).
    """
    _check_top(top)
    if not budgets:
        raise BadConfig("name at least one budget")
    start = time.perf_counter()
    runtime, plan = SharedRuntime.for_budget(model, budgets[0], tasks)
    switch_ms = 1000 * (time.perf_counter() - start)
    names = list(plan.choices)
    for later in budgets[1:]:  # a budget that does not parse, or a level, is refused before anything runs
        plan_budget_params(runtime.network, later, names)
    specs = {task: model.spec_of(task, model.levels(task)[-1]) for task in names}  # input shape and preprocessing
    images = ImageSet.read(paths, *image_inputs(specs), load_image, on_skipped)
    forwards = {task: (lambda x, task=task: runtime(x, task)) for task in names}
    result = Predictions(skipped=images.skipped)
    for i, budget in enumerate(budgets):
        switch: dict[str, Any] = {"budget": budget}
        if i > 0:
            start = time.perf_counter()
            try:
                plan = runtime.set_budget(budget, names)
                switch_ms = 1000 * (time.perf_counter() - start)
            except BadBudget as exc:
                switch["error"] = str(exc)
        if "error" not in switch:
            timing = "switch_ms" if i > 0 else "load_ms"  # the first budget opens the runtime
            switch |= {"choices": dict(plan.choices), "memory_bytes": plan.memory_bytes, timing: switch_ms}
        result.switches.append(switch)
        if on_switch is not None:
            on_switch(switch)
        rows = classify(images, specs, forwards, runtime.choices, top)
        result.rows += [{**row, "budget": budget, "met": "error" not in switch} for row in rows]
    return result


def _check_top(top: int) -> None:
    if top < 1:
        raise BadConfig(f"--top must be at least 1, got {top}")


def image_inputs(specs: Mapping[str, Any]) -> tuple[tuple[int, int], list[str]]:
    """((channels, size), resize methods) the images of ``specs`` (task -> spec) are decoded at: every task of a
    file shares its backbone's input."""
    backbone = next(iter(specs.values())).backbone
    return (backbone.in_channels, backbone.input_size), [spec.task.resize for spec in specs.values()]


def classify(
    images: ImageSet, specs: dict, forwards: dict[str, Callable], choices: dict[str, int], top: int
) -> list[dict[str, Any]]:
    """Rows ``{"image", "task", "level", "top"}`` of every readable image for every task, image by image: the
    JSON rows of ``dvn predict --json`` and ``dvn serve`` (``rows.prediction_rows``).

    Args:
        forwards: task -> a function from a normalised batch to logits.
        choices: task -> the level its forward runs (what the rows say).
    """
    tops: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for task in choices:
        spec = specs[task]
        for start in range(0, len(images.readable), BATCH_SIZE):
            chunk = images.readable[start : start + BATCH_SIZE]
            x = normalize_batch(torch.stack([images.by_resize[spec.task.resize][p] for p in chunk]), spec.task)
            with torch.no_grad():
                probs = torch.softmax(forwards[task](x).float(), dim=1)
            for path, classes in zip(chunk, top_classes(probs.numpy(), spec.task.classes, top), strict=True):
                tops[path, task] = classes
    return prediction_rows(images.readable, choices, tops)
