"""Examples are run, so they stay true."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_two_task_example_runs_and_prints_every_level():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_task_dvn.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "digits: unit order [0, 1, 2, 3]" in out and "clothes: unit order [3, 2, 1, 0]" in out
    assert out.count("level ") == 8
    assert "logits (2, 10)" in out
