"""The main job's training step (examples/mnist_fashion.toml shapes), profiled by operator and timed per lever.

    .venv/bin/python benchmarks/main_job_step.py profile [--mode base] [--steps 5]
    .venv/bin/python benchmarks/main_job_step.py levers [--rounds 6] [--modes base,nchw,threads1,foreach,fused]

ResNet-14 32/64/128, k = 4, 2 tasks of 10 classes, batch 128 per task, 1x28x28 with a stride-2 stem: the step
``training.loop`` takes (``task_losses`` over every level, the summed backward, ``make_optimizer``'s SGD). A mode
is one lever changed from ``base`` (2 threads, channels-last, the optimiser as ``make_optimizer`` builds it):

- ``nchw``: contiguous (NCHW) tensors instead of channels-last;
- ``threads1``: one intra-op thread instead of two;
- ``foreach`` / ``fused``: SGD's multi-tensor or fused implementation instead of the per-tensor loop;
- ``sandwich``: levels 1, k and one random middle level per task (3 of 4 forwards and backwards);
- ``depth8``: ResNet-8 (one basic block per stage) instead of ResNet-14 (two);
- ``taskthreads``: each task's forwards and backward in its own thread with one intra-op thread
  (``training.task_threads``, what ``dvn train`` does on CPU) instead of one summed backward on every thread;
- ``batch64``: 64 images per task instead of ``--batch`` (compare per image: half the images per step).

Levers combine with ``+``: ``sandwich+depth8`` is the sampled step of ResNet-8.

``levers`` interleaves the modes round by round (each round one timed step per mode after an untimed one) and
reports medians of wall time and of the process's CPU time (user + system, all threads): wall time moves with
the machine's load, CPU time much less so. The machine's load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import time

import torch

from dvn_cli import BackboneConfig, TaskSpec, TrainConfig, build_network
from dvn_cli.training.loss import summed, task_loss, task_losses
from dvn_cli.training.schedule import make_optimizer
from dvn_cli.training.task_threads import TaskThreads

LEVERS = ("base", "nchw", "threads1", "foreach", "fused", "sandwich", "depth8", "taskthreads", "batch64")


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_step(mode: str, batch: int, threads: int):
    """One training step of the main job's network under ``mode`` (a fresh network and optimiser per mode)."""
    levers = set(mode.split("+"))
    if unknown := levers - set(LEVERS):
        raise SystemExit(f"unknown lever(s) {sorted(unknown)}; choose from {', '.join(LEVERS)}")
    torch.manual_seed(0)
    depth = 8 if "depth8" in levers else 14
    batch = 64 if "batch64" in levers else batch
    config = BackboneConfig(depth=depth, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
    tasks = [TaskSpec(name=f"task{t}", classes=tuple(str(c) for c in range(10))) for t in range(2)]
    fmt = torch.contiguous_format if "nchw" in levers else torch.channels_last
    network = build_network(config, tasks).train().to(memory_format=fmt)
    batches = [
        (torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt), torch.randint(0, 10, (batch,))) for _ in tasks
    ]
    optimizer = make_optimizer(network, TrainConfig())
    for group in optimizer.param_groups:
        group["foreach"] = "foreach" in levers
        group["fused"] = True if "fused" in levers else None
    rng = random.Random(0)
    k = config.units
    pool = TaskThreads.for_cpu_step(len(tasks), threads) if "taskthreads" in levers else None

    def step() -> None:
        torch.set_num_threads(1 if "threads1" in levers else threads)
        optimizer.zero_grad(set_to_none=True)
        levels = [k, rng.randint(2, k - 1), 1] if "sandwich" in levers else None  # None: every level
        if pool is not None:
            pool.backward(network, batches, lambda t, x, y: task_loss(network, t, x, y, levels=levels))
        else:
            summed(task_losses(network, batches, levels=levels)).backward()
        optimizer.step()

    return step


def profile(args) -> None:
    step = make_step(args.mode, args.batch, args.threads)
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(header(args))
    print(f"profile of {args.steps} steps, mode {args.mode}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


def levers(args) -> None:
    modes = args.modes.split(",")
    steps = {mode: make_step(mode, args.batch, args.threads) for mode in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for mode, step in steps.items():
            step()  # untimed: the thread count and caches settle
            start_wall, start_cpu = time.perf_counter(), cpu_seconds()
            step()
            wall[mode].append(time.perf_counter() - start_wall)
            cpu[mode].append(cpu_seconds() - start_cpu)
        loads.append(os.getloadavg()[0])
    print(header(args))
    print(f"{args.rounds} interleaved rounds, medians; 1-minute load average {min(loads):.1f}-{max(loads):.1f}")
    base_wall, base_cpu = statistics.median(wall[modes[0]]), statistics.median(cpu[modes[0]])
    print(f"{'mode':10} {'wall ms':>9} {'cpu ms':>9} {'wall/' + modes[0]:>12} {'cpu/' + modes[0]:>12}")
    for mode in modes:
        w, c = statistics.median(wall[mode]), statistics.median(cpu[mode])
        print(f"{mode:10} {w * 1000:9.1f} {c * 1000:9.1f} {w / base_wall:12.2f} {c / base_cpu:12.2f}")


def header(args) -> str:
    return (
        f"machine: {platform.processor() or platform.machine()}, ATen CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, torch {torch.__version__}; "
        f"main job step: ResNet-14 (depth8: ResNet-8) 32/64/128, k=4, 2 tasks, batch {args.batch}/task, "
        "1x28x28, stem stride 2"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("profile", "levers"))
    parser.add_argument("--mode", default="base", help="profile: the mode profiled (levers joined by +)")
    parser.add_argument("--modes", default="base,nchw,threads1,foreach,fused", help="levers: modes, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="profile: steps profiled")
    parser.add_argument("--top", type=int, default=25, help="profile: operators shown")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    (profile if args.what == "profile" else levers)(args)


if __name__ == "__main__":
    main()
