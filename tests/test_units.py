import pytest
import torch

from dvn_cli.config import BackboneConfig
from dvn_cli.core.units import (
    UnitLayout,
    anchor_units,
    cyclic_orders,
    make_orders,
    nearest_orders,
    register_order_rule,
    table_orders,
    unit_channels,
)
from dvn_cli.errors import BadConfig


def test_nearest_orders_four_tasks_four_units():
    assert nearest_orders(4, 4) == [[0, 1, 2, 3], [1, 0, 2, 3], [2, 1, 3, 0], [3, 2, 1, 0]]


def test_nearest_orders_two_tasks_four_units():
    assert nearest_orders(2, 4) == [[0, 1, 2, 3], [3, 2, 1, 0]]


def test_anchors_round_half_up_and_single_task():
    assert anchor_units(1, 4) == [0]
    assert anchor_units(3, 4) == [0, 2, 3]  # 1.5 rounds up to 2
    assert anchor_units(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("num_tasks,units", [(1, 1), (1, 4), (2, 4), (3, 4), (5, 3), (4, 8), (6, 2)])
@pytest.mark.parametrize("rule", ["nearest", "cyclic"])
def test_every_rule_gives_permutations(rule, num_tasks, units):
    orders = make_orders(rule, num_tasks, units)
    assert len(orders) == num_tasks
    for order in orders:
        assert sorted(order) == list(range(units))


def test_cyclic_orders_start_at_anchor():
    assert cyclic_orders(2, 4) == [[0, 1, 2, 3], [3, 0, 1, 2]]


def test_table_must_be_permutation_with_one_row_per_task():
    assert table_orders([[1, 0], [0, 1]], 2, 2) == [[1, 0], [0, 1]]
    with pytest.raises(BadConfig, match="not a permutation"):
        table_orders([[0, 0, 1, 2]], 1, 4)
    with pytest.raises(BadConfig, match="2 rows for 3 tasks"):
        table_orders([[0, 1], [1, 0]], 3, 2)
    with pytest.raises(BadConfig, match="needs a table"):
        make_orders("table", 1, 4)


def test_unknown_rule_and_duplicate_registration_are_refused():
    with pytest.raises(BadConfig, match="unknown order rule 'spiral'"):
        make_orders("spiral", 2, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_order_rule("nearest", nearest_orders)


def test_unit_channels_and_divisibility():
    assert unit_channels(32, 4, 2) == range(16, 24)
    with pytest.raises(BadConfig, match="channels 30 not divisible by k=4"):
        unit_channels(30, 4, 0)
    with pytest.raises(BadConfig, match="channels 30 not divisible by k=4"):
        BackboneConfig(widths=(16, 30, 64), units=4)


@pytest.mark.parametrize("rule", ["nearest", "cyclic"])
def test_levels_are_nested(rule):
    layout = UnitLayout(make_orders(rule, 3, 4), 4)
    for task in range(3):
        for level in range(1, 4):
            assert set(layout.level_units(task, level)) < set(layout.level_units(task, level + 1))
        assert sorted(layout.level_units(task, 4)) == [0, 1, 2, 3]


def test_nearest_selections_are_slices_and_others_are_indices():
    nearest = UnitLayout(nearest_orders(4, 4), 4)
    for task in range(4):
        for level in range(1, 5):
            assert isinstance(nearest.selection(16, task, level), slice)
    scrambled = UnitLayout([[0, 2, 1, 3]], 4)
    index = scrambled.selection(8, 0, 2)
    assert isinstance(index, torch.Tensor)
    assert index.tolist() == [0, 1, 4, 5]
    assert scrambled.mask(8, 0, 2).tolist() == [1, 1, 0, 0, 1, 1, 0, 0]


def test_layout_refuses_out_of_range_task_and_level():
    layout = UnitLayout(nearest_orders(2, 4), 4)
    with pytest.raises(BadConfig, match="level 5 out of range 1..4"):
        layout.level_units(0, 5)
    with pytest.raises(BadConfig, match="task index 2 out of range"):
        layout.level_units(2, 1)
