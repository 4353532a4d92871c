"""Intra-op threads of one inference call: a forward of a few images runs on one thread.

A forward of a few images is dozens of short convolutions. Split over the cores, each one is an OpenMP parallel
region whose barrier costs more than the work it shares out, and with the passive waiting ``dvn`` sets for
training under load (``cli/__init__.py``) every barrier wakes a sleeping thread. On 2 AVX2 cores a batch-1 call of
the main job's network took 1.6-1.7 ms on two threads and 0.9-1.1 ms on one; up to 4 images one thread was faster
at levels 1 and 4, at 8 they tied, from 16 images level 4 gained from two (docs/results.md §2). One thread has no
barrier to wait at, so it also keeps its speed when other work shares the cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["SMALL_BATCH", "threads_for_batch"]

SMALL_BATCH = 8
"""Calls of at most this many images run on one intra-op thread (the crossover measured in docs/results.md §2)."""


@contextlib.contextmanager
def threads_for_batch(batch: int) -> Iterator[None]:
    """Run the block on one intra-op thread when ``batch`` is small, then give the calling thread back its count.

    The count is per calling thread (OpenMP's), so a server thread answering one image leaves others alone.
    """
    before = torch.get_num_threads()
    if batch > SMALL_BATCH or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
