"""What ``dvn serve`` runs (an ``Engine``), and how its errors become HTTP answers.

An engine holds the tasks of one model file and the level each runs at: ``model_engine.ModelEngine`` runs a
checkpoint or a bundle in PyTorch, ``folder_engine.FolderEngine`` a shared export folder with onnxruntime and numpy
only. A request the server refuses is a ``RequestError`` with its status; any other ``DvnError`` is answered by
``status_of`` (an unknown task 404, a budget 422, anything else 400), always as one line (``one_line``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import BadBudget, DvnError, UnknownTask
from ..runtime.images import ImageSet

__all__ = ["Engine", "RequestError", "one_line", "status_of"]


class RequestError(DvnError):
    """A request the server refuses with HTTP ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_of(exc: DvnError) -> int:
    """The HTTP status that answers ``exc``."""
    if isinstance(exc, RequestError):
        return exc.status
    return 404 if isinstance(exc, UnknownTask) else 422 if isinstance(exc, BadBudget) else 400


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Engine(Protocol):
    """What the server runs: the tasks, the levels running and how they switch, and the images' rows.

    ``switch`` and ``classify`` run on the server's worker thread only (``jobs.Worker``), one at a time; ``plan``
    and ``decode`` run on other threads and read nothing that ``switch`` changes.
    """

    tasks: list[str]
    choices: dict[str, int]  # task -> the level it runs now
    plans: bool  # whether ``fit`` can choose levels for a number of bytes held (--budget auto)

    @property
    def shared(self) -> bool:
        """Whether each block of the running levels is held once."""
        ...

    def plan(self, budget: str | None) -> tuple[dict[str, int], int | None]:
        """The levels a budget picks for every task together, and the bytes they hold (None: not counted); raises
        ``BadBudget`` for a budget that does not parse, a level, or one nothing fits."""
        ...

    def fit(self, budget: int) -> tuple[dict[str, int], int]:
        """The levels that together hold at most ``budget`` bytes, and the bytes they hold (--budget auto)."""
        ...

    def switch(self, choices: dict[str, int]) -> None: ...

    def held_bytes(self) -> int:
        """Weight bytes held for the running levels."""
        ...

    def decode(self, sources: Mapping[Any, bytes], on_skipped: Callable[[Any, str], None]) -> ImageSet:
        """Each upload (its header already checked) decoded for every running task's input."""
        ...

    def classify(self, images: ImageSet, running: dict[str, int], top: int) -> list[dict[str, Any]]:
        """The rows of ``dvn predict --json`` (``rows.prediction_rows``) of every image for every running task."""
        ...
