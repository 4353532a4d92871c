"""No native crash: training every level in channels-last, 1 and 3 input channels, batch sizes 1..33.

Each case runs in its own process (tests/scripts/train_levels.py), so a heap corruption or segfault fails that
case (its exit code is asserted) instead of killing the suite. Without the routing in ``core.layers._conv2d``
odd batches abort on AVX-512 CPUs (docs/design.md §2).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "tests" / "scripts" / "train_levels.py"


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", range(1, 34))
def test_training_every_level_never_crashes(channels, batch):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(channels), str(batch)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "ok"
