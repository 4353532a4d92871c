"""What several commands share: the default model file, options written alike, and library errors as one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import DvnError, MissingData
from . import ui

if TYPE_CHECKING:
    from ..modelfile.base import ModelFile

__all__ = [
    "BUDGET_HELP",
    "DEFAULT_CHECKPOINT",
    "CheckpointOption",
    "DataRootOption",
    "JsonOption",
    "TaskOption",
    "open_model_file",
    "split_names",
    "user_errors",
]

DEFAULT_CHECKPOINT = Path("runs/dvn/model.safetensors")
"""Where ``dvn train`` writes with its default ``--out``, and what ``-c`` reads when not given."""

CheckpointOption = Annotated[
    Path,
    typer.Option(
        "--checkpoint", "-c", help="A dvn model file: checkpoint, compact model, bundle, or a shared export folder."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
TaskOption = Annotated[str | None, typer.Option(help="Comma-separated tasks (default: all).")]
DataRootOption = Annotated[str | None, typer.Option(help="Dataset folder (default ./data or $DVN_DATA_ROOT).")]
BUDGET_HELP = "A level (3), parameters (250k), a share (40%) or bytes (2MB)"
"""What ``--budget`` of one (task, level) takes (``planning.budget_rules``)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one red line and exit code 1."""
    try:
        yield
    except DvnError as exc:
        ui.print_error(str(exc))
        raise typer.Exit(1) from None


def open_model_file(path: Path, formats: tuple[str, ...] | None = None) -> ModelFile:
    """The model file at ``path`` (any kind, or one of ``formats``); the default one missing says how to get it."""
    from ..modelfile.registry import open_model  # imports torch: only the commands that open a file pay for it

    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise MissingData(f"no checkpoint at {path}; train one with 'dvn train' or pass -c FILE")
    return open_model(path, formats)


def split_names(text: str | None) -> tuple[str, ...] | None:
    """``a,b`` -> ``("a", "b")``; None or empty -> None (every task)."""
    names = tuple(t.strip() for t in (text or "").split(",") if t.strip())
    return names or None
