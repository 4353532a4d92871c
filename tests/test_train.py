"""Training: the loss falls, files hold everything, resume equals an uninterrupted run, Ctrl-C loses nothing."""

import math
import re

import pytest
import torch

from dvn_cli.errors import BadConfig, DvnError, MissingData
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.container import read_metadata
from dvn_cli.training.loop import fit
from dvn_cli.training.loss import multitask_loss
from dvn_cli.training.observer import TrainObserver
from dvn_cli.training.schedule import lr_at

from .conftest import StopAt, tiny_train_config, two_synthetic_tasks


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_at(0, 100, 0.1, 10) == pytest.approx(0.01)
    assert lr_at(9, 100, 0.1, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, 0.1, 10) == pytest.approx(0.05)
    assert lr_at(100, 100, 0.1, 10) == pytest.approx(0.0)


def test_multitask_loss_sums_every_task_and_level(tiny_network):
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 0])
    total, per_task = multitask_loss(tiny_network, [(x, y), (x, y % 3)])
    manual = sum(
        torch.nn.functional.cross_entropy(tiny_network(x, t, lv), yt).item()
        for t, yt in enumerate([y, y % 3])
        for lv in range(1, 5)
    )
    assert total.item() == pytest.approx(manual, rel=1e-5)
    assert len(per_task) == 2 and sum(per_task) == pytest.approx(manual, rel=1e-5)
    weighted, _ = multitask_loss(tiny_network, [(x, y), (x, y % 3)], level_weights=[0, 0, 0, 1])
    top_only = sum(
        torch.nn.functional.cross_entropy(tiny_network(x, t, 4), yt).item() for t, yt in enumerate([y, y % 3])
    )
    assert weighted.item() == pytest.approx(top_only, rel=1e-5)
    distilled, _ = multitask_loss(tiny_network, [(x, y), (x, y % 3)], distill=1.0)
    assert distilled.item() > total.item()


def test_training_lowers_the_loss_and_writes_every_file(tmp_path):
    losses = []

    class Record(TrainObserver):
        def on_step(self, info):
            losses.append(sum(info.task_losses.values()))

    result = fit(tiny_train_config(tmp_path, epochs=6), observer=Record(), data=two_synthetic_tasks())
    assert sum(losses[-3:]) < sum(losses[:3])
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {
        "model.safetensors",
        "train_state.safetensors",
        "metrics.jsonl",
        "config.json",
    }
    meta = read_metadata(result.checkpoint)
    assert [t["name"] for t in meta["tasks"]] == ["alpha", "beta"]
    assert meta["tasks"][1]["classes"] == ["c0", "c1", "c2", "c3"]
    assert meta["order_rule"] == "nearest" and meta["units"] == 4
    training = meta["training"]
    assert training["finished"] and training["steps"] == 6 * 4  # 72 train images / 16 = 4 steps per epoch
    assert set(training["val_accuracy"]) == {"alpha", "beta"}
    assert all(len(v) == 4 and all(0 <= a <= 1 for a in v) for v in training["val_accuracy"].values())
    assert training["config"]["batch_size"] == 16
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.network.layout.orders == ((0, 1, 2, 3), (3, 2, 1, 0))


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path):
    straight = fit(tiny_train_config(tmp_path / "a"), data=two_synthetic_tasks())
    with pytest.raises(KeyboardInterrupt) as caught:
        fit(
            tiny_train_config(tmp_path / "b"), observer=StopAt(3), data=two_synthetic_tasks()
        )  # mid-epoch (4 steps per epoch)
    assert caught.value.result.interrupted and caught.value.result.summary["steps"] == 3
    run_b = tmp_path / "b" / "run"
    assert not [p for p in run_b.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(run_b / "model.safetensors").training["steps"] == 3
    resumed = fit(tiny_train_config(tmp_path / "b"), resume=True, data=two_synthetic_tasks())
    a = load_checkpoint(straight.checkpoint).network.state_dict()
    b = load_checkpoint(resumed.checkpoint).network.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_existing_run_needs_resume_or_force_and_resume_needs_a_run(tmp_path):
    fit(tiny_train_config(tmp_path, epochs=1), data=two_synthetic_tasks())
    with pytest.raises(BadConfig, match="already holds a run; pass --resume"):
        fit(tiny_train_config(tmp_path, epochs=1), data=two_synthetic_tasks())
    fit(tiny_train_config(tmp_path, epochs=1), force=True, data=two_synthetic_tasks())
    with pytest.raises(MissingData, match="nothing to resume"):
        fit(tiny_train_config(tmp_path / "other", epochs=1), resume=True, data=two_synthetic_tasks())
    with pytest.raises(BadConfig, match="another configuration"):
        fit(tiny_train_config(tmp_path, epochs=1, lr=0.2), resume=True, data=two_synthetic_tasks())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    fit(tiny_train_config(tmp_path, epochs=1), data=two_synthetic_tasks())
    good = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(DvnError, match="the loss became (nan|inf) at step"):
        fit(tiny_train_config(tmp_path, epochs=1, lr=1e30, warmup_steps=0), force=True, data=two_synthetic_tasks())
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == good
    assert math.isfinite(load_checkpoint(tmp_path / "run" / "model.safetensors").training["steps"])


def test_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(DvnError) as caught:
        fit(tiny_train_config(tmp_path, epochs=1, lr=1e30, warmup_steps=0), data=two_synthetic_tasks())
    message = str(caught.value)
    run = re.escape(str(tmp_path / "run"))
    expected = rf"the loss became (nan|inf) at step [23]; stopped, and no checkpoint was written yet in {run}; "
    assert re.fullmatch(expected + "try a lower --lr", message), message
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / ".lock").exists()
