"""Start a DVN from pretrained weights: a torchvision state dict, each layer's channels mapped into units.

``dvn train --init FILE`` fills the physical network from a torchvision ``resnet18`` or ``mobilenet_v2`` state dict
stored as safetensors (``dvn convert`` writes one from a ``.pth`` once; ``modelfile.torchvision_file`` reads and writes
both files and refuses non-finite values: this module only maps tensors). A backbone says how torchvision's names
map onto its layers and which CHANNEL SPACES its layers share (``torchvision_layout()`` on its unit feature
extractor): a space is a set of channels that every layer writing or reading it must permute alike (a residual
stream is one space across all its blocks; a depthwise convolution stays in the space of its input).

Which channels go into unit ``u`` matters: level 1 of task ``t`` sees only the unit ``order_t[0]``. The
``bn-scale`` mapping (default) ranks each space's channels by the summed ``|gamma|`` of its batch norms and deals
the strongest to the units that tasks take first (a unit's priority is its earliest position in any task's order;
units of equal priority take turns); ``identity`` keeps torchvision's channel order. Both are permutations of a
space, so the top level computes exactly what the torchvision network computes (docs/design.md §6).

Every (task, level)'s private batch norm starts from the pretrained statistics of its own channels; a task's head
starts from the file's classifier when their class counts agree, else it keeps its random start.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch

from ..errors import BadConfig, WrongFileFormat
from .layers import LevelBatchNorm2d, UnitConv2d, take_channels
from .units import UnitLayout

__all__ = [
    "INIT_MAPPINGS",
    "ChannelSpace",
    "InitReport",
    "TorchvisionLayout",
    "init_from_torchvision",
    "unit_permutation",
]

INIT_MAPPINGS = ("bn-scale", "identity")
_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")
_IGNORED = "num_batches_tracked"


@dataclass(frozen=True)
class ChannelSpace:
    """Channels that every layer touching them must permute alike (torchvision module names).

    Args:
        writes: convolutions whose output channels (weight dim 0) these are; a depthwise one writes its input's.
        norms: batch norms over these channels; their ``|weight|`` ranks the channels.
        reads: convolutions and linear layers whose input channels (weight dim 1) these are.
    """

    writes: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def members(self) -> list[tuple[str, int]]:
        """(torchvision tensor name, dimension) of every tensor indexed by these channels."""
        found = [(f"{m}.weight", 0) for m in self.writes] + [(f"{m}.weight", 1) for m in self.reads]
        return found + [(f"{m}.{key}", 0) for m in self.norms for key in _NORM_KEYS]


@dataclass(frozen=True)
class TorchvisionLayout:
    """How a torchvision model's state dict maps onto a unit backbone.

    Args:
        model: torchvision's name for it (``resnet18``, ``mobilenet_v2``).
        names: torchvision module name -> module name under the DVN's ``features``, the stem convolution first.
        spaces: the channel spaces (every channel of every layer in exactly one).
        head: torchvision's name of the final linear layer (the DVN's per-task heads).
    """

    model: str
    names: dict[str, str]
    spaces: tuple[ChannelSpace, ...]
    head: str


@dataclass(frozen=True)
class InitReport:
    """What ``--init`` did: the model read, the mapping, and the tasks whose heads came from the file."""

    model: str
    mapping: str
    heads: tuple[str, ...]


def unit_permutation(scores: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """The channel order that puts the highest ``scores`` into the units tasks take first.

    ``result[i]`` is the old channel that becomes channel ``i``. A unit's priority is its earliest position in any
    task's order; units of equal priority are dealt the ranked channels in turns, so each gets an equal share of
    the strong ones. Within a unit, channels stay ranked.
    """
    k, size = layout.units, scores.numel() // layout.units
    priority = [min(order.index(u) for order in layout.orders) for u in range(k)]
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    slots: list[list[int]] = [[] for _ in range(k)]
    position = 0
    for p in sorted(set(priority)):
        group = [u for u in range(k) if priority[u] == p]
        for i in range(len(group) * size):
            slots[group[i % len(group)]].append(ranked[position])
            position += 1
    return torch.tensor([c for unit in slots for c in unit], dtype=torch.int64)


# --------------------------------------------------------------------------------------------- the mapping


def init_from_torchvision(
    network, state: dict[str, torch.Tensor], mapping: str = "bn-scale", label: str = "the state dict"
) -> InitReport:
    """Fill ``network`` (a ``DeepVirtualNetwork``) from a torchvision state dict, channels mapped into units.

    Args:
        network: the DVN; its backbone must have a torchvision counterpart.
        state: torchvision tensor name -> tensor (``num_batches_tracked`` entries are ignored).
        mapping: ``bn-scale`` or ``identity`` (module docstring).
        label: how messages name the source.

    Raises:
        BadConfig: an unknown mapping, or a backbone without a torchvision counterpart.
        WrongFileFormat: a state dict of another architecture or other widths (a file's non-finite values are
            refused by its reader, ``modelfile.torchvision_file.read_state_file``).
    """
    if mapping not in INIT_MAPPINGS:
        raise BadConfig(f"unknown init mapping {mapping!r}; use {', '.join(INIT_MAPPINGS)}")
    features, arch = network.features, network.config.arch
    if not hasattr(features, "torchvision_layout"):
        raise BadConfig(f"--init needs a backbone with a torchvision counterpart (resnet18, mobilenetv2), not {arch}")
    tv = features.torchvision_layout()
    modules = {name: features.get_submodule(ours) for name, ours in tv.names.items()}
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED)}
    expected = _expected(modules, tv.head)
    _check_names(state, expected, tv, label)
    state = _fit_shapes(state, expected, tv, network, label)
    layout = network.layout
    for space in tv.spaces if mapping == "bn-scale" else ():
        # the sum of the space's |norm weights| (every space has a norm; a sum from 0 would type as int | Tensor)
        scores = functools.reduce(operator.add, (state[f"{n}.weight"].abs() for n in space.norms))
        order = unit_permutation(scores, layout)
        for key, dim in space.members():
            state[key] = state[key].index_select(dim, order)
    with torch.no_grad():
        for name, module in modules.items():
            if isinstance(module, UnitConv2d):
                module.weight.copy_(state[f"{name}.weight"])
            else:
                _load_norm(module, {key: state[f"{name}.{key}"] for key in _NORM_KEYS}, layout)
        heads = []
        weight, bias = state[f"{tv.head}.weight"], state[f"{tv.head}.bias"]
        for t, head in enumerate(network.heads):
            if head.weight.shape == weight.shape:
                head.weight.copy_(weight)
                head.bias.copy_(bias)
                heads.append(network.task_names[t])
    return InitReport(tv.model, mapping, tuple(heads))


def _expected(modules, head: str) -> dict[str, tuple[int, ...] | None]:
    """Tensor name -> the full shape the network needs (None: the head, checked on its own)."""
    expected: dict[str, tuple[int, ...] | None] = {f"{head}.weight": None, f"{head}.bias": None}
    for name, module in modules.items():
        if isinstance(module, UnitConv2d):
            expected[f"{name}.weight"] = tuple(module.weight.shape)
        elif isinstance(module, LevelBatchNorm2d):
            expected |= {f"{name}.{key}": (module.num_channels,) for key in _NORM_KEYS}
    return expected


def _check_names(state, expected: dict, tv: TorchvisionLayout, label: str) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"it lacks {len(missing)} of its tensors ({', '.join(missing[:3])}, ...)")
        if extra:
            detail.append(f"has {len(extra)} others ({', '.join(extra[:3])}, ...)")
        raise WrongFileFormat(f"{label} is not a torchvision {tv.model} state dict: {' and '.join(detail)}")


def _fit_shapes(state, expected: dict, tv: TorchvisionLayout, network, label: str) -> dict[str, torch.Tensor]:
    """The state with every shape checked; an RGB stem summed over its colours for a one-channel network."""
    widths = ",".join(str(w) for w in network.config.widths)
    stem = f"{next(iter(tv.names))}.weight"  # layouts name the stem convolution first
    fitted = {}
    for key, shape in expected.items():
        tensor = state[key].float()
        if key == stem and tensor.shape[1] == 3 and shape[1] == 1:
            tensor = tensor.sum(1, keepdim=True)  # a grey image is an RGB image with three equal channels
        if shape is not None and tuple(tensor.shape) != shape:
            raise WrongFileFormat(
                f"{label}: {key} has shape {tuple(tensor.shape)}, this {network.config.arch} (widths {widths}, "
                f"{network.config.in_channels} input channels) needs {shape}; train with the file's width"
            )
        fitted[key] = tensor
    head_in = network.heads[0].in_features
    if fitted[f"{tv.head}.weight"].dim() != 2 or fitted[f"{tv.head}.weight"].shape[1] != head_in:
        raise WrongFileFormat(
            f"{label}: {tv.head}.weight has shape {tuple(fitted[f'{tv.head}.weight'].shape)}, this network's "
            f"features have {head_in} channels"
        )
    return fitted


def _load_norm(module: LevelBatchNorm2d, state: dict[str, torch.Tensor], layout: UnitLayout) -> None:
    """Each (task, level)'s private batch norm takes the pretrained entries of its own channels."""
    for t in range(layout.num_tasks):
        for level in range(1, layout.units + 1):
            channels = layout.selection(module.num_channels, t, level)
            norm = module.norm(t, level)
            for key, tensor in state.items():
                getattr(norm, key).copy_(take_channels(tensor, 0, channels))
