"""Typed configuration: backbone, tasks and training, each JSON-round-trippable for checkpoint metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import BadConfig

__all__ = ["PRECISIONS", "BackboneConfig", "TaskSpec", "TrainConfig", "from_dict"]

PRECISIONS = ("fp32", "bf16", "fp16")
"""Training precisions: float32, or autocast to bfloat16 / float16 (float16 with gradient scaling)."""


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the physical network.

    Args:
        arch: registered backbone name (see ``backbones.BACKBONES``).
        depth: ResNet depth ``6n + 2`` (n basic blocks per stage, three stages).
        widths: channels of the three stages; each must be divisible by ``units``.
        units: k, the number of units per layer and so the number of levels.
        in_channels: channels of the input image (never split into units).
        input_size: height and width of the input image every task is brought to.
        stem_stride: stride of the first convolution (2 halves the cost on 28x28 digits).
    """

    arch: str = "resnet"
    depth: int = 14
    widths: tuple[int, ...] = (32, 64, 128)
    units: int = 4
    in_channels: int = 1
    input_size: int = 28
    stem_stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.units < 1:
            raise BadConfig(f"units k={self.units} must be at least 1")
        for width in self.widths:
            if width % self.units:
                raise BadConfig(
                    f"channels {width} not divisible by k={self.units}; "
                    f"choose widths that are multiples of {self.units}"
                )
        if self.in_channels < 1 or self.input_size < 1 or self.stem_stride < 1:
            raise BadConfig("in_channels, input_size and stem_stride must be positive")


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: its name, classes and the preprocessing its images get.

    Args:
        name: task name used on the command line (``mnist``, ``fashion-mnist``, ``pets`` ...).
        classes: class names in output order.
        mean: per-channel normalisation mean, after conversion to the model's channels.
        std: per-channel normalisation std.
        source: where the data came from (a dataset name or a folder path).
        resize: how images of another size reach the input size (``pad`` or ``bilinear``).
    """

    name: str
    classes: tuple[str, ...]
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    source: str = ""
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.classes:
            raise BadConfig(f"task {self.name!r} has no classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``dvn train`` needs; saved in the checkpoint so a run can be read back and resumed."""

    tasks: tuple[str, ...] = ("mnist", "fashion-mnist")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    order_rule: str = "nearest"
    order_table: tuple[tuple[int, ...], ...] | None = None
    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    label_smoothing: float = 0.0
    level_weights: tuple[float, ...] | None = None
    distill: float = 0.0
    seed: int = 0
    limit: int | None = None
    val_fraction: float = 0.1
    data_root: str = "data"
    download: bool = False
    augment: bool = True
    channels_last: bool = True
    device: str = "cpu"
    precision: str = "fp32"
    out: str = "runs/dvn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", from_dict(BackboneConfig, self.backbone))
        if self.order_table is not None:
            object.__setattr__(self, "order_table", tuple(tuple(r) for r in self.order_table))
        if self.level_weights is not None:
            object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))
        if not self.tasks:
            raise BadConfig("no tasks given; pass --tasks a,b")
        names = [t.partition("=")[0].strip() for t in self.tasks]  # "name" or "name=path/to/folder"
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise BadConfig(f"task listed twice: {', '.join(dupes)}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise BadConfig("epochs, batch size and learning rate must be positive")
        if self.precision not in PRECISIONS:
            raise BadConfig(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        if self.level_weights is not None and len(self.level_weights) != self.backbone.units:
            raise BadConfig(f"{len(self.level_weights)} level weights given for k={self.backbone.units} levels")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass from a dict, refusing unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadConfig(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)
