"""One optimiser step of a run: the batches of every task, the loss, the gradients, the update.

A step cut short before the update (a signal, a data failure) is undone (``Mark``); the update and its bookkeeping
run to their end, so the run is always at a step it can save (docs/design.md §6).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DvnError
from .affinity_warmup import AffinityWarmup
from .distributed import all_reduce_gradients
from .levels import sample_levels
from .loss import summed, task_loss
from .observer import StepInfo
from .run_folder import RunPaths
from .run_state import Run, place
from .schedule import lr_at
from .stops import StopSignals

__all__ = ["Mark", "check_finite_loss", "forward_backward", "take_step"]


@dataclass
class Mark:
    """What a step changes before the optimiser updates the weights, so a step cut short can be undone: the
    streams, the affinity sums, and the batch norms' running statistics (a forward updates them as it goes, and the
    tasks' threads finish their forwards after the step is cut short). Torch's global RNG is not among them: no
    step draws from it (every draw has a generator of its own; tests/test_resume.py checks)."""

    streams: list[dict[str, Any]]
    warmup: tuple[np.ndarray, int] | None  # the warm-up's (sums, measured)
    buffers: list[torch.Tensor]

    @classmethod
    def of(cls, run: Run) -> Mark:
        warmup = (run.warmup.sums, run.warmup.measured) if run.warmup is not None else None
        buffers = [b.clone() for b in run.network.buffers()]
        return cls([s.state_dict() for s in run.streams], warmup, buffers)

    def restore(self, run: Run) -> None:
        for stream, state in zip(run.streams, self.streams, strict=True):
            stream.load_state_dict(state)
        if run.warmup is not None and self.warmup is not None:  # both or neither: a Mark is of this run
            run.warmup.sums, run.warmup.measured = self.warmup
        with torch.no_grad():
            for buffer, saved in zip(run.network.buffers(), self.buffers, strict=True):
                buffer.copy_(saved)


def take_step(run: Run, stops: StopSignals) -> StepInfo:
    """One optimiser step. Cut short before the update (a signal, a data failure), it is undone; the update and
    its bookkeeping run to their end (``stops.deferred``), so the run is always at a step it can save."""
    cfg, scaler, names = run.cfg, run.scaler, run.names
    tick = time.perf_counter()
    mark = Mark.of(run)
    try:
        lr = lr_at(run.step, run.total_steps, cfg.lr, cfg.warmup_steps)
        batches, step_losses = forward_backward(run, lr)
    except BaseException:
        mark.restore(run)
        raise
    network = run.network
    warmup = _warming_up(run)
    with stops.deferred():
        run.settled = False
        scaler.step(run.optimizer)
        scaler.update()
        run.step += 1
        if warmup is not None and run.step == warmup.steps:
            place(run, warmup.place(network.units))
        elapsed = time.perf_counter() - tick
        run.seconds += elapsed
        for n, value in zip(names, step_losses, strict=True):
            run.epoch_losses[n] += value
        run.settled = True
    return StepInfo(
        run.step,
        run.total_steps,
        run.step / run.steps_per_epoch,
        dict(zip(names, step_losses, strict=True)),
        run.env.world_size * sum(len(y) for _, y in batches) / max(elapsed, 1e-9),
        lr,
    )


def forward_backward(run: Run, lr: float) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """The step's batches, its loss and gradients (averaged over ranks) at learning rate ``lr``; the weights are
    not touched. Returns the batches and each task's loss."""
    cfg, env, device, scaler = run.cfg, run.env, run.device, run.scaler
    batches = [
        (x.to(device, memory_format=run.memory_format, non_blocking=True), y.to(device))
        for x, y in (next(f) for f in run.feeds)
    ]
    network, optimizer = run.network, run.optimizer  # the affinity rule replaces them after its warm-up
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    weights = list(cfg.level_weights) if cfg.level_weights else None
    levels = sample_levels(cfg.level_sampling, network.units, cfg.seed, run.step)
    warmup = _warming_up(run)

    def loss_of(task: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # autocast is per thread: entered wherever the loss is computed
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            return task_loss(network, task, images, labels, weights, cfg.distill, cfg.label_smoothing, levels=levels)

    if run.task_threads is not None and warmup is None:
        losses = run.task_threads.backward(network, batches, loss_of)
        step_losses = [float(value) for value in losses]
        check_finite_loss(sum(step_losses), run.step, run.paths)  # before the update, which it prevents
        return batches, step_losses
    losses = [loss_of(task, images, labels) for task, (images, labels) in enumerate(batches)]
    loss = summed(losses)
    step_losses = [float(value.detach()) for value in losses]
    if not env.distributed:
        check_finite_loss(float(loss.detach()), run.step, run.paths)
    if warmup is not None:
        warmup.backward(network, losses, scaler)  # one backward per task, to measure their affinity
    else:
        scaler.scale(loss).backward()
    if env.distributed:  # one flat all-reduce: averaged gradients and the global batch's task losses
        step_losses = all_reduce_gradients(list(network.parameters()), torch.tensor(step_losses)).tolist()
        check_finite_loss(sum(step_losses), run.step, run.paths)
    return batches, step_losses


def _warming_up(run: Run) -> AffinityWarmup | None:
    """The run's affinity warm-up while its step is one of the warm-up's, else None."""
    return run.warmup if run.warmup is not None and run.step < run.warmup.steps else None


def check_finite_loss(loss: float, step: int, paths: RunPaths) -> None:
    if math.isfinite(loss):
        return
    if paths.checkpoint.exists():
        kept = f"the last good checkpoint is kept in {paths.out}"
    else:
        kept = f"no checkpoint was written yet in {paths.out}"
    raise DvnError(f"the loss became {loss} at step {step + 1}; stopped, and {kept}; try a lower --lr")
