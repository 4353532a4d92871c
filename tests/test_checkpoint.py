import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dvn_cli.errors import MissingData, WrongFileFormat
from dvn_cli.fsutil import write_atomic
from dvn_cli.modelfile.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from dvn_cli.modelfile.container import read_metadata, write_dvn_file


@pytest.fixture
def saved(tiny_network, tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(tiny_network, path, training={"steps": 7, "val_accuracy": {"task0": [0.1, 0.2, 0.3, 0.4]}})
    return path


def test_round_trip_is_bit_exact(tiny_network, saved):
    loaded = load_checkpoint(saved)
    net = loaded.network
    assert net.layout.orders == tiny_network.layout.orders
    assert net.config == tiny_network.config and net.tasks == tiny_network.tasks
    assert net.order_rule == "nearest"
    assert loaded.training == {"steps": 7, "val_accuracy": {"task0": [0.1, 0.2, 0.3, 0.4]}}
    original = tiny_network.state_dict()
    restored = net.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]) and tensor.dtype == restored[name].dtype, name


def test_checkpoint_holds_orders_and_metadata(saved):
    meta = read_metadata(saved)
    assert meta["format"] == CHECKPOINT_FORMAT and meta["version"] == 1
    assert meta["units"] == 4 and meta["order_rule"] == "nearest"
    assert [t["name"] for t in meta["tasks"]] == ["task0", "task1"]
    assert meta["tasks"][1]["classes"] == ["cat", "dog", "fox"]
    assert meta["backbone"]["widths"] == [8, 16, 32]


def test_write_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    write_atomic(target, b"good")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(WrongFileFormat, match="is not a safetensors file or is damaged"):
        load_checkpoint(saved)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WrongFileFormat, match="is not a safetensors file or is damaged"):
        load_checkpoint(path)


def test_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(WrongFileFormat, match="is not a safetensors file"):
        load_checkpoint(path)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(WrongFileFormat, match="is a safetensors file but not a dvn file"):
        load_checkpoint(path)


def test_newer_version_is_refused(tmp_path, saved, monkeypatch):
    import dvn_cli.modelfile.container as ckpt

    path = tmp_path / "future.safetensors"
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", 2)
    write_dvn_file(path, {"w": torch.zeros(1)}, CHECKPOINT_FORMAT, {})
    monkeypatch.undo()
    with pytest.raises(WrongFileFormat, match="format version 2, newer than this dvn reads .1.; upgrade dvn"):
        load_checkpoint(path)


def test_other_dvn_format_and_inconsistent_file_are_refused(tmp_path, saved):
    compact = tmp_path / "c.safetensors"
    write_dvn_file(compact, {"w": torch.zeros(1)}, "dvn-compact", {})
    with pytest.raises(WrongFileFormat, match="is a dvn-compact file; expected dvn-checkpoint"):
        load_checkpoint(compact)
    meta = read_metadata(saved)
    meta["backbone"]["widths"] = [16, 32, 64]
    lying = tmp_path / "lying.safetensors"
    tensors = dict(load_checkpoint(saved).network.state_dict())
    tensors |= {"orders.task0": torch.arange(4), "orders.task1": torch.arange(4)}
    save_file(tensors, str(lying), metadata={"dvn": json.dumps(meta)})
    with pytest.raises(WrongFileFormat, match="does not match its own metadata"):
        load_checkpoint(lying)


def test_missing_file(tmp_path):
    with pytest.raises(MissingData, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_an_opened_checkpoint_reads_its_weights_on_first_use_and_refuses_a_changed_file(tiny_network, saved):
    """``open_model`` reads a checkpoint's header and checks its tensors but holds none of them until
    ``network`` is used; a file replaced in between by another network's is refused, not run half and half."""
    from dvn_cli.core.network import build_network
    from dvn_cli.modelfile.registry import open_model

    from .conftest import tiny_config, tiny_tasks

    model = open_model(saved)
    assert not model.weights_loaded and model.pairs() == [(t, lv) for t in ("task0", "task1") for lv in (1, 2, 3, 4)]
    assert model.cost_of("task1", 2) == load_checkpoint(saved).cost_of("task1", 2)
    torch.testing.assert_close(model.network.state_dict(), tiny_network.state_dict())
    later = open_model(saved)
    save_checkpoint(build_network(tiny_config(widths=(8, 16, 16)), tiny_tasks(2)), saved)
    with pytest.raises(WrongFileFormat, match="changed since it was opened"):
        later.plain_of("task0", 1)
