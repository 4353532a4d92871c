"""``dvn serve``: every task of a model file over HTTP.

A shared export folder is served by onnxruntime without PyTorch: on that path nothing here imports torch
(``tests/test_serve_folder.py``), so the PyTorch engine and the model files are imported only for the other kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..serve.memory_source import reserve_bytes
from ..serve.options import ServeOptions
from . import ui
from .common import DEFAULT_CHECKPOINT, CheckpointOption, open_model_file, user_errors

if TYPE_CHECKING:
    from ..serve.engine import Engine

__all__ = ["serve"]


def serve(
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    host: Annotated[str, typer.Option(help="Address to listen on; loopback unless you say otherwise.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one, named on stderr).")
    ] = 8000,
    budget: Annotated[
        str | None,
        typer.Option(
            help="A shared budget as dvn plan takes (30%, 2MB), or auto: follow the memory the device has. "
            "Default: each task's largest level."
        ),
    ] = None,
    reserve: Annotated[
        str | None, typer.Option(help="With --budget auto: memory to leave free (e.g. 500MB; default none).")
    ] = None,
    max_body: Annotated[int | None, typer.Option(min=1, help="Largest request body, in bytes (default 8 MiB).")] = None,
    body_timeout: Annotated[
        float | None, typer.Option(help="Seconds a request body may take to arrive (default 10; then 408).")
    ] = None,
    max_uploads: Annotated[
        int | None, typer.Option(help="Request bodies read at once (default 16; one more is a 503).")
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(min=1, help="Largest image, in pixels (checked before decoding; default 4096x4096)."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most images of concurrent requests run as one batch.")] = 32,
    memory_file: Annotated[Path | None, typer.Option(hidden=True)] = None,
    poll: Annotated[float, typer.Option(hidden=True)] = 1.0,
    per_pair: Annotated[bool, typer.Option("--per-pair", hidden=True)] = False,
) -> None:
    """Serve every task of a model file over HTTP: POST /v1/predict, PUT /v1/budget, GET /v1/status, /metrics.

    -c takes a checkpoint or a bundle (every task from one block store, PyTorch) or a shared export folder
    (onnxruntime, without PyTorch). SIGTERM finishes the requests in flight and exits 0.
    """
    from ..modelfile.shared_folder import is_export_folder  # these import numpy: dvn --help does not wait for it
    from ..serve.listen import serve as run_server

    with user_errors():
        options = ServeOptions(
            host=host,
            port=port,
            budget=budget,
            reserve=None if reserve is None else reserve_bytes(reserve),
            memory_file=memory_file,
            poll_s=poll,
            max_batch=max_batch,
            max_body=max_body or ServeOptions.max_body,  # the limits live in serve/options.py, once
            max_pixels=max_pixels or ServeOptions.max_pixels,
            body_timeout_s=ServeOptions.body_timeout_s if body_timeout is None else body_timeout,
            max_uploads=ServeOptions.max_uploads if max_uploads is None else max_uploads,
        )
        engine: Engine
        if is_export_folder(checkpoint):  # imports no torch: a deployment may not have it
            from ..serve.folder_engine import FolderEngine

            engine = FolderEngine(checkpoint)
        else:
            from ..serve.model_engine import ModelEngine  # imports torch

            engine = ModelEngine(open_model_file(checkpoint), per_pair)
        run_server(engine, options, ui.print_note)
