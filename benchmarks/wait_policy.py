"""Inference latency under OpenMP's waiting policies and thread counts: what ``dvn``'s passive default costs.

    PYTHONPATH=src .venv/bin/python benchmarks/wait_policy.py [-c runs/dvn/model.safetensors] [--rounds 4] \
        [--batches 1,2,4,8,16,64]

``dvn`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (``cli/__init__.py``), for training under load. libgomp
reads the policy once, when it loads, so each setting runs in a fresh process: (ACTIVE, PASSIVE) x (1, 2 threads),
alternated round by round. Each process times the checkpoint's virtual network (task 0) at levels 1 and k, at each of
``--batches`` (default 1 and 64), as medians of many calls; the table gives the median over rounds of those
medians, in ms per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [(policy, threads) for policy in ("ACTIVE", "PASSIVE") for threads in (1, 2)]


def child(checkpoint: str, batches: list[int]) -> None:
    """In a fresh process: medians of the virtual network's forward, ms per call, as one JSON line."""
    import torch

    from dvn_cli.modelfile.checkpoint import load_checkpoint

    network = load_checkpoint(checkpoint).network.eval()
    channels, size = network.config.in_channels, network.config.input_size
    k = network.units
    result = {}
    with torch.no_grad():
        for batch in batches:
            calls = max(30, 200 // batch)
            x = torch.randn(batch, channels, size, size)
            for level in (1, k):
                for _ in range(10):
                    network(x, 0, level)
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    network(x, 0, level)
                    times.append(time.perf_counter() - start)
                result[f"l{level} b{batch}"] = 1000 * statistics.median(times)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", default="runs/dvn/model.safetensors")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.checkpoint, args.batches)
        return
    runs: dict[tuple[str, int], list[dict[str, float]]] = {s: [] for s in SETTINGS}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for policy, threads in SETTINGS:
            env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": str(threads)}
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "-c",
                    args.checkpoint,
                    "--batches",
                    ",".join(map(str, args.batches)),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[policy, threads].append(json.loads(out.stdout.strip().splitlines()[-1]))
        loads.append(os.getloadavg()[0])
    keys = list(runs[SETTINGS[0]][0])
    print(f"{Path(args.checkpoint)}: {args.rounds} rounds, 1-minute load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'policy':8} {'threads':>7} " + " ".join(f"{key:>9}" for key in keys))
    for (policy, threads), rows in runs.items():
        cells = " ".join(f"{statistics.median(r[key] for r in rows):9.3f}" for key in keys)
        print(f"{policy:8} {threads:>7} {cells}")


if __name__ == "__main__":
    main()
