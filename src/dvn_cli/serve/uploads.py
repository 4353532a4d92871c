"""A request's images: its body read within its limits, split into uploads, each upload's header checked.

Nothing is parsed or decoded before it is bounded. ``BodyReader`` reads a body, refusing it at once (503) while
``--max-uploads`` bodies are being read, as soon as it is known to exceed its limit (413: from ``Content-Length``,
or while read), and when it has not all arrived within ``--body-timeout`` (408: a client trickling bytes). Only
then is it split (``split_uploads``): a ``multipart/form-data`` body by python-multipart, through Starlette's
``MultiPartParser`` (at most ``MAX_IMAGES`` parts), any other body as one image. Each upload's header is checked
(``check_header``: a format of ``IMAGE_FORMATS``, at most ``--max-pixels``) before the engine decodes it
(``decode_uploads``).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..runtime.images import ImageSet
from .engine import Engine, RequestError
from .options import MAX_IMAGES

if TYPE_CHECKING:
    from starlette.datastructures import Headers
    from starlette.requests import Request

__all__ = [
    "IMAGE_FORMATS",
    "BodyReader",
    "Upload",
    "check_header",
    "decode_uploads",
    "read_body",
    "split_uploads",
]

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
"""Formats a request may send: PIL's plain raster decoders (no EPS, which would run Ghostscript)."""


@dataclass(frozen=True)
class Upload:
    """One image of one request: unique across the requests batched together, shown by its name."""

    request: int
    index: int
    name: str

    def __str__(self) -> str:
        return self.name


class BodyReader:
    """Reads request bodies (``read_body``), at most ``max_uploads`` at once; one more is refused at once (503).

    Used on the event loop only, so the count needs no lock."""

    def __init__(self, max_uploads: int, timeout_s: float) -> None:
        self.max_uploads, self.timeout_s = max_uploads, timeout_s
        self.reading = 0  # bodies being read now

    async def read(self, request: Request, limit: int) -> bytes:
        if self.reading >= self.max_uploads:
            raise RequestError(503, f"{self.reading} uploads are being read already; try again later")
        self.reading += 1
        try:
            return await read_body(request, limit, self.timeout_s)
        finally:
            self.reading -= 1


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes: from its length, or while read;
    and refused (408) when all of it has not arrived within ``timeout_s`` seconds (a client trickling bytes)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"a body of {declared} bytes is over the limit of {limit} bytes")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout_s:g} s") from None


async def split_uploads(headers: Headers, body: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image: the parts of a multipart body (by the file name of each, else its field name),
    else the body itself.

    Raises:
        RequestError: an empty body (400), a multipart body that does not parse or has no part (400), one of more
            than ``MAX_IMAGES`` parts (413).
    """
    if not headers.get("content-type", "").lower().startswith("multipart/"):
        if not body:
            raise RequestError(400, "send an image as the request body (or several as multipart/form-data)")
        return [("image", body)]
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay() -> AsyncGenerator[bytes, None]:  # the body, already read within its limits
        yield body

    class ExactParts(MultiPartParser):
        """Starlette's parser, keeping a part without a file name as the bytes sent: Starlette decodes it as text
        (UTF-8, else Latin-1), which no encoding undoes for every image (bytes that are valid UTF-8 come back as
        other bytes)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fields: dict[int, bytes] = {}  # position among the parts -> the bytes of a field's part

        def on_part_end(self) -> None:
            part = self._current_part  # Starlette's part being parsed: its bytes, before they are decoded
            if part.file is None:
                self.fields[len(self.items)] = bytes(part.data)
            super().on_part_end()

    parser = ExactParts(headers, replay(), max_files=MAX_IMAGES, max_fields=MAX_IMAGES, max_part_size=max(len(body), 1))
    parser.spool_max_size = len(body)  # the body is in memory already: no part is spooled to a file
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many"):  # files, or fields: parts either way
            raise RequestError(413, f"over {MAX_IMAGES} images in one request; at most {MAX_IMAGES}") from None
        raise RequestError(400, f"a multipart body that does not parse: {exc.message}") from None
    try:
        uploads = [await _upload(i, field, value, parser.fields) for i, (field, value) in enumerate(form.multi_items())]
    finally:
        await form.close()
    if not uploads:
        raise RequestError(400, "a multipart body without parts (or without its boundary)")
    if len(uploads) > MAX_IMAGES:
        raise RequestError(413, f"{len(uploads)} images in one request; at most {MAX_IMAGES}")
    return uploads


async def _upload(index: int, field: str, value: Any, fields: dict[int, bytes]) -> tuple[str, bytes]:
    """(name, bytes) of part ``index``: a file (``UploadFile``), or a field without a file name, its bytes as sent
    (``fields``)."""
    if isinstance(value, str):
        return field or f"image{index}", fields[index]
    return value.filename or field or f"image{index}", await value.read()


def check_header(name: str, data: bytes, max_pixels: int) -> None:
    """Refuse what is not an image of ``IMAGE_FORMATS`` (415) or has more than ``max_pixels`` (413), from its
    header alone: a decompression bomb is refused before a pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name} is a decompression bomb (over PIL's pixel limit)") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise RequestError(415, f"{name} is not an image ({', '.join(IMAGE_FORMATS)})") from None
    if width * height > max_pixels:
        raise RequestError(413, f"{name} is {width}x{height} pixels, over the limit of {max_pixels} pixels")


def decode_uploads(engine: Engine, uploads: Sequence[tuple[str, bytes]], request: int, max_pixels: int) -> ImageSet:
    """Each upload of request number ``request`` checked from its header (``check_header``), then decoded by the
    engine as ``dvn predict`` decodes files; one that does not decode is refused (415)."""
    sources = {}
    for index, (name, data) in enumerate(uploads):
        check_header(name, data, max_pixels)
        sources[Upload(request, index, name)] = data

    def unreadable(upload: Upload, why: str) -> None:  # its header passed: it does not decode
        raise RequestError(415, f"{upload} cannot be decoded as an image")

    return engine.decode(sources, unreadable)
