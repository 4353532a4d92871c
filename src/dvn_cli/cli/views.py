"""What each command shows when it is done: its tables and summaries, on stdout (``--json`` prints instead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from ..planning.budget_rules import format_bytes, format_count
from .ui import console, format_cell, print_note, print_table, print_warning, visible

__all__ = [
    "accuracy_table",
    "show_affinity",
    "show_checkpoint",
    "show_compact",
    "show_eval",
    "show_export",
    "show_model_file",
    "show_plan",
    "show_predictions",
    "show_shared_export",
    "show_switch",
]


def accuracy_table(val_accuracy: dict[str, list[float]], title: str) -> None:
    """A task x level table of accuracies."""
    k = max((len(v) for v in val_accuracy.values()), default=0)
    table = Table(title=None if title is None else visible(title), title_justify="left")
    table.add_column("task")
    for level in range(1, k + 1):
        table.add_column(f"level {level}", justify="right")
    for task, accs in val_accuracy.items():
        table.add_row(task, *(format_cell("accuracy", a) for a in accs))
    console().print(table)


def _arch(backbone: dict) -> str:
    """``resnet-14``: the CIFAR-style ResNet's depth is a setting; the other families name theirs (``resnet18``)."""
    return f"{backbone['arch']}-{backbone['depth']}" if backbone["arch"] == "resnet" else backbone["arch"]


def _sha256(digest: Any) -> str:
    """``sha256 0123456789abcdef…``: a file's digest, shortened for the summaries."""
    return f"sha256 {str(digest)[:16]}…"


def show_model_file(described: dict[str, Any]) -> None:
    """``dvn info`` of any model file: one (task, level) in detail, or the task x unit grid and levels table."""
    shows = {"dvn-compact": show_compact, "dvn-shared-export": show_shared_export}
    shows.get(described["format"], show_checkpoint)(described)


def show_checkpoint(described: dict[str, Any]) -> None:
    """``dvn info``: format, tasks, the task x unit order grid, per-level sizes and training summary."""
    bb = described["backbone"]
    console().print(
        f"[bold]{visible(described['file'])}[/]  {described['format']} v{described['version']}, "
        f"{format_bytes(described['bytes'])}, {_sha256(described['sha256'])}"
    )
    console().print(
        f"backbone {_arch(bb)} widths {bb['widths']} k={described['units']} "
        f"input {bb['in_channels']}x{bb['input_size']}x{bb['input_size']} stem stride {bb['stem_stride']}; "
        f"{format_count(described['stored_params'])} parameters stored for all tasks and levels"
    )
    grid = Table(
        title=f"unit orders (rule: {described['order_rule']}); cell = level that adds the unit", title_justify="left"
    )
    grid.add_column("task")
    for unit in range(described["units"]):
        grid.add_column(f"unit {unit}", justify="center")
    grid.add_column("classes")
    grid.add_column("source")
    for task in described["tasks"]:
        taken_at = {u: i + 1 for i, u in enumerate(task["order"])}
        classes = ", ".join(task["classes"][:4]) + (" …" if len(task["classes"]) > 4 else "")
        grid.add_row(
            visible(task["name"]),
            *(str(taken_at[u]) for u in range(described["units"])),
            visible(f"{len(task['classes'])}: {classes}"),
            visible(task["source"]),
        )
    console().print(grid)
    print_table(
        described["levels"],
        [
            ("task", "task"),
            ("level", "level"),
            ("units", "units"),
            ("params", "params"),
            ("params_total", "+bn+head"),
            ("bytes", "bytes"),
            ("macs", "MACs/image"),
            ("val_accuracy", "val top-1"),
        ],
        title="virtual networks",
    )
    training = described["training"]
    if training:
        console().print(
            f"trained {training.get('steps')} of {training.get('total_steps')} steps "
            f"({training.get('epochs')} epochs, {training.get('seconds')} s, "
            f"{training.get('images_per_second')} img/s); finished: {training.get('finished')}"
        )
    if isinstance(training.get("affinity"), dict):
        show_affinity(training["affinity"])


def show_affinity(affinity: dict[str, Any]) -> None:
    """The affinity rule's measured task x task matrix and the placement it chose (``dvn info``)."""
    names = affinity["tasks"]
    console().print(
        f"task affinity (gradient cosine on the shared weights, {affinity['measured_steps']} of "
        f"{affinity['warmup_steps']} warm-up steps):"
    )
    matrix = Table()
    matrix.add_column("task")
    for name in names:
        matrix.add_column(visible(name), justify="right")
    for name, row in zip(names, affinity["matrix"], strict=True):
        matrix.add_row(visible(name), *(f"{v:.3f}" for v in row))
    console().print(matrix)
    if "line" in affinity:
        console().print(
            f"placement on the anchors' line ({affinity['search']} search): "
            f"{' - '.join(visible(n) for n in affinity['line'])}; "
            f"score {affinity['score']} against {affinity['given_score']} for the given order"
        )
    else:
        console().print("placement: not chosen yet (the warm-up has not ended)")


def show_plan(plan: dict[str, Any], budget: str) -> None:
    """``dvn plan``: the chosen level per task, the shared memory and what separate models would need."""
    rows = [
        {"task": t, "level": lv, "units": plan["units"][t], "accuracy": plan["accuracy"][t]}
        for t, lv in plan["choices"].items()
    ]
    print_table(
        rows,
        [("task", "task"), ("level", "level"), ("units", "units"), ("accuracy", "val top-1")],
        title=f"plan for tasks running at once under {budget}",
    )
    for task in plan["left_out"]:
        console().print(f"{visible(task)}: left out (no level fits)")
    at = "" if plan["precision"] == "fp32" else f" at {plan['precision']}"
    limit = format_bytes(plan["budget_bytes"]) if plan["budget_bytes"] else format_count(plan["budget_params"])
    console().print(
        f"shared memory {format_count(plan['memory_params'])} parameters ({format_bytes(plan['memory_bytes'])}{at}) "
        f"of a budget of {limit}; separate models would need "
        f"{format_count(plan['separate_params'])} ({format_bytes(plan['separate_bytes'])}), "
        f"{format_count(plan['saved_params'])} more"
    )


def show_compact(described: dict[str, Any]) -> None:
    """``dvn info`` of a compact file: where it came from and what it costs."""
    task, bb = described["task"], described["backbone"]
    console().print(
        f"[bold]{visible(described['file'])}[/]  dvn-compact, {format_bytes(described['bytes'])}, "
        f"{_sha256(described['sha256'])}\n"
        f"task {visible(task['name'])} ({len(task['classes'])} classes), "
        f"level {described['level']} of {described['k']}, "
        f"units {described['units']}\n"
        f"plain {_arch(bb)} widths {bb['widths']}, input {bb['in_channels']}x{bb['input_size']}"
        f"x{bb['input_size']}; {format_count(described['params'])} weights, "
        f"{format_count(described['params_total'])} with batch norm and head, {format_count(described['macs'])} "
        f"MACs/image\nfrom checkpoint {_sha256(described['source_sha256'])}"
    )


def show_shared_export(described: dict[str, Any]) -> None:
    """``dvn info`` of a shared export folder: its weights file and the (task, level) graphs that share it."""
    weights, source = described["weights"], described["source"]
    console().print(
        f"[bold]{visible(described['file'])}[/]  shared export ({described['graph_mode']} graphs, dvn "
        f"{visible(str(described['dvn_version']))}): {visible(str(weights['file']))} "
        f"{format_bytes(weights['bytes'])}, {format_count(weights['stored_params'])} parameters stored once "
        f"at {visible(str(weights['precision']))}, "
        f"{_sha256(weights['sha256'])}\nfrom {visible(str(source.get('format')))} {_sha256(source.get('sha256'))}"
    )
    print_table(
        described["levels"],
        [
            ("task", "task"),
            ("level", "level"),
            ("units", "units"),
            ("params_total", "params"),
            ("macs", "MACs/image"),
            ("file", "graph"),
        ],
        title="(task, level) graphs",
    )


EVAL_COLUMNS = [
    ("task", "task"),
    ("level", "level"),
    ("units", "units"),
    ("params", "params"),
    ("params_total", "+bn+head"),
    ("macs", "MACs/image"),
    ("accuracy", "top-1"),
]
LATENCY_COLUMNS = [("latency_b1_ms", "ms/img b1"), ("latency_b64_ms", "ms/img b64")]
EXPORT_COLUMNS = [
    ("task", "task"),
    ("level", "level"),
    ("file", "file"),
    ("params", "params"),
    ("bytes", "bytes"),
    ("precision", "precision"),
    ("check_max_abs_diff", "max |diff|"),
    ("check_top1_agreement", "top-1 agree"),
]


def show_eval(rows: Sequence[dict[str, Any]], title: str, latency: bool = False) -> None:
    """The task x level table of ``dvn eval``; latency columns when they were measured."""
    print_table(rows, EVAL_COLUMNS + (LATENCY_COLUMNS if latency else []), title=title)


def show_export(manifest: dict[str, Any], out: Any) -> None:
    """The models an export wrote, and a shared export's one weights file."""
    print_table(manifest["models"], EXPORT_COLUMNS, title=f"exported to {out} (manifest.json)")
    weights = manifest.get("weights")
    if weights:
        console().print(
            f"shared weights: {weights['file']}, {weights['stored_params']} parameters at {weights['precision']}, "
            f"{weights['bytes']} bytes",
            markup=False,
            highlight=False,
        )


def show_predictions(rows: Sequence[dict[str, Any]]) -> None:
    """``dvn predict``: one row per (image, task), its level and its top classes with probabilities; under
    ``--budgets``, each row's budget, marked "(not met)" where no plan fitted it and the previous levels ran."""
    table_rows = [
        {
            "image": row["image"],
            "task": row["task"],
            "level": row["level"],
            "top": "  ".join(f"{c['class']} {100 * c['probability']:.1f}%" for c in row["top"]),
            "budget": row.get("budget") if row.get("met", True) else f"{row['budget']} (not met)",
        }
        for row in rows
    ]
    columns = [("image", "image"), ("task", "task"), ("level", "level"), ("top", "top classes (probability)")]
    if any("budget" in row for row in rows):
        columns.insert(0, ("budget", "budget"))
    print_table(table_rows, columns, title="predictions")


def show_switch(switch: dict[str, Any]) -> None:
    """``dvn predict --budgets``: what one budget switched the runtime to (or why it kept the previous levels)."""
    if "error" in switch:
        print_warning(f"budget {switch['budget']}: {switch['error']}; the previous levels keep running")
        return
    levels = ", ".join(f"{task} level {level}" for task, level in switch["choices"].items())
    print_note(
        f"budget {switch['budget']}: {levels}, {format_bytes(switch['memory_bytes'])} shared "
        + (
            f"({switch['switch_ms']:.1f} ms to switch)"
            if "switch_ms" in switch
            else f"({switch['load_ms']:.0f} ms to load)"
        )
    )
