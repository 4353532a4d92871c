"""``dvn info``: what a model file holds."""

from __future__ import annotations

from . import ui, views
from .common import DEFAULT_CHECKPOINT, CheckpointOption, JsonOption, open_model_file, user_errors

__all__ = ["info"]


def info(checkpoint: CheckpointOption = DEFAULT_CHECKPOINT, json_output: JsonOption = False) -> None:
    """What a model file holds: tasks, classes, unit orders, per-level sizes, training, format."""
    with user_errors():
        described = open_model_file(checkpoint).describe()
    if json_output:
        ui.print_json(described)
    else:
        views.show_model_file(described)
