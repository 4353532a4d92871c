"""Turn `benchmarks/reproduce.py` results into markdown tables (mean ± std over seeds) and a plot.

.venv/bin/python benchmarks/report.py docs/results.json --plot docs/accuracy_vs_params.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METHODS = ("dvn", "independent", "nested", "shared")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    runs = results["runs"]
    acc: dict[tuple, list[float]] = defaultdict(list)
    params: dict[tuple, int] = {}
    for run in runs:
        for row in run["rows"]:
            key = (run["method"], row["task"], row["level"])
            acc[key].append(row["accuracy"])
            params[key] = row["params_total"]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    tasks = list(dict.fromkeys(row["task"] for run in runs for row in run["rows"]))
    levels = sorted({key[2] for key in acc})
    seeds = sorted({r["seed"] for r in runs})

    print(f"Command: `{results['command']}`; machine: {results['machine']}; seeds {seeds}.\n")
    print(
        "| task | level | " + " | ".join(f"{m} top-1 %" for m in methods) + " | params (dvn) | params (independent) |"
    )
    print("|---|---|" + "---|" * len(methods) + "---|---|")
    for task in tasks:
        for level in levels:
            cells = [mean_std(acc[m, task, level]) if (m, task, level) in acc else "–" for m in methods]
            print(
                f"| {task} | {level} | "
                + " | ".join(cells)
                + f" | {params.get(('dvn', task, level), '–'):,} | {params.get(('independent', task, level), '–'):,} |"
            )
    print()
    print("| method | parameters stored for all its (task, budget) pairs | training time (s, mean) |")
    print("|---|---|---|")
    for m in methods:
        of_m = [r for r in runs if r["method"] == m]
        print(f"| {m} | {of_m[0]['stored_params']:,} | {statistics.mean(r['seconds'] for r in of_m):.0f} |")
    if "independent" in methods and "dvn" in methods:
        gaps = [
            statistics.mean(acc["dvn", t, lv]) - statistics.mean(acc["independent", t, lv])
            for t in tasks
            for lv in levels
        ]
        ratio = [r for r in runs if r["method"] == "independent"][0]["stored_params"] / [
            r for r in runs if r["method"] == "dvn"
        ][0]["stored_params"]
        print(
            f"\nDVN minus independent, mean over (task, level): {100 * statistics.mean(gaps):+.2f} points; "
            f"storage ratio independent / dvn: {ratio:.2f}x"
        )

    if args.plot:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), dpi=120)
        for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks, strict=True):
            for m in methods:
                pts = sorted(
                    (
                        params[m, task, lv],
                        100 * statistics.mean(acc[m, task, lv]),
                        100 * (statistics.stdev(acc[m, task, lv]) if len(acc[m, task, lv]) > 1 else 0),
                    )
                    for lv in levels
                    if (m, task, lv) in acc
                )
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(task)
            ax.set_xlabel("parameters of the (task, level) model")
            ax.set_ylabel("test top-1 (%)")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
