#!/usr/bin/env bash
# GPU check of `dvn train`: a few hundred real training steps (dvn_cli.training.loop.fit, the code `dvn train` runs) on
# synthetic, learnable data on one CUDA device, in fp32, bf16 and fp16, timed step by step. Prints a small table:
# median ms per optimiser step (2 tasks x 4 levels, batch 128 per task), images/s, the loss at the start and the
# end (it must fall), peak GPU memory and top-level validation accuracy. Ends in well under 4 minutes on one H100
# (a hard limit of 210 s is set below).
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   PYTHON=/path/to/python STEPS=300 bash benchmarks/gpu_check.sh
#   DEVICE=cpu STEPS=12 BATCH=8 bash benchmarks/gpu_check.sh   # smoke test of the script without a GPU
#
# Needs: a CUDA GPU, and a Python with torch, safetensors, numpy and pillow (dvn_cli is taken from src/).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c "import torch, safetensors, numpy, PIL" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
PY="$(pick_python)" || {
    echo "gpu_check: no Python with torch, safetensors, numpy and pillow found; set PYTHON=..." >&2
    exit 2
}
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export STEPS="${STEPS:-300}" DEVICE="${DEVICE:-cuda}" BATCH="${BATCH:-128}"
status=0
timeout 210 "$PY" - <<'PYTHON' || status=$?
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from dvn_cli.config import BackboneConfig, TaskSpec, TrainConfig
from dvn_cli.data.datasets import TaskData
from dvn_cli.training.loop import fit
from dvn_cli.training.observer import TrainObserver

STEPS = int(os.environ["STEPS"])
BATCH, SIZE, CLASSES, EPOCHS = int(os.environ["BATCH"]), 32, 10, 3
device = torch.device(os.environ["DEVICE"])
cuda = device.type == "cuda"
if cuda and not torch.cuda.is_available():
    sys.exit("gpu_check: CUDA is not available here; this check needs a GPU (DEVICE=cpu for a smoke test)")
name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}, python {platform.python_version()}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported() if cuda else 'cpu autocast'}")


def synthetic_task(name: str, seed: int) -> TaskData:
    """Learnable images: class c brightens its own horizontal band of a noisy 3x32x32 image."""
    g = torch.Generator().manual_seed(seed)
    n_train = BATCH * STEPS // EPOCHS
    n = n_train + 8 * BATCH
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    images = torch.randint(0, 120, (n, 3, SIZE, SIZE), generator=g, dtype=torch.int16)
    rows = torch.arange(SIZE).view(1, SIZE)
    band = SIZE // CLASSES
    in_band = (rows >= labels.view(-1, 1) * band) & (rows < (labels.view(-1, 1) + 1) * band)  # (N, H)
    images = (images + 100 * in_band.view(n, 1, SIZE, 1)).clamp(0, 255).to(torch.uint8)
    spec = TaskSpec(name=name, classes=tuple(f"c{i}" for i in range(CLASSES)), mean=(0.3,) * 3, std=(0.25,) * 3,
                    source="synthetic")
    tr, va = slice(0, n_train), slice(n_train, n)
    return TaskData(spec, images[tr], labels[tr], images[va], labels[va], images[va], labels[va], augment="none")


class Timer(TrainObserver):
    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.losses: list[float] = []

    def on_step(self, info) -> None:
        self.ticks.append(time.perf_counter())  # fit syncs every step (it reads each task's loss)
        self.losses.append(sum(info.task_losses.values()))


data = [synthetic_task("alpha", 1), synthetic_task("beta", 2)]
backbone = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=3, input_size=SIZE)
rows = []
for precision in ("fp32", "bf16", "fp16"):
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        continue
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(tasks=("alpha", "beta"), backbone=backbone, epochs=EPOCHS, batch_size=BATCH, lr=0.1,
                          warmup_steps=20, seed=0, device=device.type, precision=precision, out=out, augment=False)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timer = Timer()
        start = time.perf_counter()
        result = fit(cfg, observer=timer, data=data)
        wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(timer.ticks, timer.ticks[1:])]
    per_epoch = len(timer.ticks) // EPOCHS
    steady = [s for i, s in enumerate(steps, start=1) if i > 10 and i % per_epoch]  # skip warm-up, epoch ends
    ms = 1000 * statistics.median(steady)
    top = [acc[-1] for acc in result.summary["val_accuracy"].values()]
    rows.append((precision, len(timer.ticks), ms, 2 * BATCH / ms * 1000, statistics.mean(timer.losses[:5]),
                 statistics.mean(timer.losses[-5:]), torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0, min(top), wall))

print()
print(f"{'precision':<10}{'steps':>6}{'ms/step':>10}{'img/s':>10}{'loss start':>12}{'loss end':>10}"
      f"{'peak MiB':>10}{'top-1 min':>11}{'wall s':>8}")
for p, n, ms, ips, l0, l1, mem, acc, wall in rows:
    print(f"{p:<10}{n:>6}{ms:>10.2f}{ips:>10.0f}{l0:>12.3f}{l1:>10.3f}{mem:>10.0f}{100 * acc:>10.1f}%{wall:>8.1f}")
base = rows[0][2]
print("\nspeed-up over fp32 (median ms/step): " + ", ".join(f"{p} {base / ms:.2f}x" for p, _, ms, *_ in rows[1:]))
bad = [p for p, _, _, _, l0, l1, *_ in rows if not l1 < 0.5 * l0]
if bad:
    sys.exit(f"gpu_check: the loss did not fall by half in {', '.join(bad)}")
print("gpu_check: ok")
PYTHON
if [ "$status" -eq 124 ]; then
    echo "gpu_check: stopped after 210 s (timeout); use fewer STEPS" >&2
fi
exit "$status"
