"""``dvn predict``: the top classes of image files, with any model file.

Images are converted and normalised per task as that task's training images were (``data.datasets.load_image``,
``normalize_batch``). A checkpoint or a bundle runs every chosen (task, level) at once from one store of unit
blocks (``deploy.runtime.SharedRuntime``); a compact model runs its plain network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import load_image, normalize_batch
from ..errors import BadConfig, MissingData
from ..modelfile.base import ModelFile
from .runtime import SharedRuntime

__all__ = ["Predictions", "image_files", "predict_images"]

BATCH_SIZE = 64


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every file named, and every file under every folder named (sorted, hidden ones skipped), in order.

    Raises:
        MissingData: a path that does not exist.
        BadConfig: a path that is neither a regular file nor a folder, or a folder without files.
    """
    if not paths:
        raise BadConfig("name at least one image file or folder")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise BadConfig(f"{path} is a folder without image files")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists() or path.is_symlink():
            what = "a broken link" if not path.exists() else "not a regular file or folder"
            raise BadConfig(f"{path} is {what}; name image files or folders of them")
        else:
            raise MissingData(f"no such file or folder: {path}")
    return list(dict.fromkeys(files))


@dataclass
class Predictions:
    """What ``predict_images`` found: one row per (readable image, task), and the files it could not read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def predict_images(
    model: ModelFile,
    paths: Sequence[str | os.PathLike],
    tasks: Sequence[str] | None = None,
    budget: str | None = None,
    top: int = 5,
    on_unreadable: Callable[[Path], None] | None = None,
) -> Predictions:
    """The ``top`` classes and probabilities of every image for every chosen task.

    Args:
        model: any model file.
        paths: image files and folders of them.
        tasks: the tasks to run (default: all the file holds).
        budget: what ``--budget`` picks per task (``ModelFile.select``); without one, each task's largest level.
        top: how many classes per image and task (fewer when the task has fewer).
        on_unreadable: called with each file that cannot be read as an image (it is skipped).

    Returns:
        Rows ``{"image", "task", "level", "top": [{"class", "probability"}, ...]}``, image by image, and the
        unreadable files.

    Raises:
        MissingData, BadConfig: a missing or unusable path, ``top < 1``, or no readable image at all.
    """
    if top < 1:
        raise BadConfig(f"--top must be at least 1, got {top}")
    choices: dict[str, int] = {}
    for task, level in model.select(tasks, budget):
        choices[task] = max(level, choices.get(task, 0))
    files = image_files(paths)
    specs = {task: model.spec_of(task, level) for task, level in choices.items()}
    backbone = next(iter(specs.values())).backbone
    if model.holds_unit_blocks:
        runtime = SharedRuntime.from_model(model, choices)
        forwards = {task: (lambda x, task=task: runtime(x, task)) for task in choices}
    else:
        forwards = {task: model.forward(task, level) for task, level in choices.items()}

    images: dict[str, dict[Path, torch.Tensor]] = {}  # resize method -> file -> uint8 (C, H, W)
    unreadable: set[Path] = set()
    channels, size = backbone.in_channels, backbone.input_size
    for resize in dict.fromkeys(spec.task.resize for spec in specs.values()):
        images[resize] = {}
        for path in files:
            image = None if path in unreadable else load_image(path, channels, size, resize)
            if image is not None:
                images[resize][path] = image
            elif path not in unreadable:
                unreadable.add(path)
                if on_unreadable is not None:
                    on_unreadable(path)
    result = Predictions(unreadable=[path for path in files if path in unreadable])
    readable = [path for path in files if path not in unreadable]
    if not readable:
        raise BadConfig(f"none of the {len(files)} file(s) could be read as an image")

    tops: dict[tuple[Path, str], list[dict[str, Any]]] = {}
    for task, spec in specs.items():
        classes = spec.task.classes
        k = min(top, len(classes))
        for start in range(0, len(readable), BATCH_SIZE):
            chunk = readable[start : start + BATCH_SIZE]
            x = normalize_batch(torch.stack([images[spec.task.resize][p] for p in chunk]), spec.task)
            with torch.no_grad():
                probs = torch.softmax(forwards[task](x).float(), dim=1)
            values, indices = probs.topk(k, dim=1)
            for path, vs, ix in zip(chunk, values.tolist(), indices.tolist(), strict=True):
                tops[path, task] = [{"class": classes[i], "probability": v} for v, i in zip(vs, ix, strict=True)]
    result.rows = [
        {"image": str(path), "task": task, "level": level, "top": tops[path, task]}
        for path in readable
        for task, level in choices.items()
    ]
    return result
