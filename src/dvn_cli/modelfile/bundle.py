"""Bundles: several (task, level)s that run at the same time in one file, every shared unit block stored once.

A plan (``plan.plan_levels``) picks one level per task for tasks that run together on one device. Their virtual
networks share the physical weights: level ``l`` of task ``t`` uses the unit-pair blocks ``W[out(u_o), in(u_i)]``
with ``u_o, u_i`` in ``S = order_t[:l]`` (the stem, whose image input is never split, the row blocks
``W[out(u_o), :]``). A ``dvn-bundle`` file (safetensors) stores the UNION of those blocks once each, plus each
choice's private batch norms and head, so it holds exactly ``plan.shared_memory_params`` parameters (plus the
batch-norm running statistics). ``Bundle.plain(task)`` assembles one choice back into an ordinary
``prune.PlainNetwork`` that computes what ``network(x, task, level)`` computes in eval mode.

Tensor names:

- ``features.<conv>.weight.<uo>.<ui>``: one block of a split-input convolution (``features.<conv>.weight.<uo>``
  for the stem);
- ``features.<norm>.<task>.<key>``: the chosen level's batch norm of ``task`` (``weight``, ``bias``,
  ``running_mean``, ``running_var``, ``num_batches_tracked``);
- ``head.<task>.weight`` / ``head.<task>.bias``: the task's head sliced to its level.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import __version__
from ..config import BackboneConfig, TaskSpec, from_dict
from ..core.cost import LevelCost, level_cost
from ..core.layers import LevelBatchNorm2d, UnitConv2d
from ..core.network import DeepVirtualNetwork, TaskLevels
from ..core.plain import PlainNetwork, plain_config
from ..core.units import BlockGrid
from ..errors import BadConfig, UnknownTask, WrongFileFormat
from ..fsutil import first_line
from .base import FileTensors, ModelFile, TensorReader, UnitSource
from .container import read_metadata, write_dvn_file
from .spec import CompactSpec, DataSplit

__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "BundleSource",
    "bundle_source",
    "bundle_tensors",
    "load_bundle",
    "save_bundle",
    "stored_params",
]

BUNDLE_FORMAT = "dvn-bundle"
RUNNING_KEYS = ("running_mean", "running_var", "num_batches_tracked")
"""Batch-norm buffers: stored, but not parameters (as in ``cost.level_cost`` and ``plan.shared_memory_params``)."""
NORM_KEYS = ("weight", "bias", *RUNNING_KEYS)


def _block_key(conv: str, unit_out: int, unit_in: int | None) -> str:
    return f"features.{conv}.weight.{unit_out}" + ("" if unit_in is None else f".{unit_in}")


def _conv_grid(conv: Mapping[str, Any], k: int) -> BlockGrid:
    """The block grid of a convolution described in a bundle's metadata (kernel size does not matter here)."""
    return BlockGrid(int(conv["out_channels"]), int(conv["in_channels"]), 1, k, bool(conv["split_input"]))


def _resolve_choices(network: DeepVirtualNetwork, choices: TaskLevels) -> dict[int, int]:
    if not choices:
        raise BadConfig("a bundle needs at least one (task, level)")
    return dict(network.resolve_pairs(choices.items(), one_level_per_task=True))


def bundle_tensors(network: DeepVirtualNetwork, choices: TaskLevels) -> dict[str, torch.Tensor]:
    """Every tensor of the bundle of ``choices``: shared conv blocks once, per-task batch norms and heads."""
    resolved = _resolve_choices(network, choices)
    layout = network.layout
    tensors: dict[str, torch.Tensor] = {}
    for name, module in network.features.named_modules():
        if isinstance(module, UnitConv2d):
            weight, grid = module.weight.detach(), module.grid
            for t, level in resolved.items():
                for uo, ui in grid.blocks(layout.level_units(t, level)):
                    key = _block_key(name, uo, ui)
                    if key not in tensors:
                        tensors[key] = grid.block(weight, uo, ui).contiguous().clone()
        elif isinstance(module, LevelBatchNorm2d):
            for t, level in resolved.items():
                task_name = network.task_names[t]
                for key, value in module.plain_state(t, level).items():
                    tensors[f"features.{name}.{task_name}.{key}"] = value
    for t, level in resolved.items():
        task_name = network.task_names[t]
        for key, value in network.head(t).plain_state(t, level).items():
            tensors[f"head.{task_name}.{key}"] = value
    return tensors


def save_bundle(
    network: DeepVirtualNetwork,
    choices: TaskLevels,
    path: str | os.PathLike,
    source_sha256: str = "",
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write the chosen (task, level)s of ``network`` as one ``dvn-bundle`` safetensors file.

    Args:
        network: the DVN.
        choices: one level per task (name or index), e.g. ``plan.choices``.
        path: the file to write.
        source_sha256: sha256 of the checkpoint the network came from ("" when unknown).
        training: the checkpoint's training summary; its seed and validation share are kept so that
            ``eval --split val`` carves the same images.

    Returns:
        The path written.

    Raises:
        UnknownTask: a task the network does not have.
        BadConfig: no choices, a task chosen twice, or a level outside the network's layout.
    """
    resolved = _resolve_choices(network, choices)
    tensors = bundle_tensors(network, choices)
    names = {t: network.task_names[t] for t in resolved}
    convs = {
        name: {"in_channels": m.in_channels, "out_channels": m.out_channels, "split_input": m.split_input}
        for name, m in network.features.named_modules()
        if isinstance(m, UnitConv2d)
    }
    norms = [name for name, m in network.features.named_modules() if isinstance(m, LevelBatchNorm2d)]
    meta = {
        "dvn_version": __version__,
        "backbone": asdict(network.config),
        "k": network.units,
        "tasks": [asdict(network.tasks[t]) for t in resolved],
        "orders": {names[t]: list(network.layout.orders[t]) for t in resolved},
        "choices": {names[t]: level for t, level in resolved.items()},
        "source_sha256": source_sha256,
        "costs": {names[t]: level_cost(network, t, level).to_dict() for t, level in resolved.items()},
        "convs": convs,
        "norms": norms,
        "stored_params": stored_params(tensors),
        "split": asdict(DataSplit.from_mapping((training or {}).get("config"))),
    }
    return write_dvn_file(path, tensors, BUNDLE_FORMAT, meta)


def stored_params(bundle_or_tensors: Bundle | Mapping[str, torch.Tensor]) -> int:
    """Parameters a bundle holds: conv blocks, batch-norm affine weight and bias, heads (not running statistics)."""
    tensors = bundle_or_tensors.tensors if isinstance(bundle_or_tensors, Bundle) else bundle_or_tensors
    shapes = tensors.shapes if isinstance(tensors, FileTensors) else {key: t.shape for key, t in tensors.items()}
    return sum(math.prod(shape) for key, shape in shapes.items() if key.rsplit(".", 1)[-1] not in RUNNING_KEYS)


@dataclass
class Bundle(ModelFile):
    """A loaded ``dvn-bundle``: the stored tensors and what runs from them (one level per task).

    Args:
        config: the PHYSICAL backbone the bundle was cut from.
        k: units per layer.
        task_specs: task name -> spec, for the chosen tasks.
        orders: task name -> the task's order of units.
        choices: task name -> chosen level.
        costs: task name -> that level's cost, as ``cost.level_cost`` counted it.
        tensors: every stored tensor; for a bundle read from a file, read from it on each access and never kept
            (``FileTensors``), so that running it through its ``SharedRuntime`` holds each block once.
        source_sha256: sha256 of the source checkpoint ("" when unknown).
        path: the file it was read from.
        convs: conv layer name -> its channels and whether its input is split.
        norms: names of the batch-norm layers.
        split: the training run's ``val_fraction`` and ``seed``, for ``eval --split val``.
    """

    format: ClassVar[str] = BUNDLE_FORMAT
    kind: ClassVar[str] = "bundle"
    holds_unit_blocks: ClassVar[bool] = True

    config: BackboneConfig
    k: int
    task_specs: dict[str, TaskSpec]
    orders: dict[str, tuple[int, ...]]
    choices: dict[str, int]
    costs: dict[str, LevelCost]
    tensors: Mapping[str, torch.Tensor]
    source_sha256: str = ""
    path: Path | None = None
    convs: dict[str, dict[str, Any]] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)
    split: DataSplit = field(default_factory=DataSplit)

    @property
    def training(self) -> dict[str, Any]:
        return {}

    def pairs(self) -> list[tuple[str, int]]:
        return list(self.choices.items())

    def task_spec(self, task: str) -> TaskSpec:
        self.check_task(task)
        return self.task_specs[task]

    def spec_of(self, task: str, level: int) -> CompactSpec:
        self.check_pair(task, level)
        cost = self.costs[task]
        return CompactSpec(
            backbone=plain_config(self.config, level),
            task=self.task_specs[task],
            task_index=list(self.choices).index(task),
            level=level,
            k=self.k,
            units=self.units(task),
            source_sha256=self.source_sha256,
            params=cost.params,
            params_total=cost.params_total,
            macs=cost.macs,
            val_fraction=self.split.val_fraction,
            seed=self.split.seed,
        )

    def plain_of(self, task: str, level: int) -> PlainNetwork:
        self.check_pair(task, level)
        return self.plain(task)

    def check_task(self, task: str) -> None:
        if task not in self.choices:
            raise UnknownTask(f"unknown task {task!r}; this bundle has: {', '.join(self.choices)}")

    def describe(self) -> dict[str, Any]:
        """The chosen (task, level)s, their units and costs, the shared storage and where the bundle came from."""
        return {
            "file": str(self.path),
            "format": self.format,
            "version": 1,
            "bytes": self.path.stat().st_size if self.path else None,
            "sha256": self.file_sha256,
            "backbone": asdict(self.config),
            "units": self.k,
            "order_rule": "as in the source checkpoint",
            "stored_params": stored_params(self),
            "source_sha256": self.source_sha256,
            "choices": dict(self.choices),
            "tasks": [
                {
                    "name": name,
                    "classes": list(spec.classes),
                    "source": spec.source,
                    "order": list(self.orders[name]),
                    "mean": list(spec.mean),
                    "std": list(spec.std),
                    "resize": spec.resize,
                }
                for name, spec in self.task_specs.items()
            ],
            "levels": [
                {"task": name, "level": level, "units": list(self.units(name)), **self.costs[name].to_dict()}
                for name, level in self.choices.items()
            ],
            "training": {},
        }

    def unit_source(self) -> BundleSource:
        """The chosen levels' blocks, read lazily from the file (from memory for a bundle never written); a file
        changed since the bundle was loaded is refused."""
        if isinstance(self.tensors, FileTensors):
            return BundleSource(self, self.tensors.reader)
        return BundleSource(self, TensorReader(self.label, tensors=self.tensors))

    def units(self, task: str) -> tuple[int, ...]:
        """The units the chosen level of ``task`` uses, in the task's order."""
        self.check_task(task)
        return tuple(self.orders[task][: self.choices[task]])

    def expected_keys(self) -> set[str]:
        """The tensor names the metadata implies."""
        keys: set[str] = set()
        for task in self.choices:
            units = self.units(task)
            for name, conv in self.convs.items():
                keys |= {_block_key(name, uo, ui) for uo, ui in _conv_grid(conv, self.k).blocks(units)}
            keys |= {f"features.{name}.{task}.{key}" for name in self.norms for key in NORM_KEYS}
            keys |= {f"head.{task}.weight", f"head.{task}.bias"}
        return keys

    def plain_state(self, task: str) -> dict[str, torch.Tensor]:
        """State dict of the ``PlainNetwork`` of ``task``: conv weights assembled from blocks over sorted units."""
        units = self.units(task)
        state: dict[str, torch.Tensor] = {}
        for name, conv in self.convs.items():
            blocks = _conv_grid(conv, self.k).blocks(units)  # row-major: one row of blocks per output unit
            rows: dict[int, list[torch.Tensor]] = {uo: [] for uo, _ in blocks}
            for uo, ui in blocks:
                rows[uo].append(self.tensors[_block_key(name, uo, ui)])
            state[f"features.{name}.weight"] = torch.cat([torch.cat(row, dim=1) for row in rows.values()], dim=0)
        for name in self.norms:
            state |= {f"features.{name}.{key}": self.tensors[f"features.{name}.{task}.{key}"] for key in NORM_KEYS}
        state |= {f"head.{key}": self.tensors[f"head.{task}.{key}"] for key in ("weight", "bias")}
        return state

    def plain(self, task: str, map_location: str | torch.device = "cpu") -> PlainNetwork:
        """The chosen level of ``task`` as an ordinary network in eval mode."""
        self.check_task(task)
        plain = PlainNetwork(plain_config(self.config, self.choices[task]), self.task_specs[task].num_classes)
        conv_names = {name for name, m in plain.features.named_modules() if isinstance(m, nn.Conv2d)}
        if conv_names != set(self.convs):
            raise WrongFileFormat(f"{self.path} holds convolutions that the plain {self.config.arch} does not have")
        try:
            plain.load_state_dict(self.plain_state(task), strict=True)
        except (KeyError, RuntimeError) as exc:
            raise WrongFileFormat(f"{self.path} does not match its own metadata ({first_line(exc)})") from None
        return plain.to(map_location).eval()


def _bundle_of(meta: dict[str, Any], path: Path, tensors: FileTensors) -> Bundle:
    """The bundle the metadata describes, refused when its tensors' names differ from what it implies."""
    try:
        specs = [from_dict(TaskSpec, t) for t in meta["tasks"]]
        choices = {str(name): int(level) for name, level in meta["choices"].items()}
        if not choices:
            raise BadConfig("no tasks: a bundle holds at least one")
        bundle = Bundle(
            config=from_dict(BackboneConfig, meta["backbone"]),
            k=int(meta["k"]),
            task_specs={s.name: s for s in specs},
            orders={str(name): tuple(int(u) for u in order) for name, order in meta["orders"].items()},
            choices=choices,
            costs={
                name: LevelCost(**{f: int(c[f]) for f in ("params", "params_total", "macs")})
                for name, c in meta["costs"].items()
            },
            tensors=tensors,
            source_sha256=str(meta.get("source_sha256", "")),
            path=path,
            convs={str(name): dict(c) for name, c in meta["convs"].items()},
            norms=[str(n) for n in meta["norms"]],
            split=DataSplit.from_mapping(meta.get("split")),
        )
        if set(bundle.task_specs) != set(choices) or set(bundle.orders) != set(choices):
            raise BadConfig("tasks, orders and choices name different tasks")
        for name, order in bundle.orders.items():
            if sorted(order) != list(range(bundle.k)) or not 1 <= choices[name] <= bundle.k:
                raise BadConfig(f"task {name} has order {list(order)} and level {choices[name]} for k={bundle.k}")
        expected, names = bundle.expected_keys(), set(tensors)
        if expected != names:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise BadConfig(f"missing tensors {missing[:3]}, unexpected tensors {extra[:3]}")
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError, BadConfig) as exc:
        raise WrongFileFormat(f"{path} does not match its own metadata ({first_line(exc)})") from None
    return bundle


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read a ``dvn-bundle`` file, refusing other dvn files, bundles whose tensors contradict their metadata and
    damaged or non-finite tensors; the tensors are checked one at a time and not kept (``FileTensors``)."""
    path = Path(path)
    meta = read_metadata(path, (BUNDLE_FORMAT,))
    tensors = FileTensors.open(path)
    bundle = _bundle_of(meta, path, tensors)
    tensors.check_all()
    return bundle


class BundleSource(UnitSource):
    """A bundle as a unit source: only its chosen levels exist; blocks are its ``features.<conv>.weight.<uo>.<ui>``
    tensors, batch norms ``features.<norm>.<task>.*``, heads ``head.<task>.*``.

    Its network (on the meta device) has the bundle's tasks only, in the bundle's order.
    """

    def __init__(self, bundle: Bundle, reader: TensorReader) -> None:
        tasks = [bundle.task_specs[name] for name in bundle.choices]
        try:
            with torch.device("meta"):
                network = DeepVirtualNetwork(bundle.config, tasks, [bundle.orders[n] for n in bundle.choices], "table")
        except BadConfig as exc:
            raise WrongFileFormat(f"{bundle.label} does not match its own metadata ({exc})") from None
        convs = {
            name: {"in_channels": m.in_channels, "out_channels": m.out_channels, "split_input": m.split_input}
            for name, m in network.features.named_modules()
            if isinstance(m, UnitConv2d)
        }
        norms = [name for name, m in network.features.named_modules() if isinstance(m, LevelBatchNorm2d)]
        if convs != bundle.convs or norms != bundle.norms:
            raise WrongFileFormat(f"{bundle.label} holds layers that its {bundle.config.arch} backbone does not have")
        super().__init__(network, reader, bundle.label, fixed=bundle.choices)

    def block_tensor(self, conv: str, unit_out: int, unit_in: int | None) -> tuple[str, None]:
        return _block_key(conv, unit_out, unit_in), None

    def norm_tensor(self, norm: str, task: int, level: int, key: str) -> str:
        return f"features.{norm}.{self.network.task_names[task]}.{key}"

    def head_tensor(self, task: int, level: int, key: str) -> tuple[str, None]:
        return f"head.{self.network.task_names[task]}.{key}", None


def bundle_source(path: str | os.PathLike) -> BundleSource:
    """A bundle file as a lazy unit source: only its header is read now."""
    path = Path(path)
    meta = read_metadata(path, (BUNDLE_FORMAT,))
    tensors = FileTensors.open(path)
    return BundleSource(_bundle_of(meta, path, tensors), tensors.reader)
