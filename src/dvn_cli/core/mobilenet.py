"""A MobileNetV2 (Sandler et al., 2018; torchvision's ``mobilenet_v2``) built from unit layers, and its plain twin.

A 3x3 stem of stride ``stem_stride`` (2 as in torchvision), seventeen inverted residual blocks in seven stages, a
1x1 convolution to the last width, global average pooling; ReLU6 after every batch norm except the projections.
An inverted residual block expands its ``C_in`` channels ``t``-fold with a 1x1 convolution, filters each channel
with a 3x3 DEPTHWISE convolution and projects to ``C_out`` with a 1x1 convolution; it adds its input where stride
is 1 and ``C_in == C_out``. Every layer is split into units: the expansion and projection like any convolution,
the depthwise one by its own channels (``layers.UnitDepthwiseConv2d``: unit ``u`` of its output reads unit ``u``
of its input only), so at level l every width, the expanded ones included, is ``C*l/k``.

``widths`` are (stem, the seven stages' outputs, last): (32, 16, 24, 32, 64, 96, 160, 320, 1280) at width 1.0;
a width multiplier rounds each to a multiple of 8 as torchvision does (the last is never made narrower).

Shapes for width 1.0, a 3x224x224 input and stem stride 2, at level l of k:
stem (B, 32l/k, 112, 112) -> stage 1 (B, 16l/k, 112, 112) -> stage 2 (B, 24l/k, 56, 56) -> stage 3 (B, 32l/k, 28, 28)
-> stage 4 (B, 64l/k, 14, 14) -> stage 5 (B, 96l/k, 14, 14) -> stage 6 (B, 160l/k, 7, 7) -> stage 7
(B, 320l/k, 7, 7) -> last (B, 1280l/k, 7, 7) -> pooled features (B, 1280l/k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig
from ..errors import BadConfig
from .family import Backbone, Features, total_stride_check
from .layers import LevelBatchNorm2d, UnitConv2d, UnitDepthwiseConv2d
from .pretrained import ChannelSpace, TorchvisionLayout
from .units import UnitLayout

__all__ = ["MOBILENETV2", "PlainMobileNetV2", "UnitMobileNetV2"]

SETTINGS = ((1, 1, 1), (6, 2, 2), (6, 3, 2), (6, 4, 2), (6, 3, 1), (6, 3, 2), (6, 1, 1))
"""(expansion t, blocks n, stride of the first block s) of each stage, as in the paper's Table 2."""
WIDTHS = (32, 16, 24, 32, 64, 96, 160, 320, 1280)
DEPTH = 53
"""Convolution and linear layers one image passes through (the count that names ResNets)."""


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of a scaled width: to the nearest multiple of 8, never below 90 % of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def widths_at(multiplier: float) -> tuple[int, ...]:
    """The widths of torchvision's ``mobilenet_v2(width_mult=multiplier)``."""
    scaled = [_make_divisible(w * multiplier) for w in WIDTHS[:-1]]
    return (*scaled, _make_divisible(WIDTHS[-1] * max(1.0, multiplier)))


def _blocks(config: BackboneConfig) -> list[tuple[int, int, int, int]]:
    """(input width, output width, stride, expansion) of every inverted residual block."""
    if config.depth != DEPTH:
        raise BadConfig(f"mobilenetv2 has depth {DEPTH}, not {config.depth}; leave --depth out")
    if len(config.widths) != len(WIDTHS):
        raise BadConfig(
            f"mobilenetv2 has {len(WIDTHS)} widths (stem, seven stages, last), got {len(config.widths)} "
            f"({config.widths})"
        )
    blocks, in_width = [], config.widths[0]
    for (t, n, s), width in zip(SETTINGS, config.widths[1:-1], strict=True):
        for i in range(n):
            blocks.append((in_width, width, s if i == 0 else 1, t))
            in_width = width
    return blocks


class UnitInvertedResidual(nn.Module):
    """Expansion (1x1), depthwise (3x3) and projection (1x1) unit convolutions, on compact ``C*l/k`` tensors."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int, layout: UnitLayout) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand_conv: UnitConv2d | None = None
        self.expand_bn: LevelBatchNorm2d | None = None
        if expand != 1:
            self.expand_conv = UnitConv2d(in_channels, hidden, 1, layout)
            self.expand_bn = LevelBatchNorm2d(hidden, layout)
        self.dw_conv = UnitDepthwiseConv2d(hidden, 3, layout, stride=stride, padding=1)
        self.dw_bn = LevelBatchNorm2d(hidden, layout)
        self.project_conv = UnitConv2d(hidden, out_channels, 1, layout)
        self.project_bn = LevelBatchNorm2d(out_channels, layout)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_in*l/k, H, W)
        out = x
        if self.expand_conv is not None and self.expand_bn is not None:  # both or neither
            out = F.relu6(self.expand_bn(self.expand_conv(out, task, level, masked), task, level, masked))
        # out: (B, t*C_in*l/k, H, W)
        out = F.relu6(self.dw_bn(self.dw_conv(out, task, level, masked), task, level, masked))  # (.., H/s, W/s)
        out = self.project_bn(self.project_conv(out, task, level, masked), task, level, masked)  # (B, C_out*l/k, ..)
        return x + out if self.residual else out


class UnitMobileNetV2(Features):
    """The physical MobileNetV2 of a DVN: stem, inverted residual blocks, last 1x1 convolution, average pool."""

    def __init__(self, config: BackboneConfig, layout: UnitLayout) -> None:
        super().__init__()
        blocks, widths = _blocks(config), config.widths
        self.out_features = widths[-1]
        self.stem_conv = UnitConv2d(
            config.in_channels, widths[0], 3, layout, stride=config.stem_stride, padding=1, split_input=False
        )
        self.stem_bn = LevelBatchNorm2d(widths[0], layout)
        self.blocks = nn.ModuleList(UnitInvertedResidual(*block, layout) for block in blocks)
        self.last_conv = UnitConv2d(widths[-2], widths[-1], 1, layout)
        self.last_bn = LevelBatchNorm2d(widths[-1], layout)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_img, H, W), never split
        x = F.relu6(self.stem_bn(self.stem_conv(x, task, level, masked), task, level, masked))  # (B, w0*l/k, ..)
        for block in self.blocks:
            x = block(x, task, level, masked)  # (B, w_i*l/k, H_i, W_i)
        x = F.relu6(self.last_bn(self.last_conv(x, task, level, masked), task, level, masked))  # (B, w8*l/k, ..)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w8*l/k)

    def torchvision_layout(self) -> TorchvisionLayout:
        """How a torchvision ``mobilenet_v2`` state dict maps onto this network (``core.pretrained``)."""
        kinds = []
        for block in self.blocks:
            assert isinstance(block, UnitInvertedResidual)  # __init__ fills blocks with nothing else
            kinds.append((block.expand_conv is not None, block.residual))
        return torchvision_layout(kinds)


class PlainInvertedResidual(nn.Module):
    """The ordinary twin of ``UnitInvertedResidual`` at fixed widths."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand_conv: nn.Conv2d | None = None
        self.expand_bn: nn.BatchNorm2d | None = None
        if expand != 1:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
        self.dw_conv = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None and self.expand_bn is not None:  # both or neither
            out = F.relu6(self.expand_bn(self.expand_conv(x)))
        out = F.relu6(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(out))
        return x + out if self.residual else out


class PlainMobileNetV2(Features):
    """The ordinary twin of ``UnitMobileNetV2`` at fixed widths (same attribute names)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        blocks, widths = _blocks(config), config.widths
        self.out_features = widths[-1]
        self.stem_conv = nn.Conv2d(config.in_channels, widths[0], 3, stride=config.stem_stride, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.blocks = nn.ModuleList(PlainInvertedResidual(*block) for block in blocks)
        self.last_conv = nn.Conv2d(widths[-2], widths[-1], 1, bias=False)
        self.last_bn = nn.BatchNorm2d(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        x = F.relu6(self.last_bn(self.last_conv(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w8)


def torchvision_layout(blocks: list[tuple[bool, bool]]) -> TorchvisionLayout:
    """torchvision ``mobilenet_v2`` names -> these layers, and the channel spaces a unit mapping keeps together.

    ``blocks`` holds (has an expansion, adds its input) per block. The expanded channels are one space through the
    expansion, the depthwise convolution and the projection's input (without expansion the depthwise convolution
    stays in its input's space); blocks that add their input continue the stream they read.
    """
    names = {"features.0.0": "stem_conv", "features.0.1": "stem_bn"}
    spaces: list[ChannelSpace] = []
    stream = {"writes": ["features.0.0"], "norms": ["features.0.1"], "reads": []}
    for i, (expands, residual) in enumerate(blocks):
        tv, ours = f"features.{i + 1}.conv", f"blocks.{i}"
        if expands:
            names |= {f"{tv}.0.0": f"{ours}.expand_conv", f"{tv}.0.1": f"{ours}.expand_bn"}
            stream["reads"].append(f"{tv}.0.0")
            inner = {"writes": [f"{tv}.0.0"], "norms": [f"{tv}.0.1"], "reads": []}
        else:
            inner = stream  # the depthwise convolution filters the stream's own channels
        first = 1 if expands else 0  # torchvision numbers the depthwise step after the expansion, if any
        dw, project, project_bn = f"{tv}.{first}.0", f"{tv}.{first + 1}", f"{tv}.{first + 2}"
        names |= {dw: f"{ours}.dw_conv", dw[:-1] + "1": f"{ours}.dw_bn"}
        names |= {project: f"{ours}.project_conv", project_bn: f"{ours}.project_bn"}
        inner["writes"].append(dw)
        inner["norms"].append(dw[:-1] + "1")
        inner["reads"].append(project)
        if expands:
            spaces.append(ChannelSpace(**{key: tuple(v) for key, v in inner.items()}))
        if not residual:
            spaces.append(ChannelSpace(**{key: tuple(v) for key, v in stream.items()}))
            stream = {"writes": [], "norms": [], "reads": []}
        stream["writes"].append(project)
        stream["norms"].append(project_bn)
    last = f"features.{len(blocks) + 1}"
    names |= {f"{last}.0": "last_conv", f"{last}.1": "last_bn"}
    stream["reads"].append(f"{last}.0")
    spaces.append(ChannelSpace(**{key: tuple(v) for key, v in stream.items()}))
    spaces.append(ChannelSpace((f"{last}.0",), (f"{last}.1",), ("classifier.1",)))
    return TorchvisionLayout("mobilenet_v2", names, tuple(spaces), head="classifier.1")


MOBILENETV2 = Backbone(
    unit=UnitMobileNetV2,
    plain=PlainMobileNetV2,
    check_input=total_stride_check(lambda c: c.stem_stride * 2 ** sum(1 for _, _, s in SETTINGS if s > 1)),
    defaults={"depth": DEPTH, "widths": WIDTHS, "stem_stride": 2},
    widths_at=widths_at,
)
"""torchvision's MobileNetV2, registered as ``mobilenetv2``."""
