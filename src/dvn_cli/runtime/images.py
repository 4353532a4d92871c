"""The images a model runs on, decoded once per resize method, whatever runs them: no torch.

``ImageSet`` holds the readable images by name (a file's path, or whatever names an image received in memory) and
what was skipped and why. Its decoder is the caller's (``Load``): ``data.pixels.load_image`` (a tensor) for
``dvn predict`` and the PyTorch engines of ``dvn serve``, ``data.decode.input_image`` (a numpy array) for the
server of a shared export folder, which never imports torch; both prepare the pixels the same way.

Image files are untrusted input: a folder's entries that are not regular files (a FIFO, a link to a device) are
never opened, and an image whose header declares more than ``MAX_IMAGE_PIXELS`` is refused from its header,
before anything is decoded. Every file skipped is reported, with why, to the caller's ``on_skipped``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..data.decode import oversized_image
from ..errors import BadConfig, MissingData

__all__ = ["ImageSet", "Load", "OnSkipped", "image_files"]

OnSkipped = Callable[[Path, str], None]
"""Called with each file that is skipped and a sentence that names it and says why."""

Load = Callable[[Path | IO[bytes], int, int, str], Any]
"""(source, channels, size, resize method) -> the image as a uint8 ``(C, size, size)`` model input, or None when
it cannot be read."""


def image_files(paths: Sequence[str | os.PathLike], on_skipped: OnSkipped | None = None) -> list[Path]:
    """Every file named, and every regular file under every folder named (sorted, hidden ones left out), in order.

    A folder's entries that are not regular files (a FIFO, a device or a link to one, a broken link) are skipped
    and reported to ``on_skipped``: reading one could block or never end. So is a sub-folder that holds no file
    (an empty ``x.png/``, say), which once was passed over without a word; the files under the others are read.

    Raises:
        MissingData: a path that does not exist.
        BadConfig: a path that is neither a regular file nor a folder, or a folder without regular files.
    """
    if not paths:
        raise BadConfig("name at least one image file or folder")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = []
            entries = sorted(p for p in path.rglob("*") if not p.name.startswith("."))
            held = {parent for p in entries if not p.is_dir() for parent in p.parents}  # folders with a file below
            for entry in entries:
                if entry.is_dir():
                    if entry not in held and on_skipped is not None:  # an empty x.png/ is named, not passed over
                        on_skipped(entry, f"{entry} is a folder without image files")
                elif entry.is_file():
                    found.append(entry)
                elif on_skipped is not None:
                    on_skipped(entry, f"{entry} is not a regular file")
            if not found:
                raise BadConfig(f"{path} is a folder without image files")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists() or path.is_symlink():
            what = "a broken link" if not path.exists() else "not a regular file or folder"
            raise BadConfig(f"{path} is {what}; name image files or folders of them")
        else:
            raise MissingData(f"no such file or folder: {path}")
    return list(dict.fromkeys(files))


@dataclass
class ImageSet:
    """The readable images as uint8 ``(C, H, W)`` per resize method, read once whatever runs on them.

    Images are keyed by name: a file's ``Path``, or whatever names an image received in memory (a row's ``image`` is
    ``str(name)``), so ``dvn predict`` and ``dvn serve`` decode through the same path.
    """

    readable: list[Any]
    skipped: list[Any]
    by_resize: dict[str, dict[Any, Any]]

    @classmethod
    def read(
        cls,
        paths: Sequence[str | os.PathLike],
        shape: tuple[int, int],
        resizes: Iterable[str],
        load: Load,
        on_skipped: OnSkipped | None,
    ) -> ImageSet:
        """The image files named, and those under the folders named (``image_files``); what is skipped is named."""
        passed_over: list[Path] = []

        def skip(path: Path, why: str) -> None:
            passed_over.append(path)
            if on_skipped is not None:
                on_skipped(path, why)

        files = image_files(paths, skip)
        images = cls.decode({path: path for path in files}, shape, resizes, load, on_skipped)
        images.skipped[:0] = passed_over
        return images

    @classmethod
    def decode(
        cls,
        sources: Mapping[Any, Path | bytes],
        shape: tuple[int, int],
        resizes: Iterable[str],
        load: Load,
        on_skipped: OnSkipped | None,
    ) -> ImageSet:
        """Name -> a file or the bytes of an encoded image, decoded by ``load`` at ``shape`` (channels, size) for
        each of ``resizes``; one whose header declares too many pixels (``oversized_image``) is skipped before
        decoding.

        Raises:
            BadConfig: none of them could be read as an image.
        """
        channels, size = shape
        skipped: list[Any] = []

        def skip(name: Any, why: str) -> None:
            skipped.append(name)
            if on_skipped is not None:
                on_skipped(name, why)

        def opened(source: Path | bytes):
            return io.BytesIO(source) if isinstance(source, bytes) else source

        for name, source in sources.items():
            why = oversized_image(opened(source), name)
            if why is not None:
                skip(name, why)
        by_resize: dict[str, dict[Any, Any]] = {}
        for resize in dict.fromkeys(resizes):
            by_resize[resize] = {}
            for name, source in sources.items():
                image = None if name in skipped else load(opened(source), channels, size, resize)
                if image is not None:
                    by_resize[resize][name] = image
                elif name not in skipped:
                    skip(name, f"cannot read {name} as an image")
        readable = [name for name in sources if name not in skipped]
        if not readable:
            raise BadConfig(f"none of the {len(sources)} file(s) could be read as an image")
        return cls(readable, skipped, by_resize)

    @classmethod
    def join(cls, sets: Sequence[ImageSet]) -> ImageSet:
        """Several sets as one (names must differ), to classify them in the same batches."""
        by_resize: dict[str, dict[Any, Any]] = {}
        for images in sets:
            for resize, decoded in images.by_resize.items():
                by_resize.setdefault(resize, {}).update(decoded)
        return cls([n for s in sets for n in s.readable], [n for s in sets for n in s.skipped], by_resize)
