"""A run that stops keeps its progress: Ctrl-C (SIGINT) and SIGTERM end ``dvn train`` with a checkpoint.

A person stops a run with Ctrl-C, a scheduler (Slurm, Kubernetes, systemd) with SIGTERM; both raise
``Interrupted``, a ``KeyboardInterrupt`` that names its signal, so the loop saves the run and the CLI exits with
``128 + signal``. The loop keeps every moment resumable: a step that is cut short before the optimiser updates
the weights is rolled back (its batches are drawn again on ``--resume``), and the update itself, with the
bookkeeping that belongs to it, runs ``deferred``: a signal that arrives then waits for it to finish.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "Interrupted", "StopSignals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
"""What ``signal.signal`` takes and returns: a function, ``SIG_DFL``/``SIG_IGN``, or None (set outside Python)."""


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``signum`` says which (the exit status is ``128 + signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While entered (in the main thread; elsewhere nothing changes), SIGINT and SIGTERM raise ``Interrupted``;
    inside ``deferred()`` they wait until its block ends. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self._previous: dict[int, _Handler] = {}
        self._deferring = False
        self._pending: int | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if not self._deferring:
            raise Interrupted(signum)
        if self._pending is None:
            self._pending = signum

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block to its end; a stop signal that came meanwhile is raised after it."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)
