"""Order rules compared on tasks given in an order the fixed rule handles badly: does ``affinity`` place them better?

Ways, all with the same backbone, steps, data and seeds (test split only for reporting):
  nearest      the paper's rule on the tasks in the given order
  cyclic       the cyclic rule on the given order
  affinity     --order-rule affinity (its warm-up counts in the same steps)
  slots=a,b,c  the nearest orders of one placement (task i on slot a_i), for EVERY placement: the exhaustive
               search; ``slots=0,1,...`` is ``nearest``. The best placement is chosen on the VALIDATION split
               (mean over (task, level)s and seeds) and reported on the test split.

    PYTHONPATH=src python benchmarks/order_rules.py --data-root /path/with/mnist+fashion+digits \\
        --out docs/order_rules.json

Runs are interleaved seed by seed (every way of seed 0, then of seed 1, ...). Writes every run's numbers to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dvn_cli.config import BackboneConfig, TrainConfig
from dvn_cli.core.affinity import placement_orders
from dvn_cli.evaluation.evaluate import accuracy
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.training.loop import fit, load_tasks


def ways(num_tasks: int, units: int) -> dict[str, dict]:
    """Way name -> the TrainConfig fields that make it."""
    out = {
        "nearest": {"order_rule": "nearest"},
        "cyclic": {"order_rule": "cyclic"},
        "affinity": {"order_rule": "affinity"},
    }
    for perm in itertools.permutations(range(num_tasks)):
        if perm != tuple(range(num_tasks)):  # the given order is "nearest"
            name = "slots=" + ",".join(map(str, perm))
            out[name] = {"order_rule": "table", "order_table": placement_orders(perm, units)}
    return out


def test_accuracies(checkpoint: Path, data) -> dict[str, list[float]]:
    network = load_checkpoint(checkpoint).network.eval()
    out = {}
    for t, task_data in enumerate(data):
        images, labels = task_data.split("test")
        out[task_data.spec.name] = [
            round(accuracy(lambda x, t=t, lv=lv: network(x, t, lv), images, labels, task_data.spec), 5)
            for lv in range(1, network.units + 1)
        ]
    return out


def mean_over_pairs(acc: dict[str, list[float]]) -> float:
    return statistics.fmean(v for levels in acc.values() for v in levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist,fashion-mnist,digits", help="the GIVEN order")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--limit", type=int, default=6400, help="training images per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=4.0, help="over the largest (limited) task")
    parser.add_argument("--affinity-steps", type=int, default=100)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--widths", default="16,32,64")
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ways", default="", help="ways separated by ';' (default: all)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", type=Path, default=Path("docs/order_rules.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks = tuple(args.tasks.split(","))
    backbone = BackboneConfig(
        depth=args.depth,
        widths=tuple(int(w) for w in args.widths.split(",")),
        units=args.units,
        in_channels=1,
        input_size=28,
        stem_stride=2,
    )
    all_ways = ways(len(tasks), args.units)
    chosen = args.ways.split(";") if args.ways else list(all_ways)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        base = TrainConfig(
            tasks=tasks,
            backbone=backbone,
            epochs=args.epochs,
            batch_size=args.batch_size,
            limit=args.limit,
            data_root=args.data_root,
            warmup_steps=50,
            augment=False,
            affinity_steps=args.affinity_steps,
            seed=seed,
            out=tempfile.mkdtemp(),
        )
        data = load_tasks(base)
        for way in chosen:
            cfg = dataclasses.replace(base, **all_ways[way], out=tempfile.mkdtemp())
            start = time.perf_counter()
            result = fit(cfg, data=data)
            wall = time.perf_counter() - start
            summary = result.summary
            test = test_accuracies(result.checkpoint, data)
            row = {
                "way": way,
                "seed": seed,
                "train_seconds": summary["seconds"],
                "wall_seconds": round(wall, 1),
                "steps": summary["steps"],
                "orders": [list(o) for o in load_checkpoint(result.checkpoint).network.layout.orders],
                "val_accuracy": summary["val_accuracy"],
                "test_accuracy": test,
                "test_mean": round(mean_over_pairs(test), 5),
                "val_mean": round(mean_over_pairs(summary["val_accuracy"]), 5),
                "affinity": summary.get("affinity"),
            }
            runs.append(row)
            print(json.dumps({k: row[k] for k in ("way", "seed", "train_seconds", "test_mean", "val_mean")}))
            args.out.write_text(
                json.dumps(
                    {
                        "settings": {**vars(args), "out": str(args.out)},
                        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
                        "runs": runs,
                    },
                    indent=1,
                )
            )


if __name__ == "__main__":
    main()
