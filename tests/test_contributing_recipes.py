"""The extension recipes of CONTRIBUTING.md run as written: a stale signature there fails here.

Each recipe is the ```python block after a ``<!-- recipe: NAME -->`` line. It runs in a fresh interpreter (the
registries it adds to are process-wide), followed by what a contributor would do next with the new piece.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def recipes() -> dict[str, str]:
    blocks = re.findall(r"<!-- recipe: ([\w-]+) -->\n```python\n(.*?)```", CONTRIBUTING.read_text(), flags=re.S)
    return dict(blocks)


def run_after(recipe: str, check: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "recipe.py"
    script.write_text(recipes()[recipe] + "\n\n# ---- the test's use of it\n" + textwrap.dedent(check))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_every_extension_point_has_a_recipe():
    assert {"backbone", "export-format"} <= set(recipes())


def test_the_backbone_recipe_builds_a_network_whose_plain_twin_matches(tmp_path: Path):
    result = run_after(
        "backbone",
        """
        import torch

        from dvn_cli.config import BackboneConfig, TaskSpec
        from dvn_cli.core.network import build_network
        from dvn_cli.core.plain import extract_plain

        config = BackboneConfig(arch="tiny", widths=(8,), units=4, in_channels=1, input_size=8)
        net = build_network(config, [TaskSpec("a", ("x", "y")), TaskSpec("b", ("p", "q", "r"))]).eval()
        for norm in net.modules():  # statistics and affine parameters that are not the identity
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
                norm.weight.data.uniform_(0.5, 2), norm.bias.data.uniform_(-1, 1)
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            for task in ("a", "b"):
                for level in range(1, 5):
                    torch.testing.assert_close(extract_plain(net, task, level)(x), net(x, task, level))
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


def test_the_export_format_recipe_exports_and_checks_a_model(tmp_path: Path):
    result = run_after(
        "export-format",
        """
        import json

        import torch

        from dvn_cli.config import BackboneConfig, TaskSpec
        from dvn_cli.core.network import build_network
        from dvn_cli.export.pairs import export_models
        from dvn_cli.modelfile.checkpoint import save_checkpoint

        torch.manual_seed(0)
        config = BackboneConfig(depth=8, widths=(8, 16, 32), units=4, in_channels=1, input_size=12)
        net = build_network(config, [TaskSpec("a", ("x", "y"), mean=(0.5,), std=(0.25,))])
        save_checkpoint(net, "model.safetensors")
        export_models("model.safetensors", "out", pairs=[("a", 2)], format="weights")
        manifest = json.load(open("out/manifest.json"))
        (model,) = manifest["models"]
        assert model["file"].endswith(".safetensors"), model
        print("ok", model["format"], model["check_max_abs_diff"])
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[:2] == ["ok", "weights"] and float(words[2]) < 1e-4, result.stdout
