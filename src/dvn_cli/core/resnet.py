"""Residual networks (He et al., 2016) built from unit layers, and their plain twins, as torchvision's ``resnet.py``.

Two families share one network: a stem convolution, an optional 3x3 max-pool of stride 2, stages of basic blocks,
global average pooling. They differ only in what ``ResNetShape`` holds:

- ``resnet`` (CIFAR-style, §4.2 of the paper): a 3x3 stem, no max-pool, ``n`` blocks in each stage for depth
  ``6n + 2``; widths 32/64/128 at width 1.0.
- ``resnet18`` (torchvision's ``resnet18``): a 7x7 stem, the max-pool, two blocks in each of four stages; widths
  64/128/256/512 at width 1.0 and stem stride 2.

Every stage's first block halves the feature map (except the first stage's) and, where width or stride changes,
adds through a projection shortcut; ``_make_stages`` builds the stages of both twins. ``UnitResNet`` is the
physical network of a DVN: every layer is split into k units and runs any (task, level) on compact activations.
``PlainResNet`` is the same architecture made of ordinary ``Conv2d``/``BatchNorm2d`` layers at one width;
``plain.extract_plain`` fills it with the weights of one (task, level). Both share attribute names, so a unit
layer's ``plain_state`` lands on the plain layer of the same name.

Shapes at level l of k:

- ``resnet``, depth 14, widths (32, 64, 128), a 1x28x28 input, stem stride 2: stem (B, 32l/k, 14, 14) -> stage 1
  (B, 32l/k, 14, 14) -> stage 2 (B, 64l/k, 7, 7) -> stage 3 (B, 128l/k, 4, 4) -> pooled features (B, 128l/k).
- ``resnet18``, widths (64, 128, 256, 512), a 3x224x224 input, stem stride 2: stem (B, 64l/k, 112, 112) -> pool
  (B, 64l/k, 56, 56) -> stage 1 (B, 64l/k, 56, 56) -> stage 2 (B, 128l/k, 28, 28) -> stage 3 (B, 256l/k, 14, 14)
  -> stage 4 (B, 512l/k, 7, 7) -> pooled features (B, 512l/k).

``UnitResNet18.torchvision_layout`` says how a torchvision ``resnet18`` state dict maps onto these layers
(``core.pretrained``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig
from ..errors import BadConfig
from .family import Backbone, Features, total_stride_check
from .layers import LevelBatchNorm2d, UnitConv2d
from .pretrained import ChannelSpace, TorchvisionLayout
from .units import UnitLayout

__all__ = ["RESNET", "RESNET18", "PlainResNet", "ResNetShape", "UnitResNet", "UnitResNet18"]


@dataclass(frozen=True)
class ResNetShape:
    """What sets one ResNet family apart: the stem's kernel, the max-pool after it, and the blocks per stage."""

    stem_kernel: int
    max_pool: bool
    blocks: tuple[int, ...]


def blocks_per_stage(depth: int) -> int:
    """n in depth = 6n + 2 (two convolutions per basic block, three stages, stem and head)."""
    if depth < 8 or (depth - 2) % 6:
        raise BadConfig(f"resnet depth {depth} is not of the form 6n+2 with n >= 1 (8, 14, 20, 32, ...)")
    return (depth - 2) // 6


def stage_strides(num_stages: int) -> list[int]:
    """The first stage keeps the feature map; every later one halves it."""
    return [1] + [2] * (num_stages - 1)


def cifar_shape(config: BackboneConfig) -> ResNetShape:
    """The CIFAR-style ResNet: 3x3 stem, no max-pool, ``n`` blocks in every stage for depth ``6n + 2``."""
    return ResNetShape(stem_kernel=3, max_pool=False, blocks=(blocks_per_stage(config.depth),) * len(config.widths))


RESNET18_SHAPE = ResNetShape(stem_kernel=7, max_pool=True, blocks=(2, 2, 2, 2))
"""torchvision's ResNet-18: 7x7 stem, max-pool, two blocks in each of four stages."""


def resnet18_shape(config: BackboneConfig) -> ResNetShape:
    """``RESNET18_SHAPE``, once the config is shown to have ResNet-18's depth and number of stages."""
    if config.depth != 18:
        raise BadConfig(f"resnet18 has depth 18, not {config.depth}; leave --depth out")
    if len(config.widths) != len(RESNET18_SHAPE.blocks):
        raise BadConfig(
            f"resnet18 has {len(RESNET18_SHAPE.blocks)} stage widths, got {len(config.widths)} ({config.widths})"
        )
    return RESNET18_SHAPE


class UnitBasicBlock(nn.Module):
    """Two 3x3 unit convolutions and a residual addition, all on compact ``C*l/k``-channel tensors."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, layout: UnitLayout) -> None:
        super().__init__()
        self.conv1 = UnitConv2d(in_channels, out_channels, 3, layout, stride=stride, padding=1)
        self.bn1 = LevelBatchNorm2d(out_channels, layout)
        self.conv2 = UnitConv2d(out_channels, out_channels, 3, layout, padding=1)
        self.bn2 = LevelBatchNorm2d(out_channels, layout)
        self.shortcut_conv: UnitConv2d | None = None
        self.shortcut_bn: LevelBatchNorm2d | None = None
        if stride != 1 or in_channels != out_channels:  # projection shortcut, split into the same units
            self.shortcut_conv = UnitConv2d(in_channels, out_channels, 1, layout, stride=stride)
            self.shortcut_bn = LevelBatchNorm2d(out_channels, layout)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_in*l/k, H, W)
        out = F.relu(self.bn1(self.conv1(x, task, level, masked), task, level, masked))  # (B, C_out*l/k, H/s, W/s)
        out = self.bn2(self.conv2(out, task, level, masked), task, level, masked)  # (B, C_out*l/k, H/s, W/s)
        shortcut = x
        if self.shortcut_conv is not None and self.shortcut_bn is not None:  # both or neither
            shortcut = self.shortcut_bn(self.shortcut_conv(x, task, level, masked), task, level, masked)
        return F.relu(out + shortcut)  # (B, C_out*l/k, H/s, W/s)


class PlainBasicBlock(nn.Module):
    """The ordinary twin of ``UnitBasicBlock`` at one fixed width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut_conv: nn.Conv2d | None = None
        self.shortcut_bn: nn.BatchNorm2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.shortcut_conv is not None and self.shortcut_bn is not None:  # both or neither
            shortcut = self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(out + shortcut)


def _make_stages(
    block: Callable[[int, int, int], nn.Module], widths: Sequence[int], blocks: Sequence[int]
) -> nn.ModuleList:
    """torchvision's ``_make_layer`` for every stage: ``stages[i]`` holds ``blocks[i]`` blocks of width ``widths[i]``.

    ``block(in_channels, out_channels, stride)`` builds one block; a stage's first block reads the previous width
    (the stem's, ``widths[0]``, for the first stage) at the stage's stride, its other blocks keep width and size.
    """
    stages, in_channels = [], widths[0]
    for width, stride, n in zip(widths, stage_strides(len(widths)), blocks, strict=True):
        first = block(in_channels, width, stride)  # a projection shortcut where width or stride changes
        stages.append(nn.ModuleList([first, *(block(width, width, 1) for _ in range(n - 1))]))
        in_channels = width
    return nn.ModuleList(stages)


class UnitResNet(Features):
    """The physical ResNet of a DVN: stem, optional max-pool, stages of basic blocks, global average pool."""

    def __init__(self, config: BackboneConfig, layout: UnitLayout, shape: ResNetShape) -> None:
        super().__init__()
        widths, kernel = config.widths, shape.stem_kernel
        self.out_features = widths[-1]
        self.stem_conv = UnitConv2d(
            config.in_channels,
            widths[0],
            kernel,
            layout,
            stride=config.stem_stride,
            padding=kernel // 2,
            split_input=False,
        )
        self.stem_bn = LevelBatchNorm2d(widths[0], layout)
        self.max_pool = shape.max_pool
        self.stages = _make_stages(functools.partial(UnitBasicBlock, layout=layout), widths, shape.blocks)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_img, H, W), never split
        x = F.relu(self.stem_bn(self.stem_conv(x, task, level, masked), task, level, masked))  # (B, w0*l/k, H/s, W/s)
        if self.max_pool:
            x = F.max_pool2d(x, 3, 2, 1)  # (B, w0*l/k, H/2s, W/2s)
        for stage in self.stages:
            for block in stage.children():
                x = block(x, task, level, masked)  # (B, w_i*l/k, H_i, W_i)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w_last*l/k)


class PlainResNet(Features):
    """The ordinary twin of ``UnitResNet`` at the config's widths (a DVN level's widths; same attribute names)."""

    def __init__(self, config: BackboneConfig, shape: ResNetShape) -> None:
        super().__init__()
        widths, kernel = config.widths, shape.stem_kernel
        self.out_features = widths[-1]
        self.stem_conv = nn.Conv2d(
            config.in_channels, widths[0], kernel, stride=config.stem_stride, padding=kernel // 2, bias=False
        )
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.max_pool = shape.max_pool
        self.stages = _make_stages(PlainBasicBlock, widths, shape.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))  # (B, w0, H/s, W/s)
        if self.max_pool:
            x = F.max_pool2d(x, 3, 2, 1)  # (B, w0, H/2s, W/2s)
        for stage in self.stages:
            for block in stage.children():
                x = block(x)  # (B, w_i, H_i, W_i)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w_last)


class UnitResNet18(UnitResNet):
    """``UnitResNet`` in ResNet-18's shape; its ``torchvision_layout`` lets ``--init`` fill it (``core.pretrained``)."""

    def __init__(self, config: BackboneConfig, layout: UnitLayout) -> None:
        super().__init__(config, layout, resnet18_shape(config))

    def torchvision_layout(self) -> TorchvisionLayout:
        """How a torchvision ``resnet18`` state dict maps onto this network."""
        return torchvision_layout(tuple(len(list(stage.children())) for stage in self.stages))


def torchvision_layout(blocks: tuple[int, ...]) -> TorchvisionLayout:
    """torchvision ``resnet18`` names -> these layers, and the channel spaces a unit mapping must keep together.

    A stage's blocks add onto one residual stream (stage 1's also onto the stem's output), so a stream is one space
    across every layer that writes or reads it; a projection shortcut starts the next stream, and each block's inner
    channels (conv1 -> conv2) are a space of their own.
    """
    names = {"conv1": "stem_conv", "bn1": "stem_bn"}
    spaces: list[ChannelSpace] = []
    stream = {"writes": ["conv1"], "norms": ["bn1"], "reads": []}
    for i, n in enumerate(blocks):
        for j in range(n):
            tv, ours = f"layer{i + 1}.{j}", f"stages.{i}.{j}"
            names |= {f"{tv}.{c}": f"{ours}.{c}" for c in ("conv1", "bn1", "conv2", "bn2")}
            stream["reads"].append(f"{tv}.conv1")
            if j == 0 and i > 0:  # the projection shortcut reads the old stream and starts the next
                names |= {f"{tv}.downsample.0": f"{ours}.shortcut_conv", f"{tv}.downsample.1": f"{ours}.shortcut_bn"}
                stream["reads"].append(f"{tv}.downsample.0")
                spaces.append(ChannelSpace(**{key: tuple(v) for key, v in stream.items()}))
                stream = {"writes": [f"{tv}.downsample.0"], "norms": [f"{tv}.downsample.1"], "reads": []}
            spaces.append(ChannelSpace((f"{tv}.conv1",), (f"{tv}.bn1",), (f"{tv}.conv2",)))
            stream["writes"].append(f"{tv}.conv2")
            stream["norms"].append(f"{tv}.bn2")
    stream["reads"].append("fc")
    spaces.append(ChannelSpace(**{key: tuple(v) for key, v in stream.items()}))
    return TorchvisionLayout("resnet18", names, tuple(spaces), head="fc")


def _check_cifar_input(config: BackboneConfig) -> None:
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


RESNET = Backbone(
    unit=lambda config, layout: UnitResNet(config, layout, cifar_shape(config)),
    plain=lambda config: PlainResNet(config, cifar_shape(config)),
    check_input=_check_cifar_input,
    defaults={"widths": (32, 64, 128)},
)
"""The CIFAR-style ResNet, registered as ``resnet`` (the default)."""

RESNET18 = Backbone(
    unit=UnitResNet18,
    plain=lambda config: PlainResNet(config, resnet18_shape(config)),
    check_input=total_stride_check(lambda c: c.stem_stride * 2 * 2 ** (len(RESNET18_SHAPE.blocks) - 1)),
    defaults={"depth": 18, "widths": (64, 128, 256, 512), "stem_stride": 2},
)
"""torchvision's ResNet-18, registered as ``resnet18``; its strides divide the input by ``stem_stride * 2 * 2**3``."""
