"""Plans: shared memory counted once per stored weight, and the exhaustive plan equals brute force.

The reference count marks, in a boolean mask shaped like every physical weight, the entries each chosen
(task, level) uses (from ``layout.channel_indices``), ORs the masks and counts, then adds each choice's batch-norm
affine parameters and its sliced head. Hand sizes of ``tiny_network`` are derived in ``test_budgets.py``.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dvn_cli.core.cost import level_cost, stored_params
from dvn_cli.core.layers import LevelBatchNorm2d, UnitConv2d
from dvn_cli.core.network import build_network
from dvn_cli.errors import BadBudget, BadConfig, UnknownTask
from dvn_cli.planning import plan as plan_module
from dvn_cli.planning.budgets import Budget, level_costs, resolve_budget
from dvn_cli.planning.plan import (
    Plan,
    accuracy_from_training,
    plan_budget_params,
    plan_levels,
    separate_params,
    shared_memory_params,
)

from .conftest import all_task_levels, tiny_config, tiny_tasks


def brute_force_memory(network, choices: dict[int, int]) -> int:
    """Union of the weight entries every chosen (task, level) touches, plus each choice's private parts."""
    layout = network.layout
    total = 0
    for module in network.modules():
        if isinstance(module, UnitConv2d):
            used = torch.zeros(module.weight.shape, dtype=torch.bool)
            for t, level in choices.items():
                out_idx = torch.tensor(layout.channel_indices(module.out_channels, t, level))
                in_idx = (
                    torch.tensor(layout.channel_indices(module.in_channels, t, level))
                    if module.split_input
                    else torch.arange(module.in_channels)
                )
                used[out_idx[:, None], in_idx[None, :]] = True
            total += int(used.sum())
        elif isinstance(module, LevelBatchNorm2d):
            for t, level in choices.items():
                norm = module.norm(t, level)
                total += norm.weight.numel() + norm.bias.numel()
    for t, level in choices.items():
        head = network.heads[t]
        in_idx = layout.channel_indices(head.in_features, t, level)
        mask = torch.zeros_like(head.weight, dtype=torch.bool)
        mask[:, in_idx] = True
        total += int(mask.sum()) + head.bias.numel()
    return total


def all_choices(network, tasks, with_left_out=False):
    """Every assignment of one level to each task (level 0: left out)."""
    levels = range(0 if with_left_out else 1, network.units + 1)
    for combo in itertools.product(levels, repeat=len(tasks)):
        yield {t: lv for t, lv in zip(tasks, combo, strict=True) if lv > 0}, combo


def brute_force_table(network, tasks, require_all=True):
    """``(choices, levels, memory)`` of every combination, memory counted by ``brute_force_memory``."""
    return [
        (choices, combo, brute_force_memory(network, choices))
        for choices, combo in all_choices(network, tasks, with_left_out=not require_all)
    ]


def brute_force_plan(network, table, budget, accuracy, weights=None):
    """The best combination of ``table`` by enumeration: max score, then min memory, then smallest levels."""
    names = network.task_names
    weights = weights or {}
    best = None
    for choices, combo, memory in table:
        if memory > budget:
            continue
        score = sum(weights.get(names[t], 1.0) * accuracy[names[t], lv] for t, lv in choices.items())
        key = (-round(score, 9), memory, combo)
        if best is None or key < best[0]:
            best = (key, choices)
    return None if best is None else {names[t]: lv for t, lv in best[1].items()}


def random_accuracy(network, seed):
    rng = random.Random(seed)
    return {(name, lv): round(rng.random(), 4) for name in network.task_names for lv in range(1, network.units + 1)}


def conv_weights(network, t, level):
    """Conv weights of (task, level): its ``params`` less its head weight."""
    out_features, in_features = network.heads[t].active_shape(t, level)
    return level_cost(network, t, level).params - out_features * in_features


def test_single_choice_is_params_total(tiny_network, scrambled_network):
    for network in (tiny_network, scrambled_network):
        for t, level in all_task_levels(network):
            expected = level_cost(network, t, level).params_total
            assert shared_memory_params(network, {t: level}) == expected
            assert shared_memory_params(network, {network.task_names[t]: level}) == expected
            assert separate_params(network, {t: level}) == expected


def test_disjoint_units_add_up(tiny_network):
    # orders [0,1,2,3] and [3,2,1,0]: levels 1 and 2 use disjoint units
    for l0, l1 in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        choices = {"task0": l0, "task1": l1}
        expected = level_cost(tiny_network, 0, l0).params_total + level_cost(tiny_network, 1, l1).params_total
        assert shared_memory_params(tiny_network, choices) == expected == separate_params(tiny_network, choices)


def test_overlap_counts_unit_pair_blocks_not_the_union_square(tiny_network):
    # task0 level 3 {0,1,2}, task1 level 3 {3,2,1}: 9 + 9 - 4 = 14 unit-pair blocks of 1192 weights summed over the
    # split layers (not 16 = |U x U|), all 4 stem output units (54 each), plus BN and heads of each choice.
    extras0 = 84 * 3 + 10 * 24 + 10
    extras1 = 84 * 3 + 3 * 24 + 3
    expected = 54 * 4 + 1192 * 14 + extras0 + extras1
    assert expected == 17733
    assert shared_memory_params(tiny_network, {"task0": 3, "task1": 3}) == expected
    assert separate_params(tiny_network, {"task0": 3, "task1": 3}) == 11392 + 11217


def test_nested_units_store_the_bigger_ones_weights_once():
    torch.manual_seed(0)
    network = build_network(tiny_config(), tiny_tasks(2), "table", [[0, 1, 2, 3], [1, 0, 2, 3]])
    # task0 level 1 uses unit {0}, inside task1 level 2's {1, 0}
    small, big = level_cost(network, 0, 1), level_cost(network, 1, 2)
    expected = big.params_total + small.params_total - conv_weights(network, 0, 1)
    assert shared_memory_params(network, {0: 1, 1: 2}) == expected
    assert shared_memory_params(network, {0: 1, 1: 2}) == brute_force_memory(network, {0: 1, 1: 2})


def test_every_top_level_stores_every_physical_weight_once(tiny_network, scrambled_network):
    for network in (tiny_network, scrambled_network):
        k = network.units
        conv = sum(m.weight.numel() for m in network.modules() if isinstance(m, UnitConv2d))
        heads = sum(p.numel() for head in network.heads for p in head.parameters())
        norms = [m for m in network.modules() if isinstance(m, LevelBatchNorm2d)]
        top_bn = sum(p.numel() for m in norms for t in range(len(network.tasks)) for p in m.norm(t, k).parameters())
        everything = dict.fromkeys(range(len(network.tasks)), k)
        assert shared_memory_params(network, everything) == conv + heads + top_bn
        all_bn = sum(p.numel() for m in norms for p in m.parameters())
        assert conv + heads + all_bn == stored_params(network)


def test_shared_memory_equals_brute_force_on_every_combination(tiny_network, scrambled_network):
    for network in (tiny_network, scrambled_network):
        tasks = list(range(len(network.tasks)))
        for subset_size in range(1, len(tasks) + 1):
            for subset in itertools.combinations(tasks, subset_size):
                for choices, _ in all_choices(network, list(subset)):
                    assert shared_memory_params(network, choices) == brute_force_memory(network, choices), choices


def test_shared_memory_refuses_bad_choices(tiny_network):
    with pytest.raises(BadConfig, match=r"^level 5 does not exist: task0 has levels 1..4$"):
        shared_memory_params(tiny_network, {"task0": 5})
    with pytest.raises(BadConfig, match=r"task\(s\) listed more than once: task0"):
        shared_memory_params(tiny_network, {"task0": 1, 0: 2})
    with pytest.raises(UnknownTask):
        shared_memory_params(tiny_network, {"nope": 1})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_equals_brute_force(scrambled_network, seed):
    network = scrambled_network
    tasks = network.task_names
    accuracy = random_accuracy(network, seed)
    smallest = shared_memory_params(network, dict.fromkeys(tasks, 1))
    largest = shared_memory_params(network, dict.fromkeys(tasks, 4))
    table = brute_force_table(network, [0, 1, 2])
    memories = {combo: memory for _, combo, memory in table}
    for budget in [smallest, smallest + 2500, (smallest + largest) // 2, largest - 1, largest]:
        plan = plan_levels(network, budget, tasks, accuracy)
        assert plan.choices == brute_force_plan(network, table, budget, accuracy), budget
        assert plan.memory_params == memories[tuple(plan.choices.values())]
        assert plan.memory_params <= budget
        assert plan.score == pytest.approx(sum(accuracy[n, lv] for n, lv in plan.choices.items()))


@pytest.mark.parametrize("seed", [3, 4])
def test_plan_that_may_leave_tasks_out_equals_brute_force(scrambled_network, seed):
    network = scrambled_network
    accuracy = random_accuracy(network, seed)
    weights = {"task0": 1.0, "task1": 0.5, "task2": 2.0}
    table = brute_force_table(network, [0, 1, 2], require_all=False)
    for budget in [0, 1300, 3000, 6000, 15000]:
        plan = plan_levels(network, budget, network.task_names, accuracy, weights, require_all=False)
        expected = brute_force_plan(network, table, budget, accuracy, weights)
        assert plan.choices == expected, budget
        assert plan.left_out == [n for n in network.task_names if n not in expected]


def test_plan_of_one_task_is_the_resolved_budget(tiny_network):
    accuracy = {(n, lv): lv / 10 for n in tiny_network.task_names for lv in range(1, 5)}
    for total in [c.params_total for c in level_costs(tiny_network, "task1")]:
        for budget in (total - 1, total):
            if budget < 1357:
                continue
            plan = plan_levels(tiny_network, budget, ["task1"], accuracy)
            assert plan.choices == {"task1": resolve_budget(tiny_network, "task1", Budget("params", budget, ""))}


def test_weights_change_the_answer_and_ties_go_to_less_memory(tiny_network):
    accuracy = {(n, lv): 0.4 + lv / 10 for n in tiny_network.task_names for lv in range(1, 5)}
    budget = max(
        shared_memory_params(tiny_network, {"task0": 3, "task1": 1}),
        shared_memory_params(tiny_network, {"task0": 1, "task1": 3}),
    )
    tasks = ["task0", "task1"]
    # (2,2), (3,1) and (1,3) all score 1.2: the smallest memory, (2,2), wins
    even = plan_levels(tiny_network, budget, tasks, accuracy)
    assert even.choices == {"task0": 2, "task1": 2}
    assert even.memory_params < shared_memory_params(tiny_network, {"task0": 3, "task1": 1})
    assert plan_levels(tiny_network, budget, tasks, accuracy, {"task0": 2.0}).choices == {"task0": 3, "task1": 1}
    assert plan_levels(tiny_network, budget, tasks, accuracy, {"task1": 2.0}).choices == {"task0": 1, "task1": 3}


def test_plan_fields_and_dict(tiny_network):
    accuracy = {(n, lv): 0.4 + lv / 10 for n in tiny_network.task_names for lv in range(1, 5)}
    plan = plan_levels(tiny_network, 17733, ["task1", "task0"], accuracy)
    assert plan == Plan(
        choices={"task1": 3, "task0": 3},
        memory_params=17733,
        separate_params=11392 + 11217,
        score=pytest.approx(1.4),
        accuracy={"task1": pytest.approx(0.7), "task0": pytest.approx(0.7)},
        budget_params=17733,
        units={"task1": [3, 2, 1], "task0": [0, 1, 2]},
        left_out=[],
        memory_bytes=4 * 17733,
        separate_bytes=4 * (11392 + 11217),
    )
    d = plan.to_dict()
    assert d["memory_bytes"] == 4 * 17733
    assert d["separate_bytes"] == 4 * (11392 + 11217)
    assert d["saved_params"] == 11392 + 11217 - 17733
    assert d["choices"] == {"task1": 3, "task0": 3}
    assert d["left_out"] == []


def test_a_plan_writes_null_for_the_limit_it_does_not_have(tiny_network):
    """``dvn plan --json``: a budget in parameters has no byte limit, one in bytes at int8 no parameter limit; each
    absent limit is null, not 0 (a limit of 0 would fit nothing)."""
    import json

    from dvn_cli.planning.plan import plan_limit

    accuracy = random_accuracy(tiny_network, 0)
    names = tiny_network.task_names
    in_params = plan_levels(tiny_network, plan_limit(tiny_network, "20k", names), names, accuracy).to_dict()
    assert in_params["budget_params"] == 20_000 and in_params["budget_bytes"] is None
    int8 = plan_levels(tiny_network, plan_limit(tiny_network, "80kB", names), names, accuracy, precision="int8")
    assert int8.to_dict()["budget_bytes"] == 80_000 and int8.to_dict()["budget_params"] is None
    assert '"budget_params": null' in json.dumps(int8.to_dict())


def test_infeasible_plan_names_the_minimum(tiny_network):
    accuracy = random_accuracy(tiny_network, 0)
    assert shared_memory_params(tiny_network, {"task0": 1, "task1": 1}) == 2777
    assert plan_levels(tiny_network, 2777, tiny_network.task_names, accuracy).choices == {"task0": 1, "task1": 1}
    with pytest.raises(BadBudget) as info:
        plan_levels(tiny_network, 2776, tiny_network.task_names, accuracy)
    assert str(info.value) == (
        "budget of 2.8k parameters fits no plan of task0, task1: "
        "with every task at level 1 they need 2.8k parameters (11.1 kB)"
    )


def test_plan_refuses_bad_input(tiny_network, monkeypatch):
    accuracy = random_accuracy(tiny_network, 0)
    names = tiny_network.task_names
    with pytest.raises(BadConfig, match=r"^a plan needs at least one task$"):
        plan_levels(tiny_network, 10**6, [], accuracy)
    with pytest.raises(BadConfig, match=r"listed more than once: task0"):
        plan_levels(tiny_network, 10**6, ["task0", 0], accuracy)
    missing = {key: acc for key, acc in accuracy.items() if key != ("task1", 3)}
    with pytest.raises(BadConfig, match=r"^no accuracy for task1 at level 3: "):
        plan_levels(tiny_network, 10**6, names, missing)
    with pytest.raises(BadConfig, match=r"not in the plan: task9"):
        plan_levels(tiny_network, 10**6, names, accuracy, {"task9": 1.0})
    with pytest.raises(BadConfig, match=r"weight -1.0 of task task0 must be a finite number >= 0"):
        plan_levels(tiny_network, 10**6, names, accuracy, {"task0": -1.0})
    monkeypatch.setattr(plan_module, "MAX_COMBINATIONS", 10)
    with pytest.raises(BadConfig, match=r"^a plan of 2 tasks at 4 levels has 16 combinations, more than the 10 "):
        plan_levels(tiny_network, 10**6, names, accuracy)


def test_plan_budget_params(tiny_network):
    names = tiny_network.task_names
    assert plan_budget_params(tiny_network, "20k", names) == 20_000
    assert plan_budget_params(tiny_network, "1.2345k", names) == 1234
    assert plan_budget_params(tiny_network, "2MB", names) == 500_000
    assert plan_budget_params(tiny_network, "1.5MiB", names) == 393_216
    assert plan_budget_params(tiny_network, "10B", names) == 2
    full = shared_memory_params(tiny_network, {"task0": 4, "task1": 4})
    assert plan_budget_params(tiny_network, "100%", names) == full == 20389
    assert plan_budget_params(tiny_network, "50%", names) == full // 2
    assert plan_budget_params(tiny_network, "33.3%", names) == 333 * full // 1000
    assert plan_budget_params(tiny_network, "100%", ["task0"]) == 19954  # one task: its top level
    with pytest.raises(BadBudget, match=r"^budget '3' is a level, which means nothing for several tasks at once: "):
        plan_budget_params(tiny_network, "3", names)
    with pytest.raises(BadBudget, match=r"^bad budget '3x'"):
        plan_budget_params(tiny_network, "3x", names)


def test_accuracy_from_training():
    training = {"steps": 10, "val_accuracy": {"a": [0.5, 0.75], "b": [0.25, 1.0]}}
    assert accuracy_from_training(training) == {("a", 1): 0.5, ("a", 2): 0.75, ("b", 1): 0.25, ("b", 2): 1.0}
    assert accuracy_from_training({}) == {}
