"""How dvn prints: consoles, text made safe to show, one-line errors and warnings, notes, JSON and plain tables.

Tables go to stdout; notes, warnings and errors go to stderr, so ``--json`` output stays clean for scripts. The
modules that use rich are this one, ``views`` (what each command shows) and ``progress`` (the training bar).
"""

from __future__ import annotations

import json
import math
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = [
    "console",
    "format_cell",
    "print_error",
    "print_json",
    "print_note",
    "print_table",
    "print_warning",
    "visible",
]

PIPE_WIDTH = 200  # tables piped to a file or another program are not cut to 80 columns


def console(stderr: bool = False) -> Console:
    """A console on the CURRENT sys.stdout/stderr (tests swap them), wide when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    # emoji=False: text such as ":-1:" in a message or a name is printed as written, never as an emoji
    return Console(file=stream, highlight=False, emoji=False, width=None if stream.isatty() else PIPE_WIDTH)


def visible(value: Any) -> str:
    """``value`` as text that cannot steer the terminal: control characters shown as escapes, rich markup inert.

    Task names, classes and paths come from files and folders a user may not have written.
    """
    text = "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Cf") else ch
        for ch in str(value)
    )
    return escape(text)


def print_error(message: str) -> None:
    """One red line on stderr: what went wrong and what to do."""
    console(stderr=True).print(f"[bold red]error:[/] {visible(message)}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """One yellow line on stderr: something was skipped, the rest went on."""
    console(stderr=True).print(f"[yellow]warning:[/] {visible(message)}", highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    """One JSON document on stdout, for scripts: every ``--json`` prints through here.

    JSON has no NaN or infinity (Python would print ``NaN``, which strict parsers refuse): a number that is not
    finite (an accuracy an older run could not measure) is printed as null, "unknown".
    """
    sys.stdout.write(json.dumps(_finite(value), allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_note(message: str) -> None:
    console(stderr=True).print(visible(message), soft_wrap=True)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str | None = None) -> None:
    """Render ``rows`` with ``columns`` = [(key, header)]; values are formatted by ``format_cell``."""
    table = Table(title=None if title is None else visible(title), title_justify="left")
    for key, header in columns:
        numeric = bool(rows) and isinstance(rows[0].get(key), int | float) and not isinstance(rows[0].get(key), bool)
        table.add_column(header, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(format_cell(key, row.get(key)) for key, _ in columns))
    console().print(table)


def format_cell(key: str, value: Any) -> str:
    """A table cell: percentages, thousands separators, lists joined; text made ``visible``."""
    return visible(_cell_text(key, value))


def _cell_text(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):  # unknown (an older run's NaN)
        return "-"
    if isinstance(value, float) and key.startswith(("accuracy", "val_accuracy", "acc_")):
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, int) and key in ("params", "params_total", "macs", "bytes", "samples"):
        return f"{value:,}"
    return str(value)
