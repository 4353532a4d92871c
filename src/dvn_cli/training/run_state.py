"""One run in progress (``Run``): what it trains with, where it writes, how far it got; and re-laying it out.

The step (``step.py``), the epoch end (``epoch.py``) and the loop (``loop.py``) all act on a ``Run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..core.network import DeepVirtualNetwork
from ..data.task import EpochStream, Task
from ..errors import DvnError
from .affinity_warmup import AffinityWarmup, relayout
from .distributed import DistEnv, ShardedBatches, agree
from .run_folder import RunPaths
from .schedule import make_optimizer
from .task_threads import TaskThreads

__all__ = ["Run", "place", "together"]


@dataclass
class Run:
    """One run in progress: what it trains with, where it writes, and how far it got (``step``, ``history``)."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    paths: RunPaths
    data: list[Task]
    network: DeepVirtualNetwork
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    streams: list[EpochStream]
    feeds: list[EpochStream] | list[ShardedBatches]
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    warmup: AffinityWarmup | None = None
    task_threads: TaskThreads | None = None  # None: the step's tasks run one after the other
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    epoch_losses: dict[str, float] = field(default_factory=dict)  # each task's summed step losses this epoch
    settled: bool = True  # False only while the optimiser updates the weights: no consistent state to save

    @property
    def main(self) -> bool:
        return self.env.is_main

    @property
    def names(self) -> list[str]:
        return [d.spec.name for d in self.data]

    @property
    def steps_per_epoch(self) -> int:
        return max(s.batches_per_epoch for s in self.streams)

    @property
    def total_steps(self) -> int:
        return max(1, round(self.cfg.epochs * self.steps_per_epoch))


def place(run: Run, orders: list[list[int]]) -> None:
    """Continue the run under ``orders``: the same weights and optimiser state, the network laid out anew."""
    placed = relayout(run.network, orders)
    optimizer = make_optimizer(placed, run.cfg)
    optimizer.load_state_dict(run.optimizer.state_dict())  # parameters come in the same order
    run.network, run.optimizer = placed, optimizer


def together(env: DistEnv, device: torch.device, work):
    """Run ``work()`` on every rank; if it fails with a ``DvnError`` on any rank, every rank raises."""
    try:
        result, error = work(), None
    except DvnError as exc:
        result, error = None, exc
    if env.distributed:
        agree(error, device)
    elif error is not None:
        raise error
    return result
