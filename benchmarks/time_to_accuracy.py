"""Validation accuracy against training time for one training recipe: the curves that choose the main job's recipe.

    PYTHONPATH=src .venv/bin/python benchmarks/time_to_accuracy.py --name sandwich --level-sampling sandwich \\
        --epochs 1.2 --eval-every 100 --json docs/tta/sandwich.jsonl
    PYTHONPATH=src .venv/bin/python benchmarks/time_to_accuracy.py --report docs/tta/*.jsonl

The main job's tasks (MNIST + Fashion-MNIST, 6,000 validation images each carved with seed 0), network and
optimiser, trained by the library's own pieces (``lr_at``, ``make_optimizer``, ``task_losses``,
``sample_levels``) as ``dvn train`` trains; the test split is never read. Every ``--eval-every`` steps and at the
end, levels 1 and k are validated (every level at the end).

The time axis is the process's CPU time in the training steps (validation excluded, reported apart), measured
with ONE thread: on a shared machine wall time moves with the load, a one-thread process's CPU time much less,
and it is the wall time of a quiet one-thread run. ``benchmarks/main_job_step.py levers`` gives the factor from
one thread to two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import time
from functools import partial
from pathlib import Path

import torch

from dvn_cli import BackboneConfig, TrainConfig, build_network
from dvn_cli.evaluation.evaluate import count_correct
from dvn_cli.training.levels import sample_levels
from dvn_cli.training.loop import load_tasks
from dvn_cli.training.loss import summed, task_losses
from dvn_cli.training.schedule import lr_at, make_optimizer


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@torch.no_grad()
def validate_levels(network, data, levels) -> dict[str, list[float]]:
    """Validation accuracy of ``levels`` of every task (as ``training.loop.validate``, fewer levels)."""
    network.eval()
    scores = {}
    for t, task in enumerate(data):
        forwards = [partial(network, task=t, level=lv) for lv in levels]
        correct, seen = count_correct(forwards, task.batches("val", 500), task.spec)
        scores[task.spec.name] = [round(c / seen, 5) for c in correct]
    network.train()
    return scores


def step_lr(args, cfg: TrainConfig, step: int, total: int) -> float:
    """The library's warm-up and cosine (``lr_at``), or with ``--linear-decay`` a straight line to zero after it."""
    if args.linear_decay and step >= cfg.warmup_steps:
        return cfg.lr * (total - step) / (total - cfg.warmup_steps)
    return lr_at(step, total, cfg.lr, cfg.warmup_steps)


def step_levels(args, cfg: TrainConfig, units: int, step: int, total: int) -> list[int]:
    """The library's level sample, or level k alone during the first ``--top-first`` of the steps."""
    if step < args.top_first * total:
        return [units]
    return sample_levels(cfg.level_sampling, units, cfg.seed, step)


def zero_last_norms(network) -> None:
    """``--zero-init-residual``: every block's last batch norm (each task's, each level's) starts at scale 0."""
    for name, module in network.named_modules():
        if name.endswith(".bn2"):  # a LevelBatchNorm2d: one BatchNorm2d per (task, level)
            for norm in module.modules():
                if isinstance(norm, torch.nn.BatchNorm2d):
                    torch.nn.init.zeros_(norm.weight)


def train_curve(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    backbone = BackboneConfig(
        depth=args.depth, widths=tuple(args.widths), units=4, in_channels=1, input_size=28, stem_stride=args.stem_stride
    )
    cfg = TrainConfig(
        tasks=("mnist", "fashion-mnist"),
        backbone=backbone,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        label_smoothing=args.label_smoothing,
        distill=args.distill,
        level_sampling=args.level_sampling,
        level_weights=args.level_weights,
        seed=args.seed,
        data_root=args.data_root,
        augment=False,
    )
    data = [dataclasses.replace(d, augment="none") for d in load_tasks(cfg)]
    torch.manual_seed(cfg.seed)
    network = build_network(backbone, [d.spec for d in data]).to(memory_format=torch.channels_last).train()
    if args.zero_init_residual:
        zero_last_norms(network)
    optimizer = make_optimizer(network, cfg)
    streams = [d.train_batches(cfg.batch_size, seed=cfg.seed, task_index=i) for i, d in enumerate(data)]
    total = max(1, round(cfg.epochs * max(s.batches_per_epoch for s in streams)))
    k = backbone.units
    rows, train_cpu, train_wall, val_cpu = [], 0.0, 0.0, 0.0
    for step in range(total):
        start_cpu, start_wall = cpu_seconds(), time.perf_counter()
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in (next(s) for s in streams)]
        for group in optimizer.param_groups:
            group["lr"] = step_lr(args, cfg, step, total)
        optimizer.zero_grad(set_to_none=True)
        levels = step_levels(args, cfg, k, step, total)
        losses = task_losses(network, batches, cfg.level_weights, cfg.distill, cfg.label_smoothing, levels=levels)
        summed(losses).backward()
        optimizer.step()
        train_cpu += cpu_seconds() - start_cpu
        train_wall += time.perf_counter() - start_wall
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            start = cpu_seconds()
            val = validate_levels(network, data, range(1, k + 1) if step + 1 == total else (1, k))
            val_cpu += cpu_seconds() - start
            row = {
                "name": args.name,
                "step": step + 1,
                "total_steps": total,
                "train_cpu_s": round(train_cpu, 1),
                "train_wall_s": round(train_wall, 1),
                "val_cpu_s": round(val_cpu, 1),
                "load": os.getloadavg()[0],
                "val": val,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def report(paths: list[str]) -> None:
    """Each run's last row: steps, training CPU seconds, validation accuracy of level 1 and level k per task."""
    print(f"{'run':28} {'steps':>6} {'cpu s':>7} {'mnist l1/lk':>14} {'fashion l1/lk':>14}")
    for path in paths:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        for row in rows:
            m, f = row["val"]["mnist"], row["val"]["fashion-mnist"]
            print(
                f"{row['name']:28} {row['step']:>6} {row['train_cpu_s']:>7.0f} "
                f"{100 * m[0]:6.2f}/{100 * m[-1]:6.2f} {100 * f[0]:6.2f}/{100 * f[-1]:6.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="+", help="print the curves of these JSON-lines files and stop")
    parser.add_argument("--name", default="run")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--distill", type=float, default=0.0, help="distillation weight from the top level")
    parser.add_argument("--level-sampling", default="all")
    parser.add_argument("--depth", type=int, default=14, help="ResNet depth 6n+2: 14 (n = 2) or 8 (n = 1)")
    parser.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[32, 64, 128])
    parser.add_argument("--stem-stride", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level-weights", type=lambda s: [float(w) for w in s.split(",")], default=None)
    parser.add_argument("--linear-decay", action="store_true", help="linear decay to zero after warm-up")
    parser.add_argument("--top-first", type=float, default=0.0, help="fraction of steps that train level k alone")
    parser.add_argument("--zero-init-residual", action="store_true", help="each block's last batch norm starts at 0")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--json", help="append the curve's rows to this JSON-lines file")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    print(
        f"# {platform.processor() or platform.machine()}, ATen {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} thread(s), torch {torch.__version__}: {vars(args)}",
        flush=True,
    )
    rows = train_curve(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
