"""Compact models: one (task, level) of a DVN as a plain network in a ``dvn-compact`` file.

The file holds the plain twin's state dict (``core.plain.PlainNetwork``) and a ``CompactSpec`` saying where it
came from (task, level, units, the source checkpoint's sha256), what it costs, and how the training run split
its data (docs/design.md §3, §5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import __version__
from ..config import BackboneConfig, TaskSpec, from_dict
from ..core.cost import LevelCost, level_cost
from ..core.network import DeepVirtualNetwork
from ..core.plain import PlainNetwork, plain_config
from ..errors import BadConfig, WrongFileFormat
from ..fsutil import first_line
from .base import DataSplit, ModelFile
from .container import read_dvn_file, write_dvn_file

__all__ = ["COMPACT_FORMAT", "CompactModel", "CompactSpec", "compact_spec", "load_compact", "save_compact"]

COMPACT_FORMAT = "dvn-compact"


@dataclass(frozen=True)
class CompactSpec:
    """Where a compact model came from and what it costs; JSON-round-trippable via ``to_dict``/``from_dict``.

    Args:
        backbone: config of the PLAIN network (widths of this level, ``units=1``).
        task: the task's spec (classes in output order, normalisation, resize method).
        task_index: the task's index in the source checkpoint.
        level: the level this model is, ``1..k``.
        k: units per layer in the source network.
        units: the source units this level uses, in the task's order.
        source_sha256: sha256 of the source checkpoint file's bytes ("" when unknown).
        params: conv and linear weights.
        params_total: ``params`` plus batch-norm affine parameters and the head's bias.
        macs: multiply-accumulates per image.
        val_fraction: the training run's validation share, so ``eval --split val`` carves the same images.
        seed: the training run's seed, for the same reason.
    """

    backbone: BackboneConfig
    task: TaskSpec
    task_index: int
    level: int
    k: int
    units: tuple[int, ...]
    source_sha256: str
    params: int
    params_total: int
    macs: int
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", from_dict(BackboneConfig, self.backbone))
        if isinstance(self.task, dict):
            object.__setattr__(self, "task", from_dict(TaskSpec, self.task))
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        if not 1 <= self.level <= self.k or len(self.units) != self.level:
            raise BadConfig(f"compact spec of level {self.level} with units {list(self.units)} for k={self.k}")

    @property
    def cost(self) -> LevelCost:
        return LevelCost(params=self.params, params_total=self.params_total, macs=self.macs)

    @property
    def split(self) -> DataSplit:
        return DataSplit(self.val_fraction, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompactSpec:
        return from_dict(cls, data)


def compact_spec(
    network: DeepVirtualNetwork,
    task: int | str,
    level: int,
    source_sha256: str = "",
    split: DataSplit | None = None,
) -> CompactSpec:
    """The spec of (task, level): plain config, task, units, cost (``core.cost.level_cost``) and the data split."""
    t = network.task_index(task)
    cost = level_cost(network, t, level)
    split = split or DataSplit()
    return CompactSpec(
        backbone=plain_config(network.config, level),
        task=network.tasks[t],
        task_index=t,
        level=level,
        k=network.units,
        units=network.layout.level_units(t, level),
        source_sha256=source_sha256,
        params=cost.params,
        params_total=cost.params_total,
        macs=cost.macs,
        val_fraction=split.val_fraction,
        seed=split.seed,
    )


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
