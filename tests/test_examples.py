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


def test_accurate_recipe_is_the_measured_one():
    """The accurate recipe is what docs/results.md §3 measured: the main job with `--depth 14 --batch-size 128
    --epochs 2.2`, and nothing else changed but its run folder."""
    import dataclasses

    from dvn_cli.training.train_config import load_train_config

    fast = load_train_config(EXAMPLES / "mnist_fashion.toml", {}, {})
    accurate = load_train_config(EXAMPLES / "mnist_fashion_accurate.toml", {}, {})
    measured = dataclasses.replace(
        fast,
        backbone=dataclasses.replace(fast.backbone, depth=14),
        batch_size=128,
        epochs=2.2,
        out=accurate.out,
    )
    assert accurate == measured
    assert accurate.out != fast.out
