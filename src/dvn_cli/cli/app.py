"""The ``dvn`` command line: the Typer app and its commands, one module each, which parse flags, call the library
and render with ``ui`` and ``views``. No work happens here.

Importing the app loads neither torch nor numpy: each command imports the library modules that need them when it
runs, so ``dvn --help``, ``dvn data prepare`` and a torch-free ``dvn serve -c FOLDER`` do not wait for them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import __version__
from . import ui
from .convert import convert
from .data import prepare
from .eval import eval_
from .export import export
from .info import info
from .plan import plan
from .predict import predict
from .prune import prune_level
from .serve import serve
from .train import train

__all__ = ["app"]

_CLICK_EXCEPTIONS = sys.modules[typer.BadParameter.__module__]
"""click's exceptions, of whichever click this typer uses (or vendors)."""
_UsageError = _CLICK_EXCEPTIONS.UsageError
_NoArgsIsHelp = getattr(_CLICK_EXCEPTIONS, "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """A flag Typer cannot parse ends as every dvn error does: one red line and exit code 1 (not a box, 2)."""
    try:
        yield
    except _NoArgsIsHelp:
        raise  # ``dvn`` alone shows the help
    except _UsageError as exc:
        where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
        ui.print_error(exc.format_message().rstrip(".") + where)
        raise typer.Exit(1) from None


class _DvnGroup(TyperGroup):
    """The app's group: parse errors of its own options (``make_context``) and of every command's (``invoke``)
    go through ``_usage_errors``. Both pass their arguments through, as click's ``Context`` of this typer takes
    them."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors():
            return super().invoke(*args, **kwargs)


app = typer.Typer(
    name="dvn",
    cls=_DvnGroup,
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


app.command()(train)
app.command()(convert)
app.command("eval")(eval_)
app.command()(info)
app.command()(plan)
app.command("prune-level")(prune_level)
app.command()(export)
app.command()(predict)
app.command()(serve)

data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
data_app.command("prepare")(prepare)
app.add_typer(data_app, name="data")
