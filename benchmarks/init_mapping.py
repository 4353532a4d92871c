"""Which channels go into the units a task takes first when a DVN starts from pretrained weights (``--init``):
the ``bn-scale`` mapping (channels ranked by batch-norm |gamma|) against ``identity`` (torchvision's order).

    .venv/bin/python benchmarks/init_mapping.py [--data-root data] [--pretrain-steps 300] [--finetune-steps 40]
        [--stand-in stand_in.safetensors]

No pretrained weights can be downloaded here, so a torchvision ``resnet18`` is first trained from random weights on
Fashion-MNIST (3x32x32, grey repeated) and stands in for a pretrained model. Each mapping then starts a one-task,
k = 4 DVN (resnet18, width 1.0) from it, and the test accuracy of every level is measured three times: as
initialised, after re-estimating each level's batch-norm statistics on training images (no gradient), and after a
short fine-tune of all levels. Same seed, data and steps for both mappings; one seed only.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dvn_cli import BackboneConfig, build_network
from dvn_cli.core.backbones import backbone_defaults
from dvn_cli.core.pretrained import init_from_torchvision
from dvn_cli.data.batches import normalize_batch
from dvn_cli.data.datasets import load_task
from dvn_cli.training.loss import multitask_loss

SIZE = 32


def batches(data, steps: int, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.split("train")
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=generator)
        yield normalize_batch(images[idx], data.spec), labels[idx]


@torch.no_grad()
def accuracy(forward, data, limit: int) -> float:
    images, labels = data.split("test")
    images, labels = images[:limit], labels[:limit]
    correct = 0
    for i in range(0, len(labels), 250):
        x = normalize_batch(images[i : i + 250], data.spec)
        correct += int((forward(x).argmax(1) == labels[i : i + 250]).sum())
    return correct / len(labels)


def recalibrate(network, data, steps: int) -> None:
    """Re-estimate every level's batch-norm statistics on training images (cumulative average, no gradient)."""
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    network.train()
    with torch.no_grad():
        for x, _ in batches(data, steps, 128, seed=2):
            for level in range(1, network.units + 1):
                network(x, 0, level)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    network.eval()


def levels(network, data, limit: int) -> list[float]:
    network.eval()
    return [accuracy(lambda x, lv=lv: network(x, 0, lv), data, limit) for lv in range(1, network.units + 1)]


def show(mapping: str, what: str, accs: list[float]) -> None:
    print(f"{mapping:9s} {what:28s} " + "  ".join(f"L{i + 1} {a:.4f}" for i, a in enumerate(accs)), flush=True)


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--stand-in", default=None, help="safetensors file: reuse the stand-in model, or save it there")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {torch.__version__}"
    )

    data = load_task("fashion-mnist", data_root=args.data_root, channels=3, size=SIZE)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    model.train()
    if args.stand_in and os.path.exists(args.stand_in):
        model.load_state_dict(load_file(args.stand_in))
        args.pretrain_steps = 0
    for step, (x, y) in enumerate(batches(data, args.pretrain_steps, 64, seed=1)):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * (1 - step / args.pretrain_steps)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    if args.stand_in and args.pretrain_steps:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.stand_in)
    print(
        f"stand-in pretrained torchvision resnet18: {args.pretrain_steps} steps of batch 64 in "
        f"{time.perf_counter() - start:.0f} s, test top-1 {accuracy(model, data, args.test_limit):.4f} "
        f"(first {args.test_limit} test images)"
    )

    values = {**backbone_defaults("resnet18"), "units": 4, "in_channels": 3, "input_size": SIZE}
    config = BackboneConfig(arch="resnet18", **values)
    for mapping in ("identity", "bn-scale"):
        torch.manual_seed(0)
        network = build_network(config, [data.spec])
        init_from_torchvision(network, model.state_dict(), mapping)
        show(mapping, "as initialised", levels(network, data, args.test_limit))
        recalibrate(network, data, steps=10)
        show(mapping, "batch norm re-estimated", levels(network, data, args.test_limit))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        network.train()
        for x, y in batches(data, args.finetune_steps, 64, seed=3):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = multitask_loss(network, [(x, y)])
            loss.backward()
            optimizer.step()
        show(mapping, f"after {args.finetune_steps} fine-tune steps", levels(network, data, args.test_limit))


if __name__ == "__main__":
    main()
