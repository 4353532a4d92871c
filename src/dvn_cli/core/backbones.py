"""Backbones: the registry of backbone families by name (torchvision's ``register_model``) and its look-ups.

A family is a ``family.Backbone`` (unit builder, plain twin, input check, defaults) defined in its own module:
``core/resnet.py`` (``resnet``, the CIFAR-style default, and ``resnet18``) and ``core/mobilenet.py``
(``mobilenetv2``). This module imports those modules and registers each family below; they import only lower
pieces (``family``, ``layers``, ``units``, ``pretrained``), never this module, so registering runs one way and
no import cycle forms. The network (``build_features``), the plain twin (``get_backbone``), the training input
check (``check_input_shape``) and the configuration (``backbone_defaults``) look families up here.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import BackboneConfig
from ..errors import BadConfig
from . import mobilenet, resnet
from .family import Backbone, Features
from .units import UnitLayout

__all__ = [
    "BACKBONES",
    "backbone_defaults",
    "build_features",
    "check_input_shape",
    "get_backbone",
    "register_backbone",
]

BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, backbone: Backbone) -> None:
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = backbone


register_backbone("resnet", resnet.RESNET)
register_backbone("resnet18", resnet.RESNET18)
register_backbone("mobilenetv2", mobilenet.MOBILENETV2)


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


def build_features(config: BackboneConfig, layout: UnitLayout) -> Features:
    """The unit-split feature extractor named by ``config.arch``."""
    if layout.units != config.units:
        raise BadConfig(f"layout has k={layout.units} units but the backbone config says k={config.units}")
    return get_backbone(config.arch).unit(config, layout)


def check_input_shape(config: BackboneConfig) -> None:
    """Refuse an input size and stem stride that the backbone's strides cannot take (one line)."""
    get_backbone(config.arch).check_input(config)
