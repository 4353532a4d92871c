"""``dvn plan``: a level per task for tasks that run at once under one shared memory budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..fsutil import check_output_file
from . import ui, views
from .common import DEFAULT_CHECKPOINT, JsonOption, open_model_file, split_names, user_errors

__all__ = ["plan"]


def plan(
    budget: Annotated[str, typer.Option(help="Shared budget: parameters (250k), bytes (2MB) or a share (40%).")],
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            "-c",
            help="A dvn checkpoint: a plan weighs its validation accuracy (a bundle or an export holds fixed levels; "
            "dvn serve --budget chooses among those).",
        ),
    ] = DEFAULT_CHECKPOINT,
    tasks: Annotated[str | None, typer.Option(help="Tasks that run at once (default: all).")] = None,
    weights: Annotated[str | None, typer.Option(help="Task weights, e.g. mnist=2,fashion-mnist=1.")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Also write the chosen (task, level)s as one bundle file (shared units once).")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="Count bytes as export --shared --precision stores them: fp32, fp16 or int8."),
    ] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --bundle file.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Choose a level per task for tasks that run AT ONCE under one shared memory budget."""
    from ..modelfile.bundle import save_bundle  # these import torch: dvn --help does not wait for it
    from ..modelfile.checkpoint import CHECKPOINT_FORMAT, Checkpoint
    from ..planning.plan import plan_for_budget

    with user_errors():
        if bundle is not None:
            check_output_file(bundle, reads=(checkpoint,), replace=force)
        ckpt = open_model_file(checkpoint, (CHECKPOINT_FORMAT,))
        assert isinstance(ckpt, Checkpoint)  # the one format asked for
        network = ckpt.network
        names = list(split_names(tasks) or network.task_names)
        task_weights = _parse_weights(weights) if weights else None
        chosen = plan_for_budget(network, ckpt.training, budget, names, task_weights, str(checkpoint), precision)
        if bundle is not None:
            save_bundle(network, chosen.choices, bundle, ckpt.file_sha256, ckpt.training)
    result = chosen.to_dict()
    if json_output:
        ui.print_json(result)
        return
    views.show_plan(result, budget)
    if bundle is not None:
        ui.print_note(f"bundle: {bundle} ({bundle.stat().st_size:,} bytes; load with dvn_cli.open_model)")


def _parse_weights(text: str) -> dict[str, float]:
    """``mnist=2,fashion-mnist=1`` -> ``{"mnist": 2.0, "fashion-mnist": 1.0}``; anything else refuses --weights."""
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"expected task=weight, got {item!r}", param_hint="--weights")
    return weights
