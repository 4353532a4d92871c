"""The shared weights file (``weights.safetensors`` of a shared export, and of its engine cache), written and read;
no torch.

Valid safetensors whose JSON header is the index, each tensor where ``tensor_alignment`` says: a tensor of a page or
more on a page boundary, smaller ones packed on 64-byte boundaries into the gaps (``_placements``), gaps filled by
``__pad__.<n>`` uint8 tensors (docs/design.md §5). ``write_weights_file`` writes one.

Read, it is untrusted input (anyone can edit a copy and put its new size and sha256 where it is listed): before any
tensor is used, ``WeightsFile`` checks the file's size and sha256 against the entry that lists it
(``check_listed_file``), validates its index completely and reads every value once. It is held open and each tensor
copied out of it on first use, never memory-mapped: a mapped file truncated or overwritten under the process kills
it with SIGBUS. ``modelfile.shared_folder`` reads the rest of a shared export folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.sizes import SCALE_SUFFIX
from ..errors import MissingData, WrongFileFormat
from ..fileformats import read_safetensors_header
from ..fsutil import sha256_file, unusable_tensor, write_atomic

__all__ = [
    "ALIGNMENT",
    "PAD_PREFIX",
    "SMALL_ALIGNMENT",
    "WEIGHTS_FORMAT",
    "WEIGHTS_NAME",
    "WeightsFile",
    "check_listed_file",
    "read_weights_index",
    "tensor_alignment",
    "write_weights_file",
]

WEIGHTS_NAME = "weights.safetensors"

WEIGHTS_FORMAT = "dvn-shared-weights"

ALIGNMENT = 4096
"""A tensor of the weights file of at least this many bytes starts at a multiple of it (a memory page)."""

SMALL_ALIGNMENT = 64
"""A tensor smaller than a page starts at a multiple of this many bytes (a cache line), packed with others."""

ARRAY_ALIGNMENT = 64
"""Where a tensor read into memory starts (``WeightsFile.read``): onnxruntime's kernels want 64-byte aligned buffers."""

PAD_PREFIX = "__pad__."

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}


def tensor_alignment(nbytes: int, pages: bool = True) -> int:
    """Where a tensor of ``nbytes`` must start in the weights file: a page for a block worth mapping or reading
    in place (``pages``: a float32 file), a cache line for the small ones (batch norms, heads, small blocks) and for
    every tensor of a lower-precision file, packed so they cost no page each."""
    return ALIGNMENT if pages and nbytes >= ALIGNMENT else SMALL_ALIGNMENT


# ------------------------------------------------------------------------------------------------ writing


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


# ------------------------------------------------------------------------------------------------ reading


def read_weights_index(path: str | os.PathLike, pages: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Name -> (dtype, shape, absolute byte offset) of every tensor (padding left out) of a shared weights file;
    ``pages``: tensors of a page or more start on one (formats before ``PACKED_FORMAT_VERSION``).

    Raises:
        WrongFileFormat: not a dvn shared weights file, a damaged header, or an invalid index (see ``_index_of``).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return _index_of(fd, os.fstat(fd).st_size, Path(path), pages)
    finally:
        os.close(fd)


def _index_of(fd: int, size: int, path: Path, pages: bool) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """The index of the open weights file ``fd``, validated completely before any tensor is read.

    The header is untrusted input (anyone can edit it and put the new sha256 into the manifest): every tensor,
    padding included, must be a known dtype whose ``shape`` gives exactly its byte length, and in the order the
    header lists them (the order the writer wrote them) the tensors must tile the data section from its first byte
    to the end of the file, so that none is negative, out of order, overlapping or outside the file; every tensor
    but padding starts, from the start of the file, at a multiple of ``ALIGNMENT`` (a page) when it is at least a
    page long and ``pages``, else of ``SMALL_ALIGNMENT``.
    """
    header, start = _read_header(fd, size, path)
    index, position = {}, 0
    for name, entry in header.items():
        begin, end, dtype, shape = _entry_of(path, name, entry)
        if begin != position:  # out of order, overlapping, or a gap
            raise WrongFileFormat(
                f"{path} has an invalid tensor index ({name} starts at byte {begin} of the data, not at {position} "
                "where the tensor listed before it ends); export again"
            )
        if not name.startswith(PAD_PREFIX):
            alignment = tensor_alignment(end - begin, pages)
            if (start + begin) % alignment:
                raise WrongFileFormat(
                    f"{path} has an invalid tensor index ({name}, {end - begin} bytes, does not start on a "
                    f"{alignment}-byte boundary); export again"
                )
            index[name] = (dtype, shape, start + begin)
        position = end
    if start + position != size:
        raise WrongFileFormat(
            f"{path} has an invalid tensor index (its tensors end at byte {start + position} of {size}); export again"
        )
    return index


def _read_header(fd: int, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header (tensor entries only) of a dvn shared weights file, and where its data section starts."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("a name given twice")
        return dict(pairs)

    try:
        length = int.from_bytes(os.pread(fd, 8, 0), "little")
        if not 2 <= length <= size - 8:
            raise ValueError("header length out of range")
        header = json.loads(os.pread(fd, length, 8), object_pairs_hook=unique)
        meta = json.loads(header.pop("__metadata__", {}).get("dvn", "{}"))
    except (OSError, ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise WrongFileFormat(f"{path} is not a dvn shared weights file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise WrongFileFormat(f"{path} is not a dvn shared weights file (no '{WEIGHTS_FORMAT}' metadata)")
    return header, 8 + length


def _entry_of(path: Path, name: str, entry: Any) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, refusing wrong types and a length its shape contradicts."""
    try:
        dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
        shape, offsets = entry["shape"], entry["data_offsets"]
        numbers = [*shape, *offsets]
        if len(offsets) != 2 or not all(type(n) is int and n >= 0 for n in numbers):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise WrongFileFormat(
            f"{path} has an invalid tensor index ({name}: an unknown dtype, or a shape or offsets that are not "
            "whole numbers >= 0); export again"
        ) from None
    begin, end = offsets
    if end - begin != dtype.itemsize * math.prod(shape):
        raise WrongFileFormat(
            f"{path} has an invalid tensor index ({name}: {end - begin} bytes for a shape of "
            f"{math.prod(shape)} {dtype.name} values); export again"
        )
    return begin, end, dtype, tuple(shape)


def _stamp(fd: int) -> tuple[int, ...]:
    """Identity of an open file's content: inode, size, mtime (not ctime: a rename over the file changes that)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_listed_file(path: Path, entry: Mapping[str, Any], verify: bool, what: str, fd: int | None = None) -> None:
    """Refuse a missing file, one of another size than the manifest says, or (``verify``) another sha256.

    With ``fd`` (the file opened by the caller) the size and sha256 are those of the open file, which a rename
    cannot swap afterwards.
    """
    if fd is None and not path.is_file():
        raise MissingData(f"{what} {path} not found; the manifest lists it")
    size = os.fstat(fd).st_size if fd is not None else path.stat().st_size
    if size != entry.get("bytes"):
        header = read_safetensors_header(path)  # truncated only when the file's own index says it is longer
        cut = "truncated" if header is not None and (header.declared_size() or 0) > size else "changed"
        raise WrongFileFormat(f"{what} {path} is {cut}: {size} bytes, the manifest says {entry.get('bytes')}")
    if verify and sha256_file(path if fd is None else os.dup(fd)) != entry.get("sha256"):  # sha256_file closes the dup
        raise WrongFileFormat(f"{what} {path} has changed since the export (sha256 differs from the manifest)")


class WeightsFile:
    """The checked weights file, held open; each tensor is copied out of it into private memory on first use.

    Not a memory map: a file truncated or overwritten under a mapping kills the process with SIGBUS when a page is
    touched (docs/design.md §5). Reading through the descriptor opened before the sha256 was checked never does: a
    file replaced by rename leaves this descriptor on the checked copy, and a file changed in place changes its
    stamp (or reads short), which is refused in one line. Only the tensors of sessions made are ever read.
    """

    def __init__(self, path: Path, entry: Mapping[str, Any], verify: bool, pages: bool = True) -> None:
        self.path = path
        if not path.is_file():
            raise MissingData(f"weights file {path} not found; the manifest lists it")
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in since is_file would block a read
        weakref.finalize(self, os.close, self.fd)
        self.stamp = _stamp(self.fd)
        check_listed_file(path, entry, verify, "weights file", fd=self.fd)
        self.index = _index_of(self.fd, self.stamp[2], path, pages)
        self._check_values()

    def _check_values(self) -> None:
        """Read every tensor once, one at a time and none kept, refusing non-finite numbers and an int8 block's scale
        that is not > 0, as checkpoints and bundles are refused (``fsutil.unusable_tensor``): such a folder would
        answer NaN or nonsense rather than fail."""
        for name, (dtype, _, _) in self.index.items():
            if dtype.kind != "f":
                continue
            values = self.read(name)
            if not np.isfinite(values).all():
                raise unusable_tensor(self.path, name)
            quantized = name.endswith(SCALE_SUFFIX) and self.index.get(name.removesuffix(SCALE_SUFFIX), (None,))[0]
            if quantized == np.int8 and not (values > 0).all():
                raise unusable_tensor(self.path, name, "an int8 scale that is not > 0")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or its ``rows`` ``begin:end``) as a read-only array of its own (not a view of the file)."""
        dtype, shape, offset = self.index[name]
        if rows is not None:
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            offset, shape = offset + rows[0] * row_bytes, (rows[1] - rows[0], *shape[1:])
        count = dtype.itemsize * math.prod(shape)
        # 64-byte aligned, as onnxruntime's kernels want the buffers they are given (a bytes object's data is not:
        # the same graphs ran at 0.8x on buffers at 16 mod 64, docs/results.md §4)
        buffer = np.empty(count + ARRAY_ALIGNMENT, np.uint8)
        start = -buffer.ctypes.data % ARRAY_ALIGNMENT
        data = buffer[start : start + count]
        got = os.preadv(self.fd, [data.data], offset) if count else 0  # data.data: a memoryview of its bytes
        if got != count or _stamp(self.fd) != self.stamp:
            raise WrongFileFormat(
                f"weights file {self.path} changed while in use (it was written after it was checked); "
                "start again to use the new file"
            )
        array = data.view(dtype).reshape(shape)
        array.flags.writeable = False
        return array
