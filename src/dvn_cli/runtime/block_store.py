"""The block store of a shared runtime (``runtime.shared``) and the layers that read it.

The unit-pair blocks ``W[out(u_o), in(u_i)]`` of one layer (the stem's row blocks ``W[out(u_o), :]``) that the
running (task, level)s use are held in STRIPS: output units that need the same input units share one tensor
(``Strip``), so the strips of a layer hold exactly the union of the blocks, each once (``strip_layout``,
``strip_shape``). A running (task, level)'s convolution reads its weight from the strips (``BlockConv``): a VIEW
of one strip when its units lie in consecutive rows and columns of it (no copy), else the concatenation of the
views of the strips it spans, formed just before the layer runs and freed right after it (``assemble``), or one
small convolution per block, summed (``blockwise``). Its batch norms and head read its own folded tensors
(``ScaleShift``, ``Head``). docs/design.md §3, "Shared runtime".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.units import BlockGrid
from ..modelfile.base import BlockKey

__all__ = [
    "CONV_MODES",
    "BlockConv",
    "ConvMode",
    "Head",
    "Pair",
    "ScaleShift",
    "Strip",
    "meta_weight",
    "strip_layout",
    "strip_shape",
]

ConvMode = Literal["assemble", "blockwise"]
CONV_MODES: tuple[str, ...] = ("assemble", "blockwise")
"""How a convolution's weight is formed from its blocks: one transient weight per layer, or one conv per block."""

Pair = tuple[int, int]  # (task index, level)


@dataclass(frozen=True, eq=False)  # equal only to itself: a strip is one held tensor
class Strip:
    """Output units that use the same input units, held as ONE tensor ``W[out(units_out), in(units_in)]``.

    A row of blocks ``(u_o, *)`` is used by every running (task, level) whose units contain ``u_o``; the input
    units it needs are the union of those tasks' units, so rows with equal unions share a strip and the strips of
    a layer hold exactly the union of the blocks the tasks use, each once. ``units_in`` is None for the stem.
    """

    units_out: tuple[int, ...]  # ascending
    units_in: tuple[int, ...] | None  # ascending; None: the input is not split
    tensor: torch.Tensor

    def keys(self, conv: str) -> list[BlockKey]:
        return [(conv, uo, ui) for uo in self.units_out for ui in (self.units_in or (None,))]

    def block(self, grid: BlockGrid, unit_out: int, unit_in: int | None) -> torch.Tensor:
        """One block, as a view."""
        rows = grid.out_channels // grid.units
        view = self.tensor.narrow(0, self.units_out.index(unit_out) * rows, rows)
        if unit_in is None:
            return view
        assert self.units_in is not None  # a block with an input unit is in a strip whose input is split
        cols = grid.in_channels // grid.units
        return view.narrow(1, self.units_in.index(unit_in) * cols, cols)


class BlockConv(nn.Module):
    """A convolution of one (task, level) whose weight lives in the shared strips (views, never a copy held).

    ``assemble``: the weight is a view of one strip when the (task, level)'s units are contiguous in it, else the
    concatenation of one view per strip, formed just before the convolution and freed right after it.
    ``blockwise``: one convolution per unit-pair block, summed per output unit.
    """

    def __init__(self, conv: nn.Conv2d, grid: BlockGrid, strips: Mapping[int, Strip], units, mode: ConvMode):
        super().__init__()
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups  # a depthwise layer: one group per channel, its blocks are its rows
        self.mode = mode
        rows, cols = grid.out_channels // grid.units, grid.in_channels // grid.units
        runs: list[list] = []  # [strip, first row, end row]: output units in consecutive rows of one strip
        for uo in units:
            strip, r = strips[uo], strips[uo].units_out.index(uo)
            if runs and runs[-1][0] is strip and runs[-1][2] == r:
                runs[-1][2] = r + 1
            else:
                runs.append([strip, r, r + 1])
        self.pieces: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (view, input channels to gather)
        for strip, first, end in runs:
            view = strip.tensor.narrow(0, first * rows, (end - first) * rows)
            if strip.units_in is None:
                self.pieces.append((view, None))
                continue
            at = [strip.units_in.index(u) for u in units]
            if at == list(range(at[0], at[0] + len(at))):
                self.pieces.append((view.narrow(1, at[0] * cols, len(at) * cols), None))
            else:
                channels = torch.tensor([p * cols + c for p in at for c in range(cols)], dtype=torch.int64)
                self.pieces.append((view, channels.to(view.device)))
        in_units = (None,) if grid.split_input is False else units
        self.blocks = [[strips[uo].block(grid, uo, ui) for ui in in_units] for uo in units]  # views

    def weight(self) -> torch.Tensor:
        """The layer's weight: a view when it can be, else one transient tensor."""
        parts = [view if channels is None else view.index_select(1, channels) for view, channels in self.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "assemble":  # (B, C_in*l/k, H, W) -> (B, C_out*l/k, H', W'); a formed weight dies here
            return F.conv2d(x, self.weight(), None, self.stride, self.padding, self.dilation, self.groups)
        if self.groups > 1:  # depthwise: each unit's filters read that unit's own channels
            chunks = x.split(self.blocks[0][0].shape[0], dim=1)
            return torch.cat(
                [
                    F.conv2d(chunk, row[0], None, self.stride, self.padding, self.dilation, row[0].shape[0])
                    for chunk, row in zip(chunks, self.blocks, strict=True)
                ],
                dim=1,
            )
        inputs = x.split(self.blocks[0][0].shape[1], dim=1)  # one chunk per input unit (the stem: the whole image)
        outputs = []
        for row in self.blocks:  # every row has a block per input chunk, so at least one
            out = F.conv2d(inputs[0], row[0], None, self.stride, self.padding, self.dilation)
            for block, chunk in zip(row[1:], inputs[1:], strict=True):
                out = out.add_(F.conv2d(chunk, block, None, self.stride, self.padding, self.dilation))
            outputs.append(out)
        return torch.cat(outputs, dim=1)


class ScaleShift(nn.Module):
    """Batch norm in eval mode as a per-channel ``x * scale + shift``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.scale, self.shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)  # views of the held tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class Head(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def strip_layout(layout, grid: BlockGrid, pairs: Sequence[Pair]) -> list[tuple[tuple[int, ...], tuple | None]]:
    """The strips of one layer for ``pairs``: output units grouped by the input units they need (the union of the
    units of every pair that uses the output unit); the stem, whose input is not split, is one strip."""
    needs: dict[int, set[int]] = {}
    for t, level in pairs:
        units = layout.level_units(t, level)
        for uo in units:
            needs.setdefault(uo, set()).update(units)
    groups: dict[tuple[int, ...] | None, list[int]] = {}
    for uo in sorted(needs):
        groups.setdefault(tuple(sorted(needs[uo])) if grid.split_input else None, []).append(uo)
    return [(tuple(units_out), units_in) for units_in, units_out in groups.items()]


def strip_shape(grid: BlockGrid, network, conv: str, units_out, units_in) -> tuple[int, ...]:
    rows = grid.out_channels // grid.units * len(units_out)
    cols = grid.in_channels if units_in is None else grid.in_channels // grid.units * len(units_in)
    return (rows, cols, *meta_weight(network, conv).shape[2:])


def meta_weight(network, conv: str) -> torch.Tensor:
    return network.features.get_submodule(conv).weight
