"""What one (task, level) costs, as plain numbers: ``LevelCost``, the precisions a file stores weights at, the
bytes of a weight at each, and ``stored_bytes``, the bytes a shared export stores at a precision. No torch.

Counted from a network by ``core.cost``; read back from a file's metadata by the model files, and from a shared
export's manifest by the torch-free server (``serve/folder_engine.py``), so that all compare a budget with the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import BadConfig

__all__ = ["BYTES_PER_PARAM", "SCALE_SUFFIX", "STORAGE_PRECISIONS", "LevelCost", "check_precision", "stored_bytes"]

STORAGE_PRECISIONS = {"fp32": 4, "fp16": 2, "int8": 1}
"""Precision a deployed file stores its weight blocks at -> bytes per stored weight (docs/design.md §5)."""

BYTES_PER_PARAM = STORAGE_PRECISIONS["fp32"]

SCALE_SUFFIX = ".scale"
"""The float32 per-output-channel scale of int8 tensor ``<name>`` is tensor ``<name>.scale`` (written by
``export.precision``, checked by ``modelfile.shared_weights``)."""


def check_precision(precision: str) -> str:
    """``precision`` when it is one of ``STORAGE_PRECISIONS``; else one line naming the known ones."""
    if precision not in STORAGE_PRECISIONS:
        raise BadConfig(f"unknown precision {precision!r}; known: {', '.join(STORAGE_PRECISIONS)}")
    return precision


def stored_bytes(block_weights: int, block_rows: int, float_params: int, precision: str) -> int:
    """Bytes that ``dvn export --shared --precision`` stores for these parameters (docs/design.md §4).

    Args:
        block_weights: weights of convolution unit blocks, stored at ``precision``.
        block_rows: output channels of those blocks, summed block by block: at int8 each has a float32 scale.
        float_params: everything else (batch-norm scales and shifts, heads), float32 at every precision.
        precision: one of ``STORAGE_PRECISIONS``.
    """
    scales = block_rows if check_precision(precision) == "int8" else 0
    return STORAGE_PRECISIONS[precision] * block_weights + BYTES_PER_PARAM * (scales + float_params)


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
