"""Resolving what the user gave ``dvn train`` into a ``TrainConfig``: family defaults, the data's shape, a stored run.

Lives in ``training/`` because it looks below the config: at the backbone registry (``--arch``, ``--width``), at the
data (the input shape when none is given) and at the run folder (``--resume``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import settings
from ..config import MAX_WIDTH, BackboneConfig, TrainConfig
from ..core.backbones import backbone_defaults
from ..data.datasets import native_shape
from ..errors import BadConfig
from ..user_config import build_train_config, comparable, config_differences, given_settings
from .run_folder import RunPaths, stored_config

__all__ = ["load_train_config", "resumed_config"]


def load_train_config(
    file: str | os.PathLike[str] | None,
    flags: Mapping[str, Any],
    backbone_flags: Mapping[str, Any],
    *,
    resume: bool = False,
) -> TrainConfig:
    """The configuration of ``dvn train``: config file values, overridden by the flags the user gave.

    A new run takes the backbone's ``in_channels`` and ``input_size`` from its tasks' data when neither gives
    them. With ``resume`` the run in ``out`` supplies every setting (see ``resumed_config``): what the file and
    flags give must equal it, except the settings of ``user_config.NOT_COMPARED``. The data root is the flag, else
    ``$DVN_DATA_ROOT``, else the file's (or the stored run's), else ``data``.

    Args:
        file: a TOML file of ``TrainConfig`` fields with an optional ``[backbone]`` table, or None.
        flags: ``TrainConfig`` field -> flag value (None: not given).
        backbone_flags: ``BackboneConfig`` field -> flag value (None: not given).
        resume: continue the run in ``out`` with its stored configuration.
    """
    given = given_settings(file, flags, backbone_flags)
    if resume:
        if given.width is not None:
            raise BadConfig("--resume takes the run's stored widths; drop --width")
        return _check_affinity_steps(given.train, resumed_config(given.train, given.backbone, given.data_root_flag))
    train, backbone = dict(given.train), dict(given.backbone)
    if given.width is not None and "widths" in backbone:
        raise BadConfig("give a width multiplier (--width) or the widths themselves (--widths), not both")
    arch = backbone.get("arch", BackboneConfig.arch)
    if arch != BackboneConfig.arch or given.width is not None:
        for key, value in backbone_defaults(arch, given.width).items():
            backbone.setdefault(key, value)
        if given.width is not None:
            _check_width_splits(given.width, backbone)
    train["data_root"] = settings.data_root(given.data_root_flag, train.get("data_root"))
    if "in_channels" not in backbone or "input_size" not in backbone:
        shapes = [native_shape(t, train["data_root"]) for t in train.get("tasks") or list(TrainConfig.tasks)]
        backbone.setdefault("in_channels", max(c for c, _ in shapes))
        backbone.setdefault("input_size", max(s for _, s in shapes))
    return _check_affinity_steps(train, build_train_config(train, backbone))


def _check_affinity_steps(given: Mapping[str, Any], cfg: TrainConfig) -> TrainConfig:
    """Refuse affinity steps given (flag or file) for a run whose order rule is not affinity: nothing reads them."""
    if given.get("affinity_steps") is not None and cfg.order_rule != "affinity":
        raise BadConfig(
            f"--affinity-steps sets the warm-up of --order-rule affinity; this run's order rule is "
            f"{cfg.order_rule}: drop --affinity-steps or pass --order-rule affinity"
        )
    return cfg


def resumed_config(
    given: Mapping[str, Any], given_backbone: Mapping[str, Any], data_root_flag: str | None = None
) -> TrainConfig:
    """The stored configuration of the run in ``given["out"]`` (default ``runs/dvn``), with the settings given.

    A given setting that differs from the stored one is refused, naming it, unless it is one of
    ``user_config.NOT_COMPARED`` (where the files live and how the run computes), which the given value replaces.
    """
    out = str(given.get("out") or TrainConfig.out)
    stored = stored_config(RunPaths(Path(out)))
    stored_backbone = dict(stored.pop("backbone", {}))
    data_root = settings.data_root(data_root_flag, given.get("data_root") or stored.get("data_root"))
    stored.update(out=out, data_root=data_root)
    before = build_train_config(stored, stored_backbone)
    after = build_train_config({**stored, **given, "data_root": data_root}, {**stored_backbone, **given_backbone})
    differences = config_differences(comparable(before), after)
    if len(differences) == 1:
        name, old, new = differences[0]
        raise BadConfig(
            f"--resume: {name} differs from the run in {out} ({_plain(old)} stored, {_plain(new)} given); "
            "drop the flag or train a new run"
        )
    if differences:
        names = ", ".join(name for name, _, _ in differences)
        detail = "; ".join(f"{name} {_plain(old)} stored, {_plain(new)} given" for name, old, new in differences)
        raise BadConfig(
            f"--resume: {names} differ from the run in {out} ({detail}); drop those flags or train a new run"
        )
    return after


def _plain(value: Any) -> str:
    if isinstance(value, list) and all(not isinstance(v, list) for v in value):
        return ",".join(str(v) for v in value)
    return json.dumps(value) if not isinstance(value, str) else value


def _check_width_splits(width: float, backbone: Mapping[str, Any]) -> None:
    """Refuse a width multiplier whose widths do not split into k units, naming --width (the user gave no widths)."""
    units = backbone.get("units", BackboneConfig.units)
    if not isinstance(units, int) or units < 1:
        return  # BackboneConfig refuses it
    widths = backbone["widths"]
    if max(widths) > MAX_WIDTH:
        raise BadConfig(
            f"--width {width} gives widths {','.join(map(str, widths))}, more channels than a stage may have "
            f"({MAX_WIDTH}); choose a smaller --width"
        )
    if any(w % units for w in widths):
        raise BadConfig(
            f"--width {width} gives widths {','.join(map(str, widths))}, which do not split into k={units} units; "
            "choose another --width or -k, or give --widths"
        )
