"""The progress of ``dvn train`` on stderr: a rich bar with per-task losses, speed and the time the run has left."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

from ..training.observer import EpochInfo, StepInfo, TrainObserver
from .ui import console, print_note, print_warning

if TYPE_CHECKING:  # a type only: data.task imports torch, and dvn_cli.cli.app must not (tests/test_threads.py)
    from ..data.task import Task

__all__ = ["NAMED_SKIPS", "TimeLeft", "TrainProgress", "format_duration"]

NAMED_SKIPS = 10  # unreadable files of a training task named one by one; the rest are counted


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
            console=console(stderr=True),
            transient=False,
        )
        self.bar: TaskID | None = None  # on_start adds it
        self.started = False

    def on_start(self, total_steps: int, start_step: int, data: list[Task]) -> None:
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
        assert self.bar is not None, "the loop calls on_start before any on_step"
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
