"""``dvn predict``: the top classes of image files, with any model file.

Images are converted and normalised per task as that task's training images were (``data.datasets.load_image``,
``normalize_batch``). A checkpoint or a bundle runs every chosen (task, level) at once from one store of unit
blocks (``deploy.runtime.SharedRuntime``); a compact model runs its plain network, a shared export its onnxruntime
sessions. ``predict_under_budgets`` runs the images under several shared budgets in turn, switching one runtime's
levels between them, as a device whose free memory changes would.

Image files are untrusted input: a folder's entries that are not regular files (a FIFO, a link to a device) are
never opened, and an image whose header declares more than ``MAX_IMAGE_PIXELS`` is refused from its header,
before anything is decoded. Every file skipped is reported, with why, to the caller's ``on_skipped``.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ..data.batches import normalize_batch
from ..data.pixels import load_image
from ..errors import BadBudget, BadConfig, MissingData
from ..modelfile.base import ModelFile
from ..planning.plan import plan_budget_params
from ..planning.select import select_pairs
from .run import ModelRunner
from .runtime import SharedRuntime

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageSet",
    "OnSkipped",
    "Predictions",
    "classify",
    "image_files",
    "oversized_image",
    "predict_images",
    "predict_under_budgets",
]

BATCH_SIZE = 64
MAX_IMAGE_PIXELS = 8192 * 8192
"""The most pixels (width x height) an image file may declare; a larger one is refused from its header, before
decoding (a decompression bomb declares billions in a few bytes). Below PIL's own warning threshold (89.5M), so
PIL never warns. Whatever decodes images for a model (``dvn predict``, a server) bounds them with this."""

OnSkipped = Callable[[Path, str], None]
"""Called with each file that is skipped and a sentence that names it and says why."""


def image_files(paths: Sequence[str | os.PathLike], on_skipped: OnSkipped | None = None) -> list[Path]:
    """Every file named, and every regular file under every folder named (sorted, hidden ones left out), in order.

    A folder's entries that are not regular files (a FIFO, a device or a link to one, a broken link) are skipped
    and reported to ``on_skipped``: reading one could block or never end.

    Raises:
        MissingData: a path that does not exist.
        BadConfig: a path that is neither a regular file nor a folder, or a folder without regular files.
    """
    if not paths:
        raise BadConfig("name at least one image file or folder")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = []
            for entry in sorted(p for p in path.rglob("*") if not p.name.startswith(".") and not p.is_dir()):
                if entry.is_file():
                    found.append(entry)
                elif on_skipped is not None:
                    on_skipped(entry, f"{entry} is not a regular file")
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
    images = ImageSet.read(paths, specs, on_skipped)
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
    images = ImageSet.read(paths, specs, on_skipped)
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


@dataclass
class ImageSet:
    """The readable images as uint8 ``(C, H, W)`` per resize method, read once whatever runs on them.

    Images are keyed by name: a file's ``Path``, or whatever names an image received in memory (a row's ``image`` is
    ``str(name)``), so ``dvn predict`` and ``dvn serve`` decode through the same path.
    """

    readable: list[Any]
    skipped: list[Any]
    by_resize: dict[str, dict[Any, torch.Tensor]]

    @classmethod
    def read(cls, paths: Sequence[str | os.PathLike], specs: dict, on_skipped: OnSkipped | None) -> ImageSet:
        """The image files named, and those under the folders named (``image_files``); what is skipped is named."""
        passed_over: list[Path] = []

        def skip(path: Path, why: str) -> None:
            passed_over.append(path)
            if on_skipped is not None:
                on_skipped(path, why)

        files = image_files(paths, skip)
        images = cls.decode({path: path for path in files}, specs, on_skipped)
        images.skipped[:0] = passed_over
        return images

    @classmethod
    def decode(cls, sources: Mapping[Any, Path | bytes], specs: dict, on_skipped: OnSkipped | None) -> ImageSet:
        """Name -> a file or the bytes of an encoded image, decoded for every resize method ``specs`` use; one
        whose header declares too many pixels (``oversized_image``) is skipped before decoding.

        Raises:
            BadConfig: none of them could be read as an image.
        """
        backbone = next(iter(specs.values())).backbone
        channels, size = backbone.in_channels, backbone.input_size
        skipped: list[Any] = []

        def skip(name: Any, why: str) -> None:
            skipped.append(name)
            if on_skipped is not None:
                on_skipped(name, why)

        def opened(source: Path | bytes):
            return io.BytesIO(source) if isinstance(source, bytes) else source

        for name, source in sources.items():
            why = oversized_image(opened(source), name)
            if why is not None:
                skip(name, why)
        by_resize: dict[str, dict[Any, torch.Tensor]] = {}
        for resize in dict.fromkeys(spec.task.resize for spec in specs.values()):
            by_resize[resize] = {}
            for name, source in sources.items():
                image = None if name in skipped else load_image(opened(source), channels, size, resize)
                if image is not None:
                    by_resize[resize][name] = image
                elif name not in skipped:
                    skip(name, f"cannot read {name} as an image")
        readable = [name for name in sources if name not in skipped]
        if not readable:
            raise BadConfig(f"none of the {len(sources)} file(s) could be read as an image")
        return cls(readable, skipped, by_resize)

    @classmethod
    def join(cls, sets: Sequence[ImageSet]) -> ImageSet:
        """Several sets as one (names must differ), to classify them in the same batches."""
        by_resize: dict[str, dict[Any, torch.Tensor]] = {}
        for images in sets:
            for resize, decoded in images.by_resize.items():
                by_resize.setdefault(resize, {}).update(decoded)
        return cls([n for s in sets for n in s.readable], [n for s in sets for n in s.skipped], by_resize)


def oversized_image(source: Path | IO[bytes], name: Any = None, limit: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why the image ``source`` must not be decoded (its header declares more than ``limit`` pixels), or None.

    Only the header is read (PIL decodes nothing on open). A file PIL cannot open is not judged here: the
    decoder reports it.
    """
    from PIL import Image

    name = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file's name
            with Image.open(source) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # more than twice PIL's own limit, itself above ``limit``
        return f"{name} declares more than {limit:,} pixels (a decompression bomb?), more than dvn decodes"
    except (OSError, ValueError, SyntaxError):  # a file PIL cannot open: the decoder reports it
        return None
    if width * height > limit:
        return f"{name} declares {width}x{height} pixels, more than the {limit:,} dvn decodes"
    return None


def classify(
    images: ImageSet, specs: dict, forwards: dict[str, Callable], choices: dict[str, int], top: int
) -> list[dict[str, Any]]:
    """Rows ``{"image", "task", "level", "top"}`` of every readable image for every task, image by image: the
    JSON rows of ``dvn predict --json`` and ``dvn serve``.

    Args:
        forwards: task -> a function from a normalised batch to logits.
        choices: task -> the level its forward runs (what the rows say).
    """
    tops: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for task in choices:
        spec = specs[task]
        classes = spec.task.classes
        k = min(top, len(classes))
        for start in range(0, len(images.readable), BATCH_SIZE):
            chunk = images.readable[start : start + BATCH_SIZE]
            x = normalize_batch(torch.stack([images.by_resize[spec.task.resize][p] for p in chunk]), spec.task)
            with torch.no_grad():
                probs = torch.softmax(forwards[task](x).float(), dim=1)
            values, indices = probs.topk(k, dim=1)
            for path, vs, ix in zip(chunk, values.tolist(), indices.tolist(), strict=True):
                tops[path, task] = [{"class": classes[i], "probability": v} for v, i in zip(vs, ix, strict=True)]
    return [
        {"image": str(path), "task": task, "level": level, "top": tops[path, task]}
        for path in images.readable
        for task, level in choices.items()
    ]
