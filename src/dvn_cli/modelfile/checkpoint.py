"""dvn files: safetensors with a JSON ``__metadata__`` entry naming the format and version. Nothing is pickled.

Formats: ``dvn-checkpoint`` (a whole DVN: physical weights, every (task, level) batch norm, every head and each
task's order), ``dvn-compact`` (one (task, level) as a plain network, see ``prune``) and ``dvn-train-state``
(optimizer and RNG state for resume). Every write is atomic: temporary file, fsync, rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..config import BackboneConfig, TaskSpec, from_dict
from ..core.network import DeepVirtualNetwork
from ..errors import BadConfig, MissingData, WrongFileFormat

__all__ = [
    "CHECKPOINT_FORMAT",
    "COMPACT_FORMAT",
    "FORMAT_VERSION",
    "STATE_FORMAT",
    "Checkpoint",
    "first_line",
    "load_checkpoint",
    "read_dvn_file",
    "read_metadata",
    "save_checkpoint",
    "sha256_file",
    "write_atomic",
    "write_dvn_file",
]

CHECKPOINT_FORMAT = "dvn-checkpoint"
COMPACT_FORMAT = "dvn-compact"
STATE_FORMAT = "dvn-train-state"
FORMAT_VERSION = 1
METADATA_KEY = "dvn"


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_dvn_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], fmt: str, meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` with metadata ``{"format": fmt, "version": ..., **meta}``."""
    header = {"format": fmt, "version": FORMAT_VERSION, **meta}
    payload = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return write_atomic(path, save(payload, metadata={METADATA_KEY: json.dumps(header)}))


def read_metadata(path: str | os.PathLike, formats: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The dvn metadata of ``path`` (header only), refusing anything that is not a dvn file of ``formats``."""
    path = Path(path)
    if not path.is_file():
        raise MissingData(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises several types for broken headers
        raise WrongFileFormat(f"{path} is not a safetensors file or is damaged ({first_line(exc)})") from None
    if raw is None:
        raise WrongFileFormat(f"{path} is a safetensors file but not a dvn file (it has no dvn metadata)")
    try:
        meta = json.loads(raw)
        fmt, version = meta["format"], int(meta["version"])
    except (ValueError, KeyError, TypeError):
        raise WrongFileFormat(f"{path} has damaged dvn metadata") from None
    if formats is not None and fmt not in formats:
        raise WrongFileFormat(f"{path} is a {fmt} file; expected {' or '.join(formats)}")
    if version > FORMAT_VERSION:
        raise WrongFileFormat(
            f"{path} has {fmt} format version {version}, newer than this dvn reads ({FORMAT_VERSION}); upgrade dvn"
        )
    return meta


def read_dvn_file(path: str | os.PathLike, formats: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a dvn file of one of ``formats``."""
    meta = read_metadata(path, formats)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise WrongFileFormat(f"{path} is damaged: its tensors cannot be read ({first_line(exc)})") from None
    return tensors, meta


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line user errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class Checkpoint:
    """A loaded DVN and what its file said about it."""

    network: DeepVirtualNetwork
    path: Path
    training: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_tensors(network: DeepVirtualNetwork) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the state dict plus ``orders.<task>`` (int64)."""
    tensors = dict(network.state_dict())
    for task, order in zip(network.task_names, network.layout.orders, strict=True):
        tensors[f"orders.{task}"] = torch.tensor(order, dtype=torch.int64)
    return tensors


def save_checkpoint(
    network: DeepVirtualNetwork, path: str | os.PathLike, training: dict[str, Any] | None = None
) -> Path:
    """Write ``network`` (and a training summary) as one ``dvn-checkpoint`` file."""
    meta = {
        "backbone": asdict(network.config),
        "units": network.units,
        "tasks": [asdict(t) for t in network.tasks],
        "order_rule": network.order_rule,
        "training": training or {},
    }
    return write_dvn_file(path, checkpoint_tensors(network), CHECKPOINT_FORMAT, meta)


def network_from_meta(meta: dict[str, Any], orders: list[list[int]]) -> DeepVirtualNetwork:
    config = from_dict(BackboneConfig, meta["backbone"])
    tasks = [from_dict(TaskSpec, t) for t in meta["tasks"]]
    return DeepVirtualNetwork(config, tasks, orders, meta.get("order_rule", "table"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a ``dvn-checkpoint`` file back into a network, refusing files that do not match their metadata."""
    tensors, meta = read_dvn_file(path, (CHECKPOINT_FORMAT,))
    try:
        task_names = [t["name"] for t in meta["tasks"]]
        orders = [tensors.pop(f"orders.{name}").tolist() for name in task_names]
        network = network_from_meta(meta, orders)
        network.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, RuntimeError, BadConfig) as exc:
        raise WrongFileFormat(f"{path} does not match its own metadata ({first_line(exc)})") from None
    network.to(map_location)
    return Checkpoint(network=network, path=Path(path), training=meta.get("training", {}), meta=meta)
