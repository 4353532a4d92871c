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

Runs are interleaved seed by seed (every way of seed 0, then of seed 1, ...). Writes every run's numbers to --out;
``--ways`` splits the ways over several processes, and ``--report A.json B.json`` prints the tables of
docs/results.md from their files.
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
from dvn_cli.training.observer import TrainObserver


class StepTimes(TrainObserver):
    """Seconds of every optimiser step, from the images per second the loop reports for it."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.seconds: list[float] = []

    def on_step(self, info) -> None:
        self.seconds.append(self.images_per_step / info.images_per_second)


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


def step_overhead(backbone: BackboneConfig, num_tasks: int, batch_size: int, rounds: int) -> dict:
    """Median step time of a warm-up step (one backward per task + gradient cosines) against an ordinary step
    (one backward of the summed loss), interleaved round by round on the same network and batches, and the time
    of the placement (search + relayout) once."""
    from dvn_cli.config import TaskSpec
    from dvn_cli.core.network import build_network
    from dvn_cli.training.affinity_warmup import AffinityWarmup, relayout
    from dvn_cli.training.loss import task_losses

    torch.manual_seed(0)
    specs = [TaskSpec(f"t{i}", tuple("0123456789")) for i in range(num_tasks)]
    network = build_network(backbone, specs, "affinity").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, backbone.in_channels, backbone.input_size, backbone.input_size)
    batches = [
        (torch.randn(shape, generator=g).to(memory_format=torch.channels_last), torch.randint(0, 10, (batch_size,)))
        for _ in range(num_tasks)
    ]
    warmup = AffinityWarmup(rounds, [s.name for s in specs])
    times: dict[str, list[float]] = {"ordinary": [], "warm-up": []}
    for _ in range(rounds + 2):
        for mode in times:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses = task_losses(network, batches)
            if mode == "warm-up":
                warmup.backward(network, losses, scaler)
            else:
                sum(losses).backward()
            optimizer.step()
            times[mode].append(time.perf_counter() - start)
    start = time.perf_counter()
    relayout(network, warmup.place(backbone.units))
    place = time.perf_counter() - start
    med = {mode: statistics.median(t[2:]) for mode, t in times.items()}  # the first two rounds warm the caches
    return {
        "rounds": rounds,
        "ordinary_ms": round(1000 * med["ordinary"], 2),
        "warmup_ms": round(1000 * med["warm-up"], 2),
        "ratio": round(med["warm-up"] / med["ordinary"], 4),
        "place_ms": round(1000 * place, 2),
    }


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(files: list[Path]) -> None:
    """Markdown tables: per way, per (task, level) test accuracy, mean over them, time; the best placement chosen
    on validation; how much of the gap affinity recovers; the measured matrices."""
    runs = [r for f in files for r in json.loads(f.read_text())["runs"]]
    by_way: dict[str, list[dict]] = {}
    for r in runs:  # affinity runs of several warm-up lengths are ways of their own
        way = f"affinity-{r['affinity']['warmup_steps']}" if r["way"] == "affinity" else r["way"]
        by_way.setdefault(way, []).append(r)
    tasks = list(runs[0]["test_accuracy"])
    k = len(runs[0]["test_accuracy"][tasks[0]])
    placements = {w: rs for w, rs in by_way.items() if w == "nearest" or w.startswith("slots=")}
    best = max(placements, key=lambda w: statistics.fmean(r["val_mean"] for r in placements[w]))
    head = " | ".join(f"{t} L{lv}" for t in tasks for lv in range(1, k + 1))
    print(f"| way | seeds | {head} | mean over (task, level) | train s |")
    print("|---" * (4 + len(tasks) * k) + "|")
    affinities = sorted((w for w in by_way if w.startswith("affinity-")), key=lambda w: -int(w.split("-")[1]))
    order = ["nearest", "cyclic", *affinities, *sorted(w for w in by_way if w.startswith("slots="))]
    for way in (w for w in order if w in by_way):
        rs = by_way[way]
        cells = [_pm([r["test_accuracy"][t][lv] for r in rs]) for t in tasks for lv in range(k)]
        name = f"**{way}** (best on val)" if way == best else way
        print(
            f"| {name} | {len(rs)} | {' | '.join(cells)} | {_pm([r['test_mean'] for r in rs])} | "
            f"{_pm([r['train_seconds'] for r in rs], 1, 1)} |"
        )
    mean = {w: statistics.fmean(r["test_mean"] for r in rs) for w, rs in by_way.items()}
    gap = mean[best] - mean["nearest"]
    print(
        f"\nbest placement on validation: {best}; test mean: nearest {100 * mean['nearest']:.2f}, best "
        f"{100 * mean[best]:.2f}; gap {100 * gap:+.2f} points"
    )
    for way in affinities:
        recovered = (mean[way] - mean["nearest"]) / gap if gap else float("nan")
        aff, near = by_way[way], by_way["nearest"]
        ratio = statistics.fmean(r["train_seconds"] for r in aff) / statistics.fmean(r["train_seconds"] for r in near)
        print(
            f"\n{way}: test mean {100 * mean[way]:.2f}, recovers {recovered:.2f} of the gap; training time / "
            f"nearest's (means over seeds, under the load of the moment): {ratio:.3f}"
        )
        for r in aff:
            warm, rest = r["step_ms_warmup"], r["step_ms"]
            share = r["affinity"]["warmup_steps"] / r["steps"]
            print(
                f"seed {r['seed']}: median step {warm} ms in the warm-up, {rest} ms after: the warm-up's measurement "
                f"adds {100 * share * (warm / rest - 1):+.1f} % to the run; placed {' - '.join(r['affinity']['line'])}"
                f" (slots {r['affinity']['slots']}); matrix {r['affinity']['matrix']}"
            )


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
    parser.add_argument("--report", type=Path, nargs="+", help="print the tables of these result files and stop")
    parser.add_argument("--step-overhead", type=int, default=0, help="only time warm-up vs ordinary steps, N rounds")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
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
    if args.step_overhead:
        print(json.dumps(step_overhead(backbone, len(tasks), args.batch_size, args.step_overhead)))
        return
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
            times = StepTimes(cfg.batch_size * len(tasks))
            start = time.perf_counter()
            result = fit(cfg, data=data, observer=times)
            wall = time.perf_counter() - start
            warm = cfg.affinity_steps if cfg.order_rule == "affinity" else 0
            summary = result.summary
            test = test_accuracies(result.checkpoint, data)
            row = {
                "way": way,
                "seed": seed,
                "train_seconds": summary["seconds"],
                "wall_seconds": round(wall, 1),
                "steps": summary["steps"],
                # medians of the step times in the warm-up and after it (the same run, so the same load)
                "step_ms_warmup": round(1000 * statistics.median(times.seconds[:warm]), 2) if warm else None,
                "step_ms": round(1000 * statistics.median(times.seconds[warm:]), 2),
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
