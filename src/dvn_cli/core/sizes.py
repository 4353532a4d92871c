"""What one (task, level) costs, as plain numbers: ``LevelCost`` and the bytes of a float32 weight. No torch.

Counted from a network by ``core.cost``; read back from a file's metadata by the model files, and from a shared
export's manifest by the torch-free server (``deploy/serve_folder.py``), so that all compare a budget with the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["BYTES_PER_PARAM", "LevelCost"]

BYTES_PER_PARAM = 4


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
