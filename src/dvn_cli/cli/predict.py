"""``dvn predict``: the top classes of image files, for each task of a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadConfig
from . import ui, views
from .common import (
    BUDGET_HELP,
    DEFAULT_CHECKPOINT,
    CheckpointOption,
    JsonOption,
    TaskOption,
    open_model_file,
    split_names,
    user_errors,
)

__all__ = ["predict"]


def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files, or folders of them.", metavar="IMAGE", show_default=False)
    ],
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    task: TaskOption = None,
    budget: Annotated[
        str | None,
        typer.Option(help=f"{BUDGET_HELP}; default: the largest level."),
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="Shared budgets applied in turn (e.g. 100%,30%,2MB): one runtime re-plans the tasks' levels "
            "for each (as dvn plan) and classifies the images again. Checkpoint only."
        ),
    ] = None,
    top: Annotated[int, typer.Option(help="Classes shown per image and task.")] = 5,
    json_output: JsonOption = False,
) -> None:
    """Classify images: the top classes and their probabilities for each image and task.

    -c takes a checkpoint (with --task and --budget or --budgets), a bundle (its tasks run at once, shared units
    held once), a compact model, or a folder of dvn export --shared (run by onnxruntime). Files that are not
    regular files, not images, or declare more pixels than dvn decodes are named on stderr and skipped. Under
    --budgets, rows of a budget no plan fits ran at the previous levels and say "met": false.
    """
    from ..runtime.predict import predict_images, predict_under_budgets  # imports torch

    def skipped(path: Path, why: str) -> None:
        ui.print_warning(f"{why}; skipped")

    with user_errors():
        model = open_model_file(checkpoint)
        if budgets is None:
            result = predict_images(model, images, split_names(task), budget, top, on_skipped=skipped)
        else:
            if budget is not None:
                raise BadConfig("give --budget (one level per task) or --budgets (shared budgets in turn), not both")
            result = predict_under_budgets(
                model, images, split_names(budgets) or (), split_names(task), top, skipped, on_switch=views.show_switch
            )
    if json_output:
        ui.print_json({"rows": result.rows} | ({"switches": result.switches} if budgets else {}))
        return
    views.show_predictions(result.rows)
