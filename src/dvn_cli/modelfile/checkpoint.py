"""Checkpoints: a whole DVN in one ``dvn-checkpoint`` file (physical weights, every (task, level) batch norm,
every head and each task's order), and the name of the training-state format that accompanies it.

Tensor names are the network's state dict plus ``orders.<task>`` (int64). The metadata holds the backbone
config, the task specs, the order rule and the training summary (docs/design.md §5).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import BackboneConfig, TaskSpec, from_dict
from ..core.cost import LevelCost, level_cost, stored_params
from ..core.network import DeepVirtualNetwork
from ..core.plain import PlainNetwork, extract_plain
from ..errors import BadConfig, WrongFileFormat
from ..fsutil import first_line
from .base import ModelFile, TensorReader, UnitSource
from .container import check_finite, read_dvn_file, read_metadata, write_dvn_file
from .spec import CompactSpec, DataSplit, compact_spec

__all__ = [
    "CHECKPOINT_FORMAT",
    "STATE_FORMAT",
    "Checkpoint",
    "CheckpointSource",
    "checkpoint_source",
    "load_checkpoint",
    "open_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "dvn-checkpoint"
STATE_FORMAT = "dvn-train-state"
"""Weights, optimizer and batch-order state of a run, for ``dvn train --resume`` (written by ``training``)."""


class Checkpoint(ModelFile):
    """A DVN and what its file said about it: every task at every level.

    Opened from a file (``open_checkpoint``), it reads the header and the task orders only: ``shape`` (the network
    on the meta device) answers every question of layout, spec and cost, and the weights are read on the first use
    of ``network`` (a plain model, a virtual network). Paths that run a ``SharedRuntime`` from the file instead
    (``dvn predict --budgets``, ``dvn serve``) thereby hold each block once, in the runtime.
    """

    format: ClassVar[str] = CHECKPOINT_FORMAT
    kind: ClassVar[str] = "checkpoint"
    holds_unit_blocks: ClassVar[bool] = True
    training: dict[str, Any]

    def __init__(
        self,
        network: DeepVirtualNetwork | None = None,
        path: Path | None = None,
        training: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        shape: DeepVirtualNetwork | None = None,
    ) -> None:
        known = shape if shape is not None else network
        if known is None or network is None and path is None:
            raise ValueError("a checkpoint needs its network, or the shape of one and the file holding its weights")
        self._network, self._shape = network, known
        self.path, self.training, self.meta = path, training or {}, meta or {}

    @property
    def shape(self) -> DeepVirtualNetwork:
        """The network's layout, layers and tasks: what every question but running it needs (maybe weightless)."""
        return self._shape

    @property
    def network(self) -> DeepVirtualNetwork:
        """The network with its weights, read from the file on first use (which must still hold the same shape)."""
        if self._network is None:
            assert self.path is not None  # __init__ refuses a checkpoint without its network and without its file
            loaded = load_checkpoint(self.path).network
            if _shape_of(loaded) != _shape_of(self.shape):
                raise WrongFileFormat(f"{self.path} changed since it was opened: its network is not the same shape")
            self._network = loaded
        return self._network

    @property
    def weights_loaded(self) -> bool:
        """Whether ``network`` has read the weights (it never does on the shared-runtime paths)."""
        return self._network is not None

    @property
    def split(self) -> DataSplit:
        return DataSplit.from_mapping(self.training.get("config"))

    def pairs(self) -> list[tuple[str, int]]:
        return [(name, level) for name in self.shape.task_names for level in range(1, self.shape.units + 1)]

    def task_spec(self, task: str) -> TaskSpec:
        return self.shape.tasks[self.shape.task_index(task)]

    def spec_of(self, task: str, level: int) -> CompactSpec:
        self.check_pair(task, level)
        return compact_spec(self.shape, task, level, self.file_sha256, self.split)

    def plain_of(self, task: str, level: int) -> PlainNetwork:
        self.check_pair(task, level)
        return extract_plain(self.network, task, level)

    def cost_of(self, task: str, level: int) -> LevelCost:
        self.check_pair(task, level)
        return level_cost(self.shape, task, level)

    def check_task(self, task: str) -> None:
        self.shape.task_index(task)

    def check_pair(self, task: str, level: int, verb: str = "use") -> None:
        self.shape.resolve_pairs([(task, level)])

    def unit_source(self) -> CheckpointSource:
        """Every (task, level)'s blocks, read lazily from the file (from memory for a checkpoint never written)."""
        if self.path is not None:
            return checkpoint_source(self.path)
        reader = TensorReader(self.label, tensors=self.network.state_dict())
        return CheckpointSource(meta_copy(self.network), reader, self.label, self.training)

    def describe(self) -> dict[str, Any]:
        """Tasks, orders, per-level sizes and validation accuracy, training summary and format."""
        network, training = self.shape, self.training
        val = training.get("val_accuracy", {})
        levels = []
        for name, level in self.pairs():
            accs = val.get(name)
            levels.append(
                {
                    "task": name,
                    "level": level,
                    "units": list(network.layout.level_units(network.task_index(name), level)),
                    **self.cost_of(name, level).to_dict(),
                    "val_accuracy": accs[level - 1] if accs else None,
                }
            )
        return {
            "file": str(self.path),
            "format": self.format,
            "version": self.meta.get("version"),
            "bytes": self.path.stat().st_size if self.path else None,
            "sha256": self.file_sha256,
            "backbone": asdict(network.config),
            "units": network.units,
            "order_rule": network.order_rule,
            "stored_params": stored_params(network),
            "tasks": [
                {
                    "name": s.name,
                    "classes": list(s.classes),
                    "source": s.source,
                    "order": list(order),
                    "mean": list(s.mean),
                    "std": list(s.std),
                    "resize": s.resize,
                }
                for s, order in zip(network.tasks, network.layout.orders, strict=True)
            ],
            "levels": levels,
            "training": {k: v for k, v in training.items() if k not in ("val_accuracy", "data")},
        }


class CheckpointSource(UnitSource):
    """A checkpoint as a unit source: blocks are slices of ``features.<conv>.weight``, batch norms
    ``features.<norm>.norms.<t>.<level-1>.*``, heads ``heads.<t>.*`` with the level's input columns."""

    def block_tensor(self, conv: str, unit_out: int, unit_in: int | None) -> tuple[str, tuple[slice, ...]]:
        return f"features.{conv}.weight", self.grids[conv].index(unit_out, unit_in)

    def norm_tensor(self, norm: str, task: int, level: int, key: str) -> str:
        return f"features.{norm}.norms.{task}.{level - 1}.{key}"

    def head_tensor(self, task: int, level: int, key: str) -> tuple[str, list[int] | None]:
        if key != "weight":
            return f"heads.{task}.{key}", None
        in_features = self.network.head(task).in_features
        return f"heads.{task}.weight", self.network.layout.channel_indices(in_features, task, level)


def meta_copy(network: DeepVirtualNetwork) -> DeepVirtualNetwork:
    """The same network on the meta device: its shape (layout, layers, sizes) without any weight."""
    with torch.device("meta"):
        return DeepVirtualNetwork(network.config, network.tasks, network.layout.orders, network.order_rule)


def _read_shape(path: str | os.PathLike, scan: bool = False) -> tuple[DeepVirtualNetwork, dict[str, Any]]:
    """The network a checkpoint file describes, on the meta device, and the file's metadata: header and orders only
    (with ``scan``, every tensor is also read once, one at a time, and refused if it is not finite)."""
    from safetensors import safe_open

    meta = read_metadata(path, (CHECKPOINT_FORMAT,))
    try:
        with safe_open(str(path), framework="pt") as f:
            names = [str(t["name"]) for t in meta["tasks"]]
            orders = {f"orders.{n}": f.get_tensor(f"orders.{n}") for n in names if f"orders.{n}" in f.keys()}
            for name in f.keys() if scan else ():
                check_finite(path, name, f.get_tensor(name))
        with torch.device("meta"):
            network = _network_from_meta(meta, orders)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError, BadConfig) as exc:
        raise WrongFileFormat(f"{path} does not match its own metadata ({first_line(exc)})") from None
    except WrongFileFormat:
        raise
    except Exception as exc:  # safetensors raises its own type for broken files
        raise WrongFileFormat(f"{path} is damaged: its tensors cannot be read ({first_line(exc)})") from None
    return network, meta


def _shape_of(network: DeepVirtualNetwork) -> tuple:
    return asdict(network.config), network.tasks, network.layout.orders, network.order_rule


def checkpoint_source(path: str | os.PathLike) -> CheckpointSource:
    """A checkpoint file as a lazy unit source: only its header and task orders are read now."""
    network, meta = _read_shape(path)
    return CheckpointSource(network, TensorReader(str(path), path=Path(path)), str(path), meta.get("training", {}))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint file whose weights are held only from their first use (``Checkpoint.network``): refused now if
    damaged or not finite, as every tensor is read once, one at a time."""
    network, meta = _read_shape(path, scan=True)
    return Checkpoint(path=Path(path), training=meta.get("training", {}), meta=meta, shape=network)


def checkpoint_tensors(network: DeepVirtualNetwork) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the state dict plus ``orders.<task>`` (int64)."""
    tensors = dict(network.state_dict())
    for task, order in zip(network.task_names, network.layout.orders, strict=True):
        tensors[f"orders.{task}"] = torch.tensor(order, dtype=torch.int64)
    return tensors


def save_checkpoint(
    network: DeepVirtualNetwork, path: str | os.PathLike, training: dict[str, Any] | None = None
) -> Path:
    """Write ``network`` (and a training summary) as one ``dvn-checkpoint`` file."""
    meta = {
        "backbone": asdict(network.config),
        "units": network.units,
        "tasks": [asdict(t) for t in network.tasks],
        "order_rule": network.order_rule,
        "training": training or {},
    }
    return write_dvn_file(path, checkpoint_tensors(network), CHECKPOINT_FORMAT, meta)


def _network_from_meta(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DeepVirtualNetwork:
    if not isinstance(meta.get("training", {}), dict):
        raise BadConfig("training is not a table")
    tasks = [from_dict(TaskSpec, t) for t in meta["tasks"]]
    orders = []
    for spec in tasks:
        order = tensors.pop(f"orders.{spec.name}")
        if order.dtype != torch.int64 or order.dim() != 1:
            raise BadConfig(f"orders.{spec.name} is not a list of unit indices")
        orders.append(order.tolist())
    config = from_dict(BackboneConfig, meta["backbone"])
    return DeepVirtualNetwork(config, tasks, orders, str(meta.get("order_rule", "table")))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a ``dvn-checkpoint`` file back into a network, refusing files that do not match their metadata."""
    tensors, meta = read_dvn_file(path, (CHECKPOINT_FORMAT,))
    try:
        network = _network_from_meta(meta, tensors)
        network.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError, BadConfig) as exc:
        raise WrongFileFormat(f"{path} does not match its own metadata ({first_line(exc)})") from None
    network.to(map_location)
    return Checkpoint(network=network, path=Path(path), training=meta.get("training", {}), meta=meta)
