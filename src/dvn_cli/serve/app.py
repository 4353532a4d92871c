"""``dvn serve``'s HTTP side: the ``Server``, one engine's ASGI app (Starlette, the ``serve`` extra); no torch.

- ``GET /health``, ``GET /v1/status``, ``GET /metrics`` (Prometheus text, ``metrics.Metrics``);
- ``POST /v1/predict?task=NAME&top=5``: one image as the body, or several as ``multipart/form-data``
  (``uploads``); the rows are those of ``dvn predict --json`` (``rows.prediction_rows`` builds them all);
- ``PUT /v1/budget`` ``{"budget": "30%"}``: re-plan and switch. A budget is what every task served holds together,
  each shared block once, as ``dvn plan`` counts it (the engine's ``plan``); one that even the smallest levels
  exceed is a 422 and changes nothing. The answer and ``/v1/status`` say whether it is ``met``.

Every forward and switch runs on one worker thread (``jobs.Worker``), in the order asked for; with ``--budget
auto`` a ``watcher.MemoryWatcher`` switches the levels as the memory changes. A bad request is a 4xx with
``{"error": "one line"}`` (``engine.status_of``), and no answer holds NaN (a number JSON cannot write is null).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import BadConfig, DvnError, UnknownTask
from .engine import Engine, RequestError, one_line, status_of
from .jobs import Worker
from .memory_source import AutoBudget, file_memory, system_memory
from .metrics import Metrics
from .options import ServeOptions
from .uploads import BodyReader, decode_uploads, split_uploads
from .watcher import MemoryWatcher

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["Server"]

_CLOSE = (408, 413, 503)
"""Answers sent before the body was read: the connection is closed, not kept for a client still sending."""


class Server:
    """The ASGI app (``app``) of one engine, its worker thread and, with ``--budget auto``, its memory watcher.

    Raises:
        DvnError: Starlette, uvicorn or python-multipart missing; a budget that does not parse or that no plan
            fits; ``auto`` on an engine that cannot plan or with a room nothing fits.
    """

    def __init__(self, engine: Engine, options: ServeOptions, log: Callable[[str], None]) -> None:
        _check_stack()
        self.engine, self.options, self.log = engine, options, log
        self.watcher: MemoryWatcher | None = None
        self.budget: str | None = options.budget  # what the levels were planned for
        if options.budget == "auto":
            auto = AutoBudget(options.reserve or 0, options.margin)
            if not engine.plans:
                raise BadConfig("--budget auto cannot follow the memory with --per-pair")
            memory = file_memory(options.memory_file) if options.memory_file else system_memory
            self.watcher = MemoryWatcher(engine, auto, memory, log)
            choices, self.budget = self.watcher.first()
        else:
            choices, _ = engine.plan(options.budget)
        engine.switch(choices)
        self._met: bool | None = None if options.budget is None else True
        self.metrics = Metrics()
        self.worker = Worker(engine, options.max_batch)
        self.bodies = BodyReader(options.max_uploads, options.body_timeout_s)
        self._ids = itertools.count()  # request numbers: uploads of requests batched together stay apart
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

    @property
    def met(self) -> bool | None:
        """Whether the running levels keep the budget (None: no budget; false only under ``auto``)."""
        return self.watcher.met if self.watcher is not None else self._met

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any):
        self.worker.start()
        watch = None
        if self.watcher is not None:
            watch = asyncio.create_task(self.watcher.watch(self.options.poll_s, self._switch))
        try:
            yield
        finally:  # uvicorn has drained the requests in flight
            if watch is not None:
                watch.cancel()
            await self.worker.stop()

    def _endpoint(self, name: str, handler: Callable[[Request], Awaitable[Response]]):
        """``handler`` timed and counted, a ``DvnError`` answered as a 4xx ``{"error": "one line"}``."""
        from starlette.responses import JSONResponse

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except DvnError as exc:
                status = status_of(exc)
                headers = {"Connection": "close"} if status in _CLOSE else None
                response = JSONResponse({"error": one_line(exc)}, status_code=status, headers=headers)
            except Exception as exc:  # a bug: still one line, and the server keeps serving
                response = JSONResponse({"error": f"internal error: {one_line(exc)}"}, status_code=500)
            self.metrics.record(name, response.status_code, time.perf_counter() - start)
            return response

        return endpoint

    # ------------------------------------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "tasks": self.engine.tasks})

    async def status(self, request: Request) -> Response:
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

    async def prometheus(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse

        text = self.metrics.text(self.engine.choices, self.engine.held_bytes())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def predict(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        tasks = self._tasks(request.query_params.get("task"))
        top = _top(request.query_params.get("top", "5"))
        body = await self.bodies.read(request, self.options.max_body)
        uploads = await split_uploads(request.headers, body)
        images = await asyncio.to_thread(decode_uploads, self.engine, uploads, next(self._ids), self.options.max_pixels)
        rows = await self.worker.predict(tasks, images, top)
        self.metrics.served += 1
        return JSONResponse(_finite({"rows": rows}))

    async def set_budget(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        if self.watcher is not None:
            raise RequestError(409, "the budget follows the memory (--budget auto); serve without it to set one")
        body = await self.bodies.read(request, 2**16)
        try:
            budget = json.loads(body)["budget"]
            if not isinstance(budget, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise RequestError(400, 'send a JSON object {"budget": "30%"}') from None
        choices, _ = await asyncio.to_thread(self.engine.plan, budget)  # a budget nothing fits: BadBudget, 422
        switch_ms = await self._switch(choices, budget)
        self._met = True
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

    def _tasks(self, text: str | None) -> tuple[str, ...]:
        """The tasks a request names (comma-separated), or () for every running task."""
        names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
        for name in names:
            if name not in self.engine.tasks:
                raise UnknownTask(f"unknown task {name!r}; serving: {', '.join(self.engine.tasks)}")
        return names

    async def _switch(self, choices: dict[str, int], budget: str) -> float:
        """Switch on the worker (after the batches asked for before), said in one line; returns its time in ms."""
        switch_ms = await self.worker.switch(choices)
        self.budget = budget
        self.metrics.switches += 1
        levels = ", ".join(f"{task} {level}" for task, level in choices.items())
        self.log(
            f"budget {budget}: levels {levels}, {self.engine.held_bytes()} bytes held, switched in {switch_ms:.1f} ms"
        )
        return switch_ms


def _check_stack() -> None:
    try:
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        needs = "dvn serve needs Starlette, uvicorn and python-multipart"
        raise DvnError(f"{needs}: pip install 'dvn-cli[serve]'") from None


async def _http(request: Request, exc: Any) -> Response:
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
