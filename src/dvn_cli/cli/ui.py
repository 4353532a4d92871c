"""Everything dvn shows a person: rich tables, progress bars and one-line errors. The only module using rich.

Tables go to stdout; progress and errors go to stderr, so ``--json`` output stays clean for scripts.
"""

from __future__ import annotations

import json
import math
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..training.observer import EpochInfo, StepInfo, TrainObserver

__all__ = [
    "TimeLeft",
    "TrainProgress",
    "accuracy_table",
    "format_duration",
    "print_error",
    "print_json",
    "print_note",
    "print_table",
    "print_warning",
    "show_checkpoint",
    "show_compact",
    "show_model_file",
    "show_plan",
    "show_predictions",
    "visible",
]

PIPE_WIDTH = 200  # tables piped to a file or another program are not cut to 80 columns
NAMED_SKIPS = 10  # unreadable files of a training task named one by one; the rest are counted


def _console(stderr: bool = False) -> Console:
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
    _console(stderr=True).print(f"[bold red]error:[/] {visible(message)}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """One yellow line on stderr: something was skipped, the rest went on."""
    _console(stderr=True).print(f"[yellow]warning:[/] {visible(message)}", highlight=False, soft_wrap=True)


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
    _console(stderr=True).print(visible(message), soft_wrap=True)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str | None = None) -> None:
    """Render ``rows`` with ``columns`` = [(key, header)]; values are formatted by ``format_cell``."""
    table = Table(title=None if title is None else visible(title), title_justify="left")
    for key, header in columns:
        numeric = bool(rows) and isinstance(rows[0].get(key), int | float) and not isinstance(rows[0].get(key), bool)
        table.add_column(header, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(format_cell(key, row.get(key)) for key, _ in columns))
    _console().print(table)


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


def accuracy_table(val_accuracy: dict[str, list[float]], title: str) -> None:
    """A task x level table of accuracies."""
    k = max((len(v) for v in val_accuracy.values()), default=0)
    table = Table(title=None if title is None else visible(title), title_justify="left")
    table.add_column("task")
    for level in range(1, k + 1):
        table.add_column(f"level {level}", justify="right")
    for task, accs in val_accuracy.items():
        table.add_row(task, *(_cell_text("accuracy", a) for a in accs))
    _console().print(table)


class TimeLeft:
    """The time a training run has left, from the step and validation times measured on this run's own clock.

    A step's time is the clock between two ``step`` calls (data, forward, backward, optimiser: all a step costs),
    averaged over the last ``window`` steps; the first step after the start, slowed by one-off set-up, is not
    counted. An epoch end's time (validation of every (task, level) and the save) is the clock from the last step
    to ``epoch``. Until one is measured, a validation pass is estimated from the training speed: it forwards each
    validation image once through the levels, about a third of what a training step does per image (forward and
    backward). No estimate is given before ``min_steps`` steps are measured.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: int = 100, min_steps: int = 3) -> None:
        self.clock, self.min_steps = clock, min_steps
        self.steps: deque[float] = deque(maxlen=window)
        self.validations: list[float] = []
        self.last: float | None = None
        self.skip_next = True
        self.val_images = 0
        self.seconds_per_image: float | None = None

    def start(self, val_images: int) -> None:
        """Training (re)starts now; each epoch end validates ``val_images`` images (all tasks)."""
        self.val_images, self.last, self.skip_next = val_images, self.clock(), True

    def step(self, info: StepInfo) -> None:
        now = self.clock()
        if self.last is not None and not self.skip_next:
            self.steps.append(now - self.last)
        self.skip_next, self.last = False, now
        self.seconds_per_image = 1.0 / info.images_per_second if info.images_per_second > 0 else None

    def epoch(self) -> None:
        now = self.clock()
        if self.last is not None:
            self.validations.append(now - self.last)
        self.last = now

    def seconds(self, step: int, total_steps: int, epoch: float) -> float | None:
        """Seconds left after ``step`` of ``total_steps`` (``epoch`` = step / steps per epoch), or None."""
        if len(self.steps) < self.min_steps or epoch <= 0:
            return None
        steps_per_epoch = max(1, round(step / epoch))
        # the epoch ends at steps step..total_steps (this step's own comes after it is reported) and at the last
        ends_left = total_steps // steps_per_epoch - (step - 1) // steps_per_epoch + bool(total_steps % steps_per_epoch)
        if self.validations:
            validation = sum(self.validations) / len(self.validations)
        else:
            validation = self.val_images * (self.seconds_per_image or 0.0) / 3
        return (total_steps - step) * sum(self.steps) / len(self.steps) + ends_left * validation


def format_duration(seconds: float | None) -> str:
    """``1:02:03``, ``4:05``, or ``-:--`` while unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainProgress(TrainObserver):
    """A rich progress bar: epoch, step, per-task loss, images/s and time left; a table after each epoch.

    The time left is ``TimeLeft``'s: the whole run's remaining steps and epoch-end validations at the times
    measured on this run, not rich's extrapolation of the bar, which knows nothing of validation.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.time_left = TimeLeft(clock)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]} left"),
            console=_console(stderr=True),
            transient=False,
        )
        self.bar = None
        self.started = False

    def on_start(self, total_steps: int, start_step: int, data) -> None:
        for d in data:
            s = d.summary()
            print_note(
                f"{s['task']}: {s['train']} train / {s['val']} val / {s['test']} test images, "
                f"{s['classes']} classes, input {'x'.join(map(str, s['shape']))} ({s['resize']}), "
                f"augment {s['augment']}, "
                + (f"streamed from disk by {s['workers']} workers" if s["storage"] == "stream" else "in memory")
                + (f", {s['skipped']} unreadable files skipped" if s["skipped"] else "")
            )
            for path in d.skipped[:NAMED_SKIPS]:  # the sentence dvn predict gives a file it skips
                print_warning(f"cannot read {path} as an image; skipped")
            if len(d.skipped) > NAMED_SKIPS:
                print_warning(f"and {len(d.skipped) - NAMED_SKIPS} more unreadable files of {s['task']}; skipped")
        self.progress.start()
        self.started = True
        self.bar = self.progress.add_task(
            "train", total=total_steps, completed=start_step, epoch="-", losses="", speed="", left="-:--"
        )
        self.time_left.start(sum(d.summary()["val"] for d in data))

    def on_step(self, info: StepInfo) -> None:
        losses = " ".join(f"{t} {v:.3f}" for t, v in info.task_losses.items())
        self.time_left.step(info)
        self.progress.update(
            self.bar,
            completed=info.step,
            epoch=f"{info.epoch:.2f}",
            losses=losses,
            speed=f"{info.images_per_second:,.0f} img/s",
            left=format_duration(self.time_left.seconds(info.step, info.total_steps, info.epoch)),
        )

    def on_epoch(self, info: EpochInfo) -> None:
        self.time_left.epoch()
        self.progress.console.print(
            f"epoch {info.epoch} (step {info.step}, {info.seconds:.0f} s): validation accuracy "
            + "  ".join(f"{t} " + "/".join(f"{100 * a:.1f}" for a in accs) for t, accs in info.val_accuracy.items())
        )

    def close(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


def _arch(backbone: dict) -> str:
    """``resnet-14``: the CIFAR-style ResNet's depth is a setting; the other families name theirs (``resnet18``)."""
    return f"{backbone['arch']}-{backbone['depth']}" if backbone["arch"] == "resnet" else backbone["arch"]


def show_model_file(described: dict[str, Any]) -> None:
    """``dvn info`` of any model file: one (task, level) in detail, or the task x unit grid and levels table."""
    shows = {"dvn-compact": show_compact, "dvn-shared-export": show_shared_export}
    shows.get(described["format"], show_checkpoint)(described)


def show_checkpoint(described: dict[str, Any]) -> None:
    """``dvn info``: format, tasks, the task x unit order grid, per-level sizes and training summary."""
    from ..planning.budgets import format_bytes, format_count

    bb = described["backbone"]
    _console().print(
        f"[bold]{visible(described['file'])}[/]  {described['format']} v{described['version']}, "
        f"{format_bytes(described['bytes'])}, sha256 {described['sha256'][:16]}…"
    )
    _console().print(
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
    _console().print(grid)
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
        _console().print(
            f"trained {training.get('steps')} of {training.get('total_steps')} steps "
            f"({training.get('epochs')} epochs, {training.get('seconds')} s, "
            f"{training.get('images_per_second')} img/s); finished: {training.get('finished')}"
        )
    if isinstance(training.get("affinity"), dict):
        show_affinity(training["affinity"])


def show_affinity(affinity: dict[str, Any]) -> None:
    """The affinity rule's measured task x task matrix and the placement it chose (``dvn info``)."""
    names = affinity["tasks"]
    _console().print(
        f"task affinity (gradient cosine on the shared weights, {affinity['measured_steps']} of "
        f"{affinity['warmup_steps']} warm-up steps):"
    )
    matrix = Table()
    matrix.add_column("task")
    for name in names:
        matrix.add_column(visible(name), justify="right")
    for name, row in zip(names, affinity["matrix"], strict=True):
        matrix.add_row(visible(name), *(f"{v:.3f}" for v in row))
    _console().print(matrix)
    if "line" in affinity:
        _console().print(
            f"placement on the anchors' line ({affinity['search']} search): "
            f"{' - '.join(visible(n) for n in affinity['line'])}; "
            f"score {affinity['score']} against {affinity['given_score']} for the given order"
        )
    else:
        _console().print("placement: not chosen yet (the warm-up has not ended)")


def show_plan(plan: dict[str, Any], budget: str) -> None:
    """``dvn plan``: the chosen level per task, the shared memory and what separate models would need."""
    from ..planning.budgets import format_bytes, format_count

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
        _console().print(f"{visible(task)}: left out (no level fits)")
    at = "" if plan["precision"] == "fp32" else f" at {plan['precision']}"
    limit = format_bytes(plan["budget_bytes"]) if plan["budget_bytes"] else format_count(plan["budget_params"])
    _console().print(
        f"shared memory {format_count(plan['memory_params'])} parameters ({format_bytes(plan['memory_bytes'])}{at}) "
        f"of a budget of {limit}; separate models would need "
        f"{format_count(plan['separate_params'])} ({format_bytes(plan['separate_bytes'])}), "
        f"{format_count(plan['saved_params'])} more"
    )


def show_compact(described: dict[str, Any]) -> None:
    """``dvn info`` of a compact file: where it came from and what it costs."""
    from ..planning.budgets import format_bytes, format_count

    task, bb = described["task"], described["backbone"]
    _console().print(
        f"[bold]{visible(described['file'])}[/]  dvn-compact, {format_bytes(described['bytes'])}, "
        f"sha256 {described['sha256'][:16]}…\n"
        f"task {visible(task['name'])} ({len(task['classes'])} classes), "
        f"level {described['level']} of {described['k']}, "
        f"units {described['units']}\n"
        f"plain {_arch(bb)} widths {bb['widths']}, input {bb['in_channels']}x{bb['input_size']}"
        f"x{bb['input_size']}; {format_count(described['params'])} weights, "
        f"{format_count(described['params_total'])} with batch norm and head, {format_count(described['macs'])} "
        f"MACs/image\nfrom checkpoint sha256 {described['source_sha256'][:16]}…"
    )


def show_shared_export(described: dict[str, Any]) -> None:
    """``dvn info`` of a shared export folder: its weights file and the (task, level) graphs that share it."""
    from ..planning.budgets import format_bytes, format_count

    weights, source = described["weights"], described["source"]
    _console().print(
        f"[bold]{visible(described['file'])}[/]  shared export ({described['graph_mode']} graphs, dvn "
        f"{visible(str(described['dvn_version']))}): {visible(str(weights['file']))} "
        f"{format_bytes(weights['bytes'])}, {format_count(weights['stored_params'])} parameters stored once "
        f"at {visible(str(weights['precision']))}, "
        f"sha256 {str(weights['sha256'])[:16]}…\nfrom {visible(str(source.get('format')))} sha256 "
        f"{str(source.get('sha256'))[:16]}…"
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
        _console().print(
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
    from ..planning.budgets import format_bytes

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
