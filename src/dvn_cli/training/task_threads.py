"""The tasks of one CPU step side by side: each task's forwards and backward in its own thread.

Why: a DVN step is many small convolutions (8 to 128 channels on 4x4 to 14x14 maps). Split over the cores, each
one is a short OpenMP parallel region, and the cores spend much of the step meeting at its barriers: on two AVX2
cores ResNet-14's sandwich step takes 1.37x less time with two threads than with one, not 2x, and under load the
barriers wait for threads the kernel is not running. The tasks of a step are independent until their gradients
are added, so each task runs whole on one core instead: one thread per task, one intra-op thread each, and no
barrier inside the step (docs/results.md §2: 1.34x faster than two intra-op threads on the same step).

Determinism: each task's gradients are computed apart (``torch.autograd.grad``) and added in task order, so a run
repeats bit for bit whatever the threads' timing. It differs from the one-thread path (one summed backward) in
rounding only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch import nn

__all__ = ["TaskThreads"]

TaskLoss = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(task index, images, labels) -> that task's loss``, computed in the task's thread."""


class TaskThreads:
    """A pool of ``workers`` threads, each running one task's step at a time on ``threads_each`` intra-op threads.

    Args:
        workers: threads running tasks at once (at most the number of tasks).
        threads_each: PyTorch intra-op threads of each worker.
    """

    def __init__(self, workers: int, threads_each: int) -> None:
        self.workers, self.threads_each = workers, threads_each
        # OpenMP's thread count is per calling thread: set it once in each worker, the caller's is untouched
        self._pool = ThreadPoolExecutor(
            workers, "dvn-task", initializer=torch.set_num_threads, initargs=(threads_each,)
        )

    @classmethod
    def for_cpu_step(cls, num_tasks: int, threads: int) -> TaskThreads | None:
        """The pool for a step of ``num_tasks`` tasks on ``threads`` CPU threads; None where one task or one
        thread leaves nothing to run side by side."""
        workers = min(num_tasks, threads)
        return cls(workers, threads // workers) if workers >= 2 else None

    def backward(
        self, network: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_of: TaskLoss
    ) -> list[torch.Tensor]:
        """Each task's loss (detached), with the gradients of all tasks added into ``network``'s ``.grad``.

        ``.grad`` must be None or zero beforehand (``zero_grad``). Returns only once every task's thread is done,
        also when one fails or the caller is interrupted, so nothing runs on the network after this returns.
        """
        params = [p for p in network.parameters() if p.requires_grad]

        def one_task(task: int) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
            images, labels = batches[task]
            loss = loss_of(task, images, labels)
            return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

        futures: list[Future] = [self._pool.submit(one_task, t) for t in range(len(batches))]
        try:
            results = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
            wait(futures)
        for i, p in enumerate(params):
            per_task = [task_grads[i] for _, task_grads in results if task_grads[i] is not None]
            if not per_task:
                continue
            total = per_task[0]
            for grad in per_task[1:]:  # in task order: the same sum whatever thread finished first
                total.add_(grad)
            p.grad = total if p.grad is None else p.grad.add_(total)
        return [loss for loss, _ in results]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
