"""A shared export folder (``dvn export --shared``) as a model file.

``open_model`` opens a folder holding a shared export's ``manifest.json`` as a ``SharedExport``: its (task, level)s
and their compact specs come from the manifest, so ``dvn predict``, ``eval`` and ``info`` take the folder like any
file; ``runtime.runner.ModelRunner`` runs them through ONE ``runtime.ort.SharedOrtRuntime`` over the folder read
here (``files``). The folder is untrusted input: ``shared_folder.SharedFolder`` checks it (paths inside the folder,
every file's size and sha256 against the manifest, the weights index, every tensor a graph names present once)
before anything runs, and each entry's spec must describe the pair, units and classes of its entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from ..config import TaskSpec
from ..errors import BadConfig, WrongFileFormat
from .base import ModelFile
from .shared_folder import SHARED_EXPORT_FORMAT, SharedFolder
from .spec import CompactSpec, DataSplit

__all__ = ["SHARED_EXPORT_FORMAT", "SharedExport"]


class SharedExport(ModelFile):
    """The (task, level)s of a shared export folder (run with onnxruntime by ``runtime.runner.ModelRunner``).

    Raises:
        MissingData, WrongFileFormat: what ``SharedFolder`` refuses (a missing, truncated or changed file, a
            manifest of another layout or from a newer dvn), or a manifest entry without a spec.
    """

    format: ClassVar[str] = SHARED_EXPORT_FORMAT
    kind: ClassVar[str] = "shared export"
    split: DataSplit

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = SharedFolder(self.path)
        self.specs: dict[tuple[str, int], CompactSpec] = {}
        for (task, level), entry in self.files.models.items():
            try:
                spec = CompactSpec.from_dict(entry["spec"])
            except (KeyError, TypeError, ValueError, AttributeError, BadConfig):
                raise WrongFileFormat(
                    f"{self.path}: the manifest has no readable spec for {task} level {level}; export again"
                ) from None
            described = (spec.task.name, spec.level, list(spec.units), list(spec.task.classes))
            if described != (task, level, entry.get("units"), entry.get("classes")):  # the spec labels the output
                raise WrongFileFormat(
                    f"{self.path}: the manifest's spec for {task} level {level} describes another (task, level), "
                    "units or classes; export again"
                )
            self.specs[task, level] = spec
        first = next(iter(self.specs.values()), None)
        if first is None:
            raise WrongFileFormat(f"{self.path}: the manifest lists no models")
        self.split = first.split
        self.training: dict[str, Any] = {}

    def pairs(self) -> list[tuple[str, int]]:
        return list(self.specs)

    def task_spec(self, task: str) -> TaskSpec:
        self.check_task(task)
        return next(spec.task for (name, _), spec in self.specs.items() if name == task)

    def spec_of(self, task: str, level: int) -> CompactSpec:
        self.check_pair(task, level)
        return self.specs[task, level]

    def stored_bytes(self, task: str, level: int) -> int:
        self.check_pair(task, level)
        return self.files.held_bytes([(task, level)])

    def plain_of(self, task: str, level: int):
        raise BadConfig(
            f"{self.label} is a shared export: it holds ONNX graphs, not a PyTorch network; use the checkpoint or "
            "bundle it was exported from"
        )

    def describe(self) -> dict[str, Any]:
        manifest = self.files.manifest
        weights = manifest["weights"]
        return {
            "file": str(self.path),
            "format": self.format,
            "dvn_version": manifest.get("dvn_version"),
            "graph_mode": manifest.get("graph_mode"),
            "source": manifest.get("source", {}),
            "weights": {
                **{key: weights.get(key) for key in ("file", "bytes", "sha256", "stored_params", "tensors")},
                "precision": weights.get("precision", "fp32"),  # exports before --precision stored float32
            },
            "levels": [
                {
                    "task": task,
                    "level": level,
                    "units": list(spec.units),
                    "file": self.files.models[task, level]["file"],
                    **spec.cost.to_dict(),
                }
                for (task, level), spec in self.specs.items()
            ],
        }
