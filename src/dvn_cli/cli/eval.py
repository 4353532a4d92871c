"""``dvn eval``: accuracy, parameters and MACs of each (task, level) of a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..evaluation.report import plot_accuracy, write_csv
from ..fsutil import check_output_file
from . import ui, views
from .common import (
    BUDGET_HELP,
    DEFAULT_CHECKPOINT,
    CheckpointOption,
    DataRootOption,
    JsonOption,
    TaskOption,
    open_model_file,
    split_names,
    user_errors,
)

__all__ = ["eval_"]


def eval_(
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    task: TaskOption = None,
    budget: Annotated[str | None, typer.Option(help=f"{BUDGET_HELP}.")] = None,
    split: Annotated[str, typer.Option(help="test (for reporting) or val.")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most N images per task.")] = None,
    data_root: DataRootOption = None,
    latency: Annotated[bool, typer.Option("--latency", help="Also time ms/image at batch 1 and 64.")] = False,
    workers: Annotated[int, typer.Option(help="Processes decoding a streamed folder task.")] = 2,
    json_output: JsonOption = False,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the rows to this CSV file.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also plot accuracy against parameters (PNG).")] = None,
) -> None:
    """Accuracy, parameters and MACs of each (task, level): a task x level table.

    -c takes a full checkpoint, a compact model (prune-level) or a bundle (plan --bundle).
    """
    from ..data.streaming import excess_workers  # these import torch: dvn --help does not wait for it
    from ..evaluation.evaluate import EvalOptions, evaluate_rows

    if too_many := excess_workers(workers):
        ui.print_warning(too_many)
    with user_errors():
        options = EvalOptions(split_names(task), budget, split, data_root, limit, latency, workers)
        for written in (csv, plot):
            if written is not None:
                check_output_file(written, reads=(checkpoint,))  # before the evaluation, not after it
        rows = evaluate_rows(open_model_file(checkpoint), options)
        if csv is not None:
            write_csv(rows, csv)
        if plot is not None:
            plot_accuracy(rows, plot, title=str(checkpoint))
    if json_output:
        ui.print_json({"checkpoint": str(checkpoint), "split": split, "rows": rows})
        return
    views.show_eval(rows, f"{checkpoint} on the {split} split ({rows[0]['samples']} images per task)", latency)
