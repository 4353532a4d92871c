"""The PyTorch engine of ``dvn serve``: a checkpoint or a bundle, every task from ONE block store.

``ModelEngine`` is what ``serve.app.Server`` runs for a model file: a checkpoint or a bundle from one
``SharedRuntime`` (every unit-pair block held once, whatever the number of tasks), or with ``per_pair`` one plain
model per running (task, level) (the benchmark's comparison); another kind (a compact model) runs as
``runtime.runner.ModelRunner`` runs it. Images decode and rows are built as ``dvn predict`` does (``predict.classify``).
A shared export folder is served without PyTorch by ``serve.folder_engine.FolderEngine`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..core.cost import BYTES_PER_PARAM
from ..data.pixels import load_image
from ..modelfile.base import ModelFile
from ..planning.select import shared_levels
from ..runtime.images import ImageSet
from ..runtime.predict import classify, image_inputs
from ..runtime.runner import ModelRunner
from ..runtime.shared import SharedRuntime

__all__ = ["ModelEngine"]


class ModelEngine:
    """The (task, level)s of one model file running in PyTorch, and how they switch (``serve.engine.Engine``).

    Args:
        model: a checkpoint or a bundle (any model file runs).
        per_pair: hold one plain model per running (task, level) instead of the shared block store (benchmarks).
    """

    def __init__(self, model: ModelFile, per_pair: bool = False) -> None:
        self.model, self.per_pair, self.runner = model, per_pair, ModelRunner(model)
        self.tasks = model.task_names()
        self.source = model.unit_source() if model.holds_unit_blocks else None
        self.plans = not per_pair  # per-pair models hold more than a plan counts
        self.specs = {task: model.spec_of(task, model.levels(task)[-1]) for task in self.tasks}
        self.runtime: SharedRuntime | None = None
        self.choices: dict[str, int] = {}
        self._forwards: dict[str, Callable] = {}

    @property
    def shared(self) -> bool:
        return self.runtime is not None

    def plan(self, budget: str | None) -> tuple[dict[str, int], int | None]:
        """The levels a budget picks for every task together (``planning.select.shared_levels``: ``dvn plan``'s
        joint plan for a checkpoint with validation accuracy, else the held levels whose shared blocks fit), and
        the bytes they hold together; every task's largest level without a budget (bytes not counted: None)."""
        if budget is None:
            return {task: self.model.levels(task)[-1] for task in self.tasks}, None
        return shared_levels(self.model, self.tasks, budget)

    def fit(self, budget: int) -> tuple[dict[str, int], int]:
        """The levels for ``budget`` bytes: ``plan`` of that many bytes."""
        choices, planned = self.plan(f"{budget}B")
        assert planned is not None
        return choices, planned

    def switch(self, choices: dict[str, int]) -> None:
        if self.source is not None and not self.per_pair:
            if self.runtime is None:
                self.runtime = SharedRuntime(self.source, choices)
            else:
                self.runtime.set_levels(choices)
        else:
            forwards = {t: self._forwards[t] for t, lv in choices.items() if self.choices.get(t) == lv}
            self._forwards = {t: forwards.get(t) or self.runner.forward(t, lv) for t, lv in choices.items()}
        self.choices = dict(choices)

    def held_bytes(self) -> int:
        """Weights held for the running levels: the block store, else each pair's model."""
        if self.runtime is not None:
            return self.runtime.held_params() * BYTES_PER_PARAM
        return sum(self.model.cost_of(t, lv).bytes for t, lv in self.choices.items())

    def decode(self, sources: Mapping[Any, bytes], on_skipped: Callable[[Any, str], None]) -> ImageSet:
        return ImageSet.decode(sources, *image_inputs(self.specs), load_image, on_skipped)

    def classify(self, images: ImageSet, running: dict[str, int], top: int) -> list[dict[str, Any]]:
        runtime = self.runtime
        if runtime is None:
            forwards = self._forwards
        else:
            forwards = {task: (lambda x, task=task: runtime(x, task)) for task in self.choices}
        return classify(images, self.specs, forwards, running, top)
