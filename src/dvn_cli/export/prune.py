"""``dvn prune-level``: resolve a budget for one task and write that level as a compact model file.

Any model file that holds more than the one plain network works as the source (a checkpoint, a bundle); the
compact model itself is built by the model-file layer (``ModelFile.plain_of`` and ``spec_of``), written by
``modelfile.compact.save_compact`` (docs/design.md §3).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadConfig
from ..fsutil import check_output_file
from ..modelfile.base import ModelFile
from ..modelfile.compact import CompactModel, save_compact
from ..planning.select import file_level
from .folder import pair_file_name

__all__ = ["default_compact_path", "write_compact_level"]


def default_compact_path(source: ModelFile, task: str, level: int) -> Path:
    """``<task>-level<l>.safetensors`` (``export_folder.pair_file_name``) beside the source file."""
    folder = source.path.parent if source.path is not None else Path.cwd()
    return folder / pair_file_name(task, level, ".safetensors")


def write_compact_level(
    source: ModelFile,
    task: str,
    budget: str,
    out: str | os.PathLike | None = None,
    force: bool = False,
) -> CompactModel:
    """Resolve ``budget`` for ``task`` in ``source`` and write that level's compact model.

    An existing file is kept unless ``force``, and then only a regular file is replaced; the source file itself
    never is, nor a file in a folder that does not exist (``fsutil.check_output_file``).
    """
    if not source.holds_unit_blocks:
        held = ", ".join(f"{name} level {level}" for name, level in source.pairs())
        raise BadConfig(
            f"{source.label} is already a {source.kind} ({held}); prune-level needs a checkpoint or a bundle"
        )
    level = file_level(source, task, budget)
    path = Path(out) if out is not None else default_compact_path(source, task, level)
    check_output_file(path, reads=(source.path,), replace=force, hint=" or -o for another file")
    plain, spec = source.plain_of(task, level), source.spec_of(task, level)
    save_compact(plain, spec, path)
    return CompactModel(plain=plain, spec=spec, path=path)
