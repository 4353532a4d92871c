"""Compact models: one (task, level) of a DVN as a plain network in a ``dvn-compact`` file.

The file holds the plain twin's state dict (``core.plain.PlainNetwork``) and a ``CompactSpec`` saying where it
came from (task, level, units, the source checkpoint's sha256), what it costs, and how the training run split
its data (docs/design.md §3, §5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import __version__
from ..config import TaskSpec
from ..core.plain import PlainNetwork
from ..errors import WrongFileFormat
from ..fsutil import first_line
from .base import ModelFile
from .container import read_dvn_file, write_dvn_file
from .spec import CompactSpec, DataSplit

__all__ = ["COMPACT_FORMAT", "CompactModel", "load_compact", "save_compact"]

COMPACT_FORMAT = "dvn-compact"


@dataclass
class CompactModel(ModelFile):
    """A compact model: its plain network, its spec and the file it came from (one (task, level)).

    Unpacks as ``plain, spec = load_compact(path)``.
    """

    format: ClassVar[str] = COMPACT_FORMAT
    kind: ClassVar[str] = "compact model"

    plain: PlainNetwork
    spec: CompactSpec
    path: Path | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.plain, self.spec))

    @property
    def split(self) -> DataSplit:
        return self.spec.split

    @property
    def training(self) -> dict[str, Any]:
        return {}

    def pairs(self) -> list[tuple[str, int]]:
        return [(self.spec.task.name, self.spec.level)]

    def task_spec(self, task: str) -> TaskSpec:
        self.check_task(task)
        return self.spec.task

    def spec_of(self, task: str, level: int) -> CompactSpec:
        self.check_pair(task, level)
        return self.spec

    def plain_of(self, task: str, level: int) -> PlainNetwork:
        self.check_pair(task, level)
        return self.plain

    def check_task(self, task: str) -> None:
        if task != self.spec.task.name:
            self.check_pair(task, self.spec.level)

    def describe(self) -> dict[str, Any]:
        """Where the compact model came from (task, level, units, source hash) and what it costs."""
        return {
            "file": str(self.path),
            "format": self.format,
            "bytes": self.path.stat().st_size if self.path else None,
            "sha256": self.file_sha256,
            **self.spec.to_dict(),
            "bytes_float32": self.spec.cost.bytes,
        }


def save_compact(plain: PlainNetwork, spec: CompactSpec, path: str | os.PathLike) -> Path:
    """Atomically write ``plain`` and ``spec`` as one ``dvn-compact`` safetensors file."""
    meta = {"dvn_version": __version__, "spec": spec.to_dict()}
    return write_dvn_file(path, dict(plain.state_dict()), COMPACT_FORMAT, meta)


def load_compact(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CompactModel:
    """Read a ``dvn-compact`` file back (eval mode), refusing other files and files that contradict themselves."""
    tensors, meta = read_dvn_file(path, (COMPACT_FORMAT,))
    try:
        spec = CompactSpec.from_dict(meta["spec"])
        plain = PlainNetwork(spec.backbone, spec.task.num_classes)
        plain.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as exc:
        raise WrongFileFormat(f"{path} does not match its own metadata ({first_line(exc)})") from None
    return CompactModel(plain=plain.to(map_location).eval(), spec=spec, path=Path(path))
