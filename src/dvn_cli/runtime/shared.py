"""A shared runtime: several (task, level)s of one DVN ready at once, every unit-pair block held ONCE.

Running two tasks from two plain copies stores their shared units twice; a ``SharedRuntime`` holds exactly what a
plan counts (``planning.plan.shared_memory_params``, docs/design.md §3 "Shared runtime"):

- one store of unit-pair blocks ``W[out(u_o), in(u_i)]`` (stem: row blocks ``W[out(u_o), :]``), the union over the
  running (task, level)s, each held once. A layer's blocks are kept in STRIPS: output units that need the same
  input units share one tensor (``runtime.block_store.Strip``), so the strips hold exactly the union;
- per running (task, level): its batch norms folded to a per-channel scale and shift (eval mode; as many numbers as
  the affine parameters a plan counts), and its task's head sliced to its level.

Each running (task, level) is the backbone's PLAIN twin (``core.plain.PlainNetwork``) built on the meta device (no
memory), whose convolutions read their weight from the store (``assemble``, the default): a VIEW of one strip when
the (task, level)'s units lie in consecutive rows and columns of it (no copy), else the concatenation of the views
of the strips it spans, formed just before the layer runs and freed right after it, so the transient memory is one
layer's weight, whatever the number of tasks. ``blockwise`` instead runs one small convolution per block and sums
them (no weight is formed; measured slower, ``benchmarks/memory.py``).

The blocks come from a ``modelfile.base.UnitSource``: a checkpoint or a bundle, read lazily from its file, block by
block. ``set_levels`` and ``set_budget`` (a joint plan, ``planning.plan.plan_levels``) switch the running levels:
they read only the blocks the new choice lacks, release those it no longer uses, and change nothing when they fail.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ..config import BackboneConfig
from ..core.network import TaskLevels
from ..core.plain import PlainNetwork, plain_config
from ..core.threads import threads_for_batch
from ..errors import BadConfig, UnknownTask, WrongFileFormat
from ..modelfile.base import BlockKey, ModelFile, UnitParts, UnitSource
from ..modelfile.registry import open_unit_source
from ..planning.plan import Plan, plan_for_budget
from .block_store import (
    CONV_MODES,
    BlockConv,
    ConvMode,
    Head,
    Pair,
    ScaleShift,
    Strip,
    meta_weight,
    strip_layout,
    strip_shape,
)

__all__ = ["SharedRuntime"]

_Module = TypeVar("_Module", bound=nn.Module)

_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class _State:
    """Everything one choice runs from; replaced as a whole by a switch, so a call never sees half of one."""

    choices: dict[str, int]  # task name -> level
    strips: dict[str, tuple[Strip, ...]]  # conv name under features -> the strips holding its blocks
    private: dict[Pair, dict[str, tuple[torch.Tensor, ...]]]  # plain module name -> (scale, shift) / (weight, bias)
    runners: dict[str, nn.Module]  # task name -> its plain twin reading from the store


class SharedRuntime:
    """Co-resident (task, level)s of one DVN running from one store of unit-pair blocks.

    Args:
        source: where blocks, batch norms and heads are read (``ModelFile.unit_source()``, ``open_unit_source``).
        choices: task (name or index) -> level; the (task, level)s to hold ready.
        conv: ``assemble`` (default) or ``blockwise``, how a convolution forms its weight (module docstring).

    Example::

        rt = SharedRuntime.open("model.safetensors", {"mnist": 3, "fashion-mnist": 2})  # one copy of each block
        logits = rt(x, "mnist")
        rt.set_budget("3MB")

    Raises:
        UnknownTask, BadConfig: a task the source does not have, a level outside ``1..k`` or not in a bundle.
        WrongFileFormat: the file is damaged, changed since it was opened, or contradicts its metadata.
    """

    def __init__(self, source: UnitSource, choices: TaskLevels, conv: ConvMode = "assemble") -> None:
        if conv not in CONV_MODES:
            raise BadConfig(f"unknown conv mode {conv!r}; use one of {', '.join(CONV_MODES)}")
        self.source, self.conv = source, conv
        self._state = _State({}, {}, {}, {})
        self.set_levels(choices)

    @classmethod
    def from_model(cls, model: ModelFile, choices: TaskLevels, conv: ConvMode = "assemble") -> SharedRuntime:
        """A runtime of a loaded checkpoint or bundle; one that was written is read again from its file, so the
        runtime keeps none of ``model``'s tensors."""
        return cls(model.unit_source(), choices, conv)

    @classmethod
    def open(cls, path: str | os.PathLike, choices: TaskLevels, conv: ConvMode = "assemble") -> SharedRuntime:
        """A runtime of a checkpoint or bundle file that reads nothing but the header and the blocks it needs."""
        return cls(open_unit_source(path), choices, conv)

    # ---------------------------------------------------------------------------------------------- running

    @property
    def choices(self) -> dict[str, int]:
        """Task name -> the level it runs at."""
        return dict(self._state.choices)

    @property
    def network(self):
        """The network's shape on the meta device (task names, orders, layers); no weights."""
        return self.source.network

    def __call__(self, x: torch.Tensor, task: str | int) -> torch.Tensor:
        """Logits ``(B, classes)`` of ``task`` at its running level for a preprocessed batch ``(B, C, H, W)``."""
        state, network = self._state, self.source.network
        name = network.task_names[network.task_index(task)]
        if name not in state.runners:
            raise UnknownTask(f"task {name!r} is not running; running: {', '.join(state.choices)}")
        channels = network.config.in_channels
        if x.dim() != 4 or x.shape[1] != channels:
            raise BadConfig(f"input of shape {tuple(x.shape)} does not match the network's (B, {channels}, H, W)")
        with torch.no_grad(), threads_for_batch(x.shape[0]):
            return state.runners[name](x)

    def held_blocks(self) -> set[BlockKey]:
        """The unit-pair blocks held now."""
        return {key for conv, strips in self._state.strips.items() for strip in strips for key in strip.keys(conv)}

    def held_block_params(self) -> int:
        """Convolution weights held: every held block once."""
        return sum(strip.tensor.numel() for strips in self._state.strips.values() for strip in strips)

    def held_tensors(self) -> list[torch.Tensor]:
        """Every weight tensor held: the strips, each choice's folded batch norms and head (views share storage)."""
        private = [t for parts in self._state.private.values() for ts in parts.values() for t in ts]
        return [strip.tensor for strips in self._state.strips.values() for strip in strips] + private

    def held_params(self) -> int:
        """Everything held that a plan counts: the blocks, and each choice's batch-norm scale and shift and head.

        Equal to ``plan.shared_memory_params`` of the running choices (batch-norm running statistics are folded,
        so nothing else is held).
        """
        private = sum(t.numel() for parts in self._state.private.values() for ts in parts.values() for t in ts)
        return self.held_block_params() + private

    # -------------------------------------------------------------------------------------------- switching

    def set_levels(self, choices: TaskLevels) -> dict[str, int]:
        """Run ``choices`` (task -> level) from now on: read the blocks they lack, release the ones they do not use.

        Returns:
            The new choices (task name -> level).

        Raises:
            BadConfig, UnknownTask, WrongFileFormat: nothing changed, the previous choice keeps running.
        """
        network, old = self.source.network, self._state
        if not choices:
            raise BadConfig("a shared runtime needs at least one (task, level) to run")
        pairs = network.resolve_pairs(choices.items(), one_level_per_task=True)
        self.source.check_pairs(pairs)
        grids = self.source.grids
        held = {
            key: (strip, grids[key[0]]) for conv, ss in old.strips.items() for strip in ss for key in strip.keys(conv)
        }
        strips: dict[str, tuple[Strip, ...]] = {}
        into: dict[BlockKey, torch.Tensor] = {}  # where each block to be read goes: a view of its new strip
        for conv, grid in grids.items():
            kept = {(strip.units_out, strip.units_in): strip for strip in old.strips.get(conv, ())}
            layer = []
            for units_out, units_in in strip_layout(network.layout, grid, pairs):
                strip = kept.get((units_out, units_in))
                if strip is None:  # filled from held blocks now and from the source below
                    strip = Strip(
                        units_out, units_in, torch.empty(strip_shape(grid, network, conv, units_out, units_in))
                    )
                    for key in strip.keys(conv):
                        view = strip.block(grid, *key[1:])
                        if key in held:
                            view.copy_(held[key][0].block(grid, *key[1:]))
                        else:
                            into[key] = view
                layer.append(strip)
            strips[conv] = tuple(layer)
        parts = self.source.parts(pairs, skip_blocks=held.keys(), skip_private=old.private.keys(), into=into)
        self._check(parts)
        private = {pair: old.private.get(pair) or self._fold(pair, parts.private[pair]) for pair in pairs}
        old_pairs = {network.task_index(name): level for name, level in old.choices.items()}
        runners = {}
        for t, level in pairs:
            name = network.task_names[t]
            same = old_pairs.get(t) == level and all(strips[c] == old.strips.get(c) for c in grids)
            runners[name] = old.runners[name] if same else self._runner(t, level, strips, private[t, level])
        self._state = _State({network.task_names[t]: level for t, level in pairs}, strips, private, runners)
        return self.choices

    def set_budget(self, budget: str, tasks: Sequence[str] | None = None, weights: Mapping[str, float] | None = None):
        """Re-plan the levels of ``tasks`` (default: those running) under one shared budget and switch to them.

        The plan is ``planning.plan.plan_levels`` on the checkpoint's validation accuracy; a budget that no plan
        fits raises ``BadBudget`` and changes nothing.

        Returns:
            The ``planning.plan.Plan`` now running.
        """
        plan = _plan(self.source, budget, list(tasks) if tasks else list(self._state.choices), weights)
        self.set_levels(plan.choices)
        return plan

    @classmethod
    def for_budget(
        cls, model: ModelFile, budget: str, tasks: Sequence[str] | None = None, conv: ConvMode = "assemble"
    ) -> tuple[SharedRuntime, Plan]:
        """A runtime of a checkpoint whose tasks (default: all) start at the levels a shared budget plans."""
        source = model.unit_source()
        plan = _plan(source, budget, list(tasks) if tasks else source.network.task_names)
        return cls(source, plan.choices, conv), plan

    # ------------------------------------------------------------------------------------------------ parts

    def _check(self, parts: UnitParts) -> None:
        """Refuse blocks and private parts whose shapes are not the ones the network's layers imply."""
        network = self.source.network
        for (conv, uo, ui), block in parts.blocks.items():
            shape = self.source.grids[conv].block(meta_weight(network, conv), uo, ui).shape
            if block.shape != shape:
                raise WrongFileFormat(
                    f"{self.source.label} does not match its own metadata (block {conv} {uo},{ui} has shape "
                    f"{tuple(block.shape)}, expected {tuple(shape)})"
                )
        for (t, level), state in parts.private.items():
            out_features, in_features = network.head(t).active_shape(t, level)
            expected = {"head.weight": (out_features, in_features), "head.bias": (out_features,)}
            for name, module in self.source.norms.items():
                channels = (module.norm(t, level).num_features,)
                expected |= {f"features.{name}.{key}": channels for key in _NORM_KEYS}
            for name, tensor in state.items():
                if tuple(tensor.shape) != expected.get(name):
                    raise WrongFileFormat(
                        f"{self.source.label} does not match its own metadata ({name} of "
                        f"{network.task_names[t]} level {level} has shape {tuple(tensor.shape)}, expected "
                        f"{expected.get(name)})"
                    )

    def _fold(self, pair: Pair, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Batch norms as (scale, shift) under their plain names, and the head as (weight, bias).

        All the batch norms of a pair are folded in one go (a few ops, not a few per layer): their scales are views
        of one tensor, their shifts of another.
        """
        t, level = pair
        keys = [f"features.{name}" for name in self.source.norms]
        sizes = [state[f"{key}.weight"].numel() for key in keys]
        eps = torch.tensor([m.norm(t, level).eps for m in self.source.norms.values()]).repeat_interleave(
            torch.tensor(sizes)
        )
        weight, bias, mean, var = (torch.cat([state[f"{key}.{k}"] for key in keys]) for k in _NORM_KEYS)
        scale = weight / torch.sqrt(var + eps)
        shift = bias - mean * scale
        folded: dict[str, tuple[torch.Tensor, ...]] = {"head": (state["head.weight"], state["head.bias"])}
        folded |= dict(zip(keys, zip(scale.split(sizes), shift.split(sizes), strict=True), strict=True))
        return folded

    def _runner(
        self,
        t: int,
        level: int,
        strips: Mapping[str, Sequence[Strip]],
        private: Mapping[str, tuple[torch.Tensor, ...]],
    ) -> nn.Module:
        """The plain twin of (t, level) on the meta device, every layer replaced by one reading the store."""
        network = self.source.network
        plain = _meta_plain(network, t, level)
        units = tuple(sorted(network.layout.level_units(t, level)))
        grids = self.source.grids
        for name, module in list(plain.named_modules()):
            if isinstance(module, nn.Conv2d):
                conv = name.removeprefix("features.")
                depthwise = module.groups == module.in_channels == module.out_channels
                if conv not in grids or module.bias is not None or module.groups != 1 and not depthwise:
                    raise RuntimeError(f"plain {network.config.arch} layer {name} has no unit blocks to share")
                by_unit = {uo: strip for strip in strips[conv] for uo in strip.units_out}
                _replace(plain, name, BlockConv(module, grids[conv], by_unit, units, self.conv))
            elif isinstance(module, nn.BatchNorm2d):
                _replace(plain, name, ScaleShift(*private[name]))
            elif isinstance(module, nn.Linear):
                _replace(plain, name, Head(*private[name]))
        left = [n for n, _ in [*plain.named_parameters(), *plain.named_buffers()]]
        if left:  # a plain builder with layers the runtime does not know: a bug, said plainly
            raise RuntimeError(f"plain {network.config.arch} has layers the shared runtime cannot run: {left[:3]}")
        return plain.eval()


def _plan(source: UnitSource, budget: str, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> Plan:
    """``planning.plan.plan_for_budget`` on a unit source, refusing a file of fixed levels."""
    if source.fixed is not None:
        raise BadConfig(f"{source.label} holds fixed levels; a budget needs the full checkpoint to choose from")
    return plan_for_budget(source.network, source.training, budget, tasks, weights, source.label)


def _meta_plain(network, t: int, level: int) -> PlainNetwork:
    """A fresh plain twin of (t, level) on the meta device, to be rewired: a copy of the cached skeleton whose
    modules are new objects (building one with its layers' initialisers took most of a switch's time)."""
    return _copy_tree(_plain_skeleton(network.config, level, network.tasks[t].num_classes))


@functools.lru_cache(maxsize=64)
def _plain_skeleton(config: BackboneConfig, level: int, num_classes: int) -> PlainNetwork:
    """The plain twin's shape depends on (frozen config, level, classes) only; it is never changed, only copied."""
    with torch.device("meta"):
        return PlainNetwork(plain_config(config, level), num_classes)


def _copy_tree(module: _Module) -> _Module:
    """A copy of every module of the tree (attributes shared, child maps new), so replacing a child of the copy
    leaves the original as it was."""
    copied = copy.copy(module)
    copied._modules = {
        name: None if child is None else _copy_tree(child)  # a child registered as None stays None
        for name, child in module._modules.items()
    }
    return copied


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
