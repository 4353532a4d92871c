"""The files of a pretrained start: ``dvn convert`` (a torchvision ``.pth`` -> safetensors) and ``--init FILE``.

A ``.pth`` is untrusted input: it is loaded with ``torch.load(weights_only=True)``, which builds tensors and
containers only and refuses, without running it, any other object the pickle names; the refusal says so and
never suggests loading the file another way. ``--init`` reads safetensors only. Formats are told apart by parsing
(``fileformats.file_format``), so a safetensors file is never taken for a pickle. The mapping of a state dict onto
units is ``core.pretrained`` (docs/design.md §6).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from ..core.pretrained import InitReport, init_from_torchvision
from ..errors import BadConfig, WrongFileFormat
from ..fileformats import file_format
from ..fsutil import check_output_file, first_line, write_atomic
from .container import check_finite, check_regular_file

__all__ = ["convert_torchvision", "init_from_file", "read_state_file"]

_PICKLES = ("torch-zip", "pickle")  # what torch.save writes (fileformats.file_format's names)
_TORCH_ADVICE = (
    "weights_only",
    "Weights only",
    "trust",
    "file an issue",
    "pytorch.org",
    "safe_globals",
    "allowlist",
    "Please use",
)
"""Sentences of torch's refusal that advise loading the file unsafely, allow-listing what it names (which would run
it) or point elsewhere; the rest says what it met."""


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors state dict, every floating-point one finite; a pickled ``.pth``, a FIFO and
    other files are refused in one line."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise BadConfig(f"--init file {path} not found")
    check_regular_file(path)  # a FIFO would block the read below; a folder or device is refused in one line
    if file_format(path) in _PICKLES:
        raise WrongFileFormat(
            f"{path} is a pickled PyTorch file; convert it once with 'dvn convert {path} -o FILE.safetensors' "
            "and pass that to --init"
        )
    try:
        tensors = load_file(str(path))
    except OSError as exc:
        raise BadConfig(f"cannot read --init file {path} ({exc.strerror or exc})") from None
    except Exception as exc:  # safetensors raises its own types for files that are not safetensors
        raise WrongFileFormat(f"{path} is not a safetensors state dict ({first_line(exc)})") from None
    for name, tensor in tensors.items():
        check_finite(path, name, tensor)
    return tensors


def init_from_file(network, path: str | os.PathLike, mapping: str = "bn-scale") -> InitReport:
    """``core.pretrained.init_from_torchvision`` with the state dict in the safetensors file ``path``."""
    return init_from_torchvision(network, read_state_file(path), mapping, label=str(path))


def convert_torchvision(source: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict[str, int]:
    """Write the state dict in a torchvision ``.pth`` as safetensors, loading it with ``weights_only=True``.

    Accepts a bare state dict or one under ``state_dict`` / ``model``; every value must be a tensor. An existing
    ``out`` is kept unless ``force``.

    Returns:
        ``{"tensors": n, "params": total elements}``.
    """
    from safetensors.torch import save

    source, out = Path(source), Path(out)
    check_output_file(out, reads=(source,), replace=force)
    check_regular_file(source)  # as --init and -c: a FIFO would block torch.load for ever
    if file_format(source) == "safetensors":
        raise BadConfig(f"{source} is already a safetensors file; pass it to --init as it is")
    loaded = _load_tensors_only(source)
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WrongFileFormat(f"{source} does not hold a state dict of tensors (names -> tensors)")
    tensors = {str(k): v.detach().contiguous() for k, v in loaded.items()}
    write_atomic(out, save(tensors, metadata={"converted_from": source.name}))
    return {"tensors": len(tensors), "params": sum(t.numel() for t in tensors.values())}


def _load_tensors_only(source: Path) -> object:
    """``torch.load(weights_only=True)`` of ``source``; torch's warnings and advice about the file kept from the
    user (its refusal suggests loading with ``weights_only=False``, which would run whatever the file names)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": about torch, not the user's file
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types: an object other than tensors, a damaged file, ...
        raise WrongFileFormat(
            f"{source} was refused without running anything: it is not a plain state dict of tensors "
            f"({_what_torch_met(exc)}); save the model's state_dict() and convert that"
        ) from None


def _what_torch_met(exc: BaseException) -> str:
    """The first line of torch's error that says what it met, without its advice sentences (to load the file
    unsafely, or to allow-list the function or class it names: ``add_safe_globals``) and without its own label."""
    for line in str(exc).splitlines():
        sentences = re.split(r"(?<=\.)\s+", line.strip())
        met = " ".join(s for s in sentences if s and not any(a in s for a in _TORCH_ADVICE))
        if met:
            return met.removeprefix("WeightsUnpickler error: ").rstrip(".")
    return type(exc).__name__
