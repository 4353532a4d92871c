"""The affinity order rule: slot sharing, the placement search, the warm-up's measurement, training with it,
its metadata in the checkpoint and in ``dvn info``, resume during and after the warm-up, and bad input."""

import itertools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.config import TrainConfig
from dvn_cli.core.affinity import (
    EXACT_MAX_TASKS,
    best_placement,
    placement_orders,
    placement_score,
    slot_sharing,
)
from dvn_cli.core.network import build_network
from dvn_cli.core.units import make_orders, nearest_orders, register_order_rule
from dvn_cli.errors import BadConfig
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.training.affinity_warmup import AffinityWarmup, shared_parameters
from dvn_cli.training.loop import fit
from dvn_cli.training.loss import multitask_loss, task_losses

from .conftest import StopAt, synthetic_task, tiny_config, tiny_tasks, tiny_train_config

# ------------------------------------------------------------------------------------------- slot sharing


def test_slot_sharing_counts_the_unit_pair_blocks_two_slots_share():
    # T = 3, k = 4: anchors 0, 2, 3; nearest orders 0123, 2130, 3210.
    sharing = slot_sharing(3, 4)
    # |common units|^2 summed over levels 1..4: (0,1): 0+1+4+16; (0,2): 0+0+4+16; (1,2): 0+1+9+16; diagonal 1+4+9+16
    expected = np.array([[30, 21, 20], [21, 30, 26], [20, 26, 30]])
    assert np.array_equal(sharing, expected)


def test_placement_orders_are_the_nearest_orders_of_each_task_s_slot():
    slots = nearest_orders(3, 4)
    assert placement_orders((2, 0, 1), 4) == [slots[2], slots[0], slots[1]]
    assert placement_orders((0, 1, 2), 4) == nearest_orders(3, 4)


# ------------------------------------------------------------------------------------------ placement search


def _brute_force(affinity, units):
    """Every placement scored with plain loops (independent of ``placement_score``): the best score."""
    n = len(affinity)
    sharing = slot_sharing(n, units)
    scores = {
        perm: sum(affinity[i][j] * sharing[perm[i]][perm[j]] for i in range(n) for j in range(i + 1, n))
        for perm in itertools.permutations(range(n))
    }
    return max(scores.values()), scores


def test_the_most_alike_pair_gets_the_slots_that_share_most():
    # Tasks 0 and 2 are alike, far apart in the given order; task 2 is closer to task 1 than task 0 is.
    affinity = np.array([[1.0, 0.1, 0.9], [0.1, 1.0, 0.3], [0.9, 0.3, 1.0]])
    placement = best_placement(affinity, 4)
    assert placement.slots == (2, 0, 1)  # 0 and 2 on slots 1, 2 (share 26); 2 next to 1's slot 0 (21 > 20)
    assert placement.line(["a", "b", "c"]) == ["b", "c", "a"]
    best, _ = _brute_force(affinity, 4)
    assert placement.score == pytest.approx(best)
    assert placement.given_score < placement.score and placement.search == "exhaustive"


@pytest.mark.parametrize("seed", range(5))
def test_exhaustive_search_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (5, 5))
    affinity = (a + a.T) / 2
    placement = best_placement(affinity, 4)
    best, scores = _brute_force(affinity, 4)
    assert placement.score == pytest.approx(best)
    assert scores[placement.slots] == pytest.approx(best)
    assert sorted(placement.slots) == list(range(5))


def test_two_pairs_of_alike_tasks_become_neighbours():
    # T = k = 4 (anchors 0..3): {0, 2} and {1, 3} are alike, interleaved in the given order.
    affinity = np.full((4, 4), -0.2)
    affinity[0, 2] = affinity[2, 0] = affinity[1, 3] = affinity[3, 1] = 0.8
    np.fill_diagonal(affinity, 1.0)
    slots = best_placement(affinity, 4).slots
    assert abs(slots[0] - slots[2]) == 1 and abs(slots[1] - slots[3]) == 1


def test_ties_keep_the_given_order():
    assert best_placement(np.ones((4, 4)), 4).slots == (0, 1, 2, 3)
    # mirror images score the same on symmetric anchors: the given order is kept when it is already best
    affinity = np.array([[1, 0.9, 0.1, 0.0], [0.9, 1, 0.8, 0.1], [0.1, 0.8, 1, 0.9], [0.0, 0.1, 0.9, 1]])
    assert best_placement(affinity, 4).slots == (0, 1, 2, 3)


def test_an_asymmetric_measure_counts_both_directions():
    a = np.array([[1.0, 0.0, 0.8], [0.0, 1.0, 0.2], [0.2, 0.4, 1.0]])
    assert best_placement(a, 4) == best_placement((a + a.T) / 2, 4)


def test_above_eight_tasks_a_swap_search_reaches_a_local_optimum():
    n = EXACT_MAX_TASKS + 2
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (n, n))
    affinity = (a + a.T) / 2
    placement = best_placement(affinity, 4)
    assert placement.search == "swaps"
    assert sorted(placement.slots) == list(range(n))
    assert placement.score >= placement.given_score
    sharing = slot_sharing(n, 4)
    assert placement.score == pytest.approx(placement_score(affinity, sharing, placement.slots))
    for i, j in itertools.combinations(range(n), 2):  # no single swap improves it
        trial = list(placement.slots)
        trial[i], trial[j] = trial[j], trial[i]
        assert placement_score(affinity, sharing, trial) <= placement.score + 1e-9
    # block structure: two groups of alike tasks end up each on one side of the line
    groups = np.array([0, 1] * (n // 2))
    block = np.where(groups[:, None] == groups[None, :], 0.9, -0.5)
    slots = np.array(best_placement(block, 4).slots)
    assert sorted(slots[groups == 0]) in (list(range(n // 2)), list(range(n // 2, n)))


def test_bad_affinity_matrices_are_refused():
    with pytest.raises(BadConfig, match="square"):
        best_placement(np.ones((2, 3)), 4)
    with pytest.raises(BadConfig, match="non-finite"):
        best_placement(np.array([[1.0, np.nan], [np.nan, 1.0]]), 4)


# ------------------------------------------------------------------------------------------------ bad input


def test_affinity_needs_several_tasks_and_is_reserved():
    with pytest.raises(BadConfig, match="with one task use nearest"):
        TrainConfig(tasks=("mnist",), order_rule="affinity")
    with pytest.raises(BadConfig, match="with one task use nearest"):
        make_orders("affinity", 1, 4)
    with pytest.raises(BadConfig, match="affinity_steps must be at least 1, got 0"):
        TrainConfig(order_rule="affinity", affinity_steps=0)
    with pytest.raises(ValueError, match="reserved"):
        register_order_rule("affinity", nearest_orders)
    assert make_orders("affinity", 3, 4) == [[0, 1, 2, 3]] * 3  # the warm-up's shared orders


def test_a_warm_up_as_long_as_training_is_refused(tmp_path):
    cfg = tiny_train_config(tmp_path, order_rule="affinity", affinity_steps=8, epochs=2)  # 8 steps in all
    with pytest.raises(BadConfig, match=r"warm-up \(8 steps\) must end before training does \(8 steps\)"):
        fit(cfg, data=_three_tasks())


def test_cli_refuses_affinity_with_one_task_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--tasks", "mnist", "--order-rule", "affinity", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    assert "with one task use nearest" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ the measurement


def test_per_task_backward_leaves_the_summed_gradient():
    torch.manual_seed(0)
    network = build_network(tiny_config(), tiny_tasks(3), "affinity")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 12, 12, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    total, _ = multitask_loss(network, batches)
    total.backward()
    expected = [p.grad.clone() for p in network.parameters()]
    network.zero_grad(set_to_none=True)
    warmup = AffinityWarmup(5, ["a", "b", "c"])
    warmup.backward(network, task_losses(network, batches), torch.amp.GradScaler("cpu", enabled=False))
    for p, e in zip(network.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    matrix = warmup.matrix
    assert matrix.shape == (3, 3) and warmup.measured == 1
    assert np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1.0)
    assert (np.abs(matrix) <= 1 + 1e-9).all()
    names = {n for n, p in network.named_parameters() if any(p is s for s in shared_parameters(network))}
    assert names and all(n.startswith("features.") and n.endswith("weight") for n in names)
    assert not any("norm" in n or "bn" in n for n in names)


def _three_tasks():
    """``alpha`` and ``alpha2`` share their images and labels; ``beta`` is another task. Given order: alpha,
    beta, alpha2 (the alike ones far apart)."""
    alpha = synthetic_task("alpha", 3, seed=1)
    twin = synthetic_task("alpha2", 3, seed=1)
    return [alpha, synthetic_task("beta", 4, seed=2), twin]


def _affinity_config(tmp_path, **overrides):
    return tiny_train_config(
        tmp_path, tasks=("alpha", "beta", "alpha2"), order_rule="affinity", affinity_steps=6, epochs=4, **overrides
    )


def test_tasks_that_share_data_score_higher_and_become_neighbours(tmp_path):
    result = fit(_affinity_config(tmp_path), data=_three_tasks())
    affinity = result.summary["affinity"]
    m = np.array(affinity["matrix"])
    assert affinity["measured_steps"] == 6 and affinity["tasks"] == ["alpha", "beta", "alpha2"]
    assert m[0, 2] > m[0, 1] and m[0, 2] > m[1, 2]
    assert sorted(affinity["slots"][i] for i in (0, 2)) == [1, 2]  # the slots that share most (T = 3, k = 4)
    assert affinity["search"] == "exhaustive" and affinity["score"] > affinity["given_score"]
    network = load_checkpoint(result.checkpoint).network
    assert network.order_rule == "affinity"
    assert [list(o) for o in network.layout.orders] == placement_orders(affinity["slots"], 4)
    assert affinity["orders"] == {n: list(o) for n, o in zip(network.task_names, network.layout.orders, strict=True)}
    assert result.summary["steps"] == 16  # the warm-up counts in the run's steps


def test_info_shows_the_affinity_matrix_and_the_placement(tmp_path):
    result = fit(_affinity_config(tmp_path), data=_three_tasks())
    runner = CliRunner()
    shown = runner.invoke(app, ["info", "-c", str(result.checkpoint), "--json"])
    assert shown.exit_code == 0, shown.output
    described = json.loads(shown.output)
    stored = load_checkpoint(result.checkpoint).training["affinity"]
    assert described["training"]["affinity"] == stored == json.loads(json.dumps(result.summary["affinity"]))
    text = runner.invoke(app, ["info", "-c", str(result.checkpoint)], env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert "task affinity" in text.output and "placement on the anchors' line (exhaustive search)" in text.output
    assert " - ".join(stored["line"]) in text.output
    assert f"{stored['matrix'][0][2]:.3f}" in text.output


@pytest.mark.parametrize("stop", [3, 4, 6, 9])  # in the warm-up (mid-epoch, epoch end), at its end, after it
def test_resume_during_or_after_the_warm_up_equals_an_uninterrupted_run(tmp_path, stop):
    straight = fit(_affinity_config(tmp_path / "a"), data=_three_tasks())
    with pytest.raises(KeyboardInterrupt):
        fit(_affinity_config(tmp_path / "b"), observer=StopAt(stop), data=_three_tasks())
    saved = load_checkpoint(tmp_path / "b" / "run" / "model.safetensors")
    assert saved.training["affinity"]["measured_steps"] == min(stop, 6)
    assert ("line" in saved.training["affinity"]) == (stop >= 6)
    resumed = fit(_affinity_config(tmp_path / "b"), resume=True, data=_three_tasks())
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.network.layout.orders == b.network.layout.orders
    assert a.training["affinity"] == b.training["affinity"]
    sa, sb = a.network.state_dict(), b.network.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    stem = "features.stem_conv.weight"
    assert not torch.equal(saved.network.state_dict()[stem], sb[stem])  # training went on after the stop


def test_affinity_is_refused_under_torchrun_naming_the_way_out(tmp_path):
    from dvn_cli.training.distributed import DistEnv
    from dvn_cli.training.loop import _new_run
    from dvn_cli.training.run_folder import RunPaths

    cfg = _affinity_config(tmp_path)
    with pytest.raises(BadConfig, match="measures in one process; under torchrun pass --order-rule table"):
        _new_run(cfg, DistEnv(rank=0, world_size=2), torch.device("cpu"), RunPaths(tmp_path), _three_tasks(), None)
