"""Level sampling (``--level-sampling``): every level per step, or the sandwich rule, drawn from (seed, step)."""

import pytest
import torch

from dvn_cli.config import TrainConfig
from dvn_cli.core.layers import LevelBatchNorm2d
from dvn_cli.errors import BadConfig
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.training.levels import sample_levels
from dvn_cli.training.loop import fit
from dvn_cli.training.loss import task_losses

from .conftest import StopAt, tiny_train_config, two_synthetic_tasks


def test_all_trains_every_level_top_first():
    assert sample_levels("all", 4, seed=0, step=7) == [4, 3, 2, 1]


def test_sandwich_takes_the_top_the_bottom_and_one_level_between():
    samples = [sample_levels("sandwich", 4, seed=0, step=s) for s in range(40)]
    assert all(s[0] == 4 and s[2] == 1 and s[1] in (2, 3) for s in samples)
    assert {s[1] for s in samples} == {2, 3}  # both middles are drawn
    assert samples == [sample_levels("sandwich", 4, seed=0, step=s) for s in range(40)]  # a function of (seed, step)
    assert samples != [sample_levels("sandwich", 4, seed=1, step=s) for s in range(40)]
    assert sample_levels("sandwich", 3, seed=0, step=0) == [3, 2, 1]  # no level to leave out
    assert sample_levels("sandwich", 8, seed=0, step=0)[1] in range(2, 8)


def test_unknown_level_sampling_is_refused_in_one_line():
    with pytest.raises(BadConfig, match="unknown level sampling 'some'; use all, sandwich"):
        TrainConfig(level_sampling="some")


def test_task_losses_run_only_the_levels_given(tiny_network):
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 0])
    (loss,) = task_losses(tiny_network, [(x, y)], levels=[4, 1])
    manual = sum(torch.nn.functional.cross_entropy(tiny_network(x, 0, lv), y) for lv in (4, 1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_distillation_without_the_top_level_first_is_refused_in_one_line(tiny_network):
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"top level 4; levels \[1, 4\] must start with it"):
        task_losses(tiny_network, [(x, y)], distill=0.5, levels=[1, 4])


def _norms(network, level: int) -> list[torch.nn.BatchNorm2d]:
    return [m.norm(t, level) for m in network.modules() if isinstance(m, LevelBatchNorm2d) for t in range(2)]


def test_a_sandwich_step_leaves_the_level_it_skipped_untouched(tmp_path):
    cfg = tiny_train_config(tmp_path, epochs=0.25, level_sampling="sandwich")  # one step
    skipped = 5 - sample_levels("sandwich", 4, cfg.seed, 0)[1]  # the middle level not drawn at step 0
    network = load_checkpoint(fit(cfg, data=two_synthetic_tasks()).checkpoint).network
    assert all(torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) for bn in _norms(network, skipped))
    for level in {1, 2, 3, 4} - {skipped}:
        assert not any(torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) for bn in _norms(network, level))


def test_resume_of_a_sandwich_run_equals_an_uninterrupted_run(tmp_path):
    straight = fit(tiny_train_config(tmp_path / "a", level_sampling="sandwich"), data=two_synthetic_tasks())
    with pytest.raises(KeyboardInterrupt):
        cfg = tiny_train_config(tmp_path / "b", level_sampling="sandwich")
        fit(cfg, observer=StopAt(3), data=two_synthetic_tasks())
    resumed = fit(tiny_train_config(tmp_path / "b", level_sampling="sandwich"), resume=True, data=two_synthetic_tasks())
    a = load_checkpoint(straight.checkpoint).network.state_dict()
    b = load_checkpoint(resumed.checkpoint).network.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
