"""Shared fixtures: tiny DVNs that build and run in milliseconds."""

from __future__ import annotations

import pytest
import torch

from dvn_cli.config import BackboneConfig, TaskSpec
from dvn_cli.network import DeepVirtualNetwork, build_network


def tiny_config(**overrides) -> BackboneConfig:
    base = {"depth": 8, "widths": (8, 16, 32), "units": 4, "in_channels": 3, "input_size": 12}
    return BackboneConfig(**{**base, **overrides})


def tiny_tasks(num_tasks: int = 2) -> list[TaskSpec]:
    classes = [tuple(str(i) for i in range(10)), ("cat", "dog", "fox"), ("a", "b", "c", "d", "e")]
    return [
        TaskSpec(name=f"task{t}", classes=classes[t % len(classes)], mean=(0.5,) * 3, std=(0.25,) * 3)
        for t in range(num_tasks)
    ]


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
