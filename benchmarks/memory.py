"""Memory shared at inference: resident memory of two tasks held ready at once, five ways, against the union of
their weights; speed of the shared runtime against compact models; time of a budget switch.

    PYTHONPATH=src .venv/bin/python benchmarks/memory.py [--threads 2] [--rounds 3] [--out docs/results_memory.md]

Memory: each mode runs in a FRESH process that imports every module first, runs a small warm-up convolution (the
thread pool and oneDNN set up there, not in a mode), reads VmRSS from /proc/self/status as its baseline, resets
the peak (VmHWM), then holds both tasks ready and runs one batch of 8 through each. Reported: the resident memory
added (VmRSS after the batches) and the peak added (VmHWM), in MiB, next to the float32 union of the weights that
the plan counts (``shared_memory_params`` x 4) and the sum of separate models (``separate_params`` x 4).
Network: random weights, ResNet-14, widths 128/256/512, k = 4, two tasks of 10 classes, input 3x32x32.

Speed: the modes run interleaved round by round in one process, medians of each round's median.
Switch: a ResNet-14 32/64/128 checkpoint (1x28x28, stem stride 2) with a made-up validation accuracy, switched
back and forth by ``set_budget`` and by ``set_levels``.
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
from pathlib import Path

import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.core.plain import extract_plain
from dvn_cli.deploy.runtime import SharedRuntime
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import Checkpoint, save_checkpoint
from dvn_cli.modelfile.compact import save_compact
from dvn_cli.modelfile.spec import compact_spec
from dvn_cli.planning.plan import separate_params, shared_memory_params

LEVELS = [(4, 4), (3, 3), (2, 2), (4, 2)]
TASKS = ("alpha", "beta")
MIB = 1024 * 1024

CHILD = r"""
import ctypes, gc, json, sys
import torch
from dvn_cli.deploy.runtime import SharedRuntime
from dvn_cli.modelfile.registry import open_model
import dvn_cli.modelfile.bundle, dvn_cli.modelfile.checkpoint, dvn_cli.modelfile.compact, dvn_cli.core.plain

mode, files, warm_files, choices, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def build(mode, files):
    if mode == "virtual":
        net = open_model(files["checkpoint"]).network.eval()
        return {t: (lambda x, t=t, lv=lv: net(x, t, lv)) for t, lv in choices.items()}
    if mode == "compact":
        return {t: open_model(files[f"compact_{t}"]).plain for t in choices}
    if mode == "bundle_plain":
        bundle = open_model(files["bundle"])
        return {t: bundle.plain(t) for t in choices}
    if mode == "runtime_from_model":  # the whole checkpoint loaded, the runtime built, the checkpoint dropped
        rt = SharedRuntime.from_model(open_model(files["checkpoint"]), choices)
    else:  # runtime_<checkpoint|bundle>_<conv>: the file's header and the blocks it needs, nothing else
        _, source, conv = mode.split("_")
        rt = SharedRuntime.open(files[source], choices, conv=conv)
    return {t: (lambda x, t=t: rt(x, t)) for t in choices}


def run_all(run):
    with torch.no_grad():
        for t in choices:
            run[t](x)


# warm-up: the same code path on a tiny network of the same kind, so that lazy set-up (thread pool, oneDNN,
# kernels, caches) is paid before the baseline and what follows is the memory of the weights and activations
x = torch.randn(8, 3, 32, 32)
run_all(build(mode, warm_files))
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status("VmRSS")
run = build(mode, files)
run_all(run)
gc.collect()
rss, peak = status("VmRSS"), status("VmHWM")
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back: what is left is what is held
print(json.dumps({"rss": rss - base, "peak": peak - base, "held": status("VmRSS") - base}))
"""

MODES = {
    "virtual": "virtual network (whole checkpoint)",
    "compact": "two compact models (prune-level)",
    "bundle_plain": "bundle, `Bundle.plain` per task",
    "runtime_checkpoint_assemble": "**shared runtime** from the checkpoint",
    "runtime_bundle_assemble": "**shared runtime** from the bundle",
    "runtime_checkpoint_blockwise": "shared runtime, blockwise convolutions",
    "runtime_from_model": "shared runtime via `open_model` (checkpoint loaded, then dropped)",
    "compact+mmap": "two compact models, `MALLOC_MMAP_THRESHOLD_=131072`",
    "runtime_checkpoint_assemble+mmap": "**shared runtime** from the checkpoint, `MALLOC_MMAP_THRESHOLD_=131072`",
}
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc then serves every block of 128 KiB or more by mmap and returns it when freed (no dynamic threshold)."""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def measure(mode: str, files: dict, warm: dict, choices: dict[str, int], threads: int) -> dict[str, float]:
    mode, _, env = mode.partition("+")
    args = json.dumps([mode, files, warm, choices, threads])
    env = {**os.environ, **(MMAP_ENV if env == "mmap" else {})}
    out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_files(network, tmp: Path, choices: dict[str, int], checkpoint: Path, tag: str) -> dict[str, str]:
    files = {"checkpoint": str(checkpoint)}
    files["bundle"] = str(save_bundle(network, choices, tmp / f"bundle-{tag}.safetensors"))
    for t, level in choices.items():
        plain, spec = extract_plain(network, t, level), compact_spec(network, t, level)
        files[f"compact_{t}"] = str(save_compact(plain, spec, tmp / f"{t}{level}-{tag}.safetensors"))
    return files


def memory_table(network, warm_network, tmp: Path, threads: int, lines: list[str]) -> dict:
    checkpoint = save_checkpoint(network, tmp / "model.safetensors")
    warm_checkpoint = save_checkpoint(warm_network, tmp / "warm.safetensors")
    results = {}
    lines += [
        "| mode | " + " | ".join(f"({a},{b})" for a, b in LEVELS) + " |",
        "|---|" + "---|" * len(LEVELS),
    ]
    rows = {mode: f"| {label} |" for mode, label in MODES.items()}
    union_row, separate_row = "| float32 union of the weights (plan) |", "| sum of separate models (float32) |"
    ratio_row = "| shared runtime from the checkpoint / union |"
    ratio_mmap = "| shared runtime from the checkpoint, `MALLOC_MMAP_THRESHOLD_`, / union |"
    for a, b in LEVELS:
        choices = dict(zip(TASKS, (a, b), strict=True))
        tag = f"{a}{b}"
        files = write_files(network, tmp, choices, checkpoint, tag)
        warm = write_files(warm_network, tmp, choices, warm_checkpoint, f"warm{tag}")
        union = 4 * shared_memory_params(network, choices) / MIB
        separate = 4 * separate_params(network, choices) / MIB
        got = {mode: measure(mode, files, warm, choices, threads) for mode in MODES}
        results[f"{a},{b}"] = {"union_mib": union, "separate_mib": separate, **got}
        for mode, r in got.items():
            rows[mode] += f" {r['rss'] / MIB:.1f} / {r['held'] / MIB:.1f} / {r['peak'] / MIB:.1f} |"
        union_row += f" {union:.1f} |"
        separate_row += f" {separate:.1f} |"
        rt = got["runtime_checkpoint_assemble"]
        ratio_row += (
            f" {rt['rss'] / MIB / union:.3f} / {rt['held'] / MIB / union:.3f} / {rt['peak'] / MIB / union:.3f} |"
        )
        rt = got["runtime_checkpoint_assemble+mmap"]
        ratio_mmap += (
            f" {rt['rss'] / MIB / union:.3f} / {rt['held'] / MIB / union:.3f} / {rt['peak'] / MIB / union:.3f} |"
        )
        print(f"memory ({a},{b}) done", file=sys.stderr)
    lines += [union_row, separate_row, *rows.values(), ratio_row, ratio_mmap]
    return results


def median_ms(forward, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def speed_table(network, rounds: int, lines: list[str]) -> dict:
    results = {}
    lines += [
        "| levels | task | batch | compact ms | runtime (assemble) ms | runtime (blockwise) ms | virtual network ms |"
        " runtime / compact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, b in [(3, 3), (4, 2)]:
        choices = dict(zip(TASKS, (a, b), strict=True))
        compact = {t: extract_plain(network, t, lv) for t, lv in choices.items()}
        source = Checkpoint(network=network)
        runtimes = {conv: SharedRuntime.from_model(source, choices, conv) for conv in ("assemble", "blockwise")}
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32)
            repeats = 10 if batch == 1 else 1
            modes = {}
            for t, lv in choices.items():
                modes[t, "compact"] = compact[t]
                modes[t, "assemble"] = lambda x, t=t, rt=runtimes["assemble"]: rt(x, t)
                modes[t, "blockwise"] = lambda x, t=t, rt=runtimes["blockwise"]: rt(x, t)
                modes[t, "virtual"] = lambda x, t=t, lv=lv: network(x, t, lv)
            for forward in modes.values():
                median_ms(forward, x, 1)  # warm-up
            times = {m: [] for m in modes}
            for _ in range(rounds):
                for mode, forward in modes.items():
                    times[mode].append(median_ms(forward, x, repeats))
            med = {m: statistics.median(v) for m, v in times.items()}
            for t, lv in choices.items():
                ms = [med[t, m] for m in ("compact", "assemble", "blockwise", "virtual")]
                results[f"{a},{b}/{t}/b{batch}"] = ms
                lines.append(
                    f"| ({a},{b}) | {t} (level {lv}) | {batch} | "
                    + " | ".join(f"{v:.2f}" for v in ms)
                    + f" | {ms[1] / ms[0]:.2f} |"
                )
            print(f"speed ({a},{b}) batch {batch} done", file=sys.stderr)
    return results


def switch_table(tmp: Path, lines: list[str], repeats: int = 15) -> dict:
    config = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
    torch.manual_seed(0)
    network = build_network(config, [TaskSpec(t, tuple("0123456789")) for t in TASKS])
    training = {"val_accuracy": {"alpha": [0.97, 0.98, 0.985, 0.99], "beta": [0.85, 0.87, 0.88, 0.885]}}
    path = save_checkpoint(network, tmp / "small.safetensors", training=training)
    rt = SharedRuntime.open(path, {"alpha": 4, "beta": 4})
    x = torch.randn(1, 1, 28, 28)
    results = {}
    for label, switch in {
        "set_budget 30% -> 100%, 100% -> 30%": lambda i: rt.set_budget("30%" if i % 2 else "100%"),
        "set_levels (2,2) -> (4,4), back": lambda i: rt.set_levels(
            {"alpha": 2, "beta": 2} if i % 2 else {"alpha": 4, "beta": 4}
        ),
        "set_levels (4,1) -> (4,4), back": lambda i: rt.set_levels(
            {"alpha": 4, "beta": 1} if i % 2 else {"alpha": 4, "beta": 4}
        ),
    }.items():
        switch(1)  # start from the small choice; the first set_budget also counts every level once
        times, seen = {0: [], 1: []}, set()
        for i in range(2 * repeats):  # up, down, up, down, ...
            start = time.perf_counter()
            switch(i)
            times[i % 2].append(1000 * (time.perf_counter() - start))
            seen.add(tuple(rt.choices.values()))
            rt(x, "alpha")
        up, down = (statistics.median(times[d]) for d in (0, 1))
        results[label] = {"up_median_ms": up, "down_median_ms": down, "choices": sorted(seen)}
        lines.append(f"| {label} | {', '.join(str(c) for c in sorted(seen))} | {up:.1f} | {down:.1f} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--widths", default="128,256,512", help="stage widths of the memory and speed network")
    parser.add_argument("--out", type=Path, default=None, help="write the results as Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "PYTHONPATH=src .venv/bin/python benchmarks/memory.py " + " ".join(sys.argv[1:])

    widths = tuple(int(w) for w in args.widths.split(","))
    config = BackboneConfig(depth=14, widths=widths, units=4, in_channels=3, input_size=32, stem_stride=1)
    torch.manual_seed(0)
    network = build_network(config, [TaskSpec(t, tuple("0123456789")) for t in TASKS]).eval()
    tmp = Path(tempfile.mkdtemp())
    warm_config = BackboneConfig(depth=14, widths=(8, 16, 32), units=4, in_channels=3, input_size=32, stem_stride=1)
    warm_network = build_network(warm_config, [TaskSpec(t, tuple("0123456789")) for t in TASKS]).eval()
    lines = [
        "# dvn — memory shared at inference (issue 12)",
        "",
        f"Command: `{command}`. Machine: {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "## Resident memory of two tasks held ready (MiB)",
        "",
        f"Random-weight DVN ResNet-14, widths {'/'.join(map(str, widths))}, k = 4, two tasks (nearest orders:"
        " 0 1 2 3 and 3 2 1 0),"
        " input 3x32x32. Each cell, in MiB: resident memory added (VmRSS) after holding both tasks ready and"
        " running one batch of 8 through each / the same after `malloc_trim(0)` (freed heap handed back: what is"
        " held) / peak added (VmHWM). Each mode in a fresh process, warmed up on a tiny network of the same kind"
        " first.",
        "",
    ]
    results = {}
    if not args.skip_memory:
        results["memory"] = memory_table(network, warm_network, tmp, args.threads, lines)
    if not args.skip_speed:
        lines += [
            "",
            f"## Speed: shared runtime against compact models ({args.rounds} interleaved rounds, medians)",
            "",
        ]
        results["speed"] = speed_table(network, args.rounds, lines)
    lines += [
        "",
        "## Budget switch (ResNet-14 32/64/128, 1x28x28, from the checkpoint file)",
        "",
        "| switch | choices | median ms, small -> large | median ms, large -> small |",
        "|---|---|---|---|",
    ]
    results["switch"] = switch_table(tmp, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
