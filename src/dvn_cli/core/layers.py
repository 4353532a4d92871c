"""Unit layers: convolution, batch norm and linear layers that run one (task, level) of a DVN.

Every layer takes ``(x, task, level, masked)`` explicitly. The default GATHER path takes the active weight block
``W[out(S), in(S)]`` (a view when the units are contiguous) and runs a smaller op on compact activations of
``C*l/k`` channels. The MASKED path runs the full-width op and zeroes every channel outside ``S``; it is the
reference semantics that the tests hold the gather path to. Batch norm is private per (task, level), as in
switchable batch norm (Yu et al., "Slimmable Neural Networks", ICLR 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .units import BlockGrid, ChannelSelection, UnitLayout

__all__ = ["LevelBatchNorm2d", "UnitConv2d", "UnitDepthwiseConv2d", "UnitLinear", "take_channels"]


def take_channels(tensor: torch.Tensor, dim: int, selection: ChannelSelection) -> torch.Tensor:
    """Channels ``selection`` of ``tensor`` along ``dim``: a view for a slice, a gather for an index tensor."""
    if isinstance(selection, slice):
        return tensor.narrow(dim, selection.start, selection.stop - selection.start)
    return tensor.index_select(dim, selection)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` without bias, routing around a oneDNN defect (docs/design.md §2, "A native crash").

    oneDNN's 1x1 backward-weights kernel for a strided convolution writes past its workspace when the input has
    fewer channels than its channel block (16 with AVX-512) and is channels-last with an odd batch: heap
    corruption (uxlfoundation/oneDNN#6035). A strided 1x1 convolution without padding equals the same convolution
    at stride 1 on every ``stride``-th pixel, which never takes that path; it is exact. Only narrow inputs are
    routed (+1.2 % per training step where measured; every strided 1x1 would cost +8 %).
    """
    if stride > 1 and padding == 0 and weight.shape[-2:] == (1, 1) and x.shape[1] < 16:
        return F.conv2d(x[:, :, ::stride, ::stride], weight, groups=groups)
    return F.conv2d(x, weight, None, stride, padding, 1, groups)


class UnitConv2d(nn.Module):
    """A bias-free convolution whose input and output channels are split into the layout's units.

    Args:
        in_channels: full input channels of the physical layer.
        out_channels: full output channels of the physical layer.
        kernel_size: square kernel size.
        layout: the network's (task, level) -> units map.
        stride: convolution stride.
        padding: convolution padding.
        split_input: False for the first convolution, whose image input is never split.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        layout: UnitLayout,
        stride: int = 1,
        padding: int = 0,
        split_input: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.split_input = stride, padding, split_input
        self.layout = layout
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        if not self.weight.is_meta:  # a shape on the meta device has no values (and normal_ there imports dynamo)
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def active_weight(self, task: int, level: int) -> torch.Tensor:
        """The weight block ``W[out(S), in(S)]`` of (task, level); the whole weight at the top level."""
        if level == self.layout.units:
            return self.weight
        device = self.weight.device
        weight = take_channels(self.weight, 0, self.layout.selection(self.out_channels, task, level, device))
        if self.split_input:
            weight = take_channels(weight, 1, self.layout.selection(self.in_channels, task, level, device))
        return weight

    @property
    def grid(self) -> BlockGrid:
        """This layer's weight as unit-pair blocks (what plans count and bundles store)."""
        kh, kw = self.weight.shape[2:]
        return BlockGrid(self.out_channels, self.in_channels, kh * kw, self.layout.units, self.split_input)

    def active_shape(self, task: int, level: int) -> tuple[int, int]:
        """(active output channels, active input channels) of (task, level)."""
        active_in = self.layout.active_channels(self.in_channels, level) if self.split_input else self.in_channels
        return self.layout.active_channels(self.out_channels, level), active_in

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        if masked:  # (B, C_in, H, W) zero outside S -> (B, C_out, H', W') zero outside S
            out = _conv2d(x, self.weight, self.stride, self.padding)
            return out * self.layout.mask(self.out_channels, task, level, out.device).view(1, -1, 1, 1)
        # (B, C_in*l/k, H, W) -> (B, C_out*l/k, H', W')
        return _conv2d(x, self.active_weight(task, level), self.stride, self.padding)

    def plain_state(self, task: int, level: int) -> dict[str, torch.Tensor]:
        """The sliced weight of (task, level) for an ordinary ``nn.Conv2d``."""
        return {"weight": self.active_weight(task, level).detach().contiguous().clone()}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, "
            f"stride={self.stride}, padding={self.padding}, units={self.layout.units}, "
            f"split_input={self.split_input}"
        )


class UnitDepthwiseConv2d(UnitConv2d):
    """A bias-free depthwise convolution (one filter per channel) whose channels are split into units.

    Output channel ``c`` reads input channel ``c`` only, so the unit block of unit ``u`` is its own channels'
    filters ``W[out(u)]`` and there are no cross-unit blocks: the weight ``(C, 1, kh, kw)`` is split by rows like
    the stem's (``split_input=False`` in the block grid), and (task, level) runs the depthwise convolution of its
    ``C*l/k`` channels. ``in_channels`` is 1, the input channels of each filter, as in the weight's shape.

    Args:
        channels: channels of the physical layer (input = output).
        kernel_size: square kernel size.
        layout: the network's (task, level) -> units map.
        stride: convolution stride.
        padding: convolution padding.
    """

    def __init__(self, channels: int, kernel_size: int, layout: UnitLayout, stride: int = 1, padding: int = 0) -> None:
        super().__init__(1, channels, kernel_size, layout, stride=stride, padding=padding, split_input=False)

    def active_shape(self, task: int, level: int) -> tuple[int, int]:
        return self.layout.active_channels(self.out_channels, level), 1

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        if masked:  # (B, C, H, W) zero outside S -> (B, C, H', W') zero outside S
            out = _conv2d(x, self.weight, self.stride, self.padding, self.out_channels)
            return out * self.layout.mask(self.out_channels, task, level, out.device).view(1, -1, 1, 1)
        weight = self.active_weight(task, level)  # (C*l/k, 1, kh, kw)
        return _conv2d(x, weight, self.stride, self.padding, weight.shape[0])  # (B, C*l/k, H, W) -> (B, C*l/k, H', W')

    def extra_repr(self) -> str:
        return (
            f"{self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
            f"padding={self.padding}, units={self.layout.units}, depthwise"
        )


class LevelBatchNorm2d(nn.Module):
    """One private ``BatchNorm2d`` per (task, level) over that virtual network's ``C*l/k`` channels."""

    def __init__(self, num_channels: int, layout: UnitLayout) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.layout = layout
        self.norms = nn.ModuleList(
            nn.ModuleList(
                nn.BatchNorm2d(layout.active_channels(num_channels, level)) for level in range(1, layout.units + 1)
            )
            for _ in range(layout.num_tasks)
        )

    def norm(self, task: int, level: int) -> nn.BatchNorm2d:
        row = self.norms[task]
        assert isinstance(row, nn.ModuleList)  # __init__ fills norms with one ModuleList of BatchNorm2d per task
        norm = row[level - 1]
        assert isinstance(norm, nn.BatchNorm2d)
        return norm

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        norm = self.norm(task, level)
        if not masked:  # (B, C*l/k, H, W)
            return norm(x)
        selection = self.layout.selection(self.num_channels, task, level, x.device)
        out = torch.zeros_like(x)  # (B, C, H, W), zero outside S
        out[:, selection] = norm(x[:, selection])
        return out

    def plain_state(self, task: int, level: int) -> dict[str, torch.Tensor]:
        """Affine parameters and running statistics of (task, level) for an ordinary ``nn.BatchNorm2d``."""
        return {name: t.detach().clone() for name, t in self.norm(task, level).state_dict().items()}


class UnitLinear(nn.Module):
    """A linear layer whose INPUT is split into units (a task's head); its outputs are never split.

    Its parameters, their initialisation and its ``repr`` are ``nn.Linear``'s (with a bias); it is no subclass of
    it, since its ``forward`` takes ``(x, task, level, masked)`` as every unit layer's does.
    """

    def __init__(self, in_features: int, out_features: int, layout: UnitLayout) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        # nn.Linear.reset_parameters, so a seeded network starts from the same weights
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)
        self.layout = layout

    def active_weight(self, task: int, level: int) -> torch.Tensor:
        if level == self.layout.units:
            return self.weight
        selection = self.layout.selection(self.in_features, task, level, self.weight.device)
        return take_channels(self.weight, 1, selection)

    def active_shape(self, task: int, level: int) -> tuple[int, int]:
        return self.out_features, self.layout.active_channels(self.in_features, level)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        if masked:  # (B, C) zero outside S -> (B, classes)
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.active_weight(task, level), self.bias)  # (B, C*l/k) -> (B, classes)

    def plain_state(self, task: int, level: int) -> dict[str, torch.Tensor]:
        return {
            "weight": self.active_weight(task, level).detach().contiguous().clone(),
            "bias": self.bias.detach().clone(),
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=True"
