"""Shared graphs that read each layer's weight as unit blocks: ``concat`` and ``blockwise`` (docs/design.md §5).

The weights file of such an export holds every unit-pair block ``W[out(u_o), in(u_i)]`` of the chosen pairs once
(the stem's row blocks ``W[out(u_o), :]``), each (task, level)'s private batch norm as a per-channel ``scale`` and
``shift`` (eval-mode batch norm cannot be folded into a block that other pairs share), and each task's head as
per-unit column blocks plus its bias; a block seen again must be the same block. The module of a (task, level)
(``BlockLayout.module``) is its plain twin with every layer replaced by one that reads those tensors: a convolution
assembles its weight from its blocks with ``Concat`` then runs once (``concat``: measured faster than summing one
convolution per block, docs/results_memory_onnx.md) or runs block by block and sums (``blockwise``).
``export.shared`` traces it into the pair's graph; orders whose units are contiguous runs get graphs without
``Concat`` instead (``export.canonical``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadConfig, DvnError
from ..modelfile.base import ModelFile
from ..modelfile.registry import open_model
from ..modelfile.spec import CompactSpec
from .folder import requested_pairs
from .pairs import norm_scale_shift, set_submodule

__all__ = ["BlockLayout", "shared_tensors", "split_inputs"]


def split_inputs(model: ModelFile) -> dict[str, bool]:
    """Conv layer name (under ``features``) -> whether its input is split into units, from the source file."""
    from ..core.layers import UnitConv2d
    from ..modelfile.bundle import Bundle
    from ..modelfile.checkpoint import Checkpoint

    if isinstance(model, Checkpoint):
        return {n: m.split_input for n, m in model.network.features.named_modules() if isinstance(m, UnitConv2d)}
    if isinstance(model, Bundle):
        return {name: bool(conv["split_input"]) for name, conv in model.convs.items()}
    raise BadConfig(
        f"{model.label} is a {model.kind}: it holds one (task, level), so there is nothing to share; "
        "export it without --shared"
    )


def _chunks(tensor: torch.Tensor, dim: int, units: Sequence[int]) -> dict[int, torch.Tensor]:
    """Split ``dim`` of a level's tensor into its units' channels (ascending units, equal sizes)."""
    size = tensor.shape[dim] // len(units)
    return {u: tensor.narrow(dim, i * size, size) for i, u in enumerate(sorted(units))}


class _Collector:
    """Tensors of the weights file (float32), each stored once; a block seen again must be the same block.

    ``blocks`` names the convolutions' unit blocks: what ``--precision`` stores at lower precision.
    """

    def __init__(self, label: str) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.blocks: set[str] = set()
        self.label = label

    def add(self, key: str, tensor: torch.Tensor, block: bool = False) -> nn.Parameter:
        if block:
            self.blocks.add(key)
        array = tensor.detach().float().cpu().contiguous().numpy()
        if key in self.tensors:
            if not np.array_equal(self.tensors[key], array):
                raise DvnError(f"{self.label}: block {key} differs between two (task, level)s of the same file")
        else:
            self.tensors[key] = array.copy()
        return nn.Parameter(torch.from_numpy(self.tensors[key]), requires_grad=False)


class _BlockConv2d(nn.Module):
    """A convolution whose weight is assembled from unit blocks (``concat``) or applied block by block."""

    def __init__(self, conv: nn.Conv2d, rows: list[list[nn.Parameter]], mode: str) -> None:
        super().__init__()
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if conv.bias is not None or conv.groups != 1 and not depthwise:
            raise DvnError("a shared export needs bias-free convolutions, ungrouped or depthwise")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups  # a depthwise layer: one group per channel, its blocks are its rows
        self.shape = [len(row) for row in rows]
        self.blocks = nn.ParameterList([b for row in rows for b in row])
        self.mode = mode

    def _rows(self) -> list[list[torch.Tensor]]:
        rows, i = [], 0
        for n in self.shape:
            rows.append(list(self.blocks[i : i + n]))
            i += n
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows()
        if self.mode == "concat":
            weight = torch.cat([torch.cat(row, 1) if len(row) > 1 else row[0] for row in rows], 0)
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        if self.groups > 1:  # depthwise: each unit's filters read that unit's own channels
            pieces = torch.split(x, x.shape[1] // len(rows), dim=1) if len(rows) > 1 else (x,)
            outs = [
                F.conv2d(piece, row[0], None, self.stride, self.padding, self.dilation, row[0].shape[0])
                for piece, row in zip(pieces, rows, strict=True)
            ]
            return torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        pieces = torch.split(x, x.shape[1] // len(rows[0]), dim=1) if len(rows[0]) > 1 else (x,)
        outs = []
        for row in rows:  # a block per input piece: at least one
            out = F.conv2d(pieces[0], row[0], None, self.stride, self.padding, self.dilation)
            for piece, block in zip(pieces[1:], row[1:], strict=True):
                out = out + F.conv2d(piece, block, None, self.stride, self.padding, self.dilation)
            outs.append(out)
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


class _ScaleShift(nn.Module):
    """Eval-mode batch norm as ``x * scale + shift`` with ``scale`` and ``shift`` of shape (C, 1, 1)."""

    def __init__(self, scale: nn.Parameter, shift: nn.Parameter) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _BlockLinear(nn.Module):
    """A head whose weight is per-unit column blocks, plus its bias."""

    def __init__(self, cols: list[nn.Parameter], bias: nn.Parameter, mode: str) -> None:
        super().__init__()
        self.cols, self.bias, self.mode = nn.ParameterList(cols), bias, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = list(self.cols)
        if self.mode == "concat" or len(cols) == 1:
            return F.linear(x, torch.cat(cols, 1) if len(cols) > 1 else cols[0], self.bias)
        out: torch.Tensor = self.bias
        for piece, col in zip(torch.split(x, x.shape[1] // len(cols), dim=1), cols, strict=True):
            out = F.linear(piece, col) + out
        return out


def _shared_module(
    model: ModelFile, task: str, level: int, task_index: int, split: Mapping[str, bool], store: _Collector, mode: str
) -> tuple[nn.Module, nn.Module, CompactSpec]:
    """(module of blocks for export, the plain reference network, spec) of one (task, level); blocks go to store."""
    plain, spec = model.plain_of(task, level), model.spec_of(task, level)
    units = tuple(spec.units)
    shared = model.plain_of(task, level)
    tag = f"task{task_index}.level{level}"
    for name, module in list(shared.features.named_modules()):
        if isinstance(module, nn.Conv2d):
            if name not in split:
                raise DvnError(f"{model.label}: convolution {name} is not in the source's unit layers")
            rows_of = _chunks(module.weight, 0, units)
            rows = []
            for uo, row in rows_of.items():
                if not split[name]:
                    rows.append([store.add(f"features.{name}.weight.{uo}", row, block=True)])
                    continue
                cols = _chunks(row, 1, units)
                rows.append([store.add(f"features.{name}.weight.{uo}.{ui}", b, block=True) for ui, b in cols.items()])
            set_submodule(shared.features, name, _BlockConv2d(module, rows, mode))
        elif isinstance(module, nn.BatchNorm2d):
            scale, shift = norm_scale_shift(module)
            scale_p = store.add(f"features.{name}.{tag}.scale", scale.float().view(-1, 1, 1))
            shift_p = store.add(f"features.{name}.{tag}.shift", shift.float().view(-1, 1, 1))
            set_submodule(shared.features, name, _ScaleShift(scale_p, shift_p))
    head = shared.head
    columns = [store.add(f"head.task{task_index}.weight.{u}", c) for u, c in _chunks(head.weight, 1, units).items()]
    block_head = _BlockLinear(columns, store.add(f"head.task{task_index}.bias", head.bias), mode)
    set_submodule(shared, "head", block_head)  # by name: the result is no PlainNetwork (its head a Linear)
    return shared.eval(), plain.eval(), spec


def shared_tensors(
    source: ModelFile | str | os.PathLike, pairs: Sequence[tuple[int | str, int]] | None = None
) -> dict[str, np.ndarray]:
    """Every tensor the shared weights file of ``pairs`` holds (blocks once, private parts per pair), float32."""
    model = source if isinstance(source, ModelFile) else open_model(source)
    selected = requested_pairs(model, pairs)
    split, names = split_inputs(model), model.task_names()
    store = _Collector(model.label)
    for task, level in selected:
        _shared_module(model, task, level, names.index(task), split, store, "concat")
    return store.tensors


class BlockLayout:
    """The tensors of a ``concat`` or ``blockwise`` shared export and, per pair, the module that reads them (what
    ``canonical.CanonicalLayout`` is for canonical graphs).

    Args:
        model: a checkpoint or a bundle.
        split: conv layer name -> whether its input is split into units (``split_inputs``).
        mode: ``concat`` or ``blockwise``.
    """

    def __init__(self, model: ModelFile, split: Mapping[str, bool], mode: str) -> None:
        self.model, self.split, self.mode = model, split, mode
        self.names = model.task_names()
        self.stored = _Collector(model.label)  # filled as the modules are made

    def module(self, task: str, level: int) -> tuple[nn.Module, nn.Module, CompactSpec, dict[str, str]]:
        """(module reading the stored tensors, the plain reference network, spec, parameter name -> weights-file
        key) of one (task, level); its tensors are added to ``stored``."""
        index = self.names.index(task)
        module, plain, spec = _shared_module(self.model, task, level, index, self.split, self.stored, self.mode)
        params = {id(p): n for n, p in module.named_parameters()}
        keys = {params[id(store_param)]: key for key, store_param in _params_by_key(module, self.stored).items()}
        return module, plain, spec, keys


def _params_by_key(module: nn.Module, store: _Collector) -> dict[str, nn.Parameter]:
    """Weights-file key -> the parameter of ``module`` that holds it (parameters share the store's arrays)."""
    by_pointer = {array.__array_interface__["data"][0]: key for key, array in store.tensors.items()}
    found = {}
    for param in module.parameters():
        key = by_pointer.get(param.data_ptr())
        if key is None:
            raise RuntimeError("a shared-export parameter is not in the weights file")  # a dvn bug
        found[key] = param
    return found
