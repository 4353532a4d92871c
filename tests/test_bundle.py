"""Bundles: several (task, level)s in one file, shared unit blocks stored once, each runnable as a plain network."""

from __future__ import annotations

import gc

import pytest
import torch

from dvn_cli.core.cost import level_cost
from dvn_cli.core.plain import PlainNetwork
from dvn_cli.errors import BadConfig, UnknownTask, WrongFileFormat
from dvn_cli.modelfile.bundle import BUNDLE_FORMAT, RUNNING_KEYS, load_bundle, save_bundle, stored_params
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.container import read_metadata
from dvn_cli.modelfile.registry import open_model
from dvn_cli.planning.plan import shared_memory_params
from dvn_cli.runtime.predict import predict_under_budgets
from dvn_cli.runtime.runner import ModelRunner
from dvn_cli.runtime.shared import SharedRuntime

from .conftest import make_image_folder, settle_batch_norm

# scrambled orders: task0 [0, 2, 1, 3], task1 [3, 1, 0, 2], task2 [1, 3, 2, 0]
CHOICE_SETS = {
    "single": {"task1": 2},
    "disjoint": {"task0": 2, "task1": 2},  # {0, 2} and {1, 3}
    "overlapping": {"task0": 3, "task1": 2, "task2": 1},  # {0, 1, 2}, {1, 3}, {1}
    "top": {"task0": 4, "task1": 4, "task2": 4},
}


@pytest.fixture
def settled(scrambled_network):
    return settle_batch_norm(scrambled_network)


@pytest.mark.parametrize("case", list(CHOICE_SETS))
def test_bundle_runs_each_choice_like_the_network(settled, tmp_path, case):
    choices = CHOICE_SETS[case]
    path = save_bundle(settled, choices, tmp_path / "b.safetensors", source_sha256="abc")
    bundle = load_bundle(path)
    assert bundle.choices == choices
    assert set(bundle.task_specs) == set(choices)
    assert bundle.source_sha256 == "abc"
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for task, level in choices.items():
            plain = bundle.plain(task)
            assert isinstance(plain, PlainNetwork) and not plain.training
            assert bundle.costs[task] == level_cost(settled, task, level)
            torch.testing.assert_close(plain(x), settled(x, task, level), atol=1e-5, rtol=1e-5)

    params = stored_params(bundle)
    assert params == shared_memory_params(settled, choices)
    running = sum(
        t.numel() * t.element_size() for k, t in bundle.tensors.items() if k.rsplit(".", 1)[-1] in RUNNING_KEYS
    )
    size = path.stat().st_size
    assert 4 * params + running <= size <= 4 * params + running + 64 * 1024
    assert read_metadata(path)["format"] == BUNDLE_FORMAT


def test_bundle_forward_runs_all_tasks_from_one_shared_runtime(settled, tmp_path):
    """The default run path (what eval and predict use) shares: one runtime for every task, held blocks = union."""
    choices = CHOICE_SETS["overlapping"]
    bundle = load_bundle(save_bundle(settled, choices, tmp_path / "b.safetensors"))
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    runner = ModelRunner(bundle)
    forwards = {task: runner.forward(task, level) for task, level in choices.items()}
    runtime = runner.runtime
    assert runtime is not None and runtime.choices == choices
    assert runtime.held_params() == shared_memory_params(settled, choices)
    for task, level in choices.items():
        assert not isinstance(forwards[task], torch.nn.Module)
        torch.testing.assert_close(forwards[task](x), settled(x, task, level), atol=1e-5, rtol=1e-5)
    assert runner.runtime is runtime  # made once
    with pytest.raises(UnknownTask, match="holds only"):
        runner.forward("task0", 4)


def test_shared_blocks_are_stored_once(settled, tmp_path):
    choices = CHOICE_SETS["overlapping"]
    separate = sum(level_cost(settled, t, lv).params_total for t, lv in choices.items())
    bundle = load_bundle(save_bundle(settled, choices, tmp_path / "b.safetensors"))
    assert stored_params(bundle) < separate
    # task2's only unit 1 is inside both other tasks' units: its conv blocks add nothing
    without = load_bundle(save_bundle(settled, {"task0": 3, "task1": 2}, tmp_path / "c.safetensors"))
    extras = level_cost(settled, "task2", 1).params_total - sum(
        t.numel()
        for k, t in load_bundle(save_bundle(settled, {"task2": 1}, tmp_path / "d.safetensors")).tensors.items()
        if k.startswith("features.") and ".weight." in k
    )
    assert stored_params(bundle) == stored_params(without) + extras


def test_single_choice_stores_its_level_cost(tiny_network, tmp_path):
    network = settle_batch_norm(tiny_network)
    for task, level in [("task0", 1), ("task1", 3), (0, 4)]:
        bundle = load_bundle(save_bundle(network, {task: level}, tmp_path / "one.safetensors"))
        assert stored_params(bundle) == level_cost(network, task, level).params_total
        name = network.task_names[network.task_index(task)]
        x = torch.randn(3, 3, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(bundle.plain(name)(x), network(x, task, level), atol=1e-5, rtol=1e-5)


def _float_storages() -> dict[int, int]:
    """Storage address -> bytes of every live floating-point CPU tensor (every tensor object is gc-tracked)."""
    found = {}
    for obj in gc.get_objects():
        # real tensors only: fake ones left by an earlier test's torch.export hold no storage to point at
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu" and obj.is_floating_point():
            found[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return found


def _stray_bytes(before: dict[int, int], *held: torch.Tensor) -> int:
    """Bytes of floating-point storages made since ``before`` that are none of ``held``'s storages."""
    kept = {t.untyped_storage().data_ptr() for t in held}
    return sum(n for ptr, n in _float_storages().items() if ptr not in before and ptr not in kept)


def test_a_bundle_run_as_eval_and_predict_run_it_holds_each_block_once(settled, tmp_path):
    """Issue 20 part 2: the loaded bundle keeps none of its tensors; the runtime its forwards make holds the union
    of the blocks (parameter count), and no other floating-point storage is left alive (storage identity)."""
    choices = CHOICE_SETS["overlapping"]
    path = save_bundle(settled, choices, tmp_path / "b.safetensors")
    x = torch.randn(2, 3, 12, 12)
    before = _float_storages()
    bundle = load_bundle(path)
    runner = ModelRunner(bundle)
    forwards = runner.forwards(choices)
    logits = [forwards[task](x) for task in choices]
    runtime = runner.runtime
    assert runtime.held_params() == stored_params(bundle) == shared_memory_params(settled, choices)
    assert _stray_bytes(before, x, *logits, *runtime.held_tensors()) == 0
    assert bundle.tensors["head.task0.weight"] is not bundle.tensors["head.task0.weight"]  # read, not kept


def test_a_checkpoint_run_at_once_holds_its_network_only(settled, tmp_path):
    """predict's path on a checkpoint (several tasks at once) runs its virtual networks: no runtime copies the
    blocks the loaded network already holds."""
    checkpoint = load_checkpoint(save_checkpoint(settled, tmp_path / "model.safetensors"))
    choices = CHOICE_SETS["overlapping"]
    x = torch.randn(2, 3, 12, 12)
    before = _float_storages()
    forwards = ModelRunner(checkpoint).forwards(choices)
    with torch.no_grad():
        logits = [forwards[task](x) for task in choices]
    assert _stray_bytes(before, x, *logits) == 0
    for task, level in choices.items():
        torch.testing.assert_close(forwards[task](x), settled(x, task, level), atol=1e-5, rtol=1e-5)


def test_a_checkpoint_run_under_budgets_holds_each_block_once(settled, tmp_path, monkeypatch):
    """Issue 20 part 2: ``dvn predict --budgets`` (and ``dvn serve``) on a checkpoint run ONE runtime read from the
    file; the checkpoint they opened never reads its weights, so at every switch the runtime's blocks are the only
    floating-point storage alive (storage identity) and they count the plan's union (parameter count)."""
    accuracy = {f"task{t}": [0.5, 0.6, 0.7, 0.8] for t in range(3)}
    path = save_checkpoint(settled, tmp_path / "model.safetensors", training={"val_accuracy": accuracy})
    make_image_folder(tmp_path / "images", classes=("a",), per_class=2, size=12)
    made, seen = [], []
    init = SharedRuntime.__init__

    def counted_init(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    def at_switch(switch):
        (runtime,) = made
        seen.append((runtime.held_params(), shared_memory_params(settled, switch["choices"])))
        seen.append((_stray_bytes(before, *runtime.held_tensors()), 0))

    monkeypatch.setattr(SharedRuntime, "__init__", counted_init)
    before = _float_storages()
    model = open_model(path)
    result = predict_under_budgets(model, [tmp_path / "images"], ["100%", "40%"], on_switch=at_switch)
    assert not model.weights_loaded
    assert len(seen) == 4 and all(got == expected for got, expected in seen), seen
    assert [s["choices"] for s in result.switches][0] == {"task0": 4, "task1": 4, "task2": 4}
    assert model.network is not None and model.weights_loaded  # the weights are there when a path needs them


def test_load_bundle_refuses_a_checkpoint(tiny_network, tmp_path):
    path = save_checkpoint(tiny_network, tmp_path / "ckpt.safetensors")
    with pytest.raises(WrongFileFormat, match="dvn-checkpoint file; expected dvn-bundle") as info:
        load_bundle(path)
    assert "\n" not in str(info.value)


def test_load_bundle_refuses_missing_tensors(settled, tmp_path):
    from dvn_cli.modelfile.bundle import bundle_tensors
    from dvn_cli.modelfile.container import write_dvn_file

    good = save_bundle(settled, {"task0": 2}, tmp_path / "good.safetensors")
    meta = read_metadata(good)
    tensors = bundle_tensors(settled, {"task0": 2})
    tensors.pop("head.task0.bias")
    bad = write_dvn_file(tmp_path / "bad.safetensors", tensors, BUNDLE_FORMAT, meta)
    with pytest.raises(WrongFileFormat, match="does not match its own metadata") as info:
        load_bundle(bad)
    assert "\n" not in str(info.value)


def test_unknown_task_lists_the_bundle_tasks(settled, tmp_path):
    bundle = load_bundle(save_bundle(settled, {"task0": 2, "task2": 1}, tmp_path / "b.safetensors"))
    with pytest.raises(UnknownTask, match="task1.*task0, task2"):
        bundle.plain("task1")


def test_bad_choices_are_refused(settled, tmp_path):
    with pytest.raises(BadConfig, match="level 5 does not exist: task0 has levels 1..4"):
        save_bundle(settled, {"task0": 5}, tmp_path / "b.safetensors")
    with pytest.raises(BadConfig, match="level 0 does not exist"):
        save_bundle(settled, {"task1": 0}, tmp_path / "b.safetensors")
    with pytest.raises(UnknownTask):
        save_bundle(settled, {"nope": 1}, tmp_path / "b.safetensors")
    with pytest.raises(BadConfig, match="more than once"):
        save_bundle(settled, {"task0": 1, 0: 2}, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
