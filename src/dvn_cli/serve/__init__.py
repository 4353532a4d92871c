"""``dvn serve``: every task of a model file served over HTTP from one process (docs/design.md, "Serving").

One idea a module, none importing torch but ``model_engine``:

- ``engine``: what the server runs (the ``Engine`` protocol), ``RequestError`` and the HTTP status of each error;
- ``options``: ``ServeOptions`` and the default limits;
- ``uploads``: a request body read within its limits, split into images (``multipart/form-data`` by
  python-multipart), each image's header checked;
- ``jobs``: the one worker thread that runs every batch and switch, in order;
- ``metrics``: the counters of ``/metrics`` and ``/v1/status``;
- ``memory`` and ``watcher``: the memory ``--budget auto`` follows, and what follows it;
- ``app``: the ``Server``, the ASGI app wiring the above; ``listen``: ``serve``, the process on its socket;
- ``model_engine`` (PyTorch) and ``folder_engine`` (onnxruntime and numpy): the engines.
"""
