"""The shared runtime: co-resident (task, level)s from one store of unit-pair blocks, each held once."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from dvn_cli.core.units import BlockGrid
from dvn_cli.errors import BadBudget, BadConfig, UnknownTask, WrongFileFormat
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import Checkpoint, save_checkpoint
from dvn_cli.modelfile.compact import save_compact
from dvn_cli.modelfile.registry import open_model, open_unit_source
from dvn_cli.modelfile.spec import compact_spec
from dvn_cli.planning.plan import accuracy_from_training, plan_budget_params, plan_levels, shared_memory_params
from dvn_cli.runtime.block_store import CONV_MODES
from dvn_cli.runtime.shared import SharedRuntime

from .conftest import all_task_levels, settle_batch_norm

# scrambled orders: task0 [0, 2, 1, 3], task1 [3, 1, 0, 2], task2 [1, 3, 2, 0]
CHOICE_SETS = [
    {"task0": 1, "task1": 1, "task2": 1},
    {"task0": 2, "task1": 2},  # {0, 2} and {1, 3}: disjoint
    {"task0": 3, "task1": 2, "task2": 1},  # overlapping, non-contiguous
    {"task0": 4, "task1": 4, "task2": 4},
    {"task1": 3},
]
TRAINING = {
    "val_accuracy": {"task0": [0.5, 0.6, 0.7, 0.8], "task1": [0.4, 0.7, 0.75, 0.8], "task2": [0.3, 0.4, 0.5, 0.6]}
}


def batch(seed: int = 7, n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def settled(scrambled_network):
    return settle_batch_norm(scrambled_network)


@pytest.fixture
def checkpoint_file(settled, tmp_path):
    return save_checkpoint(settled, tmp_path / "model.safetensors", training=TRAINING)


def union_blocks(network, choices) -> set:
    """The blocks a plan counts, from the layers' block grids."""
    pairs = network.resolve_pairs(choices.items(), one_level_per_task=True)
    return {
        (name, uo, ui)
        for name, module in network.features.named_modules()
        if isinstance(getattr(module, "grid", None), BlockGrid)
        for t, level in pairs
        for uo, ui in module.grid.blocks(network.layout.level_units(t, level))
    }


def assert_runs_like_the_network(rt, network, x=None):
    x = batch() if x is None else x
    network.eval()
    with torch.no_grad():
        for task, level in rt.choices.items():
            torch.testing.assert_close(rt(x, task), network(x, task, level), atol=1e-5, rtol=1e-5)


def assert_holds_the_union(rt, network):
    choices = rt.choices
    assert rt.held_blocks() == union_blocks(network, choices)
    assert rt.held_params() == shared_memory_params(network, choices)


@pytest.mark.parametrize("conv", CONV_MODES)
def test_every_pair_equals_the_virtual_network(settled, conv):
    source = Checkpoint(network=settled).unit_source()
    x = batch()
    for task, level in all_task_levels(settled):
        rt = SharedRuntime(source, {task: level}, conv=conv)
        with torch.no_grad():
            torch.testing.assert_close(rt(x, task), settled(x, task, level), atol=1e-5, rtol=1e-5)
        assert rt.held_params() == shared_memory_params(settled, {task: level})


def test_contiguous_orders_and_batch_one(tiny_network):
    network = settle_batch_norm(tiny_network)
    rt = SharedRuntime.from_model(Checkpoint(network=network), {"task0": 3, "task1": 2})
    assert_runs_like_the_network(rt, network, batch(n=1))
    assert_holds_the_union(rt, network)


@pytest.mark.parametrize("choices", CHOICE_SETS, ids=str)
def test_co_resident_choices_from_a_file_hold_exactly_the_union(settled, checkpoint_file, choices):
    rt = SharedRuntime.from_model(open_model(checkpoint_file), choices)
    assert rt.source.reader.tensors is None  # read from the file, block by block; the loaded model is not kept
    assert_runs_like_the_network(rt, settled)
    assert_holds_the_union(rt, settled)


def strip_storages(rt) -> dict[int, torch.Tensor]:
    return {s.tensor.untyped_storage().data_ptr(): s.tensor for ss in rt._state.strips.values() for s in ss}


def block_convs(rt, task):
    return [m for m in rt._state.runners[task].modules() if hasattr(m, "pieces")]


@pytest.mark.parametrize("conv", CONV_MODES)
def test_every_weight_is_a_view_of_the_one_store(settled, conv):
    rt = SharedRuntime(Checkpoint(network=settled).unit_source(), {"task0": 3, "task1": 2, "task2": 1}, conv=conv)
    held = strip_storages(rt)
    assert sum(t.numel() for t in held.values()) == rt.held_block_params()  # no strip shares another's memory
    for task in rt.choices:
        convs = block_convs(rt, task)
        assert len(convs) == sum(1 for m in settled.features.modules() if hasattr(m, "grid"))
        for m in convs:
            views = [v for v, _ in m.pieces] + [b for row in m.blocks for b in row]
            assert all(v.untyped_storage().data_ptr() in held for v in views)
        runner = rt._state.runners[task]
        assert not list(runner.parameters()) and not list(runner.buffers())


def test_contiguous_units_run_on_views_without_forming_a_weight(tiny_network):
    network = settle_batch_norm(tiny_network)  # nearest orders: task0 0 1 2 3, task1 3 2 1 0
    for choices in ({"task0": 4, "task1": 2}, {"task0": 2, "task1": 2}, {"task0": 4, "task1": 4}):
        rt = SharedRuntime(Checkpoint(network=network).unit_source(), choices)
        for task in choices:
            for m in block_convs(rt, task):
                assert len(m.pieces) == 1 and m.pieces[0][1] is None  # one view: no copy, no gather
        assert_runs_like_the_network(rt, network)
        assert_holds_the_union(rt, network)
    rt.set_levels({"task0": 3, "task1": 3})  # {0, 1, 2} and {1, 2, 3}: rows 1 and 2 need every input unit
    assert {len(m.pieces) for m in block_convs(rt, "task0")} == {1, 2}  # the stem is one view, others two
    assert_runs_like_the_network(rt, network)
    assert_holds_the_union(rt, network)


def test_switches_read_what_is_missing_and_release_what_is_unused(settled, checkpoint_file):
    rt = SharedRuntime.open(checkpoint_file, {"task0": 2, "task1": 2})

    def strips():
        return {(conv, s.units_out, s.units_in): s.tensor for conv, ss in rt._state.strips.items() for s in ss}

    kept = strips()
    for choices in CHOICE_SETS:
        rt.set_levels(choices)
        assert rt.choices == choices
        assert_runs_like_the_network(rt, settled)
        assert_holds_the_union(rt, settled)
        for key, tensor in strips().items():  # a strip held before and still wanted is the same tensor
            assert key not in kept or kept[key] is tensor
        kept = strips()


def test_set_budget_runs_the_plan(settled, checkpoint_file):
    rt = SharedRuntime.open(checkpoint_file, {"task0": 1, "task1": 1})
    accuracy = accuracy_from_training(TRAINING)
    for budget in ("60%", "20k", "100%", "40kB"):
        plan = rt.set_budget(budget)
        names = ["task0", "task1"]
        expected = plan_levels(settled, plan_budget_params(settled, budget, names), names, accuracy)
        assert plan.choices == expected.choices == rt.choices
        assert rt.held_params() == plan.memory_params <= plan.budget_params
        assert_runs_like_the_network(rt, settled)
    plan = rt.set_budget("100%", tasks=["task2", "task0"])
    assert rt.choices == plan.choices == {"task2": 4, "task0": 4}


def test_a_failed_switch_keeps_serving_the_previous_choice(settled, checkpoint_file):
    rt = SharedRuntime.open(checkpoint_file, {"task0": 3, "task1": 2})
    x = batch()
    before = {task: rt(x, task) for task in rt.choices}
    held = rt.held_blocks()

    def unchanged():
        assert rt.choices == {"task0": 3, "task1": 2} and rt.held_blocks() == held
        for task, logits in before.items():
            torch.testing.assert_close(rt(x, task), logits, atol=0, rtol=0)

    with pytest.raises(BadBudget, match="fits no plan"):
        rt.set_budget("1k")
    unchanged()
    with pytest.raises(BadBudget, match="is a level"):
        rt.set_budget("3")
    unchanged()
    with pytest.raises(UnknownTask, match="unknown task 'nope'"):
        rt.set_levels({"task0": 4, "nope": 1})
    unchanged()
    with pytest.raises(BadConfig, match="level 5 does not exist"):
        rt.set_levels({"task0": 5})
    unchanged()
    with pytest.raises(BadConfig, match="at least one"):
        rt.set_levels({})
    unchanged()
    os.utime(checkpoint_file, ns=(1, 1))  # the file changed under the runtime: its blocks would not match
    with pytest.raises(WrongFileFormat, match="changed since it was opened"):
        rt.set_levels({"task0": 4, "task1": 4})
    unchanged()
    rt.set_levels({"task1": 2})  # everything already held: no read needed
    assert rt.choices == {"task1": 2}


def test_a_damaged_block_is_refused_and_nothing_changes(settled, tmp_path):
    tensors = {name: t.clone() for name, t in settled.state_dict().items()}
    network = type(settled)(settled.config, settled.tasks, settled.layout.orders, "table")
    network.load_state_dict(tensors)
    rt = SharedRuntime(Checkpoint(network=network).unit_source(), {"task0": 1})
    rt.source.reader.tensors = {**rt.source.reader.tensors, "features.stem_conv.weight": torch.zeros(3, 3, 3, 3)}
    with pytest.raises(WrongFileFormat, match="does not match its own metadata"):
        rt.set_levels({"task0": 4})
    assert rt.choices == {"task0": 1}


def test_without_validation_accuracy_set_budget_is_refused(settled, tmp_path):
    path = save_checkpoint(settled, tmp_path / "untrained.safetensors")
    rt = SharedRuntime.open(path, {"task0": 2})
    with pytest.raises(BadConfig, match="no validation accuracy to plan with"):
        rt.set_budget("50%")
    assert rt.choices == {"task0": 2}


def test_a_bundle_runs_its_levels_only(settled, tmp_path):
    choices = {"task0": 3, "task1": 2, "task2": 1}
    path = save_bundle(settled, choices, tmp_path / "b.safetensors")
    rt = SharedRuntime.from_model(open_model(path), choices)
    assert_runs_like_the_network(rt, settled)
    assert rt.held_params() == shared_memory_params(settled, choices)
    rt.set_levels({"task1": 2})  # a subset of its choices
    assert rt.held_params() == shared_memory_params(settled, {"task1": 2})
    assert_runs_like_the_network(rt, settled)
    with pytest.raises(UnknownTask, match=r"holds only task0 level 3, task1 level 2, task2 level 1; task0 level 4"):
        rt.set_levels({"task0": 4})
    with pytest.raises(BadConfig, match="holds fixed levels"):
        rt.set_budget("50%")
    assert rt.choices == {"task1": 2}
    rt.set_levels(choices)
    assert_runs_like_the_network(rt, settled)


def test_a_bundle_in_memory_and_from_its_header(settled, tmp_path):
    choices = {"task0": 2, "task2": 3}
    path = save_bundle(settled, choices, tmp_path / "b.safetensors")
    bundle = open_model(path)
    bundle.path = None  # as if never written: read from its tensors
    for source in (bundle.unit_source(), open_unit_source(path)):
        rt = SharedRuntime(source, choices)
        assert_runs_like_the_network(rt, settled)


def test_a_compact_model_is_not_a_unit_source(settled, tmp_path):
    from dvn_cli.core.plain import extract_plain

    path = save_compact(extract_plain(settled, 0, 2), compact_spec(settled, 0, 2), tmp_path / "c.safetensors")
    with pytest.raises(BadConfig, match="holds plain networks, not shared unit blocks"):
        SharedRuntime.open(path, {"task0": 2})


def test_calls_are_checked(settled):
    rt = SharedRuntime(Checkpoint(network=settled).unit_source(), {"task0": 2})
    with pytest.raises(UnknownTask, match="'task1' is not running; running: task0"):
        rt(batch(), "task1")
    with pytest.raises(BadConfig, match="does not match the network's"):
        rt(torch.zeros(2, 1, 12, 12), "task0")
    with pytest.raises(BadConfig, match="unknown conv mode"):
        SharedRuntime(rt.source, {"task0": 2}, conv="views")
    assert rt(batch(), 0).shape == (5, 10)


@pytest.mark.parametrize("kind", ["checkpoint", "bundle"])
def test_every_held_tensor_owns_exactly_its_memory(settled, checkpoint_file, tmp_path, kind):
    """Nothing held is a view of something larger (a safetensors tensor can be a view of the mapped file)."""
    choices = {"task0": 3, "task1": 2, "task2": 1}
    path = checkpoint_file if kind == "checkpoint" else save_bundle(settled, choices, tmp_path / "b.safetensors")
    rt = SharedRuntime.open(path, choices)
    held = [s.tensor for ss in rt._state.strips.values() for s in ss]
    held += [t for parts in rt._state.private.values() for ts in parts.values() for t in ts]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in held) == 4 * rt.held_params()
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: nothing keeps the file mapped (a tensor viewing the mapping would keep it resident)
        gc.collect()
        assert str(path) not in maps.read_text()


def test_a_third_task_on_held_blocks_adds_only_its_batch_norm_and_head(checkpoint_file, settled, monkeypatch):
    """Issue 12: a co-resident task at a level whose blocks are already held reads and holds no block."""
    from dvn_cli.core.cost import level_cost

    rt = SharedRuntime.open(checkpoint_file, {"task0": 4, "task1": 4})  # every block of every layer
    blocks, params = rt.held_block_params(), rt.held_params()
    read = []
    parts = rt.source.parts
    monkeypatch.setattr(rt.source, "parts", lambda *a, **kw: read.append(result := parts(*a, **kw)) or result)
    rt.set_levels({"task0": 4, "task1": 4, "task2": 3})
    assert [len(p.blocks) for p in read] == [0] and list(read[0].private) == [(2, 3)]
    assert rt.held_block_params() == blocks
    cost = level_cost(settled, "task2", 3)
    out_features, in_features = settled.heads[2].active_shape(2, 3)
    private = cost.params_total - cost.params + out_features * in_features  # batch-norm affine, head bias + weight
    assert rt.held_params() - params == private
    x = batch()
    torch.testing.assert_close(rt(x, "task2"), settled.eval()(x, "task2", 3), atol=1e-5, rtol=1e-5)
