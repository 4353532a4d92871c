"""``dvn prune-level``: the compact plain model of one (task, budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..planning.budget_rules import format_bytes, format_count
from . import ui
from .common import BUDGET_HELP, DEFAULT_CHECKPOINT, CheckpointOption, open_model_file, user_errors

__all__ = ["prune_level"]


def prune_level(
    task: Annotated[str, typer.Option(help="The task to extract.")],
    budget: Annotated[str, typer.Option(help=f"{BUDGET_HELP}.")],
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default: beside the checkpoint).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write the compact plain model of one (task, budget): ordinary Conv2d/BatchNorm2d/Linear layers."""
    from ..export.prune import write_compact_level  # imports torch: dvn --help does not wait for it

    with user_errors():
        written = write_compact_level(open_model_file(checkpoint), task, budget, out, force=force)
    spec, path = written.spec, written.path
    assert path is not None  # a model just written has its file
    ui.print_note(
        f"wrote {path}: {spec.task.name} level {spec.level} of {spec.k} (units {list(spec.units)}), "
        f"{format_count(spec.params_total)} parameters, {format_bytes(path.stat().st_size)}"
    )
