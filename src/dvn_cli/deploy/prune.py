"""One (task, level) of a DVN as a plain network: ordinary layers, weights sliced out once, no index gathers.

Level ``l`` of task ``t`` uses the units ``order_t[:l]`` of every layer (Kim et al., CVPR 2019). Its weights are
the dense blocks ``W[out(S), in(S)]``; copying each block out once gives an ordinary network ``l/k`` as wide as
the physical one, built by the backbone's registered PLAIN builder. Attribute names mirror the DVN, so each unit
layer's ``plain_state(task, level)`` lands on the plain layer of the same name (``heads.<t>`` lands on ``head``).
The result computes exactly what ``network(x, task, level)`` computes in eval mode.

A compact file (``dvn-compact``, safetensors) holds that plain network and a ``CompactSpec`` saying where it
came from. See DESIGN §2 and §3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..config import BackboneConfig, TaskSpec, from_dict
from ..core.backbones import get_backbone
from ..core.cost import LevelCost, level_cost
from ..core.network import DeepVirtualNetwork
from ..errors import BadConfig, DvnError, WrongFileFormat
from ..modelfile.checkpoint import (
    CHECKPOINT_FORMAT,
    COMPACT_FORMAT,
    Checkpoint,
    first_line,
    load_checkpoint,
    read_dvn_file,
    read_metadata,
    sha256_file,
    write_dvn_file,
)
from ..planning.budgets import resolve_budget

__all__ = [
    "write_compact_level",
    "CompactModel",
    "CompactSpec",
    "PlainNetwork",
    "compact_spec",
    "extract_plain",
    "load_compact",
    "load_model_file",
    "plain_config",
    "plain_cost",
    "save_compact",
]


def plain_config(config: BackboneConfig, level: int) -> BackboneConfig:
    """The backbone config of level ``level``: every width scaled to ``w * level / k``, one unit."""
    if not 1 <= level <= config.units:
        raise BadConfig(f"level {level} out of range 1..{config.units}")
    return replace(config, widths=tuple(w * level // config.units for w in config.widths), units=1)


class PlainNetwork(nn.Module):
    """An ordinary classifier: the backbone's plain feature extractor and one linear head.

    Args:
        config: the plain backbone (widths of one level, ``units=1``).
        num_classes: outputs of the head.
    """

    def __init__(self, config: BackboneConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.features = get_backbone(config.arch).plain(config)
        self.head = nn.Linear(self.features.out_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_img, H, W)
        return self.head(self.features(x))  # (B, w_last) -> (B, classes)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompactSpec:
        return from_dict(cls, data)


@dataclass
class CompactModel:
    """A loaded compact file: its plain network, its spec and the file it came from.

    Unpacks as ``plain, spec = load_compact(path)``.
    """

    plain: PlainNetwork
    spec: CompactSpec
    path: Path | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.plain, self.spec))


def _plain_state(network: DeepVirtualNetwork, task: int, level: int) -> dict[str, torch.Tensor]:
    """State dict of the plain twin: every unit layer's ``plain_state`` under its own name, the head as ``head``."""
    state: dict[str, torch.Tensor] = {}
    for name, module in network.features.named_modules():
        if hasattr(module, "plain_state"):
            prefix = f"features.{name}." if name else "features."
            state |= {prefix + key: t for key, t in module.plain_state(task, level).items()}
    state |= {f"head.{key}": t for key, t in network.heads[task].plain_state(task, level).items()}
    return state


def extract_plain(network: DeepVirtualNetwork, task: int | str, level: int) -> PlainNetwork:
    """The virtual network (task, level) as a ``PlainNetwork`` in eval mode, on the network's device.

    Every weight is copied out once as a contiguous tensor; the source network is not changed.
    """
    t = network.task_index(task)
    network.layout.check(t, level)
    plain = PlainNetwork(plain_config(network.config, level), network.tasks[t].num_classes)
    state = _plain_state(network, t, level)
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a backbone whose unit and plain builders disagree: a bug, said plainly
        raise RuntimeError(f"plain {network.config.arch} does not mirror its unit network: {exc}") from None
    return plain.to(next(network.parameters()).device).eval()


def compact_spec(
    network: DeepVirtualNetwork,
    task: int | str,
    level: int,
    source_sha256: str = "",
    training: dict[str, Any] | None = None,
) -> CompactSpec:
    """The spec of (task, level): plain config, task, units, cost (``cost.level_cost``) and the run's data split."""
    t = network.task_index(task)
    cost = level_cost(network, t, level)
    run = (training or {}).get("config", {})
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
        val_fraction=run.get("val_fraction", 0.1),
        seed=run.get("seed", 0),
    )


def plain_cost(plain: nn.Module, config: BackboneConfig) -> LevelCost:
    """Count a plain network as ``cost.level_cost`` counts a virtual one (weights, extras, MACs per image).

    Biases of convolutions (after ``export.fold_batchnorm``) count as extras, like the affine parameters they
    replace, so a folded network keeps ``params``; its ``params_total`` drops by one per folded channel.
    """
    weights = extras = macs = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal weights, extras, macs
        if isinstance(module, nn.Conv2d | nn.Linear):
            n = module.weight.numel()
            weights += n
            macs += n * (output.shape[2] * output.shape[3] if output.dim() == 4 else 1)
            extras += 0 if module.bias is None else module.bias.numel()
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            extras += module.weight.numel() + module.bias.numel()

    hooks = [m.register_forward_hook(count) for m in plain.modules()]
    was_training = plain.training
    try:
        plain.eval()
        param = next(plain.parameters())
        x = torch.zeros(1, config.in_channels, config.input_size, config.input_size, device=param.device)
        with torch.no_grad():
            plain(x)
    finally:
        for h in hooks:
            h.remove()
        plain.train(was_training)
    return LevelCost(params=weights, params_total=weights + extras, macs=macs)


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
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WrongFileFormat(f"{path} does not match its own metadata ({first_line(exc)})") from None
    return CompactModel(plain=plain.to(map_location).eval(), spec=spec, path=Path(path))


def load_model_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint | CompactModel:
    """A full checkpoint or a compact model, whichever ``path`` holds (what ``eval`` and ``export`` accept)."""
    meta = read_metadata(path, (CHECKPOINT_FORMAT, COMPACT_FORMAT))
    if meta["format"] == COMPACT_FORMAT:
        return load_compact(path, map_location)
    return load_checkpoint(path, map_location)


def write_compact_level(
    source: Checkpoint | CompactModel,
    task: str,
    budget: str,
    out: str | os.PathLike | None = None,
    force: bool = False,
) -> CompactModel:
    """Resolve ``budget`` for ``task`` and write that level's compact model (``dvn prune-level``).

    The default file is ``<task>-level<l>.safetensors`` beside the checkpoint. An existing file is kept
    unless ``force``.
    """
    if isinstance(source, CompactModel):
        spec = source.spec
        raise BadConfig(
            f"{source.path} is already a compact model ({spec.task.name} level {spec.level}); "
            "prune-level needs the full checkpoint"
        )
    network = source.network
    level = resolve_budget(network, task, budget)
    path = Path(out) if out is not None else source.path.parent / f"{task}-level{level}.safetensors"
    if path.exists() and not force:
        raise BadConfig(f"{path} already exists; pass --force to replace it or -o for another file")
    plain = extract_plain(network, task, level)
    spec = compact_spec(network, task, level, sha256_file(source.path), source.training)
    try:
        save_compact(plain, spec, path)
    except OSError as exc:
        raise DvnError(f"cannot write {path}: {exc.strerror or exc}") from None
    return CompactModel(plain=plain, spec=spec, path=path)
