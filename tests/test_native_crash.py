"""No native crash: training every level in channels-last, 1 and 3 input channels, batch sizes 1..33.

Each input width runs its batch sizes in one process of its own (tests/scripts/train_levels.py), so a heap
corruption or segfault fails the test (its exit code is asserted; the last batch named on stderr is the one that
crashed) instead of killing the suite, and torch is imported twice, not 66 times. Without the routing in
``core.layers._conv2d`` odd batches abort on AVX-512 CPUs (docs/design.md §2).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "tests" / "scripts" / "train_levels.py"


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_training_every_level_never_crashes(channels):
    batches = [str(b) for b in range(1, 34)]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(channels), *batches], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "ok"
    assert result.stderr.split() == [word for b in batches for word in ("batch", b)]  # every batch size ran
