"""The shared weights file's writer (``weights.safetensors`` of a shared export, and of its engine cache); no torch.

Valid safetensors whose JSON header is the index, each tensor where ``tensor_alignment`` says: a tensor of a page or
more on a page boundary, smaller ones packed on 64-byte boundaries into the gaps (``_placements``), gaps filled by
``__pad__.<n>`` uint8 tensors (docs/design.md §5). Read back by ``modelfile.shared_folder``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..fsutil import write_atomic
from .shared_folder import ALIGNMENT, PAD_PREFIX, SMALL_ALIGNMENT, WEIGHTS_FORMAT, tensor_alignment

__all__ = ["write_weights_file"]

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}


def write_weights_file(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], pages: bool = True
) -> dict[str, int]:
    """Write ``tensors`` as safetensors, each where ``tensor_alignment(nbytes, pages)`` says (``_placements``); atomic.

    Returns:
        Tensor name -> its absolute byte offset in the file.
    """
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    offsets = _placements({name: array.nbytes for name, array in arrays.items()}, pages)
    header: dict[str, Any] = {"__metadata__": {"dvn": json.dumps({"format": WEIGHTS_FORMAT, "version": 1})}}
    chunks: list[bytes] = []
    position, pads = 0, 0
    for name in sorted(arrays, key=offsets.__getitem__):  # the index lists the tensors in file order
        array, begin = arrays[name], offsets[name]
        if begin > position:
            header[f"{PAD_PREFIX}{pads}"] = {
                "dtype": "U8",
                "shape": [begin - position],
                "data_offsets": [position, begin],
            }
            chunks.append(bytes(begin - position))
            pads += 1
        header[name] = {
            "dtype": _DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [begin, begin + array.nbytes],
        }
        chunks.append(array.tobytes())
        position = begin + array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # the data starts on a page boundary
    start = 8 + len(text)
    buffer = io.BytesIO()
    buffer.write(len(text).to_bytes(8, "little"))
    buffer.write(text)
    for chunk in chunks:
        buffer.write(chunk)
    buffer.seek(0)
    write_atomic(path, buffer)
    return {name: start + offsets[name] for name in tensors}


def _placements(sizes: Mapping[str, int], pages: bool) -> dict[str, int]:
    """Offset of each tensor from the (page-aligned) start of the data, so that padding stays small.

    With ``pages``, a tensor of a page or more starts on a page boundary, in the order given; each smaller one
    (largest first) goes into the first gap that a page boundary left before a large tensor and that still fits it,
    else at the end, on a ``SMALL_ALIGNMENT`` boundary. A 10-float batch norm then costs 64 bytes, not a page.
    Without ``pages`` (a lower-precision file) every tensor is such a smaller one.
    """
    offsets: dict[str, int] = {}
    gaps: list[list[int]] = []  # [first free byte, page boundary]
    end = 0
    for name, size in sizes.items():
        if tensor_alignment(size, pages) == ALIGNMENT:
            begin = _round_up(end, ALIGNMENT)
            if begin > end:
                gaps.append([end, begin])
            offsets[name], end = begin, begin + size
    for name in sorted((n for n in sizes if n not in offsets), key=lambda n: -sizes[n]):
        gap = next((g for g in gaps if _round_up(g[0], SMALL_ALIGNMENT) + sizes[name] <= g[1]), None)
        begin = _round_up(end if gap is None else gap[0], SMALL_ALIGNMENT)
        offsets[name] = begin
        if gap is None:
            end = begin + sizes[name]
        else:
            gap[0] = begin + sizes[name]
    return offsets


def _round_up(position: int, alignment: int) -> int:
    return position + -position % alignment
