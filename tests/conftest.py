"""Shared fixtures: tiny DVNs that build and run in milliseconds."""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import torch
from PIL import Image
from torch import nn

from dvn_cli.config import BackboneConfig, TaskSpec
from dvn_cli.core.network import DeepVirtualNetwork, build_network
from dvn_cli.data.prepare import offline_data_status, prepare_offline_data
from dvn_cli.training.observer import TrainObserver

REPO = Path(__file__).resolve().parents[1]

# Tiny tensors run fastest on one thread, and CI has two cores for everything.
torch.set_num_threads(1)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `make test` each pytest worker has about one core: the processes its tests start get one thread too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The processes tests start wait passively at OpenMP barriers, as `dvn` does (cli/__init__.py): a spinning thread
# takes the core that another test's thread needs (two native-crash scripts side by side on two cores: 106 s with
# libgomp's default spinning, 21 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def tiny_config(**overrides) -> BackboneConfig:
    base = {"depth": 8, "widths": (8, 16, 32), "units": 4, "in_channels": 3, "input_size": 12}
    return BackboneConfig(**{**base, **overrides})


def tiny_tasks(num_tasks: int = 2) -> list[TaskSpec]:
    classes = [tuple(str(i) for i in range(10)), ("cat", "dog", "fox"), ("a", "b", "c", "d", "e")]
    return [
        TaskSpec(name=f"task{t}", classes=classes[t % len(classes)], mean=(0.5,) * 3, std=(0.25,) * 3)
        for t in range(num_tasks)
    ]


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory) -> Path:
    """dvn's user cache (engine caches, ``runtime/engine_cache.py``) under pytest's tmp folder, for the processes
    tests start too: a test never writes to the home folder."""
    path = tmp_path_factory.mktemp("user-cache")
    os.environ["DVN_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def tiny_network() -> DeepVirtualNetwork:
    torch.manual_seed(0)
    return build_network(tiny_config(), tiny_tasks(2))


@pytest.fixture
def scrambled_network() -> DeepVirtualNetwork:
    """Three tasks whose orders make non-contiguous unit sets, so the index_select path runs too."""
    torch.manual_seed(1)
    return build_network(tiny_config(), tiny_tasks(3), "table", [[0, 2, 1, 3], [3, 1, 0, 2], [1, 3, 2, 0]])


def all_task_levels(network: DeepVirtualNetwork) -> list[tuple[int, int]]:
    return [(t, lv) for t in range(len(network.tasks)) for lv in range(1, network.units + 1)]


def synthetic_task(name: str, num_classes: int = 3, n: int = 96, size: int = 12, channels: int = 3, seed: int = 0):
    """A learnable in-memory task: each class brightens its own horizontal band of a noisy image."""
    from dvn_cli.data.datasets import TaskData

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 100, (n, channels, size, size), generator=g)
    band = size // num_classes
    for c in range(num_classes):
        images[labels == c, :, c * band : (c + 1) * band] += 120
    images = images.clamp(0, 255).to(torch.uint8)
    spec = TaskSpec(
        name=name,
        classes=tuple(f"c{i}" for i in range(num_classes)),
        mean=(0.4,) * channels,
        std=(0.3,) * channels,
        source="synthetic",
    )
    split = n * 3 // 4
    return TaskData(
        spec,
        images[:split],
        labels[:split],
        images[split:],
        labels[split:],
        images[split:],
        labels[split:],
        augment="digits",
    )


@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory) -> Path:
    """A data root with MNIST and Fashion-MNIST: an already prepared one, else prepared now into a tmp root.

    Fails (rather than skips) under CI when the data cannot be had.
    """
    for candidate in (os.environ.get("DVN_DATA_ROOT"), REPO / "data"):
        if candidate and all(r["status"] == "ready" for r in offline_data_status(candidate)):
            return Path(candidate)
    root = tmp_path_factory.mktemp("data")
    rows = prepare_offline_data(root)
    missing = [f"{r['dataset']}: {r['detail']}" for r in rows if r["status"] == "missing"]
    if missing:
        unavailable("real data unavailable: " + "; ".join(missing))
    return root


def unavailable(message: str) -> NoReturn:
    """Skip a test whose data or dependency this machine lacks; fail it under ``CI``, which must have everything."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str) -> ModuleType:
    """``pytest.importorskip`` that fails under ``CI``: a dependency the tests need must not skip silently there."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{name} is not installed ({exc})")


def settle_batch_norm(network, steps: int = 3):
    """Give every (task, level) batch norm non-trivial affine parameters and running statistics; eval mode."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
        network.train()
        for _ in range(steps):
            for task, level in all_task_levels(network):
                network(torch.randn(8, 3, 12, 12, generator=generator) * 1.5 + 0.3, task, level)
    return network.eval()


def make_image_folder(root: Path, classes=("red", "green", "blue"), per_class: int = 12, size: int = 16, seed: int = 0):
    """A learnable image folder: class c brightens its own band of channel c."""
    rng = random.Random(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(rng.randrange(60) for _ in range(3)))
            for x in range(size):
                for y in range(size // 3 * (c % 3), size // 3 * (c % 3 + 1)):
                    px = list(img.getpixel((x, y)))
                    px[c % 3] = 200 + rng.randrange(55)
                    img.putpixel((x, y), tuple(px))
            img.save(root / name / f"{i}.png")
    return root


def tiny_train_config(tmp_path, **overrides):
    """A TrainConfig for the two synthetic tasks of ``two_synthetic_tasks`` on the tiny backbone."""
    from dvn_cli.config import TrainConfig

    base = {
        "tasks": ("alpha", "beta"),
        "backbone": tiny_config(),
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.05,
        "warmup_steps": 2,
        "out": str(tmp_path / "run"),
        "seed": 3,
    }
    return TrainConfig(**{**base, **overrides})


def two_synthetic_tasks():
    return [synthetic_task("alpha", 3, seed=1), synthetic_task("beta", 4, seed=2)]


class StopAt(TrainObserver):
    """Presses Ctrl-C after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info) -> None:
        if info.step == self.step:
            raise KeyboardInterrupt
