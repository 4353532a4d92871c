"""The gather path must compute what the masked reference path defines, and touch nothing else."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dvn_cli.core.cost import level_cost
from dvn_cli.core.layers import LevelBatchNorm2d, UnitConv2d, UnitLinear
from dvn_cli.errors import BadConfig, UnknownTask

from .conftest import all_task_levels


def _loss_and_grads(network, x, task, level, masked):
    network.zero_grad(set_to_none=True)
    logits = network(x, task, level, masked=masked)
    target = torch.arange(x.shape[0]) % logits.shape[1]
    F.cross_entropy(logits, target).backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in network.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize("fixture", ["tiny_network", "scrambled_network"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gather_equals_masked_outputs_and_gradients(fixture, mode, request):
    network = request.getfixturevalue(fixture)
    x = torch.randn(6, 3, 12, 12)
    for task, level in all_task_levels(network):
        gather_net, masked_net = network, copy.deepcopy(network)
        gather_net.train(mode == "train")
        masked_net.train(mode == "train")
        out_g, grads_g = _loss_and_grads(gather_net, x, task, level, masked=False)
        out_m, grads_m = _loss_and_grads(masked_net, x, task, level, masked=True)
        torch.testing.assert_close(out_g, out_m, atol=1e-5, rtol=1e-5)
        for name in grads_g:
            torch.testing.assert_close(grads_g[name], grads_m[name], atol=1e-5, rtol=1e-4, msg=name)
        for (name, buf_g), buf_m in zip(gather_net.named_buffers(), masked_net.buffers(), strict=True):
            torch.testing.assert_close(buf_g, buf_m, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("fixture", ["tiny_network", "scrambled_network"])
def test_one_task_level_touches_only_its_units_bn_and_head(fixture, request):
    network = request.getfixturevalue(fixture)
    x = torch.randn(4, 3, 12, 12)
    for task, level in all_task_levels(network):
        _, grads = _loss_and_grads(network, x, task, level, masked=False)
        layout = network.layout
        for name, module in network.named_modules():
            if isinstance(module, UnitConv2d):
                g = grads[f"{name}.weight"]
                outside_out = torch.ones(module.out_channels, dtype=torch.bool)
                outside_out[layout.channel_indices(module.out_channels, task, level)] = False
                assert g[outside_out].abs().sum() == 0, name
                if module.split_input:
                    outside_in = torch.ones(module.in_channels, dtype=torch.bool)
                    outside_in[layout.channel_indices(module.in_channels, task, level)] = False
                    assert g[:, outside_in].abs().sum() == 0, name
            elif isinstance(module, LevelBatchNorm2d):
                for t, per_task in enumerate(module.norms):
                    for lv in range(1, len(per_task) + 1):
                        if (t, lv) != (task, level):
                            assert all(
                                grads[f"{name}.norms.{t}.{lv - 1}.{p}"].abs().sum() == 0 for p in ("weight", "bias")
                            ), (name, t, lv)
        for t in range(len(network.tasks)):
            if t != task:
                assert grads[f"heads.{t}.weight"].abs().sum() == 0
                assert grads[f"heads.{t}.bias"].abs().sum() == 0


@pytest.mark.parametrize("fixture", ["tiny_network", "scrambled_network"])
def test_params_equal_weights_the_masked_loss_can_reach(fixture, request):
    network = request.getfixturevalue(fixture)
    network.train()
    x = torch.randn(8, 3, 12, 12)
    for task, level in all_task_levels(network):
        _, grads = _loss_and_grads(network, x, task, level, masked=True)
        reachable = sum(
            int((grads[f"{name}.weight"] != 0).sum())
            for name, m in network.named_modules()
            if isinstance(m, UnitConv2d | UnitLinear)
        )
        assert level_cost(network, task, level).params == reachable


def test_top_level_counts_the_whole_backbone_and_levels_grow(tiny_network):
    for task in range(2):
        conv = sum(m.weight.numel() for m in tiny_network.modules() if isinstance(m, UnitConv2d))
        head = tiny_network.heads[task].weight.numel()
        assert level_cost(tiny_network, task, 4).params == conv + head
        costs = [level_cost(tiny_network, task, lv) for lv in range(1, 5)]
        assert all(a.params < b.params and a.macs < b.macs for a, b in zip(costs, costs[1:], strict=False))
        assert all(c.params_total > c.params and c.bytes == 4 * c.params_total for c in costs)


def test_level_cost_by_hand_for_a_single_layer_stem():
    # stem conv of the tiny network at level 1 of 4: 3 input channels (never split) -> 2 channels, 3x3
    from dvn_cli.core.network import build_network

    from .conftest import tiny_config, tiny_tasks

    net = build_network(tiny_config(depth=8), tiny_tasks(1))
    assert net.features.stem_conv.active_shape(0, 1) == (2, 3)
    assert net.features.stages[2][0].conv1.active_shape(0, 1) == (8, 4)
    assert net.heads[0].active_shape(0, 2) == (10, 16)


def test_forward_refuses_bad_task_level_and_shape(tiny_network):
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(UnknownTask, match="unknown task 'svhn'; this network has: task0, task1"):
        tiny_network(x, "svhn", 1)
    with pytest.raises(BadConfig, match="level 0 out of range 1..4"):
        tiny_network(x, "task0", 0)
    with pytest.raises(BadConfig, match=r"input of shape \(2, 1, 12, 12\)"):
        tiny_network(torch.randn(2, 1, 12, 12), 0, 1)
    assert tiny_network(x, "task1", 2).shape == (2, 3)


def test_unit_linear_starts_and_prints_as_nn_linear():
    # UnitLinear is no nn.Linear subclass (its forward takes task and level), but a seeded head is the same
    from dvn_cli.core.units import UnitLayout

    layout = UnitLayout([[0, 1, 2, 3]], 4)
    torch.manual_seed(7)
    reference = torch.nn.Linear(16, 10)
    torch.manual_seed(7)
    head = UnitLinear(16, 10, layout)
    assert [n for n, _ in head.named_parameters()] == ["weight", "bias"]
    torch.testing.assert_close(head.weight, reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.bias, reference.bias, rtol=0, atol=0)
    assert repr(head) == repr(reference).replace("Linear", "UnitLinear")
    x = torch.randn(3, 16)
    torch.testing.assert_close(head(x, 0, 4), reference(x), rtol=0, atol=0)
