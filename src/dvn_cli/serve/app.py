"""``dvn serve``: every task of a model file served over HTTP from one process, its levels switching while it runs.

This module is the HTTP side only, and imports no torch: Starlette on uvicorn (the ``serve`` extra), requests,
batching, metrics, the memory watcher. What runs the tasks is an ``Engine``: ``serve_model.ModelEngine`` for a
checkpoint or a bundle (PyTorch, every unit-pair block held once in ONE ``SharedRuntime``), ``serve_folder.
FolderEngine`` for a shared export folder (onnxruntime sessions over one weights file, images prepared in numpy: a
process serving a folder never loads PyTorch). The CLI picks the engine by what the path is.

- ``GET /health``, ``GET /v1/status``, ``GET /metrics`` (Prometheus text);
- ``POST /v1/predict?task=NAME&top=5``: one image as the body, or several as ``multipart/form-data``; the rows are
  those of ``dvn predict --json`` (``rows.prediction_rows`` builds them all);
- ``PUT /v1/budget`` ``{"budget": "30%"}``: re-plan and switch. A budget is what every task served holds together,
  each shared block once, as ``dvn plan`` counts it (the engine's ``plan``: ``dvn plan``'s joint plan for a
  checkpoint with validation accuracy, else ``planning.budget_rules.plan_held_levels``); one that even the
  smallest levels exceed is a 422 and changes nothing. The answer and ``/v1/status`` say whether it is ``met``.

ONE worker thread runs every forward and every switch, in the order they were asked for: a batch that has started
finishes on the levels it started with, and the levels a response names are the levels that computed it. Requests
for the same tasks waiting together run as one batch (up to ``max_batch`` images). Bodies and images are bounded
before anything is decoded (``max_body``, ``max_pixels``, ``MAX_IMAGES``), and must arrive within
``body_timeout_s``, at most ``max_uploads`` at a time (a slow client is cut off, not waited for); a bad request is a
4xx with ``{"error": "one line"}``, and no answer holds NaN (a number JSON cannot write is null). With
``--budget auto`` a watcher reads a ``memory_source.MemorySource`` every
``poll_s`` seconds and switches to the plan that fits (``memory_source.AutoBudget``, with hysteresis).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import math
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..errors import BadBudget, BadConfig, DvnError, UnknownTask
from ..planning.budget_rules import format_bytes
from .images import ImageSet
from .memory_source import AutoBudget, MemorySource, file_memory, system_memory

__all__ = ["MAX_IMAGES", "MAX_PIXELS", "Engine", "RequestError", "ServeOptions", "Server", "serve"]

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
_CLOSE = (408, 413, 503)
"""Answers sent before the body was read: the connection is closed, not kept for a client still sending."""
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
"""Formats a request may send: PIL's plain raster decoders (no EPS, which would run Ghostscript)."""
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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


class RequestError(DvnError):
    """A request the server refuses with HTTP ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status_of(exc: DvnError) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    return 404 if isinstance(exc, UnknownTask) else 422 if isinstance(exc, BadBudget) else 400


class Engine(Protocol):
    """What the server runs: the tasks, the levels running and how they switch, and the images' rows.

    ``deploy.serve_model.ModelEngine`` runs a checkpoint or a bundle in PyTorch; ``deploy.serve_folder.
    FolderEngine`` a shared export folder with onnxruntime and numpy only. ``switch`` and ``classify`` run on the
    server's worker thread only, one at a time; ``plan`` and ``decode`` run on other threads and read nothing that
    ``switch`` changes.
    """

    tasks: list[str]
    choices: dict[str, int]  # task -> the level it runs now
    plans: bool  # whether ``fit`` can choose levels for a number of bytes held (--budget auto)
    shared: bool  # whether each block of the running levels is held once

    def plan(self, budget: str | None) -> tuple[dict[str, int], int | None]:
        """The levels a budget picks for every task together, and the bytes they hold (None: not counted); raises
        ``BadBudget`` for a budget that does not parse, a level, or one nothing fits."""
        ...

    def fit(self, budget: int) -> tuple[dict[str, int], int]:
        """The levels that together hold at most ``budget`` bytes, and the bytes they hold (--budget auto)."""
        ...

    def switch(self, choices: dict[str, int]) -> None: ...

    def held_bytes(self) -> int:
        """Weight bytes held for the running levels."""
        ...

    def decode(self, sources: Mapping[Any, bytes], on_skipped: Callable[[Any, str], None]) -> ImageSet:
        """Each upload (its header already checked) decoded for every running task's input."""
        ...

    def classify(self, images: ImageSet, running: dict[str, int], top: int) -> list[dict[str, Any]]:
        """The rows of ``dvn predict --json`` (``rows.prediction_rows``) of every image for every running task."""
        ...


@dataclass(frozen=True)
class _Upload:
    """One image of one request: unique across the requests batched together, shown by its name."""

    request: int
    index: int
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass
class _Predict:
    tasks: tuple[str, ...]
    images: ImageSet
    top: int
    done: Future = field(default_factory=Future)


@dataclass
class _Switch:
    choices: dict[str, int]
    done: Future = field(default_factory=Future)


@dataclass
class _Metrics:
    """Counters of ``/metrics`` and ``/v1/status``, updated on the event loop only."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) -> count
    latency: dict[str, list[int]] = field(default_factory=dict)  # endpoint -> count per bucket (last: +Inf)
    latency_sum: dict[str, float] = field(default_factory=dict)
    switches: int = 0
    served: int = 0

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
        counts = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
        counts[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
        self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds

    def text(self, choices: dict[str, int], held: int) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines = [
            "# HELP dvn_requests_total Requests answered, by endpoint and status.",
            "# TYPE dvn_requests_total counter",
        ]
        lines += [f'dvn_requests_total{{endpoint="{e}",code="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP dvn_request_seconds Time to answer a request.", "# TYPE dvn_request_seconds histogram"]
        for endpoint, counts in sorted(self.latency.items()):
            for bound, total in zip([*map(str, LATENCY_BUCKETS), "+Inf"], itertools.accumulate(counts), strict=True):
                lines.append(f'dvn_request_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {total}')
            lines.append(f'dvn_request_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]}')
            lines.append(f'dvn_request_seconds_count{{endpoint="{endpoint}"}} {sum(counts)}')
        lines += ["# HELP dvn_level The level each task runs at.", "# TYPE dvn_level gauge"]
        lines += [f'dvn_level{{task="{task}"}} {level}' for task, level in choices.items()]
        lines += ["# HELP dvn_held_bytes Weight bytes held for the running levels.", "# TYPE dvn_held_bytes gauge"]
        lines += [f"dvn_held_bytes {held}", "# HELP dvn_switches_total Level switches so far."]
        lines += ["# TYPE dvn_switches_total counter", f"dvn_switches_total {self.switches}"]
        return "\n".join(lines) + "\n"


class Server:
    """The ASGI app (``app``) of one engine, its worker thread and its memory watcher.

    Raises:
        DvnError: a budget that does not parse or that no plan fits, ``auto`` on an engine that cannot plan or with
            a room nothing fits, ``--reserve`` without ``auto``, a limit below 1.
    """

    def __init__(self, engine: Engine, options: ServeOptions, log: Callable[[str], None]) -> None:
        _check_stack()
        self.options, self.log = options, log
        self.engine = engine
        if options.reserve is not None and options.budget != "auto":
            raise BadConfig("--reserve is the memory --budget auto leaves free: give --budget auto, or no --reserve")
        self.auto = AutoBudget(options.reserve or 0, options.margin) if options.budget == "auto" else None
        self.memory: MemorySource = file_memory(options.memory_file) if options.memory_file else system_memory
        for flag, value in [("--max-batch", options.max_batch), ("--max-uploads", options.max_uploads)]:
            if value < 1:
                raise BadConfig(f"{flag} must be at least 1, got {value}")
        if not options.body_timeout_s > 0:
            raise BadConfig(f"--body-timeout must be above 0 seconds, got {options.body_timeout_s}")
        if self.auto is not None and not self.engine.plans:
            raise BadConfig("--budget auto cannot follow the memory with --per-pair")
        if self.auto is not None:
            available = self.memory()
            budget, shrink = self.auto.budget(available, 0)
            self.budget: str | None = f"auto: {budget}B"
            choices, _ = self._fit(available, 0, budget, shrink)
        else:
            self.budget = options.budget
            choices, _ = self.engine.plan(options.budget)
        self.engine.switch(choices)
        self.met: bool | None = None if options.budget is None else True  # whether the levels keep the budget
        self._uploads = 0  # request bodies being read
        self.metrics = _Metrics()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._stuck = ""  # the last auto-budget message, said once
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/health", self._endpoint("health", self.health), methods=["GET"]),
            Route("/v1/status", self._endpoint("status", self.status), methods=["GET"]),
            Route("/metrics", self._endpoint("metrics", self.prometheus), methods=["GET"]),
            Route("/v1/predict", self._endpoint("predict", self.predict), methods=["POST"]),
            Route("/v1/budget", self._endpoint("budget", self.set_budget), methods=["PUT"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan, exception_handlers={404: _http, 405: _http})

    def _fit(self, available: int, held: int, budget: int, shrink: bool) -> tuple[dict[str, int], int]:
        """``engine.fit`` for the bytes ``--budget auto`` leaves (``AutoBudget.budget``: what is ``held`` and
        ``available``, less the reserve, and less the margin unless it must ``shrink``), or a ``BadBudget`` naming
        each of those."""
        assert self.auto is not None
        seen = f"{format_bytes(available)} free"
        seen += f" and {format_bytes(held)} held" if held else ""
        less = [f"--reserve {format_bytes(self.auto.reserve)}"] if self.auto.reserve else []
        less += [] if shrink or not self.auto.margin else [f"the {self.auto.margin:.0%} margin"]
        seen += f", less {' and '.join(less)}," if less else ""
        if budget < 1:
            raise BadBudget(f"--budget auto: {seen} leaves no room for any level")
        try:
            return self.engine.fit(budget)
        except BadBudget as exc:
            raise BadBudget(f"--budget auto: {seen} leaves {format_bytes(budget)}: {_one_line(exc)}") from None

    # ------------------------------------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        worker = threading.Thread(target=self._work, name="dvn-serve-worker", daemon=True)
        worker.start()
        watcher = asyncio.create_task(self._watch()) if self.auto is not None else None
        try:
            yield
        finally:  # uvicorn has drained the requests in flight
            if watcher is not None:
                watcher.cancel()
            self._jobs.put(None)
            await asyncio.to_thread(worker.join)

    def _endpoint(self, name: str, handler: Callable):
        """``handler`` timed and counted, a ``DvnError`` answered as a 4xx ``{"error": "one line"}``."""
        from starlette.responses import JSONResponse

        async def endpoint(request):
            start = time.perf_counter()
            try:
                response = await handler(request)
            except DvnError as exc:
                status = _status_of(exc)
                headers = {"Connection": "close"} if status in _CLOSE else None
                response = JSONResponse({"error": _one_line(exc)}, status_code=status, headers=headers)
            except Exception as exc:  # a bug: still one line, and the server keeps serving
                response = JSONResponse({"error": f"internal error: {_one_line(exc)}"}, status_code=500)
            self.metrics.record(name, response.status_code, time.perf_counter() - start)
            return response

        return endpoint

    # ------------------------------------------------------------------------------------------- endpoints

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "tasks": self.engine.tasks})

    async def status(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(
            {
                "tasks": self.engine.choices,
                "held_bytes": self.engine.held_bytes(),
                "budget": self.budget,
                "met": self.met,
                "switches": self.metrics.switches,
                "requests": self.metrics.served,
                "shared": self.engine.shared,
            }
        )

    async def prometheus(self, request):
        from starlette.responses import PlainTextResponse

        text = self.metrics.text(self.engine.choices, self.engine.held_bytes())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def predict(self, request):
        from starlette.responses import JSONResponse

        tasks = self._tasks(request.query_params.get("task"))
        top = _top(request.query_params.get("top", "5"))
        body = await self._body(request, self.options.max_body)
        uploads = _uploads(request.headers.get("content-type", ""), body)
        images = await asyncio.to_thread(self._decode, uploads)
        rows = await self._submit(_Predict(tasks, images, top))
        self.metrics.served += 1
        return JSONResponse(_finite({"rows": rows}))

    async def set_budget(self, request):
        from starlette.responses import JSONResponse

        if self.auto is not None:
            raise RequestError(409, "the budget follows the memory (--budget auto); serve without it to set one")
        body = await self._body(request, 2**16)
        try:
            budget = json.loads(body)["budget"]
            if not isinstance(budget, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise RequestError(400, 'send a JSON object {"budget": "30%"}') from None
        choices, _ = await asyncio.to_thread(self.engine.plan, budget)  # a budget nothing fits: BadBudget, 422
        switch_ms = await self._switch(choices, budget)
        self.met = True
        return JSONResponse(
            {
                "budget": budget,
                "tasks": choices,
                "held_bytes": self.engine.held_bytes(),
                "met": True,
                "switch_ms": switch_ms,
            }
        )

    # --------------------------------------------------------------------------------------------- helpers

    async def _body(self, request, limit: int) -> bytes:
        """The request's body (``_read_body``), refused at once (503) when ``max_uploads`` bodies are being read."""
        if self._uploads >= self.options.max_uploads:
            raise RequestError(503, f"{self._uploads} uploads are being read already; try again later")
        self._uploads += 1
        try:
            return await _read_body(request, limit, self.options.body_timeout_s)
        finally:
            self._uploads -= 1

    def _tasks(self, text: str | None) -> tuple[str, ...]:
        """The tasks a request names (comma-separated), or () for every running task."""
        names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
        for name in names:
            if name not in self.engine.tasks:
                raise UnknownTask(f"unknown task {name!r}; serving: {', '.join(self.engine.tasks)}")
        return names

    def _decode(self, uploads: Sequence[tuple[str, bytes]]) -> ImageSet:
        """Each upload checked from its header (format, pixels), then decoded as ``dvn predict`` decodes files."""
        request = next(self._ids)
        sources = {}
        for index, (name, data) in enumerate(uploads):
            _check_header(name, data, self.options.max_pixels)
            sources[_Upload(request, index, name)] = data

        def unreadable(upload: _Upload, why: str) -> None:  # its header passed: it does not decode
            raise RequestError(415, f"{upload} cannot be decoded as an image")

        return self.engine.decode(sources, unreadable)

    async def _submit(self, job):
        self._jobs.put(job)
        return await asyncio.wrap_future(job.done)

    async def _switch(self, choices: dict[str, int], budget: str) -> float:
        """Switch on the worker (after the batches asked for before); returns its time in ms."""
        switch_ms = await self._submit(_Switch(choices))
        self.budget = budget
        self.metrics.switches += 1
        levels = ", ".join(f"{task} {level}" for task, level in choices.items())
        self.log(
            f"budget {budget}: levels {levels}, {self.engine.held_bytes()} bytes held, switched in {switch_ms:.1f} ms"
        )
        return switch_ms

    # ---------------------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        """Run jobs in order until the stop mark; predictions for the same tasks waiting together form one batch."""
        while True:
            jobs = [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while jobs[-1] is not None:
                    jobs.append(self._jobs.get_nowait())
            for group in _groups(jobs, self.options.max_batch):
                if group is None:
                    return
                if isinstance(group[0], _Switch):
                    _settle(group, self._run_switch)
                else:
                    _settle(group, self._run_predicts)

    def _run_switch(self, jobs: list[_Switch]) -> None:
        (job,) = jobs
        start = time.perf_counter()
        self.engine.switch(job.choices)
        job.done.set_result(1000 * (time.perf_counter() - start))

    def _run_predicts(self, jobs: list[_Predict]) -> None:
        choices = self.engine.choices
        running = {task: choices[task] for task in jobs[0].tasks or choices}
        top = max(job.top for job in jobs)
        rows = self.engine.classify(ImageSet.join([job.images for job in jobs]), running, top)
        start = 0
        for job in jobs:  # rows come image by image, the jobs' images in order
            end = start + len(job.images.readable) * len(running)
            job.done.set_result([{**row, "top": row["top"][: job.top]} for row in rows[start:end]])
            start = end

    # --------------------------------------------------------------------------------------------- watcher

    async def _watch(self) -> None:
        """Follow the memory source: shrink at once when the levels held no longer fit, grow with a margin."""
        while True:
            await asyncio.sleep(self.options.poll_s)
            try:
                await self._follow_memory()
            except DvnError as exc:  # ``_fit``'s words already start so
                message = _one_line(exc)
                self._say_once(message if message.startswith("--budget auto") else f"--budget auto: {message}")

    async def _follow_memory(self) -> None:
        """One reading: shrink to what fits the room (a room nothing fits: the levels keep running, ``met`` false,
        said once), or grow to a plan that fits it with the margin to spare."""
        assert self.auto is not None
        available = await asyncio.to_thread(self.memory)
        held = self.engine.held_bytes()
        budget, shrink = self.auto.budget(available, held)
        try:
            choices, planned = await asyncio.to_thread(self._fit, available, held, budget, shrink)
        except BadBudget:
            if not shrink:  # what runs fits the room; only nothing smaller than it fits the margin: no switch
                self.met, self._stuck = True, ""
                return
            self.met = False
            raise
        self.met, self._stuck = True, ""
        if choices == self.engine.choices or (not shrink and planned <= held):
            return
        await self._switch(choices, f"auto: {budget}B")

    def _say_once(self, message: str) -> None:
        if message != self._stuck:
            self._stuck = message
            self.log(message)


def _groups(jobs: list, max_batch: int) -> list:
    """Jobs in order as groups: a switch alone, consecutive predictions for the same tasks together up to
    ``max_batch`` images; None (the stop mark) ends the list."""
    groups: list = []
    for job in jobs:
        if job is None:
            groups.append(None)
            break
        last = groups[-1] if groups else None
        if (
            isinstance(job, _Predict)
            and last
            and isinstance(last[0], _Predict)
            and last[0].tasks == job.tasks
            and sum(len(j.images.readable) for j in last) + len(job.images.readable) <= max_batch
        ):
            last.append(job)
        else:
            groups.append([job])
    return groups


def _settle(jobs: list, run: Callable[[list], None]) -> None:
    """Run a group; a failure fails each of its requests (the worker keeps going)."""
    try:
        run(jobs)
    except Exception as exc:
        for job in jobs:
            if not job.done.done():
                job.done.set_exception(exc)


def _check_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DvnError("dvn serve needs Starlette and uvicorn: pip install 'dvn-cli[serve]'") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def _http(request, exc):
    """Starlette's 404 and 405 as the one-line JSON every error is."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)


def _top(text: str) -> int:
    try:
        top = int(text)
    except ValueError:
        raise RequestError(400, f"top must be a whole number, got {text!r}") from None
    if top < 1:
        raise RequestError(400, f"top must be at least 1, got {top}")
    return top


async def _read_body(request, limit: int, timeout_s: float) -> bytes:
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


def _finite(value: Any) -> Any:
    """``value`` with every float that JSON cannot write (NaN, infinity) as None (null), so that an answer never
    fails, or says NaN, for one bad number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _uploads(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image: the parts of a multipart body, else the body itself."""
    if not content_type.lower().startswith("multipart/"):
        if not body:
            raise RequestError(400, "send an image as the request body (or several as multipart/form-data)")
        return [("image", body)]
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts:
        raise RequestError(400, "a multipart body without parts (or without its boundary)")
    if len(parts) > MAX_IMAGES:
        raise RequestError(413, f"{len(parts)} images in one request; at most {MAX_IMAGES}")
    uploads = []
    for i, part in enumerate(parts):
        name = part.get_filename() or part.get_param("name", header="content-disposition") or f"image{i}"
        uploads.append((str(name), part.get_payload(decode=True) or b""))
    return uploads


def _check_header(name: str, data: bytes, max_pixels: int) -> None:
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


def serve(engine: Engine, options: ServeOptions, log: Callable[[str], None]) -> None:
    """Serve ``engine``'s tasks until SIGTERM (in-flight requests drained, then a normal return) or Ctrl-C.

    Raises:
        DvnError: what ``Server`` refuses, or an address that cannot be listened on.
    """
    import uvicorn

    server = Server(engine, options, log)
    sock = _listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        server.app, log_level="warning", access_log=False, timeout_graceful_shutdown=options.drain_s, lifespan="on"
    )
    levels = ", ".join(f"{task} {level}" for task, level in server.engine.choices.items())
    log(f"serving {levels} ({server.engine.held_bytes()} bytes) on http://{host}:{port}")
    # uvicorn raises the signal it drained on again once done; a drained SIGTERM is a clean stop, so it ends here
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise BadConfig(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
