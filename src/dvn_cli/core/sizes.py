"""What one (task, level) costs, as plain numbers: ``LevelCost``, the precisions a file stores weights at and the
bytes of a weight at each. No torch.

Counted from a network by ``core.cost``; read back from a file's metadata by the model files, and from a shared
export's manifest by the torch-free server (``deploy/serve_folder.py``), so that all compare a budget with the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import BadConfig

__all__ = ["BYTES_PER_PARAM", "STORAGE_PRECISIONS", "LevelCost", "check_precision"]

STORAGE_PRECISIONS = {"fp32": 4, "fp16": 2, "int8": 1}
"""Precision a deployed file stores its weight blocks at -> bytes per stored weight (docs/design.md §5)."""

BYTES_PER_PARAM = STORAGE_PRECISIONS["fp32"]


def check_precision(precision: str) -> str:
    """``precision`` when it is one of ``STORAGE_PRECISIONS``; else one line naming the known ones."""
    if precision not in STORAGE_PRECISIONS:
        raise BadConfig(f"unknown precision {precision!r}; known: {', '.join(STORAGE_PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class LevelCost:
    """Size and compute of one (task, level)."""

    params: int
    params_total: int
    macs: int

    @property
    def bytes(self) -> int:
        return BYTES_PER_PARAM * self.params_total

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "bytes": self.bytes}
