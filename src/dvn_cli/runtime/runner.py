"""Running a model file's (task, level)s the way its kind is meant to run (docs/design.md §5).

One dispatcher for ``dvn eval``, ``info`` and ``predict``: a checkpoint runs its virtual networks (no copy of a
weight), a bundle runs every task it holds from ONE ``SharedRuntime`` (it exists to share; the loaded bundle keeps
none of its tensors, so each block is held once, by the runtime), a shared export folder from its one
``SharedOrtRuntime``, a compact model as its plain network. Tasks that run at once (``forwards``) run the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch

from ..core.threads import threads_for_batch
from ..modelfile.base import ModelFile
from ..modelfile.bundle import Bundle
from ..modelfile.checkpoint import Checkpoint
from ..modelfile.shared import SharedExport
from .ort import SharedOrtRuntime
from .shared import SharedRuntime

__all__ = ["Forward", "ModelRunner"]

Forward = Callable[[torch.Tensor], torch.Tensor]
"""A preprocessed batch ``(B, C, H, W)`` in, logits ``(B, classes)`` out."""


class ModelRunner:
    """Forwards of one model file's (task, level)s; a runtime it makes is made once and kept here, not in the file."""

    def __init__(self, model: ModelFile) -> None:
        self.model = model
        self.runtime: SharedRuntime | SharedOrtRuntime | None = None  # a bundle's or a shared export's, made once

    def forward(self, task: str, level: int) -> Forward:
        """A function from a preprocessed batch to logits of (task, level)."""
        model = self.model
        model.check_pair(task, level)
        if isinstance(model, Checkpoint):
            return partial(_run_torch, partial(model.network.eval(), task=task, level=level))
        if isinstance(model, Bundle):
            if not isinstance(self.runtime, SharedRuntime):  # None until the first forward
                self.runtime = SharedRuntime.from_model(model, model.choices)
            return partial(self.runtime, task=task)
        if isinstance(model, SharedExport):
            if not isinstance(self.runtime, SharedOrtRuntime):  # None until the first forward
                self.runtime = SharedOrtRuntime(model.files)  # the folder as already read and checked
            return partial(_run_onnx, self.runtime, task, level)
        return partial(_run_torch, model.plain_of(task, level))

    def forwards(self, choices: Mapping[str, int]) -> dict[str, Forward]:
        """Forwards of tasks that run at once, one level each, holding each block once: a bundle's and a shared
        export's from their one runtime, a checkpoint's from its own network (a runtime made over a loaded
        checkpoint would copy the blocks it already holds)."""
        return {task: self.forward(task, level) for task, level in choices.items()}


def _run_torch(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    with threads_for_batch(x.shape[0]):  # a few images on one intra-op thread (core/threads.py)
        return forward(x)


def _run_onnx(runtime, task: str, level: int, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(runtime.run(task, level, x.detach().cpu().float().numpy()))
