"""The training progress display: the time left comes from the step and validation times measured on the run."""

import pytest

from dvn_cli.cli.progress import TimeLeft, TrainProgress, format_duration
from dvn_cli.training.observer import EpochInfo, StepInfo

from .conftest import two_synthetic_tasks


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step_info(step: int, total: int = 10, per_epoch: int = 4, images_per_second: float = 100.0) -> StepInfo:
    return StepInfo(step, total, step / per_epoch, {"a": 1.0}, images_per_second, 0.1)


def test_time_left_counts_the_measured_steps_and_every_validation_left():
    clock = FakeClock()
    left = TimeLeft(clock)
    left.start(val_images=1000)
    clock.now += 30.0  # the first step pays one-off set-up: not counted
    left.step(step_info(1))
    assert left.seconds(1, 10, 0.25) is None  # no step measured yet
    for step in (2, 3, 4):
        clock.now += 2.0
        left.step(step_info(step))
    # 6 steps of 2 s, and the epoch ends at steps 4, 8 and 10 still to come, each estimated from the training
    # speed before one is measured: 1000 images x (1/100 s per image) / 3
    assert left.seconds(4, 10, 1.0) == pytest.approx(6 * 2.0 + 3 * 1000 / 100 / 3)
    clock.now += 7.0  # validation and save of epoch 1
    left.epoch()
    clock.now += 4.0  # the machine got slower: the mean of the last steps follows
    left.step(step_info(5))
    assert left.seconds(5, 10, 1.25) == pytest.approx(5 * (2 + 2 + 2 + 4) / 4 + 2 * 7.0)


def test_progress_shows_the_measured_time_left():
    clock = FakeClock()
    progress = TrainProgress(clock)
    data = two_synthetic_tasks()
    progress.on_start(10, 0, data)
    try:
        for step in range(1, 6):
            clock.now += 3.0
            progress.on_step(step_info(step))
        bar = progress.progress.tasks[0]
        val_images = sum(d.summary()["val"] for d in data)
        expected = 5 * 3.0 + 2 * val_images / 100 / 3  # ends at 8 and 10 left
        assert bar.fields["left"] == format_duration(expected)
        clock.now += 60.0
        progress.on_epoch(EpochInfo(2, 8, {}, {}, 60.0))
        clock.now += 3.0
        progress.on_step(step_info(9))
        assert progress.progress.tasks[0].fields["left"] == format_duration(1 * 3.0 + 1 * 60.0)
    finally:
        progress.close()


def test_durations_read_as_clock_times():
    assert format_duration(None) == "-:--"
    assert format_duration(65.4) == "1:05"
    assert format_duration(3725) == "1:02:05"
