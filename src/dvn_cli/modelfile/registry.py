"""One reader for every dvn model file: ``open_model(path)`` picks the kind from the file's own metadata.

The kinds (checkpoint, compact model, bundle, shared export folder) are modules of their own that know nothing of
each other or of this registry; it imports them and registers each under its format name, so no kind's import
runs back into this module. A kind added outside dvn registers with ``register_model_file``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import MissingData, WrongFileFormat
from .base import ModelFile, UnitSource
from .bundle import BUNDLE_FORMAT, bundle_source, load_bundle
from .checkpoint import CHECKPOINT_FORMAT, checkpoint_source, open_checkpoint
from .compact import COMPACT_FORMAT, load_compact
from .container import read_metadata
from .shared import SHARED_EXPORT_FORMAT, SharedExport
from .shared_folder import MANIFEST_NAME, is_export_folder

__all__ = ["MODEL_FILES", "UNIT_SOURCES", "open_model", "open_unit_source", "register_model_file"]

MODEL_FILES: dict[str, Callable[[Path], ModelFile]] = {}
"""Format name -> reader of that kind of model file."""

UNIT_SOURCES: dict[str, Callable[[Path], UnitSource]] = {}
"""Format name -> a lazy unit source of a file of that kind, read from its header alone (kinds that have one)."""


def register_model_file(
    fmt: str, reader: Callable[[Path], ModelFile], unit_source: Callable[[Path], UnitSource] | None = None
) -> None:
    """Make ``open_model`` read files of format ``fmt`` with ``reader(path)`` (and ``open_unit_source`` with
    ``unit_source(path)``, for kinds that store unit blocks); names are unique."""
    if fmt in MODEL_FILES:
        raise ValueError(f"model file format {fmt!r} is already registered")
    MODEL_FILES[fmt] = reader
    if unit_source is not None:
        UNIT_SOURCES[fmt] = unit_source


register_model_file(CHECKPOINT_FORMAT, open_checkpoint, checkpoint_source)
register_model_file(COMPACT_FORMAT, load_compact)
register_model_file(BUNDLE_FORMAT, load_bundle, bundle_source)
register_model_file(SHARED_EXPORT_FORMAT, SharedExport)


def open_model(path: str | os.PathLike, formats: Sequence[str] | None = None) -> ModelFile:
    """Read any dvn model file (or only those of ``formats``), refusing other files in one line."""
    path = Path(path)
    wanted = tuple(formats) if formats else tuple(MODEL_FILES)
    if is_export_folder(path):  # a folder model: a shared export
        if SHARED_EXPORT_FORMAT not in wanted:
            raise WrongFileFormat(f"{path} is an export folder; expected a {' or '.join(wanted)} file")
        return MODEL_FILES[SHARED_EXPORT_FORMAT](path)
    if path.is_dir():  # a folder is read by its manifest: name what is missing, not "not a regular file"
        if os.path.lexists(path / MANIFEST_NAME):
            raise WrongFileFormat(f"{path / MANIFEST_NAME} is not a regular file")
        raise MissingData(
            f"{path} is a folder without {MANIFEST_NAME}: pass a model file, or a folder dvn export --shared wrote"
        )
    try:
        meta = read_metadata(path, wanted)
    except WrongFileFormat:
        if path.is_file() and (path.parent / "manifest.json").is_file():  # a graph or weights file of an export
            raise WrongFileFormat(
                f"{path} is one file of the export in {path.parent}, not a dvn model file; pass the folder "
                f"({path.parent}) if dvn export --shared wrote it, else the checkpoint it was exported from"
            ) from None
        raise
    return MODEL_FILES[meta["format"]](path)


def open_unit_source(path: str | os.PathLike) -> UnitSource:
    """A lazy unit source of a checkpoint or bundle, reading only the file's header now (no weights).

    What ``open_model(path).unit_source()`` gives, without loading the file's tensors first.
    """
    path = Path(path)
    meta = read_metadata(path, tuple(MODEL_FILES))
    if meta["format"] not in UNIT_SOURCES:
        return MODEL_FILES[meta["format"]](path).unit_source()  # refuses in one line
    return UNIT_SOURCES[meta["format"]](path)
