"""``dvn serve``'s process: the ``Server``'s app on uvicorn, on a socket opened before anything is said."""

from __future__ import annotations

import logging
import math
import signal
import socket
from collections.abc import Callable

from ..errors import BadConfig
from .app import Server
from .engine import Engine
from .options import ServeOptions

__all__ = ["serve"]


def serve(engine: Engine, options: ServeOptions, log: Callable[[str], None]) -> None:
    """Serve ``engine``'s tasks until SIGTERM (in-flight requests drained, then a normal return) or Ctrl-C.

    Raises:
        DvnError: what ``Server`` refuses, or an address that cannot be listened on.
    """
    import uvicorn

    server = Server(engine, options, log)
    # python-multipart logs each body it cannot parse before raising; the client is answered (400), stderr is ours
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    sock = _listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    drain_s = math.ceil(options.drain_s)  # whole seconds, as uvicorn takes them
    config = uvicorn.Config(
        server.app, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_s, lifespan="on"
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
