"""Two tasks served at once, every way dvn serves them: memory held, peak, and speed at batch 1 and 64, one table.

    PYTHONPATH=src .venv/bin/python benchmarks/memory.py [--rounds 3] [--levers] [--widths 128,256,512] [--out FILE]

Network: random weights, DVN ResNet-14 (widths 128/256/512 by default), k = 4, two tasks of 10 classes (orders
0 1 2 3 and 3 2 1 0), input 1x28x28, stem stride 1 (``--stem-stride``); level pairs (4,4), (3,3), (2,2), (4,2). Ways:

- ``per-pair ONNX``: two ``dvn export`` graphs (batch norm folded), two onnxruntime sessions, default settings;
- ``shared ONNX, Concat graphs``: ``dvn export --shared`` as it was before issue 30 (``mode="concat"``), run by
  ``SharedOrtRuntime`` (each block one OrtValue, each weight assembled by ``Concat`` on every run);
- ``canonical graphs, standard``: the canonical export (issue 30, the default under nearest orders) run from its
  standard graphs (``cache=False``: no ``Concat``, weights not constant, so no NCHWc kernels);
- ``canonical graphs from the engine cache``: the same folder as ``SharedOrtRuntime`` runs it by default, from the
  engine cache built before the rounds (graphs optimised once, NCHWc weights held once); the first open's cost
  (seconds, bytes on disk) is measured after the rounds on a fresh copy;
- ``PyTorch runtime``: ``SharedRuntime.open(checkpoint, choices)`` (the header and the blocks it needs);
- ``bundle path``: a bundle opened and run as ``dvn eval -c`` / ``dvn predict -c`` run it
  (``ModelRunner(open_model(bundle)).forwards``);
- ``checkpoint path``: a checkpoint opened and run as ``dvn predict --budgets`` / ``dvn serve`` run it (the
  ``open_model(checkpoint)`` kept alive, a ``SharedRuntime`` made from it);
- ``compact (PyTorch per pair)``: two compact models (``prune-level``), the speed reference of the PyTorch runtime.

``--levers`` adds the onnxruntime levers of issue 20 side by side: per-pair graphs at level EXTENDED (no NCHWc
layout: what the shared graphs lose), the shared graphs with constant folding on (each ``Concat`` assembled once
per session and kept) and blockwise shared graphs (constant block weights, no ``Concat``).

Each (levels, way) runs in a FRESH process: modules imported and the same way run on a tiny network of the same
kind first (lazy set-up paid before the baseline), VmRSS and PSS (``/proc/self/smaps_rollup``: a file page
mapped by several processes counts once over them) read as the baseline and the peak reset
(``/proc/self/clear_refs``), both tasks made ready and one batch of 8 run through each; ``held`` is the resident
memory (RSS, and PSS) added after ``malloc_trim(0)``, ``peak`` the VmHWM added. Then the same process times both
tasks one after the other, batch 1 first (median of ``--reps1`` runs), then batch 64 (median of ``--reps64``), one
thread. The rounds repeat every (levels, way) process in turn (interleaved), and the table gives the median over
rounds, with held against the float32 union of the two tasks' weights (``plan.shared_memory_params`` x 4) and speed
against per-pair ONNX (its ms over the way's ms: above 1 is faster). ``--switch`` adds the time of budget switches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.core.plain import extract_plain
from dvn_cli.export.pairs import export_models
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.compact import save_compact
from dvn_cli.modelfile.spec import compact_spec
from dvn_cli.planning.plan import shared_memory_params
from dvn_cli.runtime.ort import SharedOrtRuntime
from dvn_cli.runtime.shared import SharedRuntime

LEVELS = [(4, 4), (3, 3), (2, 2), (4, 2)]
TASKS = ("task0", "task1")
MIB = 2**20

CHILD = r"""
import ctypes, gc, json, statistics, sys, time
import numpy as np
import onnxruntime as ort
import torch
from dvn_cli.runtime.ort import SharedOrtRuntime
from dvn_cli.runtime.runner import ModelRunner
from dvn_cli.runtime.shared import SharedRuntime
from dvn_cli.modelfile.registry import open_model

way, files, warm_files, choices, reps = json.loads(sys.argv[1])
torch.set_num_threads(1)


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def pss():
    # proportional set size: a page shared with another process counts once over them (RSS counts it in each)
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def onnx_runs(sessions):
    return [lambda x, s=s: s.run(["logits"], {"input": x}) for s in sessions]


def build(files):
    # one function per task: a float32 numpy batch (onnxruntime) or a tensor (PyTorch) in, logits out
    if way.startswith("per-pair"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if "extended" in way:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        return "np", onnx_runs([ort.InferenceSession(files[t], options, providers=["CPUExecutionProvider"])
                                for t in choices])
    if way.startswith("shared") or way in ("canonical", "engine"):
        kwargs = {"disabled_optimizers": ()} if "folding" in way else {}
        folder = "blockwise" if "blockwise" in way else "shared"
        if way in ("canonical", "engine"):
            folder, kwargs = "canonical", {"cache": way == "engine"}
        rt = SharedOrtRuntime(files[folder], threads=1, verify=False, **kwargs)
        if way == "engine" and rt.engine is None:
            raise SystemExit(f"no engine cache: {rt.cache_note}")
        return "np", [lambda x, t=t, lv=lv: rt.run(t, lv, x) for t, lv in choices.items()]
    if way == "pytorch":
        rt = SharedRuntime.open(files["checkpoint"], choices)
        return "pt", [lambda x, t=t: rt(x, t) for t in choices]
    if way == "checkpoint":
        model = open_model(files["checkpoint"])  # kept alive, as the command keeps it
        rt = SharedRuntime.from_model(model, choices)
        return "pt", [lambda x, t=t, model=model: rt(x, t) for t in choices]
    if way == "bundle":
        forwards = ModelRunner(open_model(files["bundle"])).forwards(choices)
        return "pt", list(forwards.values())
    if way == "compact":
        return "pt", [open_model(files["compact_" + t]).plain for t in choices]
    raise SystemExit(f"unknown way {way}")


def batch(kind, n):
    x = np.random.default_rng(n).standard_normal((n, 1, 28, 28)).astype(np.float32)
    return x if kind == "np" else torch.from_numpy(x)


def run_all(runs, x):
    with torch.no_grad():
        for run in runs:
            run(x)


kind, runs = build(warm_files)  # warm-up: lazy set-up (library pages, thread pool, kernels) before the baseline
run_all(runs, batch(kind, 8))
del runs
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base, base_pss = status("VmRSS"), pss()
kind, runs = build(files)
run_all(runs, batch(kind, 8))
gc.collect()
peak = status("VmHWM") - base
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back: what is left is what is held
result = {"held": status("VmRSS") - base, "held_pss": pss() - base_pss, "peak": peak}
for n, repeat in ((1, reps[0]), (64, reps[1])):  # batch 1 first
    x = batch(kind, n)
    run_all(runs, x)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run_all(runs, x)
        times.append(1000 * (time.perf_counter() - start))
    result[f"b{n}_ms"] = statistics.median(times)
print(json.dumps(result))
"""

WAYS = {
    "per-pair": "per-pair ONNX (2 sessions, default settings)",
    "shared": "shared ONNX, Concat graphs (`--shared` before issue 30)",
    "canonical": "shared ONNX, canonical graphs, standard (no engine cache)",
    "engine": "**shared ONNX, canonical graphs from the engine cache** (the default)",
    "pytorch": "**PyTorch runtime** (`SharedRuntime.open`)",
    "bundle": "**bundle path** (`eval`/`predict -c bundle`)",
    "checkpoint": "**checkpoint path** (`predict --budgets`/`serve -c checkpoint`)",
    "compact": "compact models (PyTorch per pair, reference)",
}
LEVERS = {
    "per-pair-extended": "lever: per-pair ONNX at level EXTENDED (no NCHWc)",
    "shared-folding": "lever: shared ONNX, constant folding on (Concat kept per session)",
    "shared-blockwise": "lever: shared ONNX, blockwise graphs (constant blocks, no Concat)",
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def write_files(network, checkpoint, tmp: Path, choices: dict[str, int], tag: str, levers: bool) -> dict[str, str]:
    """Every file the ways read for ``choices``: per-pair graphs, shared folders, bundle, compact models."""
    pairs = list(choices.items())
    source = load_checkpoint(checkpoint)
    files = {"checkpoint": str(checkpoint)}
    manifest = export_models(source, tmp / f"pp-{tag}", pairs, check=False)
    files |= {m["task"]: str(tmp / f"pp-{tag}" / m["file"]) for m in manifest["models"]}
    export_shared(source, tmp / f"sh-{tag}", pairs, check=False, mode="concat")
    files["shared"] = str(tmp / f"sh-{tag}")
    export_shared(source, tmp / f"can-{tag}", pairs, check=False)
    files["canonical"] = str(tmp / f"can-{tag}")
    if levers:
        export_shared(source, tmp / f"bw-{tag}", pairs, check=False, mode="blockwise")
        files["blockwise"] = str(tmp / f"bw-{tag}")
    files["bundle"] = str(save_bundle(network, choices, tmp / f"bundle-{tag}.safetensors"))
    for t, level in choices.items():
        plain, spec = extract_plain(network, t, level), compact_spec(network, t, level)
        files[f"compact_{t}"] = str(save_compact(plain, spec, tmp / f"{t}{level}-{tag}.safetensors"))
    return files


def first_open(folder: str) -> dict:
    """The engine cache's one-time cost, in a fresh process: seconds of the first open (building it), its bytes on
    disk against the folder's weights file, and the seconds of the next open."""
    code = (
        "import json, sys, time; from dvn_cli.runtime.ort import SharedOrtRuntime\n"
        "t = time.perf_counter(); rt = SharedOrtRuntime(sys.argv[1], threads=1); first = time.perf_counter() - t\n"
        "t = time.perf_counter(); SharedOrtRuntime(sys.argv[1], threads=1); again = time.perf_counter() - t\n"
        "print(json.dumps({'first_s': first, 'again_s': again, 'note': rt.cache_note,"
        " 'cache_bytes': sum(p.stat().st_size for p in rt.engine.path.iterdir()),"
        " 'cache_weights': (rt.engine.path / 'weights.safetensors').stat().st_size,"
        " 'folder_weights': rt.files.weights.stamp[2]}))"
    )
    out = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise SystemExit(f"first open of {folder}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(way: str, files: dict, warm: dict, choices: dict[str, int], reps: tuple[int, int]) -> dict:
    args = json.dumps([way, files, warm, choices, reps])
    out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise SystemExit(f"{way} {choices}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict, union: dict, ways: dict[str, str]) -> list[str]:
    lines = [
        "| levels | way | held MiB RSS (x union) | held MiB PSS (x union) | peak MiB | batch 1 ms (speed vs per-pair) |"
        " batch 64 ms (speed vs per-pair) |",
        "|---|---|---|---|---|---|---|",
    ]
    for levels, by_way in results.items():
        ref = by_way["per-pair"]
        lines.append(f"| {levels} | float32 union of the two tasks' weights | {union[levels]:.1f} | | | | |")
        for way, label in ways.items():
            r = by_way[way]
            lines.append(
                f"| {levels} | {label} | {r['held']:.1f} ({r['held'] / union[levels]:.2f}x) | "
                f"{r['held_pss']:.1f} ({r['held_pss'] / union[levels]:.2f}x) | {r['peak']:.1f} | "
                f"{r['b1_ms']:.2f} ({ref['b1_ms'] / r['b1_ms']:.2f}x) | "
                f"{r['b64_ms']:.1f} ({ref['b64_ms'] / r['b64_ms']:.2f}x) |"
            )
    return lines


def switch_table(tmp: Path, repeats: int = 15) -> list[str]:
    """Median ms of budget switches of a ResNet-14 32/64/128 checkpoint (1x28x28, stem stride 2), both ways."""
    config = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
    torch.manual_seed(0)
    network = build_network(config, [TaskSpec(t, tuple("0123456789")) for t in TASKS])
    training = {"val_accuracy": {"task0": [0.97, 0.98, 0.985, 0.99], "task1": [0.85, 0.87, 0.88, 0.885]}}
    rt = SharedRuntime.open(
        save_checkpoint(network, tmp / "small.safetensors", training=training), dict.fromkeys(TASKS, 4)
    )
    x = torch.randn(1, 1, 28, 28)
    lines = ["| switch | choices | median ms, small -> large | median ms, large -> small |", "|---|---|---|---|"]
    for label, switch in {
        "set_budget 30% -> 100%, 100% -> 30%": lambda i: rt.set_budget("30%" if i % 2 else "100%"),
        "set_levels (2,2) -> (4,4), back": lambda i: rt.set_levels(dict.fromkeys(TASKS, 2 if i % 2 else 4)),
        "set_levels (4,1) -> (4,4), back": lambda i: rt.set_levels({"task0": 4, "task1": 1 if i % 2 else 4}),
    }.items():
        switch(1)  # start from the small choice; the first set_budget also counts every level once
        times, seen = {0: [], 1: []}, set()
        for i in range(2 * repeats):  # up, down, up, down, ...
            start = time.perf_counter()
            switch(i)
            times[i % 2].append(1000 * (time.perf_counter() - start))
            seen.add(tuple(rt.choices.values()))
            rt(x, "task0")
        up, down = (statistics.median(times[d]) for d in (0, 1))
        lines.append(f"| {label} | {', '.join(str(c) for c in sorted(seen))} | {up:.1f} | {down:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per (levels, way), interleaved")
    parser.add_argument("--reps1", type=int, default=30, help="timed runs at batch 1 per process (median)")
    parser.add_argument("--reps64", type=int, default=5, help="timed runs at batch 64 per process (median)")
    parser.add_argument("--widths", default="128,256,512", help="stage widths")
    parser.add_argument("--stem-stride", type=int, default=1, help="stride of the first convolution")
    parser.add_argument("--levers", action="store_true", help="add the onnxruntime levers of issue 20")
    parser.add_argument("--only", nargs="+", choices=list(WAYS), help="of the ways only these (per-pair always)")
    parser.add_argument("--levels", nargs="+", default=[f"{a},{b}" for a, b in LEVELS], help="level pairs, e.g. 4,4")
    parser.add_argument("--switch", action="store_true", help="add the time of budget switches")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) and the raw results (.json) here")
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    config = BackboneConfig(
        depth=14, widths=widths, units=4, in_channels=1, input_size=28, stem_stride=args.stem_stride
    )
    tasks = [TaskSpec(t, tuple("0123456789")) for t in TASKS]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0]]
    torch.manual_seed(0)
    network = build_network(config, tasks, "table", orders).eval()
    # units of 16 channels, onnxruntime's blocks: narrower ones would pad, and the engine cache refuses those
    warm_network = build_network(replace(config, widths=(64, 64, 64)), tasks, "table", orders).eval()
    levels = [tuple(int(v) for v in pair.split(",")) for pair in args.levels]
    ways = {w: label for w, label in WAYS.items() if not args.only or w in args.only or w == "per-pair"}
    ways |= LEVERS if args.levers else {}
    start_load = load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DVN_CACHE_DIR"] = str(tmp / "user-cache")  # the engine key and any cache: never the home folder
        checkpoint = save_checkpoint(network, tmp / "model.safetensors")
        warm_checkpoint = save_checkpoint(warm_network, tmp / "warm.safetensors")
        files, warm, union = {}, {}, {}
        for a, b in levels:
            choices, key = dict(zip(TASKS, (a, b), strict=True)), f"({a},{b})"
            files[key] = write_files(network, checkpoint, tmp, choices, f"{a}{b}", args.levers)
            warm[key] = write_files(warm_network, warm_checkpoint, tmp, choices, f"w{a}{b}", args.levers)
            union[key] = 4 * shared_memory_params(network, choices) / MIB
            if "engine" in ways:  # each folder's engine cache built before any measurement (its first open)
                for folder in (files[key]["canonical"], warm[key]["canonical"]):
                    SharedOrtRuntime(folder, threads=1)
        raw: dict[str, dict[str, list[dict]]] = {key: {way: [] for way in ways} for key in files}
        for r in range(args.rounds):
            for (a, b), key in zip(levels, files, strict=True):
                choices = dict(zip(TASKS, (a, b), strict=True))
                for way in ways:
                    raw[key][way].append(measure(way, files[key], warm[key], choices, (args.reps1, args.reps64)))
            print(f"round {r + 1} of {args.rounds} done (load {load()})", file=sys.stderr, flush=True)
        medians = {
            key: {way: {m: statistics.median(x[m] for x in runs) for m in runs[0]} for way, runs in by_way.items()}
            for key, by_way in raw.items()
        }
        switch = switch_table(tmp) if args.switch else []
        opens = {}
        if "engine" in ways:  # after the rounds, on fresh copies: the caches above were built by the warm-ups
            for key, f in files.items():
                fresh = tmp / f"fresh-{key}"
                shutil.copytree(f["canonical"], fresh, ignore=shutil.ignore_patterns(".dvn-engine"))
                opens[key] = first_open(str(fresh))
    command = "PYTHONPATH=src .venv/bin/python benchmarks/memory.py " + " ".join(sys.argv[1:])
    import onnxruntime

    lines = [
        f"Command: `{command}`. CPU: {cpu_model()} ({os.cpu_count()} cores), one thread per way; torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}. "
        f"Load average (1, 5, 15 min) at the start: {start_load}; at the end: {load()}. Medians of {args.rounds} "
        "fresh processes per cell, interleaved.",
        "",
        *table(medians, union, ways),
    ]
    if opens:
        lines += [
            "",
            "| levels | first open s (builds the cache) | next open s | cache on disk bytes |"
            " cache weights / folder weights |",
            "|---|---|---|---|---|",
        ]
        for key, o in opens.items():
            lines.append(
                f"| {key} | {o['first_s']:.2f} | {o['again_s']:.3f} | {o['cache_bytes']:,} | "
                f"{o['cache_weights'] / o['folder_weights']:.3f} |"
            )
    if switch:
        lines += ["", *switch]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"union_mib": union, "raw": raw}, indent=2) + "\n")


if __name__ == "__main__":
    main()
