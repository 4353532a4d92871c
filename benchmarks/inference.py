"""Inference per level: virtual network (gathered on the fly) vs compact plain model vs compact with batch norm
folded vs the full network, at batch 1 and 64, next to the multiply-accumulate ratio (the physical limit);
peak memory of each compact model against the full one; file sizes; and the cost of switching a running
virtual network from one (task, level) to another.

    .venv/bin/python benchmarks/inference.py [-c runs/dvn/model.safetensors] [--task mnist] [--rounds 8]

Without a checkpoint it builds an untrained network of the same shape (speed does not depend on the weights).
Modes are interleaved round by round and medians reported: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.core.cost import level_cost
from dvn_cli.core.plain import extract_plain
from dvn_cli.export.pairs import fold_batchnorm
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.compact import save_compact
from dvn_cli.modelfile.spec import compact_spec


@torch.no_grad()
def median_ms(forward, x: torch.Tensor, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def peak_memory_mb(model_file: Path, batch: int, shape: tuple[int, ...]) -> float:
    """Peak resident memory (MB) added by loading ``model_file`` and running one batch, in a fresh process (Linux)."""
    code = f"""
import torch
from dvn_cli.modelfile.registry import open_model
torch.set_num_threads({torch.get_num_threads()})
x = torch.randn({batch}, *{shape})


def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
base = rss_kb("VmRSS")
model = open_model({str(model_file)!r})
net = model.plain if hasattr(model, "plain") else model.network.eval()
task = None if hasattr(model, "plain") else model.network.task_names[0]
with torch.no_grad():
    net(x) if task is None else net(x, task, model.network.units)
print((rss_kb("VmHWM") - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=Path("runs/dvn/model.safetensors"))
    parser.add_argument("--task", default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    if args.checkpoint.is_file():
        network = load_checkpoint(args.checkpoint).network.eval()
        source = args.checkpoint
    else:
        config = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
        network = build_network(config, [TaskSpec(f"task{i}", tuple("0123456789")) for i in range(2)]).eval()
        source = "untrained network (no checkpoint found)"
    task = args.task or network.task_names[0]
    cfg, k = network.config, network.units
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    inputs = {b: torch.randn(b, *shape) for b in (1, 64)}
    full_macs = level_cost(network, task, k).macs
    tmp = Path(tempfile.mkdtemp())

    rows = []
    for level in range(1, k + 1):
        plain = extract_plain(network, task, level)
        folded = fold_batchnorm(plain).eval()
        spec = compact_spec(network, task, level)
        compact_file = save_compact(plain, spec, tmp / f"level{level}.safetensors")
        modes = {
            "virtual": lambda x, lv=level: network(x, task, lv),
            "compact": plain,
            "folded": folded,
            "full": lambda x: network(x, task, k),
        }
        row = {
            "level": level,
            "mac_ratio": round(full_macs / spec.macs, 2),
            "file_kb": round(compact_file.stat().st_size / 1024, 1),
            "params_total": spec.params_total,
        }
        for batch, x in inputs.items():
            for forward in modes.values():  # warm-up
                median_ms(forward, x, 2)
            times = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode, forward in modes.items():
                    times[mode].append(median_ms(forward, x, 3 if batch == 64 else 20))
            med = {m: statistics.median(v) for m, v in times.items()}
            for mode in modes:
                row[f"{mode}_b{batch}_ms"] = round(med[mode], 3)
            row[f"speedup_folded_b{batch}"] = round(med["full"] / med["folded"], 2)
            row[f"speedup_virtual_b{batch}"] = round(med["full"] / med["virtual"], 2)
        row["peak_mb_b64"] = round(peak_memory_mb(compact_file, 64, shape), 1)
        rows.append(row)

    full_peak = round(peak_memory_mb(args.checkpoint, 64, shape), 1) if args.checkpoint.is_file() else None
    # switching: the first call of a (task, level) pays for its index/slice set-up; later calls do not.
    # Alternating two tasks at the same level (same MACs) against repeating one isolates the cost of switching.
    other = network.task_names[-1]
    x = inputs[1]
    fresh = load_checkpoint(args.checkpoint).network.eval() if args.checkpoint.is_file() else network
    with torch.no_grad():
        fresh(x, task, k)
        start = time.perf_counter()
        fresh(x, other, 1)
        first_switch = 1000 * (time.perf_counter() - start)
    switch = median_ms(lambda x: (network(x, task, 2), network(x, other, 2)), x, 50) / 2
    stay = median_ms(lambda x: (network(x, task, 2), network(x, task, 2)), x, 50) / 2

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"source: {source}; task {task}; input {shape}; {args.rounds} interleaved rounds, medians")
    header = ["level", "mac_ratio", "params_total", "file_kb", "peak_mb_b64"]
    for b in (1, 64):
        header += [f"virtual_b{b}_ms", f"compact_b{b}_ms", f"folded_b{b}_ms", f"full_b{b}_ms", f"speedup_folded_b{b}"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    print(f"full network peak memory at batch 64: {full_peak} MB (whole checkpoint: every task's BN and head)")
    print(
        f"switching (batch 1): first call of a new (task, level) {first_switch:.2f} ms; alternating two "
        f"(task, level)s {switch:.3f} ms/call vs repeating one {stay:.3f} ms/call"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "full_peak_mb_b64": full_peak,
                    "first_switch_ms": first_switch,
                    "alternating_ms": switch,
                    "repeating_ms": stay,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
