"""The rows ``dvn predict --json`` prints and ``dvn serve`` answers, built from class probabilities: no torch.

One row per (readable image, task), image by image: ``{"image", "task", "level", "top": [{"class",
"probability"}, ...]}``. ``runtime.predict.classify`` (PyTorch forwards) and the shared-folder engine of
``dvn serve`` (onnxruntime, ``serve/folder_engine.py``) both build their rows here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["prediction_rows", "softmax", "top_classes"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities ``(B, classes)`` of float32 logits, in float32."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def top_classes(probs: np.ndarray, classes: Sequence[str], top: int) -> list[list[dict[str, Any]]]:
    """Per image, the ``top`` most probable classes (fewer when there are fewer), most probable first."""
    k = min(top, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[i], "probability": float(p[i])} for i in ix] for p, ix in zip(probs, order, strict=True)]


def prediction_rows(
    images: Sequence[Any], choices: Mapping[str, int], tops: Mapping[tuple[Any, str], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The rows of every image for every task of ``choices`` (task -> level), image by image."""
    return [
        {"image": str(image), "task": task, "level": level, "top": tops[image, task]}
        for image in images
        for task, level in choices.items()
    ]
