"""Time one training step over all levels of a 2-task, k = 4 DVN: gather path, masked path, and the same
(task, level) models trained as independent plain networks (one per task and width l/k).

    .venv/bin/python benchmarks/train_step.py [--rounds 8] [--batch 64] [--size 32] [--channels-last]

Counting says the ideal speed-up is k / sum_l (l/k)^2 = 4 / 1.875 ~ 2.13x at k = 4. The modes are interleaved
round by round and medians reported, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.core.plain import PlainNetwork, plain_config
from dvn_cli.training.loss import multitask_loss


def make_independent_step(config, tasks, batches, channels_last):
    """One step of every independent plain network: task t at width l/k, trained alone."""
    nets = [
        (PlainNetwork(plain_config(config, level), task.num_classes), t)
        for t, task in enumerate(tasks)
        for level in range(1, config.units + 1)
    ]
    if channels_last:
        nets = [(net.to(memory_format=torch.channels_last), t) for net, t in nets]
    params = [p for net, _ in nets for p in net.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(net.train()(batches[t][0]), batches[t][1]) for net, t in nets)
        loss.backward()
        optimizer.step()

    return step


def make_step(network, optimizer, batches, masked):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = multitask_loss(network, batches, masked=masked)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--widths", default="32,64,128")
    parser.add_argument("--depth", type=int, default=14)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    config = BackboneConfig(depth=args.depth, widths=widths, units=4, in_channels=3, input_size=args.size)
    tasks = [TaskSpec(name=f"task{t}", classes=tuple(str(c) for c in range(10))) for t in range(2)]
    network = build_network(config, tasks).train()
    batches = [(torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))) for _ in tasks]
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
    steps = {mode: make_step(network, optimizer, batches, mode == "masked") for mode in ("gather", "masked")}
    steps["independent"] = make_independent_step(config, tasks, batches, args.channels_last)

    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(args.rounds):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)

    k = config.units
    ideal = k / sum((lv / k) ** 2 for lv in range(1, k + 1))
    gather, masked = (statistics.median(times[m]) for m in ("gather", "masked"))
    images = args.batch * len(tasks)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"config: depth {args.depth}, widths {widths}, k={k}, 2 tasks, batch {args.batch}/task, "
        f"{args.size}x{args.size}, channels_last={args.channels_last}, {args.rounds} rounds (medians)"
    )
    print(f"gather step: {gather * 1000:8.1f} ms  ({images / gather:7.1f} images/s over all levels)")
    print(f"masked step: {masked * 1000:8.1f} ms  ({images / masked:7.1f} images/s over all levels)")
    independent = statistics.median(times["independent"])
    print(f"independent step: {independent * 1000:8.1f} ms  ({images / independent:7.1f} images/s, 8 plain networks)")
    print(f"speed-up gather/masked: {masked / gather:.2f}x  (ideal by MAC count: {ideal:.2f}x)")
    print(f"gather / independent time: {gather / independent:.2f}  (same MACs; 1.00 = no overhead for sharing)")


if __name__ == "__main__":
    main()
