"""The house matches its ideas: torch-free helpers stay torch-free, one reader serves every model file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dvn_cli.core.plain import extract_plain
from dvn_cli.modelfile.base import ModelFile
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import save_checkpoint
from dvn_cli.modelfile.compact import save_compact
from dvn_cli.modelfile.registry import MODEL_FILES, open_model
from dvn_cli.modelfile.spec import compact_spec


def test_file_helpers_reports_and_data_preparation_do_not_load_torch():
    code = (
        "import sys\n"
        "import dvn_cli, dvn_cli.fsutil, dvn_cli.errors, dvn_cli.config\n"
        "import dvn_cli.data.prepare, dvn_cli.evaluation.report\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
        "from dvn_cli import open_model\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_unknown_public_names_are_attribute_errors():
    import dvn_cli

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dvn_cli.nope  # noqa: B018


def test_open_model_reads_every_kind_through_one_interface(tiny_network, tmp_path):
    checkpoint = save_checkpoint(tiny_network, tmp_path / "model.safetensors")
    plain, spec = extract_plain(tiny_network, "task1", 2), compact_spec(tiny_network, "task1", 2)
    compact = save_compact(plain, spec, tmp_path / "compact.safetensors")
    bundle = save_bundle(tiny_network, {"task0": 3, "task1": 1}, tmp_path / "bundle.safetensors")
    assert set(MODEL_FILES) >= {"dvn-checkpoint", "dvn-compact", "dvn-bundle"}
    expected = {
        checkpoint: [(t, lv) for t in ("task0", "task1") for lv in range(1, 5)],
        compact: [("task1", 2)],
        bundle: [("task0", 3), ("task1", 1)],
    }
    for path, pairs in expected.items():
        model = open_model(path)
        assert isinstance(model, ModelFile) and model.pairs() == pairs
        for task, level in pairs:
            spec = model.spec_of(task, level)
            assert (spec.task.name, spec.level) == (task, level)
            assert model.cost_of(task, level) == spec.cost
            assert model.plain_of(task, level)(torch_zeros()).shape == (1, spec.task.num_classes)
        assert model.describe()["format"] == model.format
    assert open_model(checkpoint, ["dvn-checkpoint"]).format == "dvn-checkpoint"


def torch_zeros():
    import torch

    return torch.zeros(1, 3, 12, 12)
