"""Backbones: the registry of backbone families, and a CIFAR-style residual network (He et al., 2016, §4.2).

Every family registers a unit-split builder and a plain builder (``register_backbone``); the ImageNet-style
``resnet18`` (``core/resnet18.py``) and ``mobilenetv2`` (``core/mobilenet.py``) live in their own modules and
register when this module is imported.

``UnitResNet`` is the physical network of a DVN: every layer is split into k units and runs any (task, level)
on compact activations. ``PlainResNet`` is the same architecture made of ordinary ``Conv2d``/``BatchNorm2d``
layers at one width; ``prune.extract_plain`` fills it with the weights of one (task, level). Both share
attribute names, so a unit layer's ``plain_state`` lands on the plain layer of the same name.

Shapes for depth 14, widths (32, 64, 128), a 1x28x28 input and stem stride 2, at level l of k:
stem (B, 32l/k, 14, 14) -> stage 1 (B, 32l/k, 14, 14) -> stage 2 (B, 64l/k, 7, 7) -> stage 3 (B, 128l/k, 4, 4)
-> pooled features (B, 128l/k).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig
from ..errors import BadConfig
from .layers import LevelBatchNorm2d, UnitConv2d
from .units import UnitLayout

__all__ = [
    "BACKBONES",
    "Backbone",
    "PlainResNet",
    "UnitResNet",
    "backbone_defaults",
    "build_features",
    "check_input_shape",
    "register_backbone",
    "total_stride_check",
]


def blocks_per_stage(depth: int) -> int:
    """n in depth = 6n + 2 (two convolutions per basic block, three stages, stem and head)."""
    if depth < 8 or (depth - 2) % 6:
        raise BadConfig(f"resnet depth {depth} is not of the form 6n+2 with n >= 1 (8, 14, 20, 32, ...)")
    return (depth - 2) // 6


def stage_strides(num_stages: int) -> list[int]:
    return [1] + [2] * (num_stages - 1)


class UnitBasicBlock(nn.Module):
    """Two 3x3 unit convolutions and a residual addition, all on compact ``C*l/k``-channel tensors."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, layout: UnitLayout) -> None:
        super().__init__()
        self.conv1 = UnitConv2d(in_channels, out_channels, 3, layout, stride=stride, padding=1)
        self.bn1 = LevelBatchNorm2d(out_channels, layout)
        self.conv2 = UnitConv2d(out_channels, out_channels, 3, layout, padding=1)
        self.bn2 = LevelBatchNorm2d(out_channels, layout)
        self.shortcut_conv = self.shortcut_bn = None
        if stride != 1 or in_channels != out_channels:  # projection shortcut, split into the same units
            self.shortcut_conv = UnitConv2d(in_channels, out_channels, 1, layout, stride=stride)
            self.shortcut_bn = LevelBatchNorm2d(out_channels, layout)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_in*l/k, H, W)
        out = F.relu(self.bn1(self.conv1(x, task, level, masked), task, level, masked))  # (B, C_out*l/k, H/s, W/s)
        out = self.bn2(self.conv2(out, task, level, masked), task, level, masked)  # (B, C_out*l/k, H/s, W/s)
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(x, task, level, masked), task, level, masked)
        return F.relu(out + shortcut)  # (B, C_out*l/k, H/s, W/s)


class UnitResNet(nn.Module):
    """The physical feature extractor of a DVN: stem, three stages of basic blocks, global average pool."""

    def __init__(self, config: BackboneConfig, layout: UnitLayout) -> None:
        super().__init__()
        n = blocks_per_stage(config.depth)
        widths = config.widths
        self.out_features = widths[-1]
        self.stem_conv = UnitConv2d(
            config.in_channels, widths[0], 3, layout, stride=config.stem_stride, padding=1, split_input=False
        )
        self.stem_bn = LevelBatchNorm2d(widths[0], layout)
        stages, in_channels = [], widths[0]
        for width, stride in zip(widths, stage_strides(len(widths)), strict=True):
            blocks = [UnitBasicBlock(in_channels, width, stride, layout)]
            blocks += [UnitBasicBlock(width, width, 1, layout) for _ in range(n - 1)]
            stages.append(nn.ModuleList(blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_img, H, W), never split
        x = F.relu(self.stem_bn(self.stem_conv(x, task, level, masked), task, level, masked))  # (B, w0*l/k, H/s, W/s)
        for stage in self.stages:
            for block in stage:
                x = block(x, task, level, masked)  # (B, w_i*l/k, H_i, W_i)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w_last*l/k)


class PlainBasicBlock(nn.Module):
    """The ordinary twin of ``UnitBasicBlock`` at one fixed width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut_conv = self.shortcut_bn = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(out + shortcut)


class PlainResNet(nn.Module):
    """Ordinary residual feature extractor with the given stage widths (a DVN level's widths)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        n = blocks_per_stage(config.depth)
        widths = config.widths
        self.out_features = widths[-1]
        self.stem_conv = nn.Conv2d(config.in_channels, widths[0], 3, stride=config.stem_stride, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for width, stride in zip(widths, stage_strides(len(widths)), strict=True):
            blocks = [PlainBasicBlock(in_channels, width, stride)]
            blocks += [PlainBasicBlock(width, width, 1) for _ in range(n - 1)]
            stages.append(nn.ModuleList(blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))  # (B, w0, H/s, W/s)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w_last)


def _check_resnet_input(config: BackboneConfig) -> None:
    """Refuse an input size and stem stride that leave the CIFAR-style ResNet nothing to look at.

    The stem convolution divides the input size by ``stem_stride`` (rounding up) and every stage after the first
    halves it. Each halving needs a feature map of at least 2x2, so the map after the stem must be at least
    ``2 ** (stages - 1)`` wide (4 for three stages), which needs an input of ``stem_stride * (4 - 1) + 1``.
    """
    halvings = sum(1 for s in stage_strides(len(config.widths)) if s > 1)
    need = 2**halvings  # the smallest feature map after the stem
    size, stride = config.input_size, config.stem_stride
    largest = size if need == 1 else (size - 1) // (need - 1)  # the largest stem stride this input takes
    if largest < 1:
        raise BadConfig(
            f"input_size {size} is too small for {len(config.widths)} stages: the feature map would shrink below "
            f"1x1 before the last stage; the smallest input_size that works is {need} (with stem_stride 1)"
        )
    if stride > size:
        raise BadConfig(
            f"stem_stride {stride} is larger than input_size {size}; the largest stem_stride that works is {largest}"
        )
    if stride > largest:
        raise BadConfig(
            f"input_size {size} is too small for stem_stride {stride}: the feature map would shrink below 1x1 "
            f"before the last stage; the smallest input_size that works is {stride * (need - 1) + 1} "
            f"(or use a stem_stride of at most {largest})"
        )


def total_stride_check(total_stride: Callable[[BackboneConfig], int]) -> Callable[[BackboneConfig], None]:
    """An input check for a backbone whose strides divide the input by ``total_stride(config)``.

    The input must be at least that large, so that the last stage still sees a whole pixel of every stride.
    """

    def check(config: BackboneConfig) -> None:
        need = total_stride(config)
        if config.input_size >= need:
            return
        hint = ""
        if config.stem_stride > 1:
            hint = f" (or --stem-stride 1, which needs {need // config.stem_stride})"
        raise BadConfig(
            f"input_size {config.input_size} is too small for {config.arch} with stem_stride {config.stem_stride}: "
            f"its strides divide the input by {need}; use an input_size of at least {need}{hint}"
        )

    return check


@dataclass(frozen=True)
class Backbone:
    """A registered backbone family.

    Args:
        unit: builds the unit-split feature extractor ``(config, layout) -> module``.
        plain: builds the plain twin at the config's widths, with the same attribute names.
        check_input: refuses an input size the family's strides cannot take (one line, ``BadConfig``).
        defaults: ``BackboneConfig`` fields this family sets when the user does not (its widths at width 1.0).
        widths_at: the widths at a width multiplier; None scales ``defaults["widths"]`` and rounds.
    """

    unit: Callable[[BackboneConfig, UnitLayout], nn.Module]
    plain: Callable[[BackboneConfig], nn.Module]
    check_input: Callable[[BackboneConfig], None]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    widths_at: Callable[[float], tuple[int, ...]] | None = None


BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, backbone: Backbone) -> None:
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = backbone


register_backbone(
    "resnet",
    Backbone(unit=UnitResNet, plain=PlainResNet, check_input=_check_resnet_input, defaults={"widths": (32, 64, 128)}),
)


def get_backbone(arch: str) -> Backbone:
    if arch not in BACKBONES:
        raise BadConfig(f"unknown arch {arch!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[arch]


def backbone_defaults(arch: str, width: float | None = None) -> dict[str, Any]:
    """The ``BackboneConfig`` fields family ``arch`` sets when they are not given, its widths at ``width``.

    A width multiplier scales every width of the family and rounds it (``mobilenetv2``: to a multiple of 8, as
    torchvision does); a width that does not split into ``k`` units is refused by ``BackboneConfig``.
    """
    backbone = get_backbone(arch)
    values = dict(backbone.defaults)
    if width is None:
        return values
    if not (math.isfinite(width) and width > 0):
        raise BadConfig(f"width multiplier must be a positive number, got {width}")
    if backbone.widths_at is not None:
        values["widths"] = backbone.widths_at(width)
    else:
        values["widths"] = tuple(max(1, round(w * width)) for w in values["widths"])
    return values


def build_features(config: BackboneConfig, layout: UnitLayout) -> nn.Module:
    """The unit-split feature extractor named by ``config.arch``."""
    if layout.units != config.units:
        raise BadConfig(f"layout has k={layout.units} units but the backbone config says k={config.units}")
    return get_backbone(config.arch).unit(config, layout)


def check_input_shape(config: BackboneConfig) -> None:
    """Refuse an input size and stem stride that the backbone's strides cannot take (one line)."""
    get_backbone(config.arch).check_input(config)


# The other built-in families register themselves on import, each from its own module.
from . import mobilenet, resnet18  # noqa: E402, F401
