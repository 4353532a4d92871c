"""What format a file holds, told by parsing its structure, never by a byte or two (no torch).

``file_format`` tells safetensors, torch.save's zip archive and a bare pickle apart: a safetensors header length
happens to start with a pickle's first byte. ``read_safetensors_header`` parses a safetensors file's header
without reading its tensors. Nothing is ever unpickled: a pickle is recognised by its opcodes.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import stat
import zipfile
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_SAFETENSORS_HEADER", "SafetensorsHeader", "file_format", "read_safetensors_header"]

MAX_SAFETENSORS_HEADER = 100_000_000
"""The longest JSON header the safetensors library reads; a longer one is not a safetensors file."""
_PICKLE_WINDOW = 1 << 20  # a pickle must reach STOP within this many bytes to be recognised
_PROTO = 0x80  # pickle's PROTO opcode, the first byte of every pickle of protocol 2 or later


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed start of a safetensors file: the JSON header's length and the header (index + ``__metadata__``)."""

    length: int
    index: dict[str, Any]

    def declared_size(self) -> int | None:
        """The file size the header implies (8 + header + the furthest tensor end); None for a damaged index."""
        try:
            ends = [int(e["data_offsets"][1]) for name, e in self.index.items() if name != "__metadata__"]
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        return 8 + self.length + max(ends, default=0)


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader | None:
    """The header of the safetensors file ``path``, or None when it is not one: parsed, not guessed.

    A safetensors file starts with an 8-byte little-endian length ``n`` (at most ``MAX_SAFETENSORS_HEADER`` and
    within the file), then ``n`` bytes of a JSON object. Only a regular file is opened (a FIFO would block).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, size - 8):
                return None
            index = json.loads(f.read(length))
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON
        return None
    return SafetensorsHeader(length, index) if isinstance(index, dict) else None


def file_format(path: str | os.PathLike) -> str | None:
    """What the regular file ``path`` holds, by its structure: ``"safetensors"``, ``"torch-zip"`` (torch.save's
    zip archive, with a ``data.pkl``), ``"pickle"`` (a bare pickle, as torch.save's legacy format), or None.

    Nothing is unpickled: a pickle is recognised by parsing its opcodes (``pickletools``), which runs none.
    """
    if read_safetensors_header(path) is not None:
        return "safetensors"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist()):
                    return "torch-zip"
            return None
        with open(path, "rb") as f:
            head = f.read(_PICKLE_WINDOW)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return "pickle" if _is_pickle(head) else None


def _is_pickle(head: bytes) -> bool:
    """``head`` starts with a whole pickle: a PROTO opcode of protocol 2 to 5, then opcodes up to STOP."""
    if len(head) < 2 or head[0] != _PROTO or not 2 <= head[1] <= 5:
        return False
    try:
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(io.BytesIO(head)))
    except ValueError:  # an unknown opcode, a truncated argument, or no STOP within the window
        return False
