"""Typed configuration: backbone, tasks and training, each JSON-round-trippable for checkpoint metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import BadConfig

__all__ = [
    "DATA_MODES",
    "LEVEL_SAMPLINGS",
    "MAX_WIDTH",
    "PRECISIONS",
    "SEED_RANGE",
    "BackboneConfig",
    "Range",
    "TaskSpec",
    "TrainConfig",
    "from_dict",
]

PRECISIONS: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Training precisions (``--precision``) and the ``torch`` dtype each autocasts the training forward to.

``fp32`` is plain float32 (no autocast); ``fp16`` adds gradient scaling. The one list of precision names: the
training loop derives its dtypes from it.
"""


DATA_MODES = ("auto", "memory", "stream")
"""How folder tasks are read (``--data-mode``): ``auto`` streams those above ``data.streaming.STREAM_ABOVE_BYTES``
at the input shape and holds the others in memory; ``memory`` and ``stream`` force one way for every folder task."""

LEVEL_SAMPLINGS = ("all", "sandwich")
"""Levels one training step trains (``--level-sampling``, ``training.levels.sample_levels``): ``all`` of them, or
the sandwich rule (the smallest, the largest and one random level between them)."""


@dataclass(frozen=True)
class Range:
    """The numbers a setting may hold: from ``low`` to ``high`` (None: no bound), each bound included unless open.

    Declared once on the field (``setting(..., limits=Range(...))``) and checked when a config is built, so flags,
    config files and stored runs are held to the same range (``_check_ranges``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'more than' if self.low_open else 'at least'} {self.low}"
        if self.low is None:
            return f"{'less than' if self.high_open else 'at most'} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


SEED_RANGE = Range(0, 2**63 - 1)
"""Seeds a run takes: what ``torch.manual_seed`` and a 64-bit signed integer both hold."""

MAX_WIDTH = 2**20
"""The most channels a stage may have: one 3x3 convolution that wide holds 36 TiB of float32 weights (no machine
trains it), and below it every weight's element count fits the 64-bit sizes PyTorch counts shapes in."""


def setting(default: Any, help: str, *, limits: Range | None = None) -> Any:
    """A config field with the help and range of its ``dvn train`` option (the option is written in ``cli/train.py``).

    Args:
        default: the field's default.
        help: the option's help text.
        limits: the numbers the field (each item of a list field) may hold; None: any.
    """
    return field(default=default, metadata={"help": help, "limits": limits})


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the physical network.

    Args:
        arch: registered backbone name (see ``backbones.BACKBONES``): ``resnet`` (CIFAR-style), ``resnet18``,
            ``mobilenetv2``; ``backbones.backbone_defaults`` gives the fields each family sets.
        depth: ResNet depth ``6n + 2`` (n basic blocks per stage, three stages); fixed for the other families.
        widths: channels of the stages (the family says how many); each must be divisible by ``units``.
        units: k, the number of units per layer and so the number of levels.
        in_channels: channels of the input image (never split into units).
        input_size: height and width of the input image every task is brought to.
        stem_stride: stride of the first convolution (2 halves the cost on 28x28 digits).
    """

    arch: str = setting("resnet", "Backbone family: resnet (CIFAR-style, default), resnet18, mobilenetv2.")
    depth: int = setting(14, "ResNet depth 6n+2.")
    widths: tuple[int, ...] = setting((32, 64, 128), "Stage widths, e.g. 32,64,128.", limits=Range(1, MAX_WIDTH))
    units: int = setting(4, "k: units per layer = number of levels.", limits=Range(1))
    in_channels: int = setting(1, "Input channels, 1 or 3 (default: from tasks).", limits=Range(1))
    input_size: int = setting(28, "Input height and width (default: largest task's).", limits=Range(1))
    stem_stride: int = setting(1, "Stride of the first convolution.", limits=Range(1))

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        _check_ranges(self)
        for width in self.widths:
            if width % self.units:
                raise BadConfig(
                    f"channels {width} not divisible by k={self.units}; "
                    f"choose widths that are multiples of {self.units}"
                )


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
        if isinstance(self.classes, str) or not isinstance(self.classes, list | tuple):
            raise BadConfig(f"classes of task {self.name!r} must be a list of names, got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.classes:
            raise BadConfig(f"task {self.name!r} has no classes")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise BadConfig(f"task {self.name!r} has normalisation mean {self.mean} std {self.std}; std must be > 0")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``dvn train`` needs; saved in the checkpoint so a run can be read back and resumed."""

    tasks: tuple[str, ...] = setting(
        ("mnist", "fashion-mnist"), "Comma-separated tasks: dataset names or name=path/to/folder."
    )
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    order_rule: str = setting("nearest", "Unit order rule: nearest, cyclic, table or affinity (measured).")
    order_table: tuple[tuple[int, ...], ...] | None = setting(
        None, "Explicit orders for --order-rule table, e.g. '0,1,2,3;3,2,1,0'."
    )
    affinity_steps: int = setting(
        200, "Warm-up steps of --order-rule affinity (counted in the run's steps).", limits=Range(1)
    )
    epochs: float = setting(3.0, "Epochs over the largest task (may be fractional).", limits=Range(0, low_open=True))
    batch_size: int = setting(128, "Images per task per step.", limits=Range(1))
    lr: float = setting(0.1, "Peak learning rate (SGD, Nesterov, cosine).", limits=Range(0, low_open=True))
    momentum: float = setting(0.9, "SGD momentum.", limits=Range(0, 1, high_open=True))
    weight_decay: float = setting(5e-4, "Weight decay of conv/linear weights.", limits=Range(0))
    warmup_steps: int = setting(100, "Linear warm-up steps.", limits=Range(0))
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy.", limits=Range(0, 1, high_open=True))
    level_weights: tuple[float, ...] | None = setting(
        None, "Loss weight per level, e.g. 1,1,1,1 (at least one above 0).", limits=Range(0)
    )
    level_sampling: str = setting(
        "all", "Levels trained per step: all, or sandwich (level 1, level k and one random level between)."
    )
    distill: float = setting(0.0, "Distillation weight from the top level (0 = off).", limits=Range(0))
    seed: int = setting(0, "Seed for a repeatable run.", limits=SEED_RANGE)
    limit: int | None = setting(None, "At most N training images per task (quick runs).", limits=Range(1))
    val_fraction: float = setting(
        0.1, "Share of training images held out for validation.", limits=Range(0, 1, low_open=True, high_open=True)
    )
    data_root: str = setting("data", "Dataset folder (default ./data or $DVN_DATA_ROOT).")
    download: bool = setting(False, "Let torchvision download data.")
    data_mode: str = setting(
        "auto", "Folder tasks: auto (stream those over 256 MiB at the input shape), memory or stream."
    )
    workers: int = setting(2, "Processes decoding each streamed task (default 2).", limits=Range(0))
    augment: bool = setting(True, "Data augmentation.")
    channels_last: bool = setting(True, "Channels-last memory format for the training step.")
    task_threads: bool = setting(
        True, "On CPU, run each task's forward and backward in its own thread (one intra-op thread each)."
    )
    device: str = setting("cpu", "cpu, cuda or auto.")
    precision: str = setting("fp32", "fp32, bf16 or fp16: autocast the training forward (fp16 scales gradients).")
    out: str = setting("runs/dvn", "Run folder (default runs/dvn).")
    init: str | None = setting(None, "Start from a torchvision state dict in safetensors (see dvn convert).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", from_dict(BackboneConfig, self.backbone))
        if self.order_table is not None:
            object.__setattr__(self, "order_table", tuple(tuple(r) for r in self.order_table))
        if self.level_weights is not None:
            object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))
        _check_finite(self)
        _check_ranges(self)
        if self.level_weights is not None and not any(self.level_weights):
            raise BadConfig("level_weights are all 0, so no level would learn; give at least one weight above 0")
        if not self.tasks:
            raise BadConfig("no tasks given; pass --tasks a,b")
        names = [t.partition("=")[0].strip() for t in self.tasks]  # "name" or "name=path/to/folder"
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise BadConfig(f"task listed twice: {', '.join(dupes)}")
        if self.data_mode not in DATA_MODES:
            raise BadConfig(f"unknown data mode {self.data_mode!r}; use {', '.join(DATA_MODES)}")
        if self.level_sampling not in LEVEL_SAMPLINGS:
            raise BadConfig(f"unknown level sampling {self.level_sampling!r}; use {', '.join(LEVEL_SAMPLINGS)}")
        if self.precision not in PRECISIONS:
            raise BadConfig(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        if self.order_rule == "affinity" and len(self.tasks) < 2:
            raise BadConfig("order rule 'affinity' places several tasks; with one task use nearest")
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


def _check_ranges(cfg: Any) -> None:
    """Refuse a number outside its field's declared ``Range`` (each item of a list field), naming the field."""
    for f in fields(cfg):
        limits, value = f.metadata.get("limits"), getattr(cfg, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if limits is not None and not all(v is None or limits.holds(v) for v in items):
            shown = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
            each = " each" if isinstance(value, tuple) else ""
            raise BadConfig(f"{f.name} must{each} be {limits}, got {shown}")


def _check_finite(cfg: TrainConfig) -> None:
    """Refuse NaN and infinity in any float setting (``nan <= 0`` is False, so range checks let them through)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            shown = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
            raise BadConfig(f"{f.name} must be a finite number, got {shown}")
