"""The one worker thread of ``dvn serve``: every forward and every switch, in the order they were asked for.

A batch that has started finishes on the levels it started with, so the levels a response names are the levels that
computed it, and a switch runs after the requests queued before it. Predictions for the same tasks waiting together
run as one batch (up to ``max_batch`` images, ``groups``); a failure fails the requests of its batch only.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..runtime.images import ImageSet
from .engine import Engine

__all__ = ["Predict", "Switch", "Worker", "groups"]


@dataclass
class Predict:
    """Run ``images`` for ``tasks`` (() for every running task); ``done`` gets their rows, ``top`` classes each."""

    tasks: tuple[str, ...]
    images: ImageSet
    top: int
    done: Future = field(default_factory=Future)


@dataclass
class Switch:
    """Run the levels ``choices``; ``done`` gets the switch's time in ms."""

    choices: dict[str, int]
    done: Future = field(default_factory=Future)


Job = Predict | Switch | None  # None: the stop mark


class Worker:
    """The queue of jobs for ``engine`` and the thread that runs them (``switch`` and ``classify`` run only here).

    Args:
        engine: what runs the jobs.
        max_batch: most images run in one batch.
    """

    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.engine, self.max_batch = engine, max_batch
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="dvn-serve-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Run the jobs queued so far, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)

    async def predict(self, tasks: tuple[str, ...], images: ImageSet, top: int) -> list[dict[str, Any]]:
        """The rows of ``images`` for ``tasks`` (every running task: ()), on the levels running when it runs."""
        return await self._submit(Predict(tasks, images, top))

    async def switch(self, choices: dict[str, int]) -> float:
        """Switch to ``choices`` after the jobs queued before; returns the switch's time in ms."""
        return await self._submit(Switch(choices))

    async def _submit(self, job: Predict | Switch) -> Any:
        self._jobs.put(job)
        return await asyncio.wrap_future(job.done)

    def _work(self) -> None:
        """Run jobs in order until the stop mark; predictions for the same tasks waiting together form one batch."""
        while True:
            jobs = [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while jobs[-1] is not None:
                    jobs.append(self._jobs.get_nowait())
            for group in groups(jobs, self.max_batch):
                if group is None:
                    return
                if isinstance(group[0], Switch):
                    _settle(group, self._run_switch)
                else:
                    _settle(group, self._run_predicts)

    def _run_switch(self, jobs: list[Switch]) -> None:
        (job,) = jobs
        start = time.perf_counter()
        self.engine.switch(job.choices)
        job.done.set_result(1000 * (time.perf_counter() - start))

    def _run_predicts(self, jobs: list[Predict]) -> None:
        choices = self.engine.choices
        running = {task: choices[task] for task in jobs[0].tasks or choices}
        top = max(job.top for job in jobs)
        rows = self.engine.classify(ImageSet.join([job.images for job in jobs]), running, top)
        start = 0
        for job in jobs:  # rows come image by image, the jobs' images in order
            end = start + len(job.images.readable) * len(running)
            job.done.set_result([{**row, "top": row["top"][: job.top]} for row in rows[start:end]])
            start = end


def groups(jobs: list[Job], max_batch: int) -> list[list[Any] | None]:
    """Jobs in order as groups: a switch alone, consecutive predictions for the same tasks together up to
    ``max_batch`` images; None (the stop mark) ends the list."""
    found: list[list[Any] | None] = []
    for job in jobs:
        if job is None:
            found.append(None)
            break
        last = found[-1] if found else None
        if (
            isinstance(job, Predict)
            and last
            and isinstance(last[0], Predict)
            and last[0].tasks == job.tasks
            and sum(len(j.images.readable) for j in last) + len(job.images.readable) <= max_batch
        ):
            last.append(job)
        else:
            found.append([job])
    return found


def _settle(jobs: list[Any], run: Callable[[list[Any]], None]) -> None:
    """Run a group; a failure fails each of its requests (the worker keeps going)."""
    try:
        run(jobs)
    except Exception as exc:
        for job in jobs:
            if not job.done.done():
                job.done.set_exception(exc)
