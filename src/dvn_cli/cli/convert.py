"""``dvn convert``: a torchvision ``.pth`` state dict as the safetensors file ``dvn train --init`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import ui
from .common import user_errors

__all__ = ["convert"]


def convert(
    source: Annotated[Path, typer.Argument(help="A torchvision .pth state dict (resnet18, mobilenet_v2).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The safetensors file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Turn a torchvision .pth state dict into the safetensors file that dvn train --init reads (weights_only)."""
    from ..modelfile.torchvision_file import convert_torchvision  # imports torch

    with user_errors():
        written = convert_torchvision(source, out, force=force)
    ui.print_note(f"wrote {out}: {written['tensors']} tensors, {written['params']:,} numbers")
