"""What a training run reports while it runs (``TrainObserver``) and what it returns (``TrainResult``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a type only: the CLI's rendering imports this module, and a torch-free dvn serve runs it
    from ..data.task import Task

__all__ = ["EpochInfo", "StepInfo", "TrainObserver", "TrainResult"]


@dataclass
class StepInfo:
    """What an observer hears after every optimiser step."""

    step: int
    total_steps: int
    epoch: float
    task_losses: dict[str, float]
    images_per_second: float
    lr: float


@dataclass
class EpochInfo:
    """Validation results after an epoch, as written to ``metrics.jsonl``."""

    epoch: int
    step: int
    val_accuracy: dict[str, list[float]]
    train_loss: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainObserver:
    """Hooks the CLI implements to show progress; the library itself never prints."""

    def on_start(self, total_steps: int, start_step: int, data: list[Task]) -> None: ...

    def on_step(self, info: StepInfo) -> None: ...

    def on_epoch(self, info: EpochInfo) -> None: ...

    def close(self) -> None:
        """Training ended (finished, failed or interrupted)."""


@dataclass
class TrainResult:
    """Where the run's files are and what the run reached."""

    checkpoint: Path
    state: Path
    summary: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
