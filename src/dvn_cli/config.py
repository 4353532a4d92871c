"""Typed configuration: backbone, tasks and training, each JSON-round-trippable for checkpoint metadata."""

from __future__ import annotations

import json
import math
import os
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomllib

from .errors import BadConfig

__all__ = [
    "NOT_COMPARED",
    "DATA_MODES",
    "LEVEL_SAMPLINGS",
    "MAX_WIDTH",
    "PRECISIONS",
    "SEED_RANGE",
    "BackboneConfig",
    "Range",
    "TaskSpec",
    "TrainConfig",
    "check_types",
    "comparable",
    "config_differences",
    "from_dict",
    "GivenSettings",
    "build_train_config",
    "given_settings",
    "read_config_file",
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


# ------------------------------------------------------------------------------------------ types of values


def _matches(kind: Any, value: Any) -> bool:
    """Whether ``value`` (as TOML or JSON gives it) fits the annotation ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(k, value) for k in typing.get_args(kind))
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, list | tuple) and all(_matches(item, v) for v in value)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if is_dataclass(kind):
        return isinstance(value, Mapping | kind)
    return True


def _describe(kind: Any, plural: bool = False) -> str:
    """``kind`` in words: "a number", "a list of integers", ... (``None`` is left out: TOML has no null)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(k, plural) for k in typing.get_args(kind) if k is not type(None))
    if origin is tuple:
        return ("lists of " if plural else "a list of ") + _describe(typing.get_args(kind)[0], plural=True)
    words = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers")}
    words[str] = ("a string", "strings")
    if kind in words:
        return words[kind][plural]
    return "tables" if plural else "a table"


def _show(value: Any) -> str:
    """A value as a config file writes it: ``true`` and ``false`` for booleans, else its repr."""
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def check_types(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse a value whose type does not fit the field of ``cls`` it sets, naming the key.

    For values read from a config file (flags are typed by the command line): every field of ``TrainConfig`` and
    ``BackboneConfig`` is checked from its annotation (int, float, bool, str, tuples of them, optional ones).
    Unknown keys are left to ``from_dict``.

    Args:
        cls: a config dataclass.
        values: field name -> value.
        prefix: put before a key in the message (``backbone.`` for the ``[backbone]`` table).
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _matches(hints[key], value):
            raise BadConfig(f"{prefix}{key} must be {_describe(hints[key])}, got {_show(value)}")


# ---------------------------------------------------------------------------------- the config of dvn train


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a TOML config file, refusing a missing file, a folder or FIFO, and bad TOML in one line."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BadConfig(f"config file {path} not found") from None
    except OSError as exc:
        raise BadConfig(f"cannot read config file {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever
        raise BadConfig(f"config file {path} is not a regular file")
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise BadConfig(f"cannot read config file {path} ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadConfig(f"config file {path} is not valid TOML: {exc}") from None


@dataclass(frozen=True)
class GivenSettings:
    """What the user gave ``dvn train``: config file values overridden by flags, type-checked, not yet resolved.

    ``train`` holds ``TrainConfig`` fields, ``backbone`` ``BackboneConfig`` fields, ``width`` the ``--width``
    multiplier (None: not given), ``data_root_flag`` the ``--data-root`` flag alone (it outranks the environment,
    which outranks the file's). ``training.train_config.load_train_config`` resolves them into a ``TrainConfig``.
    """

    train: dict[str, Any]
    backbone: dict[str, Any]
    width: float | None
    data_root_flag: str | None


def given_settings(
    file: str | os.PathLike[str] | None, flags: Mapping[str, Any], backbone_flags: Mapping[str, Any]
) -> GivenSettings:
    """The settings of a TOML file (optional ``[backbone]`` table), overridden by the flags that are not None."""
    values = read_config_file(file) if file is not None else {}
    backbone = values.pop("backbone", {})
    if isinstance(values.get("tasks"), str):
        values["tasks"] = [t.strip() for t in values["tasks"].split(",") if t.strip()]
    check_types(TrainConfig, {"backbone": backbone, **values})
    if isinstance(backbone, Mapping) and not _matches(float | None, backbone.get("width")):
        raise BadConfig(f"backbone.width must be a number, got {_show(backbone['width'])}")
    check_types(BackboneConfig, backbone, "backbone.")
    given = {**values, **{k: v for k, v in flags.items() if v is not None}}
    given_backbone = {**backbone, **{k: v for k, v in backbone_flags.items() if v is not None}}
    if isinstance(given.get("tasks"), str):
        given["tasks"] = [t.strip() for t in given["tasks"].split(",") if t.strip()]
    width = given_backbone.pop("width", None)
    return GivenSettings(given, given_backbone, width, flags.get("data_root"))


def build_train_config(values: Mapping[str, Any], backbone: Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from field values, refusing unknown or ill-typed ones in one line."""
    values = {**values, "backbone": from_dict(BackboneConfig, dict(backbone))}
    try:
        return from_dict(TrainConfig, values)
    except TypeError as exc:
        raise BadConfig(f"bad configuration: {exc}") from None


# --------------------------------------------------------------------------------- what --resume compares

NOT_COMPARED = ("out", "device", "data_root", "precision", "workers", "task_threads")
"""Config fields that may change on ``--resume``: where files live and how (not what) the run computes (a streamed
task's batches do not depend on its number of workers; task threads change the gradients' rounding only)."""


def comparable(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of a config that must match for ``--resume``, as JSON values (stored in the training state)."""
    return {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in NOT_COMPARED}


def config_differences(saved: Mapping[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(setting, saved value, cfg's value)`` of each comparable setting where ``cfg`` differs from ``saved``.

    Backbone settings are named by their own key (``units``, ``widths``); a setting newer than the saved config
    (absent from it) counts as equal when ``cfg`` holds its default.
    """
    current, defaults = comparable(cfg), comparable(TrainConfig(tasks=cfg.tasks, backbone=cfg.backbone))
    saved_backbone = saved.get("backbone", {}) if isinstance(saved.get("backbone"), Mapping) else {}
    default_backbone = asdict(BackboneConfig())
    pairs = [(k, saved.get(k, _ABSENT), v, defaults[k]) for k, v in current.items() if k != "backbone"]
    pairs += [
        (k, saved_backbone.get(k, _ABSENT), v, json.loads(json.dumps(default_backbone[k])))
        for k, v in current["backbone"].items()
    ]
    pairs += [(k, v, _ABSENT, None) for k, v in saved.items() if k not in current]
    pairs += [(k, v, _ABSENT, None) for k, v in saved_backbone.items() if k not in current["backbone"]]
    return [
        (name, None if old is _ABSENT else old, None if new is _ABSENT else new)
        for name, old, new, default in pairs
        if not (old == new or (old is _ABSENT and new == default))
    ]


_ABSENT = object()
