"""Threads of PyTorch's CPU kernels: the command line makes their OpenMP threads wait passively (unless the user's
environment says otherwise), and an inference call of a few images runs on one intra-op thread (core/threads.py)."""

import os
import subprocess
import sys

import pytest
import torch

from dvn_cli.core.threads import SMALL_BATCH, threads_for_batch
from dvn_cli.modelfile.checkpoint import Checkpoint
from dvn_cli.runtime.runner import ModelRunner
from dvn_cli.runtime.shared import SharedRuntime

SHOW = "import dvn_cli.cli.app, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def _policy(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_cli_sets_passive_waiting_before_torch_loads_and_a_given_policy_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE False"  # set before torch loads (libgomp reads it when it loads)
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE False"


@pytest.fixture
def two_threads():
    """The calling thread on two intra-op threads (what a 2-core machine gives), its own count given back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_few_images_run_on_one_thread_and_the_count_comes_back(two_threads):
    with threads_for_batch(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for_batch(SMALL_BATCH):
        assert torch.get_num_threads() == 1
    with threads_for_batch(SMALL_BATCH + 1):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads_for_batch(1):
        raise RuntimeError("a failing forward")
    assert torch.get_num_threads() == 2


def _threads_seen(forward, images: torch.Tensor) -> set[int]:
    """The intra-op thread counts every module's forward saw during one call of ``forward`` on ``images``."""
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: seen.add(torch.get_num_threads()))
    try:
        forward(images)
    finally:
        hook.remove()
    return seen


def test_the_runners_forwards_of_a_few_images_run_on_one_thread(tiny_network, two_threads):
    checkpoint = Checkpoint(network=tiny_network.eval())
    runtime = SharedRuntime.from_model(checkpoint, {"task0": 3, "task1": 2})
    forwards = {
        "checkpoint (ModelRunner)": ModelRunner(checkpoint).forward("task0", 3),
        "SharedRuntime": lambda x: runtime(x, "task1"),
    }
    cfg = tiny_network.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    for name, forward in forwards.items():
        assert _threads_seen(forward, torch.randn(1, *shape)) == {1}, name
        assert _threads_seen(forward, torch.randn(SMALL_BATCH + 8, *shape)) == {2}, name
        assert torch.get_num_threads() == 2, name
