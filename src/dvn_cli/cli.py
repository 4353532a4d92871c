"""The ``dvn`` command line: parse flags, call the library, render with ``ui``. No work happens here."""

from __future__ import annotations

from typing import Annotated

import typer

from . import __version__

app = typer.Typer(
    name="dvn",
    help="Deep Virtual Networks: one network, several tasks, several memory budgets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dvn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Deep Virtual Networks: one network, several tasks, several memory budgets."""
