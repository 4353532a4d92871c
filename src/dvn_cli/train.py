"""Multi-task training of a DVN: every step takes a minibatch from EVERY task and sums the loss over all levels.

loss = sum_t sum_l lambda_l * CE(f(x_t; t, l), y_t)  [+ distill * KL(top level || level l) for l < k]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import STATE_FORMAT, load_checkpoint, read_dvn_file, save_checkpoint, write_atomic, write_dvn_file
from .config import TrainConfig
from .data import TaskBatches, TaskData, load_task
from .errors import BadConfig, DvnError, MissingData, WrongFileFormat
from .evaluate import accuracy
from .network import DeepVirtualNetwork, build_network

__all__ = [
    "EpochInfo",
    "StepInfo",
    "TrainObserver",
    "TrainResult",
    "fit",
    "load_tasks",
    "lr_at",
    "multitask_loss",
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
    k = network.units
    weights = level_weights or [1.0] * k
    total = torch.zeros((), device=batches[0][0].device)
    per_task = []
    for task, (images, labels) in enumerate(batches):
        task_loss = torch.zeros((), device=images.device)
        top_probs = None
        for level in range(k, 0, -1):  # top level first, so it can teach the lower ones
            logits = network(images, task, level, masked=masked)  # (B, classes_t)
            loss = weights[level - 1] * F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            if level == k:
                top_probs = logits.detach().softmax(-1)
            elif distill > 0:
                loss = loss + distill * F.kl_div(logits.log_softmax(-1), top_probs, reduction="batchmean")
            task_loss = task_loss + loss
        total = total + task_loss
        per_task.append(float(task_loss.detach()))
    return total, per_task


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

    def on_start(self, total_steps: int, start_step: int, data: list[TaskData]) -> None: ...

    def on_step(self, info: StepInfo) -> None: ...

    def on_epoch(self, info: EpochInfo) -> None: ...


@dataclass
class TrainResult:
    """Where the run's files are and what the run reached."""

    checkpoint: Path
    state: Path
    summary: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


@dataclass
class RunPaths:
    """The files of one run folder."""

    out: Path

    @property
    def checkpoint(self) -> Path:
        return self.out / "model.safetensors"

    @property
    def state(self) -> Path:
        return self.out / "train_state.safetensors"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.out / "config.json"


def load_tasks(cfg: TrainConfig) -> list[TaskData]:
    """Every task of ``cfg`` in memory at the backbone's input shape."""
    bb = cfg.backbone
    return [
        load_task(
            task,
            data_root=cfg.data_root,
            channels=bb.in_channels,
            size=bb.input_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            limit=cfg.limit,
            download=cfg.download,
        )
        for task in cfg.tasks
    ]


def validate(network: DeepVirtualNetwork, data: list[TaskData], device: torch.device) -> dict[str, list[float]]:
    """Validation accuracy of every (task, level)."""
    was_training = network.training
    network.eval()
    result = {}
    for t, task_data in enumerate(data):
        images, labels = task_data.split("val")
        result[task_data.spec.name] = [
            round(accuracy(lambda x, t=t, lv=lv: network(x, t, lv), images, labels, task_data.spec, device=device), 5)
            for lv in range(1, network.units + 1)
        ]
    network.train(was_training)
    return result


def _state_tensors(optimizer, streams: list[TaskBatches], names: list[str]) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value
    for name, stream in zip(names, streams, strict=True):
        for key, value in stream.state_dict().items():
            tensors[f"batches.{name}.{key}"] = torch.as_tensor(value)
    return tensors


def _load_state_tensors(tensors, optimizer, streams: list[TaskBatches], names: list[str]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    for name, stream in zip(names, streams, strict=True):
        prefix = f"batches.{name}."
        stream.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def fit(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    observer: TrainObserver | None = None,
    data: list[TaskData] | None = None,
) -> TrainResult:
    """Train a DVN on ``cfg.tasks`` and write its checkpoint, training state and metrics into ``cfg.out``.

    A checkpoint and training state are written atomically at the end of every epoch and on Ctrl-C
    (``KeyboardInterrupt`` then propagates, with ``TrainResult`` on the exception as ``result``). ``resume``
    continues from them and reaches the same weights as an uninterrupted run with the same seed.

    Args:
        cfg: the run's configuration.
        resume: continue the run in ``cfg.out``.
        force: start afresh even where ``cfg.out`` already holds a run.
        observer: progress hooks.
        data: pre-loaded task data (tests); loaded from ``cfg`` when None.
    """
    observer = observer or TrainObserver()
    paths = RunPaths(Path(cfg.out))
    device = resolve_device(cfg.device)
    data = data if data is not None else load_tasks(cfg)
    if resume and not paths.state.is_file():
        raise MissingData(f"nothing to resume in {paths.out}: no {paths.state.name}; train without --resume")
    if not resume and not force and paths.checkpoint.exists():
        raise BadConfig(
            f"{paths.out} already holds a run; pass --resume to continue it, --force to replace it, "
            "or --out for a new folder"
        )

    torch.manual_seed(cfg.seed)
    network = build_network(cfg.backbone, [d.spec for d in data], cfg.order_rule, cfg.order_table).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)  # ~15% faster convolutions on CPU
    optimizer = make_optimizer(network, cfg)
    names = [d.spec.name for d in data]
    streams = [
        TaskBatches(d, cfg.batch_size, seed=cfg.seed, task_index=i, augment=cfg.augment) for i, d in enumerate(data)
    ]
    steps_per_epoch = max(s.batches_per_epoch for s in streams)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    step, history, seconds = 0, [], 0.0
    result: TrainResult | None = None

    if resume:
        state_tensors, state_meta = read_dvn_file(paths.state, (STATE_FORMAT,))
        ckpt = load_checkpoint(paths.checkpoint)
        if state_meta["config"] != _comparable(cfg):
            raise BadConfig(
                f"{paths.state} was written by a run with another configuration; resume with the "
                "same flags or config file"
            )
        if ckpt.training.get("steps") != state_meta["step"]:
            raise WrongFileFormat(f"{paths.checkpoint} and {paths.state} are from different steps; cannot resume")
        network.load_state_dict(ckpt.network.state_dict())
        _load_state_tensors(state_tensors, optimizer, streams, names)
        step, history, seconds = state_meta["step"], state_meta["history"], state_meta["seconds"]
    else:
        paths.out.mkdir(parents=True, exist_ok=True)
        paths.metrics.unlink(missing_ok=True)
    write_atomic(paths.config, json.dumps(cfg.to_dict(), indent=2).encode())

    def save(interrupted: bool) -> TrainResult:
        summary = {
            "steps": step,
            "total_steps": total_steps,
            "epochs": round(step / steps_per_epoch, 3),
            "seconds": round(seconds, 1),
            "images_per_second": round(step * sum(s.batch_size for s in streams) / max(seconds, 1e-9), 1),
            "val_accuracy": history[-1]["val_accuracy"] if history else {},
            "data": [d.summary() for d in data],
            "config": cfg.to_dict(),
            "finished": step >= total_steps,
        }
        save_checkpoint(network, paths.checkpoint, summary)
        state_meta = {"step": step, "history": history, "seconds": seconds, "config": _comparable(cfg)}
        write_dvn_file(paths.state, _state_tensors(optimizer, streams, names), STATE_FORMAT, state_meta)
        return TrainResult(paths.checkpoint, paths.state, summary, interrupted)

    observer.on_start(total_steps, step, data)
    network.train()
    weights = list(cfg.level_weights) if cfg.level_weights else None
    epoch_start, epoch_losses = time.perf_counter(), dict.fromkeys(names, 0.0)
    try:
        while step < total_steps:
            tick = time.perf_counter()
            batches = [
                (x.to(device, memory_format=memory_format, non_blocking=True), y.to(device))
                for x, y in (next(s) for s in streams)
            ]
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss, task_losses = multitask_loss(network, batches, weights, cfg.distill, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise DvnError(
                    f"the loss became {float(loss)} at step {step + 1}; stopped, and the last good "
                    f"checkpoint is kept in {paths.out}; try a lower --lr"
                )
            loss.backward()
            optimizer.step()
            step += 1
            elapsed = time.perf_counter() - tick
            seconds += elapsed
            for n, value in zip(names, task_losses, strict=True):
                epoch_losses[n] += value
            observer.on_step(
                StepInfo(
                    step,
                    total_steps,
                    step / steps_per_epoch,
                    dict(zip(names, task_losses, strict=True)),
                    sum(len(y) for _, y in batches) / max(elapsed, 1e-9),
                    lr,
                )
            )
            if step % steps_per_epoch == 0 or step == total_steps:
                done = step % steps_per_epoch or steps_per_epoch
                info = EpochInfo(
                    epoch=math.ceil(step / steps_per_epoch),
                    step=step,
                    val_accuracy=validate(network, data, device),
                    train_loss={n: round(v / done, 5) for n, v in epoch_losses.items()},
                    seconds=round(time.perf_counter() - epoch_start, 1),
                )
                history.append(info.to_dict())
                with paths.metrics.open("a") as f:
                    f.write(json.dumps(info.to_dict()) + "\n")
                result = save(interrupted=False)
                observer.on_epoch(info)
                epoch_start, epoch_losses = time.perf_counter(), dict.fromkeys(names, 0.0)
    except KeyboardInterrupt as interrupt:
        interrupt.result = save(interrupted=True)
        raise
    return result if result is not None else save(interrupted=False)


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of a config that must match for ``--resume`` (not where files live or which device runs)."""
    return {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in ("out", "device", "data_root")}
