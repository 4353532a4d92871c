"""Size before allocation: ``dvn train`` estimates a step's memory from shapes and refuses what cannot fit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvn_cli.config import TaskSpec
from dvn_cli.errors import BadConfig
from dvn_cli.training import memory_estimate as memory
from dvn_cli.training.memory_estimate import Headroom, check_memory, estimate_memory
from dvn_cli.training.train_config import load_train_config

from .conftest import REPO, make_image_folder, tiny_config, tiny_tasks, tiny_train_config


def test_the_estimate_counts_weights_optimiser_and_activations_growing_with_the_batch():
    specs = tiny_tasks(2)
    small = estimate_memory(tiny_config(), specs, 8)
    large = estimate_memory(tiny_config(), specs, 32)
    params = sum(p.numel() for p in torch.nn.Module.parameters(_meta_network(specs))) * 4
    assert small.optimizer == params and small.gradients == 2 * params and small.weights > params
    assert large.fixed == small.fixed
    assert 3 * small.activations < large.activations < 4 * small.activations  # gathered weights: not per image
    assert estimate_memory(tiny_config(), specs, 8, momentum=0.0).optimizer == 0


def _meta_network(specs):
    from dvn_cli.core.network import build_network

    with torch.device("meta"):
        return build_network(tiny_config(), specs)


def test_a_step_that_does_not_fit_is_refused_naming_a_batch_size_that_fits(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path, batch_size=64)
    specs = tiny_tasks(2)
    fits_12 = estimate_memory(cfg.backbone, specs, 12).total
    monkeypatch.setattr(memory, "available_memory", lambda device: Headroom(fits_12 + 1000, "MemAvailable"))
    with pytest.raises(BadConfig) as caught:
        check_memory(cfg, specs, torch.device("cpu"))
    message = str(caught.value)
    assert message.startswith("training would need about ") and "activations of 64 images per task" in message
    assert message.endswith(
        "but MemAvailable leaves " + memory.format_bytes(fits_12 + 1000) + "; --batch-size 12 or less fits"
    )
    assert estimate_memory(cfg.backbone, specs, 13).total > fits_12 + 1000


def test_a_model_that_alone_does_not_fit_is_refused_naming_smaller_widths(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path, batch_size=1)
    specs = tiny_tasks(2)
    room = estimate_memory(tiny_config(widths=(4, 8, 16)), specs, 1).total
    monkeypatch.setattr(memory, "available_memory", lambda device: Headroom(room, "the cgroup's memory limit"))
    with pytest.raises(BadConfig, match=r"the model alone does not fit; --widths 4,8,16 fits at this batch size$"):
        check_memory(cfg, specs, torch.device("cpu"))


def test_the_main_job_settings_are_not_refused():
    cfg = load_train_config(REPO / "examples" / "mnist_fashion.toml", {}, {})
    specs = [TaskSpec(name, tuple(str(i) for i in range(10))) for name in cfg.tasks]
    estimate = check_memory(cfg, specs, torch.device("cpu"))  # on this machine, as it is now
    assert 0 < estimate.total < 2 * 10**9


def test_the_headroom_is_the_tightest_limit(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo", lambda field: 8 * 2**30)
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 3 * 2**30)
    assert memory.available_memory(torch.device("cpu")) == Headroom(3 * 2**30, "the cgroup's memory limit")
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    assert memory.available_memory(torch.device("cpu")).bytes in (8 * 2**30, _address_space_room())


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft - memory._status("VmSize")


def _limit_address_space() -> None:
    """In the child: at most 8 GiB of address space, so a regression fails there instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))


@pytest.mark.slow
def test_the_issue_repro_is_refused_in_one_line_before_allocating(tmp_path: Path):
    """``--width 100`` ResNet-18 once grew to 21.5 GB until the kernel's OOM killer ended it (issue 18, row 4)."""
    folder = make_image_folder(tmp_path / "rgb", per_class=6)
    args = ["train", "--tasks", f"rgb={folder}", "--arch", "resnet18", "--input-size", "32", "--width", "100"]
    args += ["-k", "2", "--limit", "256", "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dvn_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=_limit_address_space,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: training would need about "), lines[0]
    assert "GB (weights 446.3 GB" in lines[0] and "the address-space limit (ulimit -v) leaves" in lines[0]
    assert "the model alone does not fit; --widths " in lines[0] and lines[0].endswith(" fits at this batch size")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
