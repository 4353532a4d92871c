"""``dvn export``: deployable models of a model file's (task, level)s, with their manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import ui, views
from .common import (
    DEFAULT_CHECKPOINT,
    CheckpointOption,
    JsonOption,
    TaskOption,
    open_model_file,
    split_names,
    user_errors,
)

__all__ = ["export"]


def export(
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    task: TaskOption = None,
    budget: Annotated[str | None, typer.Option(help="One budget per task (default: every level).")] = None,
    format: Annotated[str, typer.Option("--format", help="onnx or torch-export.")] = "onnx",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/dvn/export"),
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Compare each export with PyTorch (onnxruntime).")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an export of another file in --out.")] = False,
    shared: Annotated[
        bool,
        typer.Option(
            "--shared", help="One weights file holding every shared block once, plus one ONNX graph per (task, level)."
        ),
    ] = False,
    precision: Annotated[
        str,
        typer.Option(help="Convolution weights as fp32, fp16 or int8 (per output channel); ONNX only."),
    ] = "fp32",
    json_output: JsonOption = False,
) -> None:
    """Deployable models of every (task, level), or of one (task, budget), with manifest.json."""
    from ..export.pairs import export_models  # these import torch: dvn --help does not wait for it
    from ..planning.select import select_pairs

    if shared and format != "onnx":
        raise typer.BadParameter("--shared writes ONNX graphs; leave --format out", param_hint="--format")
    with user_errors():
        model = open_model_file(checkpoint)
        pairs = select_pairs(model, split_names(task), budget, precision)
        if shared:
            from ..export.shared import export_shared

            manifest = export_shared(model, out, pairs, check=check, force=force, precision=precision)
        else:
            manifest = export_models(model, out, pairs, check=check, format=format, force=force, precision=precision)
    if manifest.removed:
        ui.print_note(f"removed {len(manifest.removed)} files of the previous export: {', '.join(manifest.removed)}")
    if manifest.left:
        ui.print_warning(
            f"left {len(manifest.left)} files the previous manifest listed, changed since: {', '.join(manifest.left)}"
        )
    if json_output:
        ui.print_json(manifest)
        return
    views.show_export(manifest, out)
