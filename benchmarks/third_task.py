"""What a third co-resident task costs when its blocks are already held: resident memory, PyTorch and onnxruntime.

A random-weight DVN ResNet-14 of widths 128/256/512, k=4, three tasks (``nearest`` orders), 1x28x28 input. Tasks 0
and 1 at level 4 hold every unit-pair block; task 2 at level 3 then needs none of its own, only its batch norms (a
scale and a shift per channel) and its head. Each way runs in a FRESH process (the method of
``benchmarks/memory.py``: a warm-up on a tiny network of the same kind, baseline, both or all three tasks held and
one batch of 8 run through each, freed heap handed back with ``malloc_trim``, VmRSS read); medians of ``--repeats``.

    PYTHONPATH=src .venv/bin/python benchmarks/third_task.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.planning.plan import shared_memory_params

TWO = {"task0": 4, "task1": 4}
THREE = {**TWO, "task2": 3}

CHILD = r"""
import ctypes, gc, json, sys
import numpy as np
import torch
from dvn_cli.runtime.ort import SharedOrtRuntime
from dvn_cli.runtime.shared import SharedRuntime

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024

way, path, warm, choices = json.loads(sys.argv[1])
torch.set_num_threads(1)
x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)

def serve(path, choices):
    if way == "torch":
        rt = SharedRuntime.open(path, choices)
        for task in choices:
            rt(torch.from_numpy(x), task)
    else:
        rt = SharedOrtRuntime(path, threads=1, verify=False)
        for task, level in choices.items():
            rt.run(task, level, x)
    return rt

serve(warm, choices)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = rss()
held = serve(path, choices)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"held": rss() - base}))
"""


def held_mib(way: str, path: Path, warm: Path, choices: dict, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    args = json.dumps([way, str(path), str(warm), choices])
    values = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, check=True, env=env)
        values.append(json.loads(out.stdout.strip().splitlines()[-1])["held"])
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tasks = [TaskSpec(name=f"task{t}", classes=tuple(str(i) for i in range(10))) for t in range(3)]
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, widths in (("big", (128, 256, 512)), ("tiny", (8, 16, 32))):
            torch.manual_seed(0)
            config = BackboneConfig(depth=14, widths=widths, units=4, in_channels=1, input_size=28, stem_stride=1)
            network = build_network(config, tasks).eval()
            path = save_checkpoint(network, tmp / f"{name}.safetensors")
            export_shared(load_checkpoint(path), tmp / f"{name}-shared", list(THREE.items()), check=False)
            files[name] = {"torch": path, "onnx": tmp / f"{name}-shared"}
            if name == "big":
                private = 4 * (shared_memory_params(network, THREE) - shared_memory_params(network, TWO)) / 2**20
                union = 4 * shared_memory_params(network, TWO) / 2**20
        print(
            f"union of tasks 0 and 1 at level 4: {union:.2f} MiB; task 2 level 3 private (batch norm, head): "
            f"{private:.3f} MiB"
        )
        print("| way | two tasks held (MiB) | three tasks held (MiB) | added by the third (MiB) |")
        print("|---|---|---|---|")
        for way in ("torch", "onnx"):
            two = held_mib(way, files["big"][way], files["tiny"][way], TWO, args.repeats)
            three = held_mib(way, files["big"][way], files["tiny"][way], THREE, args.repeats)
            print(f"| {way} | {two:.1f} | {three:.1f} | {three - two:.2f} |", flush=True)


if __name__ == "__main__":
    main()
