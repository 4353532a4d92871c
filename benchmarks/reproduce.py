"""Reproduction: does one DVN keep what separate networks give, at a fraction of the storage? Measured here.

Methods, all with the same backbone family, epochs, data and seeds (test split only for reporting):
  dvn          one network, all tasks, k levels
  independent  for every task and every width l/k, a plain network of that width trained on that task alone
  nested       one nested network per task (a DVN of one task: NestedNet / slimmable style)
  shared       one full network with a head (and batch norm) per task, no budgets (hard parameter sharing)

    .venv/bin/python benchmarks/reproduce.py --seeds 0,1,2 --limit 15000 --epochs 3 --out docs/results.json

Writes every per-run number to --out (JSON); `benchmarks/report.py` turns it into tables and a plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dvn_cli.config import BackboneConfig, TrainConfig
from dvn_cli.core.cost import level_cost, stored_params
from dvn_cli.evaluation.evaluate import accuracy
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.training.loop import fit, load_tasks


def test_accuracy(network, data, task: str, level: int) -> float:
    images, labels = data.split("test")
    return accuracy(lambda x: network(x, task, level), images, labels, network.tasks[network.task_index(task)])


def run(cfg: TrainConfig, data) -> tuple:
    start = time.perf_counter()
    result = fit(cfg, force=True, data=data)
    seconds = time.perf_counter() - start
    return load_checkpoint(result.checkpoint).network.eval(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist,fashion-mnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--limit", type=int, default=15000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--widths", default="32,64,128")
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--methods", default="dvn,independent,nested,shared")
    parser.add_argument("--augment", action="store_true", help="augment training images (off: short schedules)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", type=Path, default=Path("docs/results.json"))
    args = parser.parse_args()

    tasks = tuple(args.tasks.split(","))
    k = args.units
    backbone = BackboneConfig(
        depth=args.depth,
        widths=tuple(int(w) for w in args.widths.split(",")),
        units=k,
        in_channels=1,
        input_size=28,
        stem_stride=2,
    )
    base = TrainConfig(
        tasks=tasks,
        backbone=backbone,
        epochs=args.epochs,
        limit=args.limit,
        data_root=args.data_root,
        warmup_steps=50,
        augment=args.augment,
        out=tempfile.mkdtemp(),
    )
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        data = {d.spec.name: d for d in load_tasks(dataclasses.replace(base, seed=seed))}
        for method in args.methods.split(","):
            results, stored, seconds = [], 0, 0.0
            if method in ("dvn", "shared"):
                bb = backbone if method == "dvn" else dataclasses.replace(backbone, units=1)
                cfg = dataclasses.replace(base, seed=seed, backbone=bb)
                network, seconds = run(cfg, [data[t] for t in tasks])
                stored = stored_params(network)
                levels = range(1, bb.units + 1)
                results = [
                    (
                        t,
                        lv if method == "dvn" else k,
                        test_accuracy(network, data[t], t, lv),
                        level_cost(network, t, lv).params_total,
                    )
                    for t in tasks
                    for lv in levels
                ]
            elif method == "nested":
                for t in tasks:
                    network, s = run(dataclasses.replace(base, seed=seed, tasks=(t,)), [data[t]])
                    seconds += s
                    stored += stored_params(network)
                    results += [
                        (t, lv, test_accuracy(network, data[t], t, lv), level_cost(network, t, lv).params_total)
                        for lv in range(1, k + 1)
                    ]
            elif method == "independent":
                for t in tasks:
                    for lv in range(1, k + 1):
                        bb = dataclasses.replace(backbone, units=1, widths=tuple(w * lv // k for w in backbone.widths))
                        network, s = run(dataclasses.replace(base, seed=seed, tasks=(t,), backbone=bb), [data[t]])
                        seconds += s
                        stored += stored_params(network)
                        results.append(
                            (t, lv, test_accuracy(network, data[t], t, 1), level_cost(network, t, 1).params_total)
                        )
            runs.append(
                {
                    "seed": seed,
                    "method": method,
                    "seconds": round(seconds, 1),
                    "stored_params": stored,
                    "rows": [
                        {"task": t, "level": lv, "accuracy": round(a, 5), "params_total": p} for t, lv, a, p in results
                    ],
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["benchmarks/reproduce.py", *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                "backbone": dataclasses.asdict(backbone),
                "runs": runs,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
