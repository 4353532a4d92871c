"""A plain network extracted from a DVN computes what its virtual network computes, and costs what it says."""

import json

import pytest
import torch
from torch import nn

from dvn_cli.core.cost import count_cost, level_cost
from dvn_cli.core.layers import LevelBatchNorm2d
from dvn_cli.core.plain import extract_plain
from dvn_cli.errors import BadConfig, UnknownTask, WrongFileFormat
from dvn_cli.fsutil import sha256_file
from dvn_cli.modelfile.checkpoint import save_checkpoint
from dvn_cli.modelfile.compact import CompactModel, load_compact, save_compact
from dvn_cli.modelfile.container import write_dvn_file
from dvn_cli.modelfile.registry import open_model
from dvn_cli.modelfile.spec import CompactSpec, compact_spec

from .conftest import all_task_levels, settle_batch_norm


@pytest.fixture(params=["tiny_network", "scrambled_network"])
def settled(request):
    return settle_batch_norm(request.getfixturevalue(request.param))


def test_plain_equals_virtual_at_every_task_and_level(settled):
    x = torch.randn(5, 3, 12, 12)
    norm = settled.features.stem_bn.norm(0, 2)
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))  # the stats are not trivial
    for task, level in all_task_levels(settled):
        plain = extract_plain(settled, task, level)
        assert not plain.training
        with torch.no_grad():
            torch.testing.assert_close(plain(x), settled(x, task, level), atol=1e-5, rtol=0)
        assert not any(isinstance(m, LevelBatchNorm2d) for m in plain.modules())
        for name, tensor in plain.state_dict().items():
            assert tensor.is_contiguous(), name
        widths = [w * level // settled.units for w in settled.config.widths]
        assert plain.config.widths == tuple(widths) and plain.config.units == 1
        assert plain.features.stages[2][0].conv1.weight.shape[:2] == (widths[2], widths[1])


def test_plain_is_a_copy_that_does_not_touch_the_network(tiny_network):
    before = {n: t.clone() for n, t in tiny_network.state_dict().items()}
    plain = extract_plain(tiny_network, "task1", 4)  # top level: the weights are whole, still copied
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    for name, tensor in tiny_network.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert tiny_network.training  # extraction leaves the network's mode alone


def test_plain_counts_equal_level_cost(settled):
    for task, level in all_task_levels(settled):
        plain = extract_plain(settled, task, level)
        cost = level_cost(settled, task, level)
        weights = sum(m.weight.numel() for m in plain.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        assert weights == cost.params
        assert sum(p.numel() for p in plain.parameters()) == cost.params_total  # + BN affine + head bias
        assert count_cost(plain, plain.config) == cost
        spec = compact_spec(settled, task, level)
        assert spec.cost == cost
        assert spec.units == settled.layout.level_units(task, level)


def test_spec_is_json_round_trippable(scrambled_network):
    spec = compact_spec(scrambled_network, "task1", 2, source_sha256="ab" * 32)
    assert spec.task.name == "task1" and spec.task_index == 1 and spec.units == (3, 1) and spec.k == 4
    assert CompactSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_unknown_task_and_level_are_refused(tiny_network):
    with pytest.raises(UnknownTask, match="unknown task 'nope'; this network has: task0, task1"):
        extract_plain(tiny_network, "nope", 1)
    with pytest.raises(BadConfig, match=r"level 5 out of range 1\.\.4"):
        extract_plain(tiny_network, "task0", 5)


@pytest.fixture
def checkpoint_path(tiny_network, tmp_path):
    return save_checkpoint(settle_batch_norm(tiny_network), tmp_path / "model.safetensors")


def test_save_load_round_trip_is_bit_exact(tiny_network, checkpoint_path, tmp_path):
    sha = sha256_file(checkpoint_path)
    plain = extract_plain(tiny_network, "task0", 3)
    spec = compact_spec(tiny_network, "task0", 3, sha)
    path = save_compact(plain, spec, tmp_path / "task0-3.safetensors")
    loaded = load_compact(path)
    assert isinstance(loaded, CompactModel) and loaded.path == path
    plain2, spec2 = loaded  # unpacks like a (plain, spec) pair
    assert spec2 == spec and spec2.source_sha256 == sha
    assert not plain2.training
    original, restored = plain.state_dict(), plain2.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]) and tensor.dtype == restored[name].dtype, name
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(plain2(x), plain(x))
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temporary left behind


def test_compact_file_is_about_four_bytes_per_parameter(tiny_network, tmp_path):
    for level in (1, 4):
        plain = extract_plain(tiny_network, "task0", level)
        spec = compact_spec(tiny_network, "task0", level)
        size = save_compact(plain, spec, tmp_path / f"l{level}.safetensors").stat().st_size
        running = sum(m.running_mean.numel() * 2 for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
        tensor_bytes = 4 * (spec.params_total + running)
        assert tensor_bytes < size < tensor_bytes + 16_384  # headers and metadata: a few kB
        assert size < 1.25 * 4 * spec.params_total + 16_384


def test_load_compact_refuses_other_files(checkpoint_path, tiny_network, tmp_path):
    with pytest.raises(WrongFileFormat, match="is a dvn-checkpoint file; expected dvn-compact"):
        load_compact(checkpoint_path)
    plain = extract_plain(tiny_network, "task0", 2)
    good = compact_spec(tiny_network, "task0", 2).to_dict()
    lying = {**good, "backbone": {**good["backbone"], "widths": [8, 16, 32]}}  # level 4's widths, level 2's tensors
    path = tmp_path / "lying.safetensors"
    write_dvn_file(path, dict(plain.state_dict()), "dvn-compact", {"spec": lying})
    with pytest.raises(WrongFileFormat, match=r"lying\.safetensors does not match its own metadata"):
        load_compact(path)
    write_dvn_file(path, dict(plain.state_dict()), "dvn-compact", {"spec": {**good, "colour": "red"}})
    with pytest.raises(WrongFileFormat, match="does not match its own metadata .unknown CompactSpec field"):
        load_compact(path)
    write_dvn_file(path, dict(plain.state_dict()), "dvn-compact", {})
    with pytest.raises(WrongFileFormat, match="does not match its own metadata"):
        load_compact(path)


def test_load_model_file_takes_either_kind(checkpoint_path, tiny_network, tmp_path):
    path = save_compact(
        extract_plain(tiny_network, "task1", 1), compact_spec(tiny_network, "task1", 1), tmp_path / "c.safetensors"
    )
    assert isinstance(open_model(path), CompactModel)
    assert open_model(checkpoint_path).network.task_names == ["task0", "task1"]
