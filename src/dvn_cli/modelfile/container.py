"""The dvn file container: safetensors with a JSON ``__metadata__`` entry naming the format and version.

Nothing is pickled. Every kind of dvn file (``modelfile.base.MODEL_FILES``, plus ``dvn-train-state``) is this
container; readers refuse, in one line, files that are not safetensors, carry no dvn metadata, carry metadata
that is not a JSON object with a string format and a whole positive version, are newer than this dvn, or hold
non-finite numbers in floating-point tensors (a model with NaN weights gives no meaningful result).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..errors import MissingData, WrongFileFormat
from ..fsutil import first_line, unusable_tensor, write_atomic

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "read_dvn_file", "read_metadata", "write_dvn_file"]

FORMAT_VERSION = 1
METADATA_KEY = "dvn"


def write_dvn_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], fmt: str, meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` with metadata ``{"format": fmt, "version": ..., **meta}``."""
    header = {"format": fmt, "version": FORMAT_VERSION, **meta}
    payload = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return write_atomic(path, save(payload, metadata={METADATA_KEY: json.dumps(header)}))


def check_regular_file(path: Path) -> None:
    """Refuse a missing path, and a folder, FIFO or device, in one line each."""
    if not path.exists():
        raise MissingData(f"no such file: {path}")
    if not path.is_file():
        raise WrongFileFormat(f"{path} is not a regular file")


def read_metadata(path: str | os.PathLike, formats: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The dvn metadata of ``path`` (header only), refusing anything that is not a dvn file of ``formats``."""
    path = Path(path)
    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises several types for broken headers
        raise WrongFileFormat(f"{path} is not a safetensors file or is damaged ({first_line(exc)})") from None
    if raw is None:
        raise WrongFileFormat(f"{path} is a safetensors file but not a dvn file (it has no dvn metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise WrongFileFormat(f"{path} has damaged dvn metadata (not JSON, or nested too deeply)") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    version = meta.get("version") if isinstance(meta, dict) else None
    if not isinstance(fmt, str) or not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WrongFileFormat(f"{path} has damaged dvn metadata (no format name, or a version that is not 1, 2, ...)")
    if formats is not None and fmt not in formats:
        raise WrongFileFormat(f"{path} is a {fmt} file; expected {' or '.join(formats)}")
    if version > FORMAT_VERSION:
        raise WrongFileFormat(
            f"{path} has {fmt} format version {version}, newer than this dvn reads ({FORMAT_VERSION}); upgrade dvn"
        )
    return meta


def read_dvn_file(path: str | os.PathLike, formats: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a dvn file of one of ``formats``, every floating-point tensor finite."""
    meta = read_metadata(path, formats)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise WrongFileFormat(f"{path} is damaged: its tensors cannot be read ({first_line(exc)})") from None
    for name, tensor in tensors.items():
        check_finite(path, name, tensor)
    return tensors, meta


def check_finite(label: object, name: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point tensor read from a file that holds NaN or infinity: no meaningful result follows."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise unusable_tensor(label, name)
