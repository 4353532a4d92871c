"""An export folder: one file per (task, level) under one naming rule, the manifest that lists them, and the staged
swap that puts a new export in place of an earlier one without ever losing it (docs/design.md §5).

Both exports write through ``staged_export``: the per-pair one (``export.export_models``) and the shared one
(``shared_export.export_shared``). Every new file is written in a staging folder inside the export folder; when all
are built and checked, each is renamed over its name, the manifest last. So a file is never rewritten in place: a
process that has the old weights file mapped keeps its pages (the old inode lives until it lets go). Until the
manifest is in place, each file it replaces is kept aside, and any failure puts every one of them back. After it,
the files the previous manifest listed that the new one does not are removed, and only those still holding what
that manifest says (sha256): a file a user put in the folder, or changed, is never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BadConfig, CannotWrite, DvnError, UnknownTask
from ..fsutil import FolderLock, refuse_non_regular, safe_file_stem, sha256_file, write_atomic
from ..modelfile.base import ModelFile
from ..modelfile.spec import CompactSpec

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ExportStage",
    "LogitCheck",
    "WrittenManifest",
    "build_manifest",
    "is_export_file_name",
    "listed_files",
    "model_entry",
    "pair_file_name",
    "preprocess_of",
    "read_manifest",
    "requested_pairs",
    "source_entry",
    "staged_export",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_STAGING_PREFIX = ".dvn-export-"
_REPLACED = ".replaced"  # inside the staging folder: the files the swap replaced, until the manifest is in place
_EXPORT_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


# ------------------------------------------------------------------------------------------------ names


def pair_file_name(task: str, level: int, suffix: str) -> str:
    """``<task>-level<l><suffix>``: the one name of a (task, level)'s file (exports, ``prune-level``)."""
    return f"{safe_file_stem(task)}-level{level}{suffix}"


def is_export_file_name(name: object) -> bool:
    """Whether ``name`` could be a file dvn writes into an export folder: one plain name, never a path."""
    return isinstance(name, str) and name != MANIFEST_NAME and _EXPORT_FILE_NAME.fullmatch(name) is not None


def requested_pairs(model: ModelFile, pairs: Sequence[tuple[int | str, int]] | None) -> list[tuple[str, int]]:
    """(task name, level) of each requested pair (a task may be given by index), checked before anything is written."""
    if pairs is None:
        return model.pairs()
    names = model.task_names()
    resolved = []
    for task, level in pairs:
        if not isinstance(task, str):
            if not 0 <= task < len(names):
                raise UnknownTask(f"task index {task} out of range 0..{len(names) - 1}")
            task = names[task]
        model.check_pair(task, level, verb="export")
        resolved.append((task, level))
    twice = list(dict.fromkeys(p for p in resolved if resolved.count(p) > 1))
    if twice:
        raise BadConfig(f"(task, level) listed more than once: {', '.join(f'{t} level {lv}' for t, lv in twice)}")
    return resolved


# ------------------------------------------------------------------------------------------------ manifest


def preprocess_of(spec: CompactSpec) -> dict[str, Any]:
    """What turns a raw image (pixels scaled to 0..1) into this model's input, as in ``data.convert_images``.

    Grey images are repeated to 3 channels, RGB goes to grey with the ITU-R 601-2 luma weights (PIL ``L``).
    ``pad``: images no larger than height × width are zero-padded, centred; larger ones are resized bilinearly.
    ``bilinear``: every image is resized bilinearly, a JPEG after decoding at the smallest of 1/2, 1/4, 1/8 of its
    size still at least height × width (PIL ``draft``, as ``data.read_image`` reads it; libjpeg's scaled
    decoding elsewhere). Then ``(x - mean) / std`` per channel.
    """
    channels = spec.backbone.in_channels
    mean, std = list(spec.task.mean), list(spec.task.std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    return {
        "channels": channels,
        "height": spec.backbone.input_size,
        "width": spec.backbone.input_size,
        "resize": spec.task.resize,
        "mean": mean,
        "std": std,
    }


def source_entry(model: ModelFile, first_pair: tuple[str, int]) -> dict[str, Any]:
    """What the manifest says about the file the models came from."""
    spec = model.spec_of(*first_pair)
    return {
        "format": model.format,
        "file": None if model.path is None else str(model.path),
        "sha256": model.file_sha256 or None,
        "checkpoint_sha256": spec.source_sha256 or None,
        "k": spec.k,
    }


@dataclass(frozen=True)
class LogitCheck:
    """How an exported model's logits compare with its float32 PyTorch model's on the sample images."""

    max_abs_diff: float
    """Largest |exported - PyTorch| logit."""
    top1_agreement: float
    """Share of the rows compared (the first image counts twice: alone and in its batch) whose top class is the
    same; what a lower precision may change."""


def model_entry(
    spec: CompactSpec, file: str, data: bytes, format: str, check: LogitCheck | None = None, /, **extra: Any
) -> dict[str, Any]:
    """The manifest entry of one (task, level)'s file; ``extra`` adds a layout's own keys (a shared graph's
    ``tensors`` and ``spec``, every export's ``precision``: hence positional-only arguments)."""
    return {
        "task": spec.task.name,
        "level": spec.level,
        "units": list(spec.units),
        "file": file,
        "format": format,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "params": spec.params,
        "params_total": spec.params_total,
        "macs": spec.macs,
        "classes": list(spec.task.classes),
        "preprocess": preprocess_of(spec),
        "input": "input",
        "output": "logits",
        "check_max_abs_diff": None if check is None else check.max_abs_diff,
        "check_top1_agreement": None if check is None else check.top1_agreement,
        **extra,
    }


def build_manifest(source: dict[str, Any], models: list[dict[str, Any]], **layout: Any) -> dict[str, Any]:
    """The manifest of an export: version header, ``layout``'s keys (a shared export's), source and models."""
    header = {"dvn_version": __version__, "manifest_version": MANIFEST_VERSION, **layout}
    return {**header, "source": source, "models": models}


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest in ``out_dir`` (None when there is none), refusing one that dvn did not write."""
    path = out_dir / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return None
    try:
        manifest = json.loads(path.read_text())
        ok = isinstance(manifest, dict) and isinstance(manifest.get("source"), dict)
        ok = ok and isinstance(manifest.get("models"), list) and all(isinstance(m, dict) for m in manifest["models"])
    except (OSError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise DvnError(
            f"{path} is not a dvn export manifest (damaged, or written by something else); "
            "pass --force to replace it or -o for another folder"
        )
    return manifest


def listed_files(manifest: Mapping[str, Any]) -> dict[str, str | None]:
    """File name -> sha256 of every file a manifest lists (models, and a shared export's weights); names that are
    not plain file names are left out, so a manifest cannot point outside its folder."""
    entries = [m for m in manifest.get("models", []) if isinstance(m, dict)]
    if isinstance(manifest.get("weights"), dict):
        entries.append(manifest["weights"])
    return {m["file"]: m.get("sha256") for m in entries if is_export_file_name(m.get("file"))}


def _previous_manifest(out: Path, source: Mapping[str, Any], force: bool) -> dict[str, Any] | None:
    """The manifest of the export already in ``out``; without ``force`` an export of another file is refused,
    with it a manifest dvn did not write counts as none."""
    try:
        old = read_manifest(out)
    except DvnError:
        if force:
            return None
        raise
    if not force and old is not None and old["source"].get("sha256") != source.get("sha256"):
        raise DvnError(
            f"{out} holds an export of another file ({old['source'].get('file')}, "
            f"sha256 {str(old['source'].get('sha256'))[:12]}); pass --force to replace it or -o for another folder"
        )
    return old


# ------------------------------------------------------------------------------------------------ staged swap


class WrittenManifest(dict):
    """The manifest as its file holds it (a dict: tuples as lists), and what became of the previous export's files.

    ``removed``: files the previous manifest listed and the new one does not, deleted; ``left``: such files kept
    because they changed since that export (sha256) or are not regular files.
    """

    def __init__(self, manifest: Mapping[str, Any], removed: Iterable[str] = (), left: Iterable[str] = ()) -> None:
        super().__init__(manifest)
        self.removed, self.left = tuple(removed), tuple(left)


@dataclass
class ExportStage:
    """A new export being written in ``staging`` beside the export in ``out`` (``previous``: its manifest)."""

    out: Path
    staging: Path
    previous: dict[str, Any] | None
    staged: list[str] = field(default_factory=list)
    swapped: list[tuple[str, bool]] = field(default_factory=list)  # (name, whether a file it replaced is aside)
    committed: bool = False

    def file(self, name: str) -> Path:
        """The staging path of the export's file ``name``, which ``commit`` moves into place."""
        if not is_export_file_name(name) or name in self.staged:
            raise ValueError(f"{name!r} is not a new export file name")  # a dvn bug: names come from pair_file_name
        self.staged.append(name)
        return self.staging / name

    def write_manifest(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``manifest`` into the staging folder (so it can be opened there); returns what the file holds."""
        text = json.dumps(manifest, indent=2) + "\n"
        write_atomic(self.staging / MANIFEST_NAME, text.encode())
        return json.loads(text)

    def commit(self, manifest: Mapping[str, Any]) -> WrittenManifest:
        """Move every staged file into place, the manifest last; then remove the previous export's files that the
        new manifest does not list. A failure before the manifest is in place puts the previous export back."""
        written = self.write_manifest(manifest)
        aside = self.staging / _REPLACED
        for name in [*self.staged, MANIFEST_NAME]:
            target = self.out / name
            refuse_non_regular(target)
            replaced = target.exists()
            self.swapped.append((name, replaced))
            try:
                if replaced:
                    os.replace(target, aside / name)
                os.replace(self.staging / name, target)
            except OSError as exc:
                raise CannotWrite(target, exc.strerror or str(exc)) from None
        self.swapped.clear()  # the manifest is in place: the new export is the export
        self.committed = True
        return WrittenManifest(written, *self._remove_stale(written))

    def roll_back(self) -> None:
        """Put back every file the swap replaced, and remove new files that replaced none."""
        for name, replaced in reversed(self.swapped):
            with contextlib.suppress(OSError):
                if replaced:
                    os.replace(self.staging / _REPLACED / name, self.out / name)
                else:
                    (self.out / name).unlink(missing_ok=True)
        self.swapped.clear()

    def _remove_stale(self, manifest: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """Delete the files the previous manifest listed that ``manifest`` does not, if they still hold what it
        says; returns (removed, left)."""
        if self.previous is None:
            return [], []
        keep = listed_files(manifest)
        removed: list[str] = []
        left: list[str] = []
        for name, sha256 in listed_files(self.previous).items():
            path = self.out / name
            if name in keep or not os.path.lexists(path):
                continue
            try:
                unchanged = stat.S_ISREG(path.lstat().st_mode) and sha256_file(path) == sha256
                if unchanged:
                    path.unlink()
            except OSError:
                unchanged = False
            (removed if unchanged else left).append(name)
        return removed, left


def _open_folder(out: Path) -> bool:
    """Create ``out`` when missing (True when this call created it), or say why not."""
    try:
        if out.exists() and not out.is_dir():
            raise CannotWrite(out, "it is a file, not a folder")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        return created
    except CannotWrite:
        raise
    except OSError as exc:
        raise CannotWrite(out, exc.strerror or str(exc)) from None


def _open_staging(out: Path) -> Path:
    """A new staging folder in ``out``, or say why not."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
        (staging / _REPLACED).mkdir()
        return staging
    except OSError as exc:
        raise CannotWrite(out, exc.strerror or str(exc)) from None


@contextlib.contextmanager
def staged_export(out_dir: str | os.PathLike, source: Mapping[str, Any], force: bool) -> Iterator[ExportStage]:
    """A staging folder for a new export into ``out_dir``; on any failure the folder is left as it was.

    The folder is locked (``fsutil.FolderLock``, as ``dvn train`` locks its run folder) from before the previous
    manifest is read until the new one is in place: a second export into it meanwhile is refused in one line, so an
    export that succeeds has written what it reports. An earlier export of another source file (or a manifest dvn
    did not write) is refused unless ``force``. Write the new files at ``stage.file(name)`` and finish with
    ``stage.commit(manifest)``. A folder this call created is removed again when the export fails.
    """
    out = Path(out_dir)
    created = _open_folder(out)
    lock = FolderLock.acquire(out, "dvn export", "--out")
    stage = None
    try:
        previous = _previous_manifest(out, source, force)
        stage = ExportStage(out, _open_staging(out), previous)
        yield stage
    except BaseException:
        if stage is None or not stage.committed:
            if stage is not None:
                stage.roll_back()
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage.staging, ignore_errors=True)
        lock.release()
