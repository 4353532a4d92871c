"""The end of an epoch: validate every (task, level), record the epoch, save the run (docs/design.md §6)."""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any

import torch

from ..core.network import DeepVirtualNetwork
from ..data.task import Task
from ..errors import DvnError
from ..evaluation.evaluate import count_correct
from ..fsutil import write_atomic
from ..modelfile.checkpoint import STATE_FORMAT, save_checkpoint
from ..modelfile.container import write_dvn_file
from ..modelfile.train_state import train_state_tensors
from ..user_config import comparable
from .distributed import DistEnv, average_buffers
from .observer import EpochInfo, TrainObserver, TrainResult
from .run_state import Run, together

__all__ = ["end_epoch", "epoch_end_due", "run_summary", "save_progress", "save_run", "validate"]


def validate(
    network: DeepVirtualNetwork, data: list[Task], device: torch.device, env: DistEnv | None = None
) -> dict[str, list[float]]:
    """Validation accuracy of every (task, level).

    Under torchrun (``env`` distributed) each rank scores a contiguous shard of every split and the counts of
    correct predictions are summed over ranks; alone, the shard is the whole split.
    """
    rank, world = (env.rank, env.world_size) if env is not None and env.distributed else (0, 1)
    was_training = network.training
    network.eval()
    correct, sizes = [], []
    for t, task_data in enumerate(data):
        n = task_data.split_size("val")
        shard = task_data.batches("val", 500, rank * n // world, (rank + 1) * n // world)
        forwards = [partial(network, task=t, level=lv) for lv in range(1, network.units + 1)]
        correct += count_correct(forwards, shard, task_data.spec, device=device)[0]
        sizes += [n] * network.units
    total = torch.tensor(correct, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    network.train(was_training)
    scores = iter(zip(total.tolist(), sizes, strict=True))
    return {
        d.spec.name: [round(c / n, 5) if n else float("nan") for c, n in (next(scores) for _ in range(network.units))]
        for d in data
    }


def epoch_end_due(run: Run) -> bool:
    """The run stands at an epoch end (or its last step) that has not been validated and saved yet."""
    at_end = run.step > 0 and (run.step % run.steps_per_epoch == 0 or run.step == run.total_steps)
    return at_end and not (run.history and run.history[-1]["step"] == run.step)


def end_epoch(run: Run, observer: TrainObserver, seconds: float) -> TrainResult:
    """Validate every (task, level), record the epoch and save (batch-norm statistics averaged over ranks)."""
    env, device = run.env, run.device
    average_buffers(run.network)  # batch-norm statistics: per rank while training, averaged here
    done = run.step % run.steps_per_epoch or run.steps_per_epoch
    info = EpochInfo(
        epoch=math.ceil(run.step / run.steps_per_epoch),
        step=run.step,
        val_accuracy=validate(run.network, run.data, device, env),
        train_loss={n: round(v / done, 5) for n, v in run.epoch_losses.items()},
        seconds=round(seconds, 1),
    )
    run.history.append(info.to_dict())
    run.epoch_losses = dict.fromkeys(run.names, 0.0)
    result = together(env, device, lambda: save_run(run, interrupted=False))
    if run.main:
        observer.on_epoch(info)
    return result


def run_summary(run: Run) -> dict[str, Any]:
    """What the checkpoint says about the run (``Checkpoint.training``) and ``TrainResult.summary``."""
    return {
        "steps": run.step,
        "total_steps": run.total_steps,
        "epochs": round(run.step / run.steps_per_epoch, 3),
        "seconds": round(run.seconds, 1),
        "images_per_second": round(run.step * sum(s.batch_size for s in run.streams) / max(run.seconds, 1e-9), 1),
        "val_accuracy": run.history[-1]["val_accuracy"] if run.history else {},
        "data": [d.summary() for d in run.data],
        "config": run.cfg.to_dict(),
        "finished": run.step >= run.total_steps,
        "world_size": run.env.world_size,
        "device": run.device.type,
        **({"affinity": run.warmup.summary(run.network.units)} if run.warmup is not None else {}),
    }


def save_run(run: Run, interrupted: bool) -> TrainResult:
    """Write checkpoint, training state and metrics (rank 0; other ranks only return the summary)."""
    paths, summary = run.paths, run_summary(run)
    if not run.main:
        return TrainResult(paths.checkpoint, paths.state, summary, interrupted)
    state_meta = {
        "step": run.step,
        "history": run.history,
        "seconds": run.seconds,
        "epoch_losses": run.epoch_losses,
        "config": comparable(run.cfg),
    }
    if run.warmup is not None:
        state_meta["affinity"] = run.warmup.state()
    try:  # checkpoint, then state, then metrics: a kill between them leaves a state that resumes
        save_checkpoint(run.network, paths.checkpoint, summary)
        state_tensors = train_state_tensors(run.network, run.optimizer, run.scaler, run.streams, run.names)
        write_dvn_file(paths.state, state_tensors, STATE_FORMAT, state_meta)
        write_atomic(paths.metrics, "".join(json.dumps(h) + "\n" for h in run.history).encode())
    except OSError as exc:
        raise DvnError(
            f"cannot write the run into {paths.out} ({exc.strerror or exc}) at step {run.step}; "
            "its files from the last save are kept"
        ) from None
    return TrainResult(paths.checkpoint, paths.state, summary, interrupted)


def save_progress(run: Run) -> TrainResult | None:
    """Save a run that stops early (no collective: the other ranks may be gone); None when there is nothing to keep
    (no step taken) or no consistent state (stopped while the weights were being updated)."""
    return save_run(run, interrupted=True) if run.step > 0 and run.settled else None
