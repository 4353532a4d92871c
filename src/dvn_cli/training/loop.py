"""Multi-task training of a DVN: every step takes a minibatch from EVERY task and sums the loss over all levels.

loss = sum_t sum_l lambda_l * CE(f(x_t; t, l), y_t)  [+ distill * KL(top level || level l) for l < k]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import PRECISIONS, TrainConfig, comparable, config_differences
from ..core.backbones import check_input_shape
from ..core.network import DeepVirtualNetwork, build_network
from ..core.pretrained import init_from_file
from ..data.batches import TaskBatches
from ..data.streaming import StreamBatches, Task, open_task
from ..errors import BadConfig, DvnError, WrongFileFormat
from ..evaluation.evaluate import count_correct
from ..fsutil import first_line, write_atomic
from ..modelfile.checkpoint import STATE_FORMAT, load_checkpoint, save_checkpoint
from ..modelfile.container import read_dvn_file, write_dvn_file
from .affinity import AffinityWarmup, relayout
from .distributed import (
    DistEnv,
    ShardedBatches,
    agree,
    all_reduce_gradients,
    average_buffers,
    broadcast_module,
    detect_env,
    init_distributed,
    shutdown_distributed,
)
from .levels import sample_levels
from .run_folder import RunPaths, prepare_run_folder

__all__ = [
    "EpochInfo",
    "StepInfo",
    "TrainObserver",
    "TrainResult",
    "fit",
    "load_tasks",
    "lr_at",
    "multitask_loss",
    "resolve_precision",
    "task_losses",
    "validate",
]


def multitask_loss(
    network: DeepVirtualNetwork,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    level_weights: Sequence[float] | None = None,
    distill: float = 0.0,
    label_smoothing: float = 0.0,
    masked: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """The summed loss of one step and each task's share of it.

    Args:
        network: the DVN being trained.
        batches: one ``(images, labels)`` minibatch per task, in task order.
        level_weights: ``lambda_l`` for levels ``1..k`` (default all 1).
        distill: weight of distillation from the task's top level into its lower levels (0 = off).
        label_smoothing: passed to the cross-entropy.
        masked: run the full-width reference path (for benchmarks and tests).
    """
    losses = task_losses(network, batches, level_weights, distill, label_smoothing, masked)
    return summed(losses), [float(task_loss.detach()) for task_loss in losses]


def summed(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """The step's loss: the tasks' losses added in task order (the one place they are added)."""
    total = torch.zeros((), device=losses[0].device)
    for task_loss in losses:
        total = total + task_loss
    return total


def task_losses(
    network: DeepVirtualNetwork,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    level_weights: Sequence[float] | None = None,
    distill: float = 0.0,
    label_smoothing: float = 0.0,
    masked: bool = False,
    levels: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Each task's loss over ``levels`` (top first; default all; ``training.levels``), other arguments as
    ``multitask_loss``, whose sum that function returns."""
    k = network.units
    weights = level_weights or [1.0] * k
    per_task = []
    for task, (images, labels) in enumerate(batches):
        task_loss = torch.zeros((), device=images.device)
        top_probs = None
        for level in levels or range(k, 0, -1):  # top level first, so it can teach the lower ones
            logits = network(images, task, level, masked=masked)  # (B, classes_t)
            loss = weights[level - 1] * F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            if level == k:
                top_probs = logits.detach().softmax(-1)
            elif distill > 0:
                loss = loss + distill * F.kl_div(logits.log_softmax(-1), top_probs, reduction="batchmean")
            task_loss = task_loss + loss
        per_task.append(task_loss)
    return per_task


# ------------------------------------------------------------------------------------------------ the loop


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadConfig(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadConfig(f"unknown device {device!r}; use cpu, cuda or auto") from None


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to zero: a pure function of the step, so resume needs no state."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(network: DeepVirtualNetwork, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv and linear weights only (not batch norm or biases)."""
    decay = [p for p in network.parameters() if p.dim() > 1]
    no_decay = [p for p in network.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


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


def load_tasks(cfg: TrainConfig) -> list[Task]:
    """Every task of ``cfg`` at the backbone's input shape, in memory or streamed (``cfg.data_mode``)."""
    bb = cfg.backbone
    return [
        open_task(
            task,
            data_root=cfg.data_root,
            channels=bb.in_channels,
            size=bb.input_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            limit=cfg.limit,
            download=cfg.download,
            mode=cfg.data_mode,
            workers=cfg.workers,
        )
        for task in cfg.tasks
    ]


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


def _state_tensors(
    network: DeepVirtualNetwork, optimizer, scaler, streams: list[TaskBatches | StreamBatches], names: list[str]
) -> dict[str, torch.Tensor]:
    """Everything resume needs, the weights included (so the state file alone restarts the run)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    for name, value in network.state_dict().items():
        tensors[f"model.{name}"] = value
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value
    if scaler.is_enabled():
        scaler_state = scaler.state_dict()
        tensors["amp.scale"] = torch.tensor(scaler_state["scale"], dtype=torch.float64)
        tensors["amp.growth_tracker"] = torch.tensor(scaler_state["_growth_tracker"], dtype=torch.int64)
    for name, stream in zip(names, streams, strict=True):
        for key, value in stream.state_dict().items():
            tensors[f"batches.{name}.{key}"] = torch.as_tensor(value)
    return tensors


def _load_state_tensors(
    tensors, optimizer, scaler, streams: list[TaskBatches | StreamBatches], names: list[str]
) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    if scaler.is_enabled() and "amp.scale" in tensors:
        scaler.load_state_dict(
            {
                **scaler.state_dict(),
                "scale": float(tensors["amp.scale"]),
                "_growth_tracker": int(tensors["amp.growth_tracker"]),
            }
        )
    for name, stream in zip(names, streams, strict=True):
        prefix = f"batches.{name}."
        stream.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    name: None if dtype == "float32" else getattr(torch, dtype) for name, dtype in PRECISIONS.items()
}
"""``--precision`` -> the autocast dtype of the training forward (None: plain float32), from ``PRECISIONS``."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, refusing what the device cannot do.

    Weights, optimizer state and checkpoints stay float32; only the training forward runs in the lower
    precision. ``fp16`` adds gradient scaling. It runs on CPU too (PyTorch >= 2.3 autocasts float16 there), but
    only GPUs gain speed from it; ``bf16`` is the CPU choice where the CPU has bfloat16 instructions.
    """
    if precision not in AUTOCAST_DTYPES:
        raise BadConfig(f"unknown precision {precision!r}; use {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadConfig(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; use --precision fp16")
    if dtype is not None and not torch.amp.is_autocast_available(device.type):
        raise BadConfig(f"this PyTorch cannot autocast on {device.type}; use --precision fp32")
    return dtype


def _together(env: DistEnv, device: torch.device, work):
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


def fit(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    observer: TrainObserver | None = None,
    data: list[Task] | None = None,
) -> TrainResult:
    """Train a DVN on ``cfg.tasks`` and write its checkpoint, training state and metrics into ``cfg.out``.

    A checkpoint and training state are written atomically at the end of every epoch and on Ctrl-C
    (``KeyboardInterrupt`` then propagates, with ``TrainResult`` on the exception as ``result``). ``resume``
    continues from the training state (which holds the weights too) and reaches the same weights as an
    uninterrupted run with the same seed. A run killed at any moment resumes from its last epoch end (or
    Ctrl-C); ``force`` replaces an existing run's files at the first epoch end. The run folder is locked for the
    whole run (``run_folder.RunLock``, rank 0): a second run into it is refused.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this trains data-parallel (see ``distributed``): each rank takes its
    slice of every global batch of ``cfg.batch_size`` images per task, gradients are averaged over ranks after
    every backward, only rank 0 writes files and calls ``observer``, and every rank returns the same summary.

    Args:
        cfg: the run's configuration.
        resume: continue the run in ``cfg.out``.
        force: start afresh even where ``cfg.out`` already holds a run.
        observer: progress hooks (rank 0 only).
        data: pre-loaded task data (tests); loaded from ``cfg`` when None.
    """
    env = detect_env()
    device, started = init_distributed(env, resolve_device(cfg.device))
    finished = False
    try:
        result = _fit(cfg, env, device, resume, force, observer or TrainObserver(), data)
        finished = True
        return result
    finally:
        shutdown_distributed(started, synchronize=finished)


@dataclass
class _Run:
    """One run in progress: what it trains with, where it writes, and how far it got (``step``, ``history``)."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    paths: RunPaths
    data: list[Task]
    network: DeepVirtualNetwork
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    streams: list[TaskBatches | StreamBatches]
    feeds: list[TaskBatches | StreamBatches] | list[ShardedBatches]
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    warmup: AffinityWarmup | None = None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

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


def _fit(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    resume: bool,
    force: bool,
    observer: TrainObserver,
    data: list[Task] | None,
) -> TrainResult:
    check_input_shape(cfg.backbone)
    paths = RunPaths(Path(cfg.out))
    amp_dtype = resolve_precision(cfg.precision, device)
    if data is None:
        data = _together(env, device, lambda: load_tasks(cfg))
    if not cfg.augment:  # so that what is reported is what runs
        data = [dataclasses.replace(d, augment="none") for d in data]
    lock = _together(env, device, lambda: prepare_run_folder(paths, resume, force, env.is_main))
    try:
        run = _new_run(cfg, env, device, paths, data, amp_dtype)
        if resume:
            _together(env, device, lambda: _resume(run))
        elif cfg.init is not None:  # pretrained weights, channels mapped into units (docs/design.md §6)
            _together(env, device, lambda: init_from_file(run.network, cfg.init))
        broadcast_module(run.network)  # every rank starts from rank 0's weights, as DDP does
        if run.main:  # a replaced run's other files stay until this run's first epoch end rewrites them
            write_atomic(paths.config, json.dumps(cfg.to_dict(), indent=2).encode())
            observer.on_start(run.total_steps, run.step, data)
        try:
            result = _train_steps(run, observer)
        except KeyboardInterrupt as interrupt:
            interrupt.result = _save(run, interrupted=True)  # no collective: the other ranks may be gone
            raise
        return result if result is not None else _together(env, device, lambda: _save(run, interrupted=False))
    finally:
        lock.release()


def _new_run(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    paths: RunPaths,
    data: list[Task],
    amp_dtype: torch.dtype | None,
) -> _Run:
    """A fresh run at step 0: the seeded network, its optimizer and gradient scaler, and the batch streams."""
    torch.manual_seed(cfg.seed)
    network = build_network(cfg.backbone, [d.spec for d in data], cfg.order_rule, cfg.order_table).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)  # ~15% faster convolutions on CPU
    streams = [d.train_batches(cfg.batch_size, seed=cfg.seed, task_index=i) for i, d in enumerate(data)]
    run = _Run(
        cfg=cfg,
        env=env,
        device=device,
        paths=paths,
        data=data,
        network=network,
        optimizer=make_optimizer(network, cfg),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16),
        streams=streams,
        feeds=[ShardedBatches(s, env) for s in streams] if env.distributed else streams,
        amp_dtype=amp_dtype,
        memory_format=memory_format,
    )
    if cfg.order_rule == "affinity":
        if env.distributed:
            raise BadConfig(
                "order rule 'affinity' measures in one process; under torchrun pass --order-rule table with the "
                "orders that an affinity run found (dvn info shows them)"
            )
        if cfg.affinity_steps >= run.total_steps:
            raise BadConfig(
                f"the affinity warm-up ({cfg.affinity_steps} steps) must end before training does "
                f"({run.total_steps} steps); lower --affinity-steps or train longer"
            )
        run.warmup = AffinityWarmup(cfg.affinity_steps, run.names)
    return run


def _place(run: _Run, orders: list[list[int]]) -> None:
    """Continue the run under ``orders``: the same weights and optimiser state, the network laid out anew."""
    placed = relayout(run.network, orders)
    optimizer = make_optimizer(placed, run.cfg)
    optimizer.load_state_dict(run.optimizer.state_dict())  # parameters come in the same order
    run.network, run.optimizer = placed, optimizer


def _resume(run: _Run) -> None:
    """Load the run's training state: weights, optimizer, scaler, batch streams, RNG, step and history."""
    paths = run.paths
    state_tensors, state_meta = read_dvn_file(paths.state, (STATE_FORMAT,))
    differences = config_differences(state_meta.get("config", {}), run.cfg)
    if differences:
        detail = "; ".join(f"{name}: {old} stored, {new} given" for name, old, new in differences)
        raise BadConfig(
            f"{paths.state} was written by a run with another configuration ({detail}); resume with the "
            "same flags or config file, or with --resume alone"
        )
    weights = {k[len("model.") :]: v for k, v in state_tensors.items() if k.startswith("model.")}
    if not weights:  # a state file of an older dvn: the weights are in the checkpoint
        ckpt = load_checkpoint(paths.checkpoint)
        if ckpt.training.get("steps") != state_meta["step"]:
            raise WrongFileFormat(f"{paths.checkpoint} and {paths.state} are from different steps; cannot resume")
        weights = ckpt.network.state_dict()
    try:
        if run.warmup is not None:
            run.warmup.load_state(state_meta["affinity"])
            orders = run.warmup.orders(run.network.units)
            if orders is not None:
                _place(run, orders)
        run.network.load_state_dict(weights)
        _load_state_tensors(state_tensors, run.optimizer, run.scaler, run.streams, run.names)
        run.step, run.history, run.seconds = state_meta["step"], state_meta["history"], state_meta["seconds"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WrongFileFormat(f"{paths.state} does not match this run ({first_line(exc)}); cannot resume") from None


def _summary(run: _Run) -> dict[str, Any]:
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


def _save(run: _Run, interrupted: bool) -> TrainResult:
    """Write checkpoint, training state and metrics (rank 0; other ranks only return the summary)."""
    paths, summary = run.paths, _summary(run)
    if not run.main:
        return TrainResult(paths.checkpoint, paths.state, summary, interrupted)
    state_meta = {"step": run.step, "history": run.history, "seconds": run.seconds, "config": comparable(run.cfg)}
    if run.warmup is not None:
        state_meta["affinity"] = run.warmup.state()
    try:  # checkpoint, then state, then metrics: a kill between them leaves a state that resumes
        save_checkpoint(run.network, paths.checkpoint, summary)
        state_tensors = _state_tensors(run.network, run.optimizer, run.scaler, run.streams, run.names)
        write_dvn_file(paths.state, state_tensors, STATE_FORMAT, state_meta)
        write_atomic(paths.metrics, "".join(json.dumps(h) + "\n" for h in run.history).encode())
    except OSError as exc:
        raise DvnError(
            f"cannot write the run into {paths.out} ({exc.strerror or exc}) at step {run.step}; "
            "its files from the last save are kept"
        ) from None
    return TrainResult(paths.checkpoint, paths.state, summary, interrupted)


def _train_steps(run: _Run, observer: TrainObserver) -> TrainResult | None:
    """Optimiser steps from ``run.step`` to the end: validate and save at every epoch end.

    Returns the last epoch end's result (None when there was no step left to take).
    """
    cfg, env, device, scaler = run.cfg, run.env, run.device, run.scaler
    names, steps_per_epoch, total_steps = run.names, run.steps_per_epoch, run.total_steps
    run.network.train()
    weights = list(cfg.level_weights) if cfg.level_weights else None
    result: TrainResult | None = None
    epoch_start, epoch_losses = time.perf_counter(), dict.fromkeys(names, 0.0)
    while run.step < total_steps:
        tick = time.perf_counter()
        batches = [
            (x.to(device, memory_format=run.memory_format, non_blocking=True), y.to(device))
            for x, y in (next(f) for f in run.feeds)
        ]
        network, optimizer = run.network, run.optimizer  # the affinity rule replaces them after its warm-up
        lr = lr_at(run.step, total_steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            levels = sample_levels(cfg.level_sampling, network.units, cfg.seed, run.step)
            losses = task_losses(network, batches, weights, cfg.distill, cfg.label_smoothing, levels=levels)
            loss = summed(losses)
        step_losses = [float(task_loss.detach()) for task_loss in losses]
        if not env.distributed:
            _check_finite(float(loss.detach()), run.step, run.paths)
        warming_up = run.warmup is not None and run.step < run.warmup.steps
        if warming_up:
            run.warmup.backward(network, losses, scaler)  # one backward per task, to measure their affinity
        else:
            scaler.scale(loss).backward()
        if env.distributed:  # one flat all-reduce: averaged gradients and the global batch's task losses
            step_losses = all_reduce_gradients(list(network.parameters()), torch.tensor(step_losses)).tolist()
            _check_finite(sum(step_losses), run.step, run.paths)
        scaler.step(optimizer)
        scaler.update()
        run.step += 1
        if warming_up and run.step == run.warmup.steps:
            _place(run, run.warmup.place(network.units))
        elapsed = time.perf_counter() - tick
        run.seconds += elapsed
        for n, value in zip(names, step_losses, strict=True):
            epoch_losses[n] += value
        if run.main:
            observer.on_step(
                StepInfo(
                    run.step,
                    total_steps,
                    run.step / steps_per_epoch,
                    dict(zip(names, step_losses, strict=True)),
                    env.world_size * sum(len(y) for _, y in batches) / max(elapsed, 1e-9),
                    lr,
                )
            )
        if run.step % steps_per_epoch == 0 or run.step == total_steps:
            network = run.network
            average_buffers(network)  # batch-norm statistics: per rank while training, averaged here
            done = run.step % steps_per_epoch or steps_per_epoch
            info = EpochInfo(
                epoch=math.ceil(run.step / steps_per_epoch),
                step=run.step,
                val_accuracy=validate(network, run.data, device, env),
                train_loss={n: round(v / done, 5) for n, v in epoch_losses.items()},
                seconds=round(time.perf_counter() - epoch_start, 1),
            )
            run.history.append(info.to_dict())
            result = _together(env, device, lambda: _save(run, interrupted=False))
            if run.main:
                observer.on_epoch(info)
            epoch_start, epoch_losses = time.perf_counter(), dict.fromkeys(names, 0.0)
    return result


def _check_finite(loss: float, step: int, paths: RunPaths) -> None:
    if math.isfinite(loss):
        return
    if paths.checkpoint.exists():
        kept = f"the last good checkpoint is kept in {paths.out}"
    else:
        kept = f"no checkpoint was written yet in {paths.out}"
    raise DvnError(f"the loss became {loss} at step {step + 1}; stopped, and {kept}; try a lower --lr")
