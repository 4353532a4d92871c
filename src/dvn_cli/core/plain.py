"""The plain twin of a virtual network: one (task, level) as ordinary layers, weights sliced out once.

Level ``l`` of task ``t`` uses the units ``order_t[:l]`` of every layer (Kim et al., CVPR 2019). Its weights are
the dense blocks ``W[out(S), in(S)]``; copying each block out once gives an ordinary network ``l/k`` as wide as
the physical one, built by the backbone's registered PLAIN builder. Attribute names mirror the DVN, so each unit
layer's ``plain_state(task, level)`` lands on the plain layer of the same name (``heads.<t>`` lands on ``head``).
The result computes exactly what ``network(x, task, level)`` computes in eval mode (docs/design.md §3).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..config import BackboneConfig
from ..errors import BadConfig
from .backbones import get_backbone
from .network import DeepVirtualNetwork

__all__ = ["PlainNetwork", "extract_plain", "plain_config", "plain_state"]


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


def plain_state(network: DeepVirtualNetwork, task: int, level: int) -> dict[str, torch.Tensor]:
    """State dict of the plain twin: every unit layer's ``plain_state`` under its own name, the head as ``head``."""
    state: dict[str, torch.Tensor] = {}
    for name, module in network.features.named_modules():
        if hasattr(module, "plain_state"):
            prefix = f"features.{name}." if name else "features."
            state |= {prefix + key: t for key, t in module.plain_state(task, level).items()}
    state |= {f"head.{key}": t for key, t in network.head(task).plain_state(task, level).items()}
    return state


def extract_plain(network: DeepVirtualNetwork, task: int | str, level: int) -> PlainNetwork:
    """The virtual network (task, level) as a ``PlainNetwork`` in eval mode, on the network's device.

    Every weight is copied out once as a contiguous tensor; the source network is not changed.
    """
    t = network.task_index(task)
    network.layout.check(t, level)
    plain = PlainNetwork(plain_config(network.config, level), network.tasks[t].num_classes)
    try:
        plain.load_state_dict(plain_state(network, t, level), strict=True)
    except RuntimeError as exc:  # a backbone whose unit and plain builders disagree: a bug, said plainly
        raise RuntimeError(f"plain {network.config.arch} does not mirror its unit network: {exc}") from None
    return plain.to(next(network.parameters()).device).eval()
