"""Time one training step of the main job's network in fp32 and under bf16 autocast, interleaved, medians.

2 tasks x 4 levels, batch 128 per task (``--batch``), ResNet-14 widths 32/64/128, 1x28x28, stem stride 2,
channels-last: what ``make demo`` runs per step. Usage: ``.venv/bin/python benchmarks/precision_step.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from dvn_cli.config import BackboneConfig, TaskSpec
from dvn_cli.core.network import build_network
from dvn_cli.training.loss import multitask_loss

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
    tasks = [TaskSpec("a", tuple("0123456789")), TaskSpec("b", tuple("0123456789"))]
    network = build_network(config, tasks).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    images = [torch.randn(args.batch, 1, 28, 28).to(memory_format=torch.channels_last) for _ in tasks]
    batches = [(x, torch.randint(0, 10, (args.batch,))) for x in images]

    def step(dtype: torch.dtype | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = multitask_loss(network, batches)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {mode: [] for mode in DTYPES}
    for dtype in DTYPES.values():  # warm-up
        step(dtype)
    for r in range(args.rounds):
        for mode in list(DTYPES) if r % 2 == 0 else list(DTYPES)[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(DTYPES[mode])
            times[mode].append((time.perf_counter() - start) / args.steps)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for mode, values in times.items():
        print(f"{mode}: {1000 * statistics.median(values):.0f} ms/step (rounds: {[round(1000 * v) for v in values]})")


if __name__ == "__main__":
    main()
