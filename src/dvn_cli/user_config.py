"""What the user gave ``dvn train``, before it is a ``TrainConfig``: values type-checked as TOML or JSON gives
them, a config file read, flags laid over it (``given_settings``), a config built; and what ``--resume`` compares
with a stored run (``comparable``, ``config_differences``). The dataclasses themselves are ``config.py``'s.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from .config import BackboneConfig, TrainConfig, from_dict
from .errors import BadConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package (the dependency is marked for 3.10 only)
    import tomli as tomllib

__all__ = [
    "NOT_COMPARED",
    "GivenSettings",
    "build_train_config",
    "check_types",
    "comparable",
    "config_differences",
    "given_settings",
    "read_config_file",
]


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
