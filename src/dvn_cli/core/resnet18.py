"""An ImageNet-style ResNet-18 (He et al., 2016; torchvision's ``resnet18``) built from unit layers, and its twin.

The stem is a 7x7 convolution of stride ``stem_stride`` (2 as in torchvision) and a 3x3 max-pool of stride 2; four
stages of two basic blocks (``backbones.UnitBasicBlock``, projection shortcut where width or stride changes) with
strides 1, 2, 2, 2; global average pooling. Widths are 64/128/256/512 at width 1.0 (``backbone_defaults``).

Shapes for widths (64, 128, 256, 512), a 3x224x224 input and stem stride 2, at level l of k:
stem (B, 64l/k, 112, 112) -> pool (B, 64l/k, 56, 56) -> stage 1 (B, 64l/k, 56, 56) -> stage 2 (B, 128l/k, 28, 28)
-> stage 3 (B, 256l/k, 14, 14) -> stage 4 (B, 512l/k, 7, 7) -> pooled features (B, 512l/k).

``torchvision_layout`` says how a torchvision ``resnet18`` state dict maps onto these layers (``core.pretrained``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig
from ..errors import BadConfig
from .backbones import Backbone, PlainBasicBlock, UnitBasicBlock, register_backbone, total_stride_check
from .layers import LevelBatchNorm2d, UnitConv2d
from .pretrained import ChannelSpace, TorchvisionLayout
from .units import UnitLayout

__all__ = ["PlainResNet18", "UnitResNet18"]

BLOCKS = (2, 2, 2, 2)
STRIDES = (1, 2, 2, 2)
WIDTHS = (64, 128, 256, 512)


def _check(config: BackboneConfig) -> None:
    if config.depth != 18:
        raise BadConfig(f"resnet18 has depth 18, not {config.depth}; leave --depth out")
    if len(config.widths) != len(WIDTHS):
        raise BadConfig(f"resnet18 has {len(WIDTHS)} stage widths, got {len(config.widths)} ({config.widths})")


class UnitResNet18(nn.Module):
    """The physical ResNet-18 of a DVN: 7x7 stem, max-pool, four stages of basic blocks, global average pool."""

    def __init__(self, config: BackboneConfig, layout: UnitLayout) -> None:
        super().__init__()
        _check(config)
        widths = config.widths
        self.out_features = widths[-1]
        self.stem_conv = UnitConv2d(
            config.in_channels, widths[0], 7, layout, stride=config.stem_stride, padding=3, split_input=False
        )
        self.stem_bn = LevelBatchNorm2d(widths[0], layout)
        stages, in_channels = [], widths[0]
        for width, stride, n in zip(widths, STRIDES, BLOCKS, strict=True):
            blocks = [UnitBasicBlock(in_channels, width, stride, layout)]
            blocks += [UnitBasicBlock(width, width, 1, layout) for _ in range(n - 1)]
            stages.append(nn.ModuleList(blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, task: int, level: int, masked: bool = False) -> torch.Tensor:
        # x: (B, C_img, H, W), never split
        x = F.relu(self.stem_bn(self.stem_conv(x, task, level, masked), task, level, masked))  # (B, w0*l/k, H/s, W/s)
        x = F.max_pool2d(x, 3, 2, 1)  # (B, w0*l/k, H/2s, W/2s)
        for stage in self.stages:
            for block in stage:
                x = block(x, task, level, masked)  # (B, w_i*l/k, H_i, W_i)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w3*l/k)

    def torchvision_layout(self) -> TorchvisionLayout:
        """How a torchvision ``resnet18`` state dict maps onto this network (``core.pretrained``)."""
        return torchvision_layout(tuple(len(stage) for stage in self.stages))


class PlainResNet18(nn.Module):
    """The ordinary twin of ``UnitResNet18`` at fixed widths (same attribute names)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        _check(config)
        widths = config.widths
        self.out_features = widths[-1]
        self.stem_conv = nn.Conv2d(config.in_channels, widths[0], 7, stride=config.stem_stride, padding=3, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for width, stride, n in zip(widths, STRIDES, BLOCKS, strict=True):
            blocks = [PlainBasicBlock(in_channels, width, stride)]
            blocks += [PlainBasicBlock(width, width, 1) for _ in range(n - 1)]
            stages.append(nn.ModuleList(blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_bn(self.stem_conv(x))), 3, 2, 1)  # (B, w0, H/2s, W/2s)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, w3)


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


register_backbone(
    "resnet18",
    Backbone(
        unit=UnitResNet18,
        plain=PlainResNet18,
        check_input=total_stride_check(lambda c: c.stem_stride * 2 * 2 ** (len(STRIDES) - 1)),
        defaults={"depth": 18, "widths": WIDTHS, "stem_stride": 2},
    ),
)
