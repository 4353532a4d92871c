"""A CPU step's tasks side by side (``training.task_threads``): the same gradients as one summed backward, added in
task order (so repeatable), the caller's thread count untouched, a failing task waited for, and ``fit`` using it."""

import threading
import time

import pytest
import torch

from dvn_cli import build_network
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.training.loop import fit
from dvn_cli.training.loss import summed, task_loss, task_losses
from dvn_cli.training.task_threads import TaskThreads

from .conftest import tiny_config, tiny_tasks, tiny_train_config, two_synthetic_tasks


@pytest.fixture
def pool():
    threads = TaskThreads.for_cpu_step(num_tasks=3, threads=2)
    yield threads
    threads.close()


def _three_task_step():
    torch.manual_seed(0)
    network = build_network(tiny_config(), tiny_tasks(3)).train()
    batches = [(torch.randn(5, 3, 12, 12), torch.randint(0, 3, (5,))) for _ in range(3)]
    return network, batches


def _grads(network):
    return [None if p.grad is None else p.grad.clone() for p in network.parameters()]


def test_the_pool_has_one_worker_per_task_up_to_the_threads_and_none_where_nothing_runs_side_by_side():
    assert TaskThreads.for_cpu_step(1, 8) is None and TaskThreads.for_cpu_step(4, 1) is None
    for tasks, threads, workers, each in [(2, 2, 2, 1), (3, 2, 2, 1), (2, 8, 2, 4), (3, 8, 3, 2)]:
        pool = TaskThreads.for_cpu_step(tasks, threads)
        assert (pool.workers, pool.threads_each) == (workers, each)
        pool.close()


def test_threaded_gradients_equal_one_summed_backward_and_repeat_bit_for_bit(pool):
    network, batches = _three_task_step()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    summed(task_losses(network, batches, levels=[4, 2, 1])).backward()
    reference = _grads(network)
    runs = []
    for _ in range(2):
        network.load_state_dict(state)
        network.zero_grad(set_to_none=True)
        losses = pool.backward(network, batches, lambda t, x, y: task_loss(network, t, x, y, levels=[4, 2, 1]))
        runs.append(_grads(network))
    assert len(losses) == 3 and all(loss.dim() == 0 and not loss.requires_grad for loss in losses)
    for ref, first, second in zip(reference, *runs, strict=True):
        assert (ref is None) == (first is None) == (second is None)  # another task's head stays untouched
        if ref is not None:
            torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
            assert torch.equal(first, second)
    assert sum(g is None for g in reference) > 0  # the test covers parameters no task used (level 3's norms)


def test_the_callers_thread_count_is_untouched_and_each_worker_runs_on_its_share(pool):
    network, batches = _three_task_step()
    seen = []

    def loss_of(task, images, labels):
        seen.append(torch.get_num_threads())
        return task_loss(network, task, images, labels)

    before = torch.get_num_threads()
    pool.backward(network, batches, loss_of)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


def test_a_failing_task_raises_only_once_every_task_is_done(pool):
    network, batches = _three_task_step()
    finished = threading.Event()

    def loss_of(task, images, labels):
        if task == 0:
            raise RuntimeError("task 0 broke")
        time.sleep(0.3)
        loss = task_loss(network, task, images, labels)
        finished.set()
        return loss

    with pytest.raises(RuntimeError, match="task 0 broke"):
        pool.backward(network, batches, loss_of)
    assert finished.is_set()  # nothing was left running on the network


def _weights(result):
    return load_checkpoint(result.checkpoint).network.state_dict()


def test_fit_on_two_cpu_threads_runs_tasks_side_by_side_repeatably_and_as_one_backward_would(tmp_path, monkeypatch):
    calls = []
    real = TaskThreads.backward

    def counted(self, *args, **kwargs):
        calls.append(self.workers)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TaskThreads, "backward", counted)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _weights(fit(tiny_train_config(tmp_path / "a", epochs=1), data=two_synthetic_tasks()))
        again = _weights(fit(tiny_train_config(tmp_path / "b", epochs=1), data=two_synthetic_tasks()))
        assert calls == [2] * 8  # every step of both runs (4 steps per epoch)
        one_step = _weights(fit(tiny_train_config(tmp_path / "c", epochs=0.25), data=two_synthetic_tasks()))
        fit(tiny_train_config(tmp_path / "d", epochs=1, task_threads=False), data=two_synthetic_tasks())
        assert len(calls) == 9  # --no-task-threads: none
        torch.set_num_threads(1)  # one summed backward on one thread, as each task's thread runs
        summed_step = _weights(fit(tiny_train_config(tmp_path / "e", epochs=0.25), data=two_synthetic_tasks()))
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 9  # one thread: nothing to run side by side
    for name, value in first.items():
        assert torch.equal(value, again[name]), name  # repeatable bit for bit
        # the same step as one summed backward, but for the order of additions
        torch.testing.assert_close(one_step[name], summed_step[name], rtol=1e-5, atol=1e-6, msg=name)
