"""The ``resnet18`` and ``mobilenetv2`` backbones: gather vs masked training step, and level-1 compact inference vs
the full network at batch 64, each next to its multiply-accumulate limit from the one counter (``core/cost.py``).

    .venv/bin/python benchmarks/backbones.py [--arch resnet18,mobilenetv2] [--size 64] [--width 0.5] [--rounds 3]

Training: 2 tasks, k = 4, every level of both tasks per step (``multitask_loss``), SGD, channels-last as ``dvn
train`` runs. The masked path runs every level at full width, so its limit is ``k * MACs(k) / sum_l MACs(l)``:
layers split on both sides shrink like (l/k)^2, but the stem and the depthwise layers only like l/k, so the limit
is lower than the CIFAR ResNet's 2.13x. Inference: the compact plain model of level 1 with batch norm folded
against the folded compact model of the top level (the same kind of model), limit ``MACs(k) / MACs(1)``, both
channels-last (oneDNN's depthwise kernels are about 4x faster on it than on NCHW here).
Modes are interleaved round by round and medians reported: these machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.core.backbones import backbone_defaults
from dvn_cli.core.cost import level_cost
from dvn_cli.core.plain import extract_plain
from dvn_cli.export.pairs import fold_batchnorm
from dvn_cli.training.loss import multitask_loss


def interleaved_medians(modes: dict, rounds: int, repeat: int = 1) -> dict[str, float]:
    """Median seconds of each mode, the modes run in turn every round (after one warm-up call each)."""
    for run in modes.values():
        run()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode, run in modes.items():
            start = time.perf_counter()
            for _ in range(repeat):
                run()
            times[mode].append((time.perf_counter() - start) / repeat)
    return {m: statistics.median(v) for m, v in times.items()}


def bench(arch: str, args) -> None:
    torch.manual_seed(0)
    values = {**backbone_defaults(arch, args.width), "units": 4, "in_channels": 3, "input_size": args.size}
    config = BackboneConfig(arch=arch, **values)
    tasks = [TaskSpec(f"task{t}", tuple(str(c) for c in range(10))) for t in range(2)]
    network = build_network(config, tasks).to(memory_format=torch.channels_last).train()
    k = config.units
    macs = [level_cost(network, 0, level).macs for level in range(1, k + 1)]
    train_limit = k * macs[-1] / sum(macs)
    infer_limit = macs[-1] / macs[0]
    print(f"\n{arch}: widths {config.widths}, k={k}, input 3x{args.size}x{args.size}, stem stride {config.stem_stride}")
    print("MACs/image per level: " + ", ".join(f"{m / 1e6:.1f}M" for m in macs))

    shape = (3, args.size, args.size)
    batches = [
        (
            torch.randn(args.batch, *shape).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 10, (args.batch,)),
        )
        for _ in tasks
    ]
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)

    def step(masked: bool):
        def run():
            optimizer.zero_grad(set_to_none=True)
            loss, _ = multitask_loss(network, batches, masked=masked)
            loss.backward()
            optimizer.step()

        return run

    if "train" in args.parts:
        train = interleaved_medians({"gather": step(False), "masked": step(True)}, args.rounds)
        print(
            f"training step (2 tasks x {k} levels, batch {args.batch}/task): gather {train['gather'] * 1000:.0f} ms, "
            f"masked {train['masked'] * 1000:.0f} ms -> {train['masked'] / train['gather']:.2f}x "
            f"(MAC limit {train_limit:.2f}x)"
        )
    if "infer" not in args.parts:
        return

    network.eval()
    folded = {
        level: fold_batchnorm(extract_plain(network, 0, level)).eval().to(memory_format=torch.channels_last)
        for level in (1, k)
    }
    x = torch.randn(64, *shape).contiguous(memory_format=torch.channels_last)

    def infer(level: int):
        def run():
            with torch.no_grad():
                folded[level](x)

        return run

    inference = interleaved_medians({"level1": infer(1), "full": infer(k)}, args.rounds, repeat=3)
    print(
        f"inference, batch 64, compact + folded BN: level 1 {inference['level1'] * 1000:.1f} ms, full (level {k}) "
        f"{inference['full'] * 1000:.1f} ms -> {inference['full'] / inference['level1']:.2f}x "
        f"(MAC limit {infer_limit:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18,mobilenetv2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=32, help="training images per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="train,infer", help="train, infer or both")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.rounds} rounds (medians)"
    )
    for arch in args.arch.split(","):
        bench(arch.strip(), args)


if __name__ == "__main__":
    main()
