"""Multi-task training of a DVN: the run from start (or resume) to its last step, saved at every epoch end.

Every step takes a minibatch from EVERY task and sums the loss over all levels (``loss.py``); the step is
``step.py``, the epoch end ``epoch.py``, the run's state ``run_state.py``, the train-state file
``modelfile/train_state.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import TrainConfig
from ..core.backbones import check_input_shape
from ..core.network import build_network
from ..data.streaming import StreamFailed, open_task, worker_failure
from ..data.task import Task
from ..errors import BadConfig, MissingData, WrongFileFormat
from ..fsutil import first_line, write_atomic
from ..modelfile.checkpoint import STATE_FORMAT, load_checkpoint
from ..modelfile.container import read_dvn_file
from ..modelfile.torchvision_file import init_from_file
from ..modelfile.train_state import load_train_state_tensors
from ..user_config import config_differences
from .affinity_warmup import AffinityWarmup
from .distributed import DistEnv, ShardedBatches, broadcast_module, detect_env, init_distributed, shutdown_distributed
from .epoch import end_epoch, epoch_end_due, save_progress, save_run
from .memory_estimate import check_memory
from .observer import TrainObserver, TrainResult
from .run_folder import RunPaths, prepare_run_folder
from .run_state import Run, place, together
from .schedule import make_optimizer, resolve_device, resolve_precision
from .step import take_step
from .stops import StopSignals
from .task_threads import TaskThreads

__all__ = ["check_validation", "fit", "load_tasks"]


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


def check_validation(data: list[Task]) -> None:
    """Refuse a task without validation images: its accuracy could not be measured, and plans choose by it."""
    for d in data:
        if d.split_size("val") == 0:
            raise MissingData(
                f"task {d.spec.name!r} has no validation images ({d.split_size('train')} training images); give it "
                "more images or a larger --val-fraction (or images in its folder's val/)"
            )


def fit(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    observer: TrainObserver | None = None,
    data: list[Task] | None = None,
) -> TrainResult:
    """Train a DVN on ``cfg.tasks`` and write its checkpoint, training state and metrics into ``cfg.out``.

    A checkpoint and training state are written atomically at the end of every epoch, on Ctrl-C or SIGTERM
    (``stops.Interrupted``, a ``KeyboardInterrupt``, then propagates with the saved ``TrainResult`` as ``result``,
    None when no step was taken) and when a streamed task stops delivering (``StreamFailed``, naming the save).
    ``resume`` continues from the training state (which holds the weights too) and reaches the same weights and
    metrics as an uninterrupted run with the same seed, from any step. A run killed outright resumes from its last
    save; ``force`` replaces an existing run's files at the first save. The run folder is locked for the whole
    run (``run_folder.RunLock``, rank 0): a second run into it is refused. Before the network is allocated, a
    run whose step would not fit the memory left is refused (``memory.check_memory``).

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
        with StopSignals() as stops:
            result = _fit(cfg, env, device, resume, force, observer or TrainObserver(), data, stops)
        finished = True
        return result
    finally:
        shutdown_distributed(started, synchronize=finished)


def _fit(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    resume: bool,
    force: bool,
    observer: TrainObserver,
    data: list[Task] | None,
    stops: StopSignals,
) -> TrainResult:
    check_input_shape(cfg.backbone)
    paths = RunPaths(Path(cfg.out))
    amp_dtype = resolve_precision(cfg.precision, device)
    if data is None:
        data = together(env, device, lambda: load_tasks(cfg))
    together(env, device, lambda: check_validation(data))
    if not cfg.augment:  # so that what is reported is what runs
        data = [d.with_augment("none") for d in data]
    together(env, device, lambda: check_memory(cfg, [d.spec for d in data], device))
    lock = together(env, device, lambda: prepare_run_folder(paths, resume, force, env.is_main))
    run = None
    try:
        run = _new_run(cfg, env, device, paths, data, amp_dtype)
        if resume:
            together(env, device, lambda: _resume(run))
        elif cfg.init is not None:  # pretrained weights, channels mapped into units (docs/design.md §6)
            together(env, device, lambda: init_from_file(run.network, cfg.init))
        broadcast_module(run.network)  # every rank starts from rank 0's weights, as DDP does
        if run.main:  # a replaced run's other files stay until this run's first epoch end rewrites them
            write_atomic(paths.config, json.dumps(cfg.to_dict(), indent=2).encode())
            observer.on_start(run.total_steps, run.step, data)
        try:
            result = _train_steps(run, observer, stops)
        except KeyboardInterrupt as interrupt:
            # Any KeyboardInterrupt (stops.Interrupted, or one an observer raises) carries the save as `result`,
            # which KeyboardInterrupt does not declare; the CLI reads it back with getattr
            setattr(interrupt, "result", save_progress(run))  # noqa: B010
            raise
        except (StreamFailed, RuntimeError) as exc:
            failure = exc if isinstance(exc, StreamFailed) else worker_failure(exc)
            if failure is None:
                raise
            for stream in run.streams:  # no worker left to interrupt the save (DataLoader's SIGCHLD handler)
                stream.close()
            raise _saved_after(run, failure) from None
        return result if result is not None else together(env, device, lambda: save_run(run, interrupted=False))
    finally:
        if run is not None and run.task_threads is not None:
            run.task_threads.close()
        lock.release()


def _new_run(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    paths: RunPaths,
    data: list[Task],
    amp_dtype: torch.dtype | None,
) -> Run:
    """A fresh run at step 0: the seeded network, its optimizer and gradient scaler, and the batch streams."""
    torch.manual_seed(cfg.seed)
    network = build_network(cfg.backbone, [d.spec for d in data], cfg.order_rule, cfg.order_table).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)  # ~15% faster convolutions on CPU
    streams = [d.train_batches(cfg.batch_size, seed=cfg.seed, task_index=i) for i, d in enumerate(data)]
    run = Run(
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
        epoch_losses=dict.fromkeys((d.spec.name for d in data), 0.0),
    )
    # one summed backward where the step cannot be split by task: GPU, ranks, fp16's gradient scaler
    if cfg.task_threads and device.type == "cpu" and not env.distributed and not run.scaler.is_enabled():
        run.task_threads = TaskThreads.for_cpu_step(len(data), torch.get_num_threads())
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


def _resume(run: Run) -> None:
    """Load the run's training state: weights, optimizer, scaler, batch streams, step and history."""
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
                place(run, orders)
        run.network.load_state_dict(weights)
        load_train_state_tensors(state_tensors, run.optimizer, run.scaler, run.streams, run.names)
        run.step, run.history, run.seconds = state_meta["step"], state_meta["history"], state_meta["seconds"]
        run.epoch_losses = {n: float(state_meta.get("epoch_losses", {}).get(n, 0.0)) for n in run.names}
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WrongFileFormat(f"{paths.state} does not match this run ({first_line(exc)}); cannot resume") from None


def _saved_after(run: Run, failure: StreamFailed) -> StreamFailed:
    """``failure``, once the run's progress is saved, saying where (``--resume`` is promised only then)."""
    saved = save_progress(run)
    where = f"checkpoint of step {run.step} saved in {run.paths.out}; --resume continues" if saved else "nothing saved"
    return StreamFailed(f"{failure}; {where}")


def _train_steps(run: Run, observer: TrainObserver, stops: StopSignals) -> TrainResult | None:
    """Optimiser steps from ``run.step`` to the end: validate and save at every epoch end.

    An epoch end is done at the top of the loop, so a run saved after its last step but before its validation
    (stopped meanwhile) validates on ``--resume``. Returns the last epoch end's result (None when there was no
    step left to take).
    """
    run.network.train()
    result: TrainResult | None = None
    epoch_start = time.perf_counter()
    while True:
        if epoch_end_due(run):
            result = end_epoch(run, observer, time.perf_counter() - epoch_start)
            epoch_start = time.perf_counter()
        if run.step >= run.total_steps:
            return result
        info = take_step(run, stops)
        if run.main:
            observer.on_step(info)
