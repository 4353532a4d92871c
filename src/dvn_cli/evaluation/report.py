"""Reports from evaluation rows: CSV files and the accuracy-against-parameters plot (matplotlib, optional).

Needs no torch: rows are plain dicts.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DvnError
from ..fsutil import write_atomic

__all__ = ["plot_accuracy", "write_csv"]


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Rows as CSV (lists joined with spaces), written atomically."""
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return write_atomic(path, buffer.getvalue().encode())


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy against parameters: one line per task, one point per level, labelled with the level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DvnError("plots need matplotlib: pip install 'dvn-cli[plot]'") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for task in dict.fromkeys(r["task"] for r in rows):
        points = sorted((r["params_total"], 100 * r["accuracy"], r["level"]) for r in rows if r["task"] == task)
        xs, ys, levels = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=task)
        for x, y, level in points:
            ax.annotate(f"L{level}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the virtual network (with batch norm and head)")
    ax.set_ylabel(f"top-1 accuracy on {rows[0]['split']} (%)" if rows else "top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())
