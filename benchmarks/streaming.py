"""Streamed folder tasks against in-memory ones: training images/s, and resident memory against the number of images.

    .venv/bin/python benchmarks/streaming.py prepare --data-root data --folders /tmp/stream_folders
    .venv/bin/python benchmarks/streaming.py speed --folders /tmp/stream_folders [--images 10000] [--threads 1]
    .venv/bin/python benchmarks/streaming.py memory --folders /tmp/stream_folders [--images 10000,30000,60000]

``prepare`` writes MNIST and Fashion-MNIST (their 60,000 training images, from ``dvn data prepare``) as 64x64
grey PNG folders of class sub-folders (``mnist-60000``, ``fashion-60000``) and, for smaller sizes, folders of
symbolic links to the first images of each class (``mnist-10000``, ...). Write them outside the repository.

``speed``: two tasks of N images each, the same run settings in both modes (ResNet-8 32/64/128, k = 4, stride-2
stem on 1x64x64, batch 64 per task, augmentation on), training steps timed after a warm-up; the modes alternate
round by round (fresh batch streams each round) and the medians are reported.

``memory``: for each N, ``dvn``'s own training (``training.loop.fit``, a few steps, validation and checkpoint
included; 7 % validation) on two tasks of N images each, in a fresh process per (mode, N): the resident memory of
the training process once its tasks are open, its peak, and the peak proportional set size of it and its data
workers together.
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
import threading
import time
from pathlib import Path

SIZE = 64
VAL_FRACTION = 0.07  # >= 500 images at 10,000 per task: every N validates in batches of 500 (like with like)
TASKS = ("mnist", "fashion")


def prepare(data_root: Path, out: Path, sizes: list[int]) -> None:
    """Write the 64x64 PNG folders (skipping those already there)."""
    import numpy as np
    from PIL import Image

    from dvn_cli.data.registry import DATASETS

    for task, registered in zip(TASKS, ("mnist", "fashion-mnist"), strict=True):
        full = out / f"{task}-60000"
        if not full.is_dir():
            images, labels, classes = DATASETS[registered].load(data_root, True, False)
            staging = out / f".{task}-60000.tmp"
            for c in classes:
                (staging / _safe(c)).mkdir(parents=True, exist_ok=True)
            for i, (image, label) in enumerate(zip(images[:, 0].numpy(), labels.tolist(), strict=True)):
                big = Image.fromarray(np.ascontiguousarray(image), "L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
                big.save(staging / _safe(classes[label]) / f"{i:05d}.png")
            staging.rename(full)
        for n in sizes:
            subset = out / f"{task}-{n}"
            if n >= 60000 or subset.is_dir():
                continue
            classes = sorted(p.name for p in full.iterdir())
            files = {c: sorted((full / c).iterdir()) for c in classes}
            total = sum(len(f) for f in files.values())
            staging = out / f".{task}-{n}.tmp"
            for c in classes:
                (staging / c).mkdir(parents=True, exist_ok=True)
                for f in files[c][: round(len(files[c]) * n / total)]:
                    (staging / c / f.name).symlink_to(f)
            staging.rename(subset)
        print(f"{task}: folders ready in {out}", flush=True)


def _safe(name: str) -> str:
    return name.replace("/", "-").replace(" ", "_")


def _config(folders: Path, n: int, mode: str, out: str, steps: int | None = None):
    from dvn_cli.config import BackboneConfig, TrainConfig

    backbone = BackboneConfig(depth=8, widths=(32, 64, 128), units=4, in_channels=1, input_size=SIZE, stem_stride=2)
    steps_per_epoch = round(n * 0.8 * (1 - VAL_FRACTION)) // 64  # 20% test carve, then validation
    return TrainConfig(
        tasks=tuple(f"{t}={folders / f'{t}-{n}'}" for t in TASKS),
        backbone=backbone,
        epochs=(steps or steps_per_epoch) / steps_per_epoch,
        batch_size=64,
        warmup_steps=10,
        val_fraction=VAL_FRACTION,
        data_mode=mode,
        workers=2,
        out=out,
    )


def speed(folders: Path, n: int, rounds: int, steps: int, warmup: int) -> dict:
    """Median training images/s of both modes, interleaved round by round."""
    import torch

    from dvn_cli.core.network import build_network
    from dvn_cli.training.loop import load_tasks
    from dvn_cli.training.loss import multitask_loss
    from dvn_cli.training.schedule import make_optimizer

    configs = {mode: _config(folders, n, mode, "unused") for mode in ("memory", "stream")}
    data = {mode: load_tasks(cfg) for mode, cfg in configs.items()}
    assert {d.summary()["storage"] for d in data["stream"]} == {"stream"}
    times: dict[str, list[float]] = {mode: [] for mode in configs}
    for r in range(rounds):
        for mode in ("memory", "stream") if r % 2 == 0 else ("stream", "memory"):
            cfg = configs[mode]
            torch.manual_seed(0)
            network = build_network(cfg.backbone, [d.spec for d in data[mode]]).to(memory_format=torch.channels_last)
            optimizer = make_optimizer(network, cfg)
            streams = [d.train_batches(64, seed=r, task_index=i) for i, d in enumerate(data[mode])]
            for s in range(warmup + steps):
                if s == warmup:
                    start = time.perf_counter()
                batches = [(x.to(memory_format=torch.channels_last), y) for x, y in (next(t) for t in streams)]
                optimizer.zero_grad(set_to_none=True)
                loss, _ = multitask_loss(network, batches)
                loss.backward()
                optimizer.step()
            seconds = time.perf_counter() - start
            times[mode].append(steps * 64 * len(streams) / seconds)
            print(f"round {r} {mode}: {times[mode][-1]:.1f} images/s", flush=True)
            del streams
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    return {
        "images_per_task": n,
        "rounds": times,
        "median_images_per_s": medians,
        "stream_over_memory": medians["stream"] / medians["memory"],
    }


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _status_kib(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_one(folders: Path, n: int, mode: str, steps: int) -> dict:
    """One (mode, N) in this process: train a few steps with ``fit``; peak RSS and peak PSS with the workers."""
    from dvn_cli.training.loop import fit
    from dvn_cli.training.observer import TrainObserver

    peak_pss, done, opened = [0], threading.Event(), {}

    class AtStart(TrainObserver):
        def on_start(self, total_steps, start_step, data) -> None:  # the tasks are open, no step taken yet
            opened["rss_kib"] = _status_kib("VmRSS")

    def sample() -> None:
        while not done.is_set():
            pids = [os.getpid(), *_children(os.getpid())]
            peak_pss[0] = max(peak_pss[0], sum(_pss_kib(p) for p in pids))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = fit(_config(folders, n, mode, out, steps), observer=AtStart())
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "mode": mode,
        "images_per_task": n,
        "storage": [d["storage"] for d in result.summary["data"]],
        "steps": result.summary["steps"],
        "seconds": round(seconds, 1),
        "rss_when_training_starts_mib": round(opened["rss_kib"] / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "peak_pss_with_workers_mib": round(peak_pss[0] / 1024, 1),
    }


def memory(folders: Path, sizes: list[int], modes: list[str], steps: int) -> list[dict]:
    rows = []
    for n in sizes:
        for mode in modes:
            command = [sys.executable, __file__, "memory-one", "--folders", str(folders), "--images", str(n)]
            command += ["--mode", mode, "--steps", str(steps)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "speed", "memory", "memory-one"))
    parser.add_argument("--folders", type=Path, default=Path(tempfile.gettempdir()) / "stream_folders")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--images", default="10000,30000,60000", help="images per task (memory: several)")
    parser.add_argument("--mode", default="stream", choices=("stream", "memory"))
    parser.add_argument("--modes", default="stream,memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, help="threads of the training process (default: torch's)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.images.split(",")]
    if args.command == "prepare":
        prepare(args.data_root, args.folders, sizes)
        return
    if args.command == "memory-one":
        print(json.dumps(memory_one(args.folders, sizes[0], args.mode, args.steps)))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    header = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    header["torch"] = torch.__version__
    print(json.dumps(header), flush=True)
    if args.command == "speed":
        print(json.dumps(speed(args.folders, sizes[0], args.rounds, args.steps, args.warmup)))
    else:
        print(json.dumps(memory(args.folders, sizes, args.modes.split(","), args.steps)))


if __name__ == "__main__":
    main()
