"""What one (task, level) is, as every kind of model file records it: its ``CompactSpec`` and the run's data split.

Its own module, below every kind of model file (``base``, ``compact``, ``bundle``, ``shared``), which all speak of
specs and none of which it imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..config import BackboneConfig, TaskSpec, from_dict
from ..core.cost import LevelCost, level_cost
from ..core.network import DeepVirtualNetwork
from ..core.plain import plain_config
from ..errors import BadConfig

__all__ = ["CompactSpec", "DataSplit", "compact_spec"]


@dataclass(frozen=True)
class DataSplit:
    """How the training run carved its validation images, so that ``eval --split val`` carves the same ones."""

    val_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DataSplit:
        values = values or {}
        return cls(float(values.get("val_fraction", 0.1)), int(values.get("seed", 0)))


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
