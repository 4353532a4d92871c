"""What ``dvn serve`` was asked for (``ServeOptions``), and the limits a request is held to by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadConfig

__all__ = ["BODY_TIMEOUT_S", "MAX_BODY", "MAX_IMAGES", "MAX_PIXELS", "MAX_UPLOADS", "ServeOptions"]

MAX_PIXELS = 4096 * 4096
"""Largest upload (width x height) decoded by default (``--max-pixels``), checked from its header first: a quarter of
``dvn predict``'s ``MAX_IMAGE_PIXELS``, since uploads come from the network, not from the user's own files."""
MAX_BODY = 8 * 2**20
"""Largest request body in bytes, refused before it is all read."""
MAX_IMAGES = 64
"""Most images in one multipart request."""
BODY_TIMEOUT_S = 10.0
"""Longest a request body may take to arrive (``--body-timeout``): a client sending a byte a second is cut off (408)."""
MAX_UPLOADS = 16
"""Most request bodies read at once (``--max-uploads``); one more is refused at once (503), before its body."""


@dataclass(frozen=True)
class ServeOptions:
    """What ``dvn serve`` was asked for.

    Args:
        budget: a budget ``dvn plan`` takes, ``auto`` (follow the memory), or None (each task's largest level).
        reserve: bytes ``auto`` leaves free (None: not given, 0; refused without ``auto``).
        memory_file: ``auto`` reads the bytes it may use from this file instead of the system (tests, benchmarks).
        max_batch: most images run in one batch (1: no batching of concurrent requests).
        body_timeout_s: longest a request body may take to arrive (408 after it).
        max_uploads: most request bodies read at once (503 beyond).

    Raises:
        BadConfig: ``reserve`` without ``auto``, a ``max_batch`` or ``max_uploads`` below 1, a ``body_timeout_s``
            that is not above 0.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    budget: str | None = None
    reserve: int | None = None
    memory_file: Path | None = None
    poll_s: float = 1.0
    margin: float = 0.1
    max_batch: int = 32
    max_body: int = MAX_BODY
    max_pixels: int = MAX_PIXELS
    drain_s: float = 30.0
    body_timeout_s: float = BODY_TIMEOUT_S
    max_uploads: int = MAX_UPLOADS

    def __post_init__(self) -> None:
        if self.reserve is not None and self.budget != "auto":
            raise BadConfig("--reserve is the memory --budget auto leaves free: give --budget auto, or no --reserve")
        for flag, value in [("--max-batch", self.max_batch), ("--max-uploads", self.max_uploads)]:
            if value < 1:
                raise BadConfig(f"{flag} must be at least 1, got {value}")
        if not self.body_timeout_s > 0:
            raise BadConfig(f"--body-timeout must be above 0 seconds, got {self.body_timeout_s}")
