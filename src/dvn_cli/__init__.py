"""dvn: Deep Virtual Networks for memory-efficient inference of multiple tasks (Kim et al., CVPR 2019).

One convolutional network, trained once, serves several classification tasks at several memory budgets;
each (task, level) can be handed out as a small stand-alone model.

The public names below are imported on first use, so ``import dvn_cli`` (and the torch-free parts such as
``dvn_cli.data.prepare`` or ``dvn_cli.evaluation.report``) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "BackboneConfig": "config",
    "TaskSpec": "config",
    "TrainConfig": "config",
    "DvnError": "errors",
    "DeepVirtualNetwork": "core.network",
    "build_network": "core.network",
    "PlainNetwork": "core.plain",
    "extract_plain": "core.plain",
    "LevelCost": "core.cost",
    "level_cost": "core.cost",
    "DataSplit": "modelfile.spec",
    "ModelFile": "modelfile.base",
    "open_model": "modelfile.registry",
    "Checkpoint": "modelfile.checkpoint",
    "load_checkpoint": "modelfile.checkpoint",
    "save_checkpoint": "modelfile.checkpoint",
    "CompactModel": "modelfile.compact",
    "load_compact": "modelfile.compact",
    "Bundle": "modelfile.bundle",
    "load_bundle": "modelfile.bundle",
    "save_bundle": "modelfile.bundle",
    "resolve_budget": "planning.budgets",
    "plan_levels": "planning.plan",
    "select_pairs": "planning.select",
    "ModelRunner": "runtime.runner",
    "fit": "training.loop",
    "EvalOptions": "evaluation.evaluate",
    "evaluate_rows": "evaluation.evaluate",
    "write_compact_level": "export.prune",
    "export_models": "export.pairs",
    "export_shared": "export.shared",
    "SharedOrtRuntime": "runtime.ort",
    "SharedRuntime": "runtime.shared",
    "open_unit_source": "modelfile.registry",
}
"""Public name -> the module (under ``dvn_cli``) that defines it."""

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dvn_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
