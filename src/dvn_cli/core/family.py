"""What a backbone family is: its two builders, its input check and its defaults (``Backbone``).

Each family module (``core/resnet.py``, ``core/mobilenet.py``) defines its ``Backbone`` from this module and the
unit layers; the registry ``core/backbones.py`` imports the family modules and registers them by name. Nothing
here imports a family or the registry, so registration runs one way, without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import BackboneConfig
from ..errors import BadConfig
from .units import UnitLayout

__all__ = ["Backbone", "Features", "total_stride_check"]


class Features(nn.Module):
    """A family's feature extractor, unit-split or plain: it ends in global average pooling, so its output is
    ``(B, out_features)`` (``(B, out_features*l/k)`` for a unit one at level l), what a head reads."""

    out_features: int


@dataclass(frozen=True)
class Backbone:
    """A backbone family.

    Args:
        unit: builds the unit-split feature extractor ``(config, layout) -> module``.
        plain: builds the plain twin at the config's widths, with the same attribute names.
        check_input: refuses an input size the family's strides cannot take (one line, ``BadConfig``).
        defaults: ``BackboneConfig`` fields this family sets when the user does not (its widths at width 1.0).
        widths_at: the widths at a width multiplier; None scales ``defaults["widths"]`` and rounds.
    """

    unit: Callable[[BackboneConfig, UnitLayout], Features]
    plain: Callable[[BackboneConfig], Features]
    check_input: Callable[[BackboneConfig], None]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    widths_at: Callable[[float], tuple[int, ...]] | None = None


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
