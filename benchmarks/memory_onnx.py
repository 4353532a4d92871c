"""Resident memory and speed of two tasks served together: per-pair ONNX export vs the shared export.

A random-weight DVN ResNet-14 of widths 128/256/512, k=4, two tasks (orders 0123 and 3210), 1x28x28 input. For
each pair of levels, both exports are written, then each way of serving is measured in a FRESH subprocess, the
method of ``benchmarks/memory.py``: numpy, onnxruntime and dvn's runtime are imported and the same way is run once
on a tiny export (onnxruntime's lazy set-up paid), VmRSS (/proc/self/status) is read as the baseline and the peak
reset, two sessions are made and each runs one batch of 8. Reported in MiB: ``rss`` added after the batches,
``peak`` added during them (VmHWM), ``held`` added once freed heap memory is handed back (``malloc_trim``), and
``file`` (file-backed: the mapped weights). They are set beside the float32 union of the two virtual networks'
weights (``plan.shared_memory_params`` x 4 bytes). Speed (batch 1 and 64, both tasks one after the other) is
measured in one process, ways interleaved round by round, medians reported.

    PYTHONPATH=src .venv/bin/python benchmarks/memory_onnx.py [--rounds 5] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.deploy.export import export_models
from dvn_cli.deploy.shared_export import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.planning.plan import shared_memory_params

SCENARIOS = [(4, 4), (3, 3), (2, 2), (4, 2)]

CHILD = r"""
import ctypes, gc, json, sys
import numpy as np
import onnxruntime as ort
from dvn_cli.deploy.ort_runtime import SharedOrtRuntime

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def serve(args):
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    if args["way"] == "per-pair":
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if args.get("ext"):
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        held = [ort.InferenceSession(f, options, providers=["CPUExecutionProvider"]) for f in args["files"]]
        for s in held:
            s.run(["logits"], {"input": x})
    else:
        held = SharedOrtRuntime(args["folder"], threads=1, verify=False, **args["kwargs"])
        for task, level in held.pairs():
            held.run(task, level, x)
    return held

args, warm = json.loads(sys.argv[1]), json.loads(sys.argv[2])
# warm-up: the same way on a tiny export, so onnxruntime's lazy set-up (library pages, thread pool, kernels) is paid
# before the baseline and what follows is the memory of the weights, the sessions and the run
serve(warm)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = {k: status(k) for k in ("VmRSS", "RssFile")}
held = serve(args)
gc.collect()
rss, peak = status("VmRSS") - before["VmRSS"], status("VmHWM") - before["VmRSS"]
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back: what is left is what is held
print(json.dumps({"rss": rss, "peak": peak, "held": status("VmRSS") - before["VmRSS"],
                  "file": status("RssFile") - before["RssFile"]}))
"""

SHARED_WAYS = {  # name -> (graph mode, runtime keyword arguments); "shared" is the runtime's default
    "shared": ("concat", {}),
    "shared, constant folding on": ("concat", {"disabled_optimizers": []}),
    "shared, pre-packing off": ("concat", {"config": {"session.disable_prepacking": "1"}}),
    "shared, arena on, default order": ("concat", {"arena": True, "execution_order": "DEFAULT"}),
    "shared blockwise": ("blockwise", {}),
}


def child_memory(args: dict, warm: dict, repeats: int) -> dict[str, float]:
    """Median (over ``repeats`` fresh processes) of the MiB a way adds: ``rss`` after the run, ``peak`` during it,
    ``held`` after freed heap memory is handed back, and ``file`` (file-backed: the mapped weights)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    results = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(args), json.dumps(warm)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def speed(per_pair: Path, shared: Path, pairs, rounds: int, threads: int) -> dict:
    """Median ms for both tasks at batch 1 and 64: per-pair sessions vs the shared runtime, interleaved."""
    import onnxruntime as ort

    from dvn_cli.deploy.ort_runtime import SharedOrtRuntime

    files = [per_pair / f"task{t}-level{lv}.onnx" for t, (_, lv) in enumerate(pairs)]
    sessions = {}
    for name, level in (("per-pair", "ORT_ENABLE_ALL"), ("per-pair, extended level", "ORT_ENABLE_EXTENDED")):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        sessions[name] = [ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in files]
    rt = SharedOrtRuntime(shared, threads=threads)
    ways = {
        name: (lambda x, group=group: [s.run(["logits"], {"input": x}) for s in group])
        for name, group in sessions.items()
    }
    ways["shared"] = lambda x: [rt.run(task, level, x) for task, level in rt.pairs()]
    result = {}
    for batch in (1, 64):
        x = np.random.default_rng(1).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        times = {name: [] for name in ways}
        for run in ways.values():  # warm up
            run(x)
        for _ in range(rounds):
            for name, run in ways.items():
                start = time.perf_counter()
                run(x)
                times[name].append((time.perf_counter() - start) * 1000)
        result[batch] = {name: statistics.median(t) for name, t in times.items()}
    return result


def warm_exports(tmp: Path, config: BackboneConfig, tasks) -> dict[str, dict]:
    """Tiny exports of every kind (widths 8/16/32, same input), for each child's warm-up before its baseline."""
    tiny = build_network(replace(config, widths=(8, 16, 32)), tasks).eval()
    source = load_checkpoint(save_checkpoint(tiny, tmp / "tiny.safetensors"))
    pairs = [("task0", 4), ("task1", 4)]
    export_models(source, tmp / "tiny-pp", pairs, check=False)
    warm = {"per-pair": {"way": "per-pair", "files": [str(tmp / "tiny-pp" / f"task{t}-level4.onnx") for t in (0, 1)]}}
    for mode in ("concat", "blockwise"):
        export_shared(source, tmp / f"tiny-{mode}", pairs, check=False, mode=mode)
        warm[mode] = {"way": "shared", "folder": str(tmp / f"tiny-{mode}")}
    return warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per memory figure (median)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for speed")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BackboneConfig(depth=14, widths=(128, 256, 512), units=4, in_channels=1, input_size=28, stem_stride=1)
    tasks = [TaskSpec(name=f"task{t}", classes=tuple(str(i) for i in range(10))) for t in range(2)]
    network = build_network(config, tasks).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = load_checkpoint(save_checkpoint(network, tmp / "model.safetensors"))
        warm = warm_exports(tmp, config, tasks)
        for a, b in SCENARIOS:
            pairs = [("task0", a), ("task1", b)]
            union = 4 * shared_memory_params(network, {"task0": a, "task1": b}) / 2**20
            per_pair = tmp / f"pp{a}{b}"
            export_models(checkpoint, per_pair, pairs, check=False)
            files = [str(per_pair / f"task{t}-level{lv}.onnx") for t, (_, lv) in enumerate(pairs)]
            row = {"levels": [a, b], "union_mib": union}
            row["per-pair"] = child_memory({"way": "per-pair", "files": files}, warm["per-pair"], args.repeats)
            row["per-pair, extended level"] = child_memory(
                {"way": "per-pair", "files": files, "ext": True}, {**warm["per-pair"], "ext": True}, args.repeats
            )
            folders = {}
            for name, (mode, kwargs) in SHARED_WAYS.items():
                if mode not in folders:
                    folders[mode] = tmp / f"sh{a}{b}{mode}"
                    export_shared(checkpoint, folders[mode], pairs, check=False, mode=mode)
                way = {"way": "shared", "folder": str(folders[mode]), "kwargs": kwargs}
                row[name] = child_memory(way, {**warm[mode], "kwargs": kwargs}, args.repeats)
            row["weights_file_mib"] = (folders["concat"] / "weights.safetensors").stat().st_size / 2**20
            row["per_pair_files_mib"] = sum(Path(f).stat().st_size for f in files) / 2**20
            row["speed_ms"] = speed(per_pair, folders["concat"], pairs, args.rounds, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in _lscpu() if line.startswith("Model name")), "?")
    import onnxruntime

    result = {"cpu": cpu, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def _lscpu() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return []


if __name__ == "__main__":
    main()
