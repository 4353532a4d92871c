"""The command line makes PyTorch's OpenMP threads wait passively, unless the user's environment says otherwise."""

import os
import subprocess
import sys

SHOW = "import dvn_cli.cli.app, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def _policy(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_cli_sets_passive_waiting_before_torch_loads_and_a_given_policy_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE False"  # set before torch loads (libgomp reads it when it loads)
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE False"
