"""Lower-precision exports of a trained checkpoint, every way a user would make one: bytes, test accuracy, speed and
the memory two co-resident tasks hold (issue 23).

    PYTHONPATH=src .venv/bin/python benchmarks/precision.py -c runs/dvn/model.safetensors [--out FILE]

Ways, for every (task, level) of the checkpoint:

- ``shared fp32`` / ``shared fp16`` / ``shared int8``: ``dvn export --shared --precision P`` of every (task, level),
  run by ``SharedOrtRuntime``. Bytes of one (task, level): what an export of that pair alone stores (the count
  ``dvn plan --precision P`` uses, ``planning.memory``); the totals are the folder's weights file.
- ``per-pair fp32``: ``dvn export`` (one ONNX file per pair, batch norm folded), plain onnxruntime sessions.
- ``ORT dynamic int8``: ``onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)`` of each
  per-pair file (the baseline a user would try first: ``ConvInteger`` with activations quantized at run time).
- ``ORT static int8``: ``quantize_static`` (QDQ, per channel, int8 weights, uint8 activations, MinMax calibration
  on ``--calibration`` training-split images of the task) of each per-pair file (``--no-static`` leaves it out).

Accuracy: top-1 on the task's test split, every way counted in one pass over the data with the evaluation code
(``evaluation.evaluate.count_correct``; the checkpoint and the shared folders through ``runtime.runner.ModelRunner``,
as ``dvn eval -c`` runs them), against the checkpoint's own (PyTorch, float32). Speed: median ms of one forward at
batch 1 and at batch 64 (random input), one thread, the ways interleaved round by round. Memory: two tasks at their
top level in a fresh process per way (``benchmarks/memory.py``'s child: warm-up, VmRSS baseline, both tasks made
ready and one batch of 8 run, ``malloc_trim``; ``held`` = VmRSS added), median of ``--rounds`` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from dvn_cli.data.batches import normalize_batch
from dvn_cli.data.datasets import load_task
from dvn_cli.data.registry import task_string
from dvn_cli.evaluation.evaluate import count_correct, load_split
from dvn_cli.export.pairs import export_models
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.registry import open_model
from dvn_cli.modelfile.shared_weights import WEIGHTS_NAME
from dvn_cli.planning.memory import memory_model
from dvn_cli.runtime.ort import SharedOrtRuntime
from dvn_cli.runtime.runner import ModelRunner

sys.path.insert(0, str(Path(__file__).parent))
from memory import CHILD, cpu_model, load

SHARED = ("fp32", "fp16", "int8")
MIB = 2**20


class Images(CalibrationDataReader):
    """Calibration batches of one image each, normalised as the model expects."""

    def __init__(self, batch: np.ndarray) -> None:
        self.items = iter([{"input": batch[i : i + 1]} for i in range(len(batch))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def export_all(checkpoint, out: Path, static: bool, calibration: int, data_root: str) -> dict[str, dict]:
    """Every way's files: way -> {"folder": path} (shared) or {(task, level): file} (per pair)."""
    ways: dict[str, dict] = {}
    for precision in SHARED:
        folder = out / f"shared-{precision}"
        export_shared(checkpoint, folder, precision=precision, force=True)
        ways[f"shared {precision}"] = {"folder": folder}
    manifest = export_models(checkpoint, out / "per-pair-fp32", force=True)
    pairs = {(m["task"], m["level"]): out / "per-pair-fp32" / m["file"] for m in manifest["models"]}
    ways["per-pair fp32"] = pairs
    dynamic = out / "ort-dynamic"
    dynamic.mkdir(exist_ok=True)
    ways["ORT dynamic int8"] = {}
    for key, file in pairs.items():
        quantize_dynamic(file, dynamic / file.name, per_channel=True, weight_type=QuantType.QInt8)
        ways["ORT dynamic int8"][key] = dynamic / file.name
    if static:
        ways["ORT static int8"] = quantize_all_static(checkpoint, pairs, out / "ort-static", calibration, data_root)
    return ways


def quantize_all_static(checkpoint, pairs: dict, folder: Path, calibration: int, data_root: str) -> dict:
    folder.mkdir(exist_ok=True)
    files = {}
    for task in dict.fromkeys(t for t, _ in pairs):
        spec, backbone = checkpoint.task_spec(task), checkpoint.shape.config
        data = load_task(
            task_string(spec),
            data_root=data_root,
            channels=backbone.in_channels,
            size=backbone.input_size,
            val_fraction=checkpoint.split.val_fraction,
            seed=checkpoint.split.seed,
        )
        images, _ = data.split("train")
        batch = normalize_batch(images[:calibration], spec).numpy()
        for (t, level), file in pairs.items():
            if t == task:
                quantize_static(
                    file,
                    folder / file.name,
                    Images(batch),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
                files[t, level] = folder / file.name
    return files


def session(file: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


def forwards(checkpoint, ways: dict[str, dict], pairs: list[tuple[str, int]]) -> dict[str, dict]:
    """way -> (task, level) -> a function from a float32 tensor batch to logits (one thread each)."""
    out: dict[str, dict] = {"checkpoint": {key: ModelRunner(checkpoint).forward(*key) for key in pairs}}
    for way, files in ways.items():
        if "folder" in files:
            model = open_model(files["folder"])
            runner = ModelRunner(model)
            runner.runtime = SharedOrtRuntime(model.files, threads=1)  # as dvn eval -c runs it, one thread
            out[way] = {key: runner.forward(*key) for key in pairs}
        else:
            sessions = {key: session(files[key]) for key in pairs}
            out[way] = {
                key: (lambda x, s=s: torch.from_numpy(s.run(["logits"], {"input": x.numpy()})[0]))
                for key, s in sessions.items()
            }
    return out


def accuracies(checkpoint, runs: dict[str, dict], data_root: str, limit: int | None) -> dict:
    """way -> (task, level) -> test top-1, one pass over each task's test split for every way and level."""
    result: dict[str, dict] = {way: {} for way in runs}
    for task in checkpoint.task_names():
        levels = checkpoint.levels(task)
        spec = checkpoint.task_spec(task)
        images, labels = load_split(
            spec, checkpoint.shape.config, "test", data_root, limit, data_split=checkpoint.split
        )
        keys = [(way, (task, level)) for way in runs for level in levels]
        batches = zip(images.split(500), labels.split(500), strict=True)
        correct, seen = count_correct([runs[w][k] for w, k in keys], batches, spec)
        for (way, key), right in zip(keys, correct, strict=True):
            result[way][key] = right / seen
    return result


def speeds(runs: dict[str, dict], pairs: list, rounds: int, reps: tuple[int, int]) -> dict:
    """way -> (task, level) -> {"b1": ms, "b64": ms}: medians over rounds in which the ways take turns."""
    torch.set_num_threads(1)
    times: dict = {way: {key: {"b1": [], "b64": []} for key in pairs} for way in runs}
    batches = {
        n: torch.from_numpy(np.random.default_rng(n).standard_normal((n, 1, 28, 28)).astype(np.float32))
        for n in (1, 64)
    }
    for r in range(rounds):
        for key in pairs:
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for way in order:
                for n, repeat in zip((1, 64), reps, strict=True):
                    times[way][key][f"b{n}"].append(_median_ms(runs[way][key], batches[n], repeat))
    return {
        way: {key: {b: statistics.median(v) for b, v in t.items()} for key, t in by.items()}
        for way, by in times.items()
    }


def _median_ms(forward: Callable, x: torch.Tensor, repeat: int) -> float:
    with torch.no_grad():
        forward(x)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            forward(x)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def resident(ways: dict[str, dict], choices: dict[str, int], rounds: int) -> dict[str, float]:
    """way -> MiB two co-resident tasks hold (median of fresh processes), with ``memory.py``'s child."""
    import subprocess

    held: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, files in ways.items():
            if "folder" in files:
                kind, given, warm = "shared", {"shared": str(files["folder"])}, {"shared": str(files["folder"])}
            else:
                kind = "per-pair"
                given = {t: str(files[t, lv]) for t, lv in choices.items()}
                warm = {t: str(files[t, 1]) for t in choices}
            args = json.dumps([kind, given, warm, choices, (3, 1)])
            out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, env=os.environ)
            if out.returncode:
                raise SystemExit(f"{way}: {out.stderr[-2000:]}")
            held[way].append(json.loads(out.stdout.strip().splitlines()[-1])["held"])
    return {way: statistics.median(v) for way, v in held.items()}


def pair_bytes(checkpoint, ways: dict[str, dict], pairs: list) -> dict[str, dict]:
    """way -> (task, level) -> bytes of that pair: stored alone at the precision (shared) or its file."""
    model = memory_model(checkpoint.shape)
    out = {}
    for way, files in ways.items():
        if "folder" in files:
            stored = model.at(way.split()[-1])
            out[way] = {(t, lv): stored.memory({checkpoint.shape.task_index(t): lv}) for t, lv in pairs}
        else:
            out[way] = {key: files[key].stat().st_size for key in pairs}
    return out


def totals(ways: dict[str, dict], pairs: list) -> dict[str, tuple[int, int]]:
    """way -> (weights bytes, every file) for all pairs: the shared weights file, or the per-pair files."""
    out = {}
    for way, files in ways.items():
        if "folder" in files:
            folder = files["folder"]
            out[way] = ((folder / WEIGHTS_NAME).stat().st_size, sum(f.stat().st_size for f in folder.iterdir()))
        else:
            size = sum(files[key].stat().st_size for key in pairs)
            out[way] = (size, size)
    return out


def report(args, ways, pairs, size, acc, speed, held, total, start_load: str) -> str:
    ref = "shared fp32"
    lines = [
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/precision.py {' '.join(sys.argv[1:])}`. "
        f"CPU: {cpu_model()} ({os.cpu_count()} cores; flags: {cpu_flags()}), one thread; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, Python {platform.python_version()}. Load average (1, 5, 15 min) at the "
        f"start: {start_load}; at the end: {load()} (a shared machine: timings are noisy). Accuracy: test split, "
        f"{'all' if args.limit is None else args.limit} images per task; speed: medians of {args.rounds} "
        f"interleaved rounds of {args.reps1} (batch 1) and {args.reps64} (batch 64) runs.",
        "",
        "| task | level | way | bytes | test top-1 | vs checkpoint (points) | batch 1 ms | batch 64 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in pairs:
        base = acc["checkpoint"][key]
        lines.append(f"| {key[0]} | {key[1]} | checkpoint (PyTorch fp32) | | {100 * base:.2f}% | | | |")
        for way in ways:
            s = speed[way][key]
            lines.append(
                f"| {key[0]} | {key[1]} | {way} | {size[way][key]:,} | {100 * acc[way][key]:.2f}% | "
                f"{100 * (acc[way][key] - base):+.2f} | {s['b1']:.3f} | {s['b64']:.2f} |"
            )
    lines += [
        "",
        "| way | weights, all 8 (x shared fp32) | whole export | worst accuracy change (points) | "
        "batch 1 speed vs shared fp32 | batch 64 speed vs shared fp32 | two tasks held MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for way in ways:
        worst = min(100 * (acc[way][k] - acc["checkpoint"][k]) for k in pairs)
        b1 = statistics.geometric_mean(speed[ref][k]["b1"] / speed[way][k]["b1"] for k in pairs)
        b64 = statistics.geometric_mean(speed[ref][k]["b64"] / speed[way][k]["b64"] for k in pairs)
        lines.append(
            f"| {way} | {total[way][0]:,} ({total[way][0] / total[ref][0]:.3f}x) | {total[way][1]:,} | "
            f"{worst:+.2f} | {b1:.2f}x | {b64:.2f}x | {held[way]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=Path("runs/dvn/model.safetensors"))
    parser.add_argument("--work", type=Path, default=Path("runs/precision-bench"), help="folder for the exports")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--limit", type=int, help="test images per task (default: all)")
    parser.add_argument("--calibration", type=int, default=200, help="training images to calibrate static int8")
    parser.add_argument("--no-static", dest="static", action="store_false", help="leave quantize_static out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; fresh memory processes")
    parser.add_argument("--reps1", type=int, default=30)
    parser.add_argument("--reps64", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the tables (Markdown) and the raw results (.json) here")
    args = parser.parse_args()
    start_load = load()
    checkpoint = load_checkpoint(args.checkpoint)
    pairs = checkpoint.pairs()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    ways = export_all(checkpoint, args.work, args.static, args.calibration, args.data_root)
    print(f"exported (load {load()})", file=sys.stderr, flush=True)
    runs = forwards(checkpoint, ways, pairs)
    acc = accuracies(checkpoint, runs, args.data_root, args.limit)
    print(f"accuracy done (load {load()})", file=sys.stderr, flush=True)
    speed = speeds({w: r for w, r in runs.items() if w != "checkpoint"}, pairs, args.rounds, (args.reps1, args.reps64))
    print(f"speed done (load {load()})", file=sys.stderr, flush=True)
    top = {task: checkpoint.levels(task)[-1] for task in checkpoint.task_names()}
    held = resident(ways, top, args.rounds)
    size, total = pair_bytes(checkpoint, ways, pairs), totals(ways, pairs)
    text = report(args, ways, pairs, size, acc, speed, held, total, start_load)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        raw = {"accuracy": acc, "speed": speed, "bytes": size, "totals": total, "held_mib": held}
        args.out.with_suffix(".json").write_text(json.dumps(_stringify(raw), indent=2) + "\n")


def _stringify(value):
    """JSON keys for the raw results: a (task, level) becomes ``task/level``."""
    if isinstance(value, dict):
        return {(f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k): _stringify(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    main()
