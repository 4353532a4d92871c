"""``dvn serve``: a real server process on a free loopback port, talked to over HTTP; and the same ASGI app driven
in this process (``InProcess``: no port, no subprocess), fast enough for ``make test-fast``."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dvn_cli.core.network import build_network
from dvn_cli.errors import BadConfig
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.registry import open_model
from dvn_cli.planning.plan import plan_for_budget, shared_memory_params
from dvn_cli.serve.memory_source import AutoBudget, cgroup_available, reserve_bytes

from .conftest import require_module, settle_batch_norm, tiny_config, tiny_tasks

require_module("uvicorn")

ACCURACY = {"task0": [0.5, 0.6, 0.7, 0.8], "task1": [0.3, 0.5, 0.6, 0.65]}
BOUND_S = 60  # every wait below ends by then


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, object]:
    """A tiny trained-looking checkpoint (validation accuracy to plan with) and its network."""
    torch.manual_seed(0)
    network = settle_batch_norm(build_network(tiny_config(), tiny_tasks(2)))
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    save_checkpoint(network, path, training={"val_accuracy": ACCURACY})
    return path, network


def png(size=(12, 12), colour=(200, 30, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(out, "PNG")
    return out.getvalue()


WITHOUT_TORCH = ["-c", "import sys; sys.modules['torch'] = None; from dvn_cli.cli.app import app; app(prog_name='dvn')"]
"""Python arguments that run ``dvn`` in a process where ``import torch`` fails."""


class Served:
    """``python -m dvn_cli serve`` on port 0 (it names its port on stderr), stopped with SIGTERM at the end;
    ``without_torch``: in a process where ``import torch`` fails."""

    def __init__(self, model_path: Path, *args: str, without_torch: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "COLUMNS": "400"}
        dvn = WITHOUT_TORCH if without_torch else ["-m", "dvn_cli"]
        command = [sys.executable, *dvn, "serve", "-c", str(model_path), "--port", "0", *args]
        self.proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.port = None
        deadline = time.monotonic() + BOUND_S
        while self.port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if "http://127.0.0.1:" in line:
                self.port = int(line.rsplit(":", 1)[1])
        assert self.port is not None, "".join(self.lines)
        threading.Thread(target=self._drain, daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the server never became healthy")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=BOUND_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()
        finally:
            conn.close()

    def get(self, path: str):
        return self.request("GET", path)

    def predict(self, body: bytes, query: str = "", headers=None):
        return self.request("POST", f"/v1/predict{query}", body, headers)

    def budget(self, budget) -> tuple[int, dict]:
        return self.request("PUT", "/v1/budget", json.dumps({"budget": budget}).encode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=BOUND_S)


class InProcess:
    """A ``serve.app.Server``'s ASGI app run in this process: its lifespan (the worker thread) started, each
    request one ASGI call on one event loop. ``options`` are ``ServeOptions`` fields."""

    def __init__(self, engine, **options: Any) -> None:
        from dvn_cli.serve.app import Server
        from dvn_cli.serve.options import ServeOptions

        self.lines: list[str] = []
        self.server = Server(engine, ServeOptions(**options), self.lines.append)
        self.loop = asyncio.new_event_loop()
        self.lifespan = self.server._lifespan(self.server.app)
        self.loop.run_until_complete(self.lifespan.__aenter__())

    def request(self, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, Any]:
        return self.loop.run_until_complete(_asgi(self.server.app, method, path, body, headers or {}))

    def budget(self, budget) -> tuple[int, Any]:
        return self.request("PUT", "/v1/budget", json.dumps({"budget": budget}).encode())

    def close(self) -> None:
        self.loop.run_until_complete(self.lifespan.__aexit__(None, None, None))
        self.loop.close()


async def _asgi(app, method: str, target: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    path, _, query = target.partition("?")
    raw = [(b"content-length", str(len(body)).encode())]
    raw += [(key.lower().encode(), value.encode()) for key, value in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    data = b"".join(m.get("body", b"") for m in sent[1:])
    kind = dict(sent[0]["headers"]).get(b"content-type", b"").decode()
    return sent[0]["status"], json.loads(data) if kind.startswith("application/json") else data.decode()


@pytest.fixture
def served(model):
    server = Served(model[0], "--budget", "100%")
    yield server
    assert server.stop() == 0, "".join(server.lines)


@pytest.fixture(scope="module")
def limited(model):
    """One server with small limits for every bad request."""
    server = Served(model[0], "--max-pixels", "1024", "--max-body", "65536")
    yield server
    assert server.stop() == 0, "".join(server.lines)


def multipart(files: dict[str, bytes], boundary: str = "dvnboundary") -> tuple[bytes, dict]:
    body = b""
    for name, data in files.items():
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def expected_top(network, image: bytes, task: str, level: int) -> list[str]:
    from dvn_cli.data.batches import normalize_batch
    from dvn_cli.data.pixels import load_image

    spec = network.tasks[network.task_index(task)]
    x = normalize_batch(load_image(io.BytesIO(image), 3, 12, spec.resize).unsqueeze(0), spec)
    with torch.no_grad():
        probs = torch.softmax(network.eval()(x, task, level), dim=1)[0]
    return [spec.classes[i] for i in probs.topk(min(5, len(spec.classes))).indices.tolist()]


def expected_probabilities(network, image: bytes, task: str, level: int) -> list[float]:
    """The top probabilities ``network`` gives ``image`` for (task, level), largest first, as a row lists them."""
    from dvn_cli.data.batches import normalize_batch
    from dvn_cli.data.pixels import load_image

    spec = network.tasks[network.task_index(task)]
    x = normalize_batch(load_image(io.BytesIO(image), 3, 12, spec.resize).unsqueeze(0), spec)
    with torch.no_grad():
        probs = torch.softmax(network.eval()(x, task, level), dim=1)[0]
    return probs.topk(min(5, len(spec.classes))).values.tolist()


HUGE = "1" + "0" * 400


def test_a_budget_switch_changes_what_the_checkpoint_server_runs(model):
    """In process, no training: PUT /v1/budget plans as dvn plan does, the runtime itself switches (its blocks, the
    rows' levels and probabilities), and budgets nothing fits, levels or 400 digits are a 422 that changes nothing."""
    from dvn_cli.serve.model_engine import ModelEngine

    path, network = model
    engine = ModelEngine(open_model(path))
    served = InProcess(engine, budget="100%")
    try:
        top = {"task0": 4, "task1": 4}
        assert engine.runtime.choices == top and served.request("GET", "/v1/status")[1]["met"] is True
        status, out = served.budget("35%")
        small = plan_for_budget(network, {"val_accuracy": ACCURACY}, "35%", list(top)).choices
        assert status == 200 and out["tasks"] == small != top and out["met"] is True, out
        assert engine.runtime.choices == small  # the block store itself switched, not only the reported levels
        assert out["held_bytes"] == 4 * engine.runtime.held_params() == 4 * shared_memory_params(network, small)
        status, rows = served.request("POST", "/v1/predict", png())
        assert status == 200 and [(r["task"], r["level"]) for r in rows["rows"]] == list(small.items())
        for row in rows["rows"]:
            want = expected_probabilities(network, png(), row["task"], row["level"])
            assert [c["probability"] for c in row["top"]] == pytest.approx(want, abs=1e-5)
        for bad, words in [("1B", "fits no plan"), ("3", "is a level"), (HUGE, "largest budget is 10^18")]:
            status, out = served.budget(bad)
            assert status == 422 and words in out["error"] and "\n" not in out["error"], out
        status, state = served.request("GET", "/v1/status")
        assert state["tasks"] == small == engine.runtime.choices and state["switches"] == 1 and state["met"] is True
    finally:
        served.close()


# ---------------------------------------------------------------------------------------------- serving


@pytest.mark.slow
def test_health_predict_status_and_metrics(model, served):
    path, network = model
    image = png()
    status, out = served.predict(image, "?task=task1&top=2")
    assert status == 200, out
    (row,) = out["rows"]
    assert row["image"] == "image" and row["task"] == "task1" and row["level"] == 4
    assert [c["class"] for c in row["top"]] == expected_top(network, image, "task1", 4)[:2]
    status, out = served.predict(image)  # without a task, every running task answers
    assert status == 200 and [(r["task"], r["level"]) for r in out["rows"]] == [("task0", 4), ("task1", 4)]
    assert [c["class"] for c in out["rows"][0]["top"]] == expected_top(network, image, "task0", 4)
    body, headers = multipart({"red.png": image, "grey.png": png(colour=(90, 90, 90))})
    status, out = served.predict(body, "?task=task0", headers)
    assert status == 200 and [r["image"] for r in out["rows"]] == ["red.png", "grey.png"]
    status, state = served.get("/v1/status")
    assert status == 200 and state["tasks"] == {"task0": 4, "task1": 4} and state["requests"] == 3
    assert state["held_bytes"] == 4 * shared_memory_params(network, {"task0": 4, "task1": 4})
    assert state["budget"] == "100%" and state["switches"] == 0
    status, text = served.get("/metrics")
    assert status == 200
    assert 'dvn_requests_total{endpoint="predict",code="200"} 3' in text
    assert 'dvn_request_seconds_count{endpoint="predict"} 3' in text and 'dvn_level{task="task1"} 4' in text
    assert f"dvn_held_bytes {state['held_bytes']}" in text and "dvn_switches_total 0" in text


@pytest.mark.slow
def test_a_budget_switch_changes_the_levels_and_bad_budgets_are_4xx(model, served):
    network = model[1]
    status, out = served.budget("35%")
    assert status == 200, out
    small = out["tasks"]
    assert small != {"task0": 4, "task1": 4} and out["switch_ms"] > 0
    assert out["held_bytes"] == 4 * shared_memory_params(network, small)
    status, rows = served.predict(png())
    assert [(r["task"], r["level"]) for r in rows["rows"]] == list(small.items())
    for bad, code, words in [("1B", 422, "fits no plan"), ("lots", 422, "bad budget"), (3, 400, "budget")]:
        status, out = served.budget(bad)
        assert status == code and words in out["error"] and "\n" not in out["error"], out
    status, out = served.request("PUT", "/v1/budget", b"{not json")
    assert status == 400 and list(out) == ["error"]
    status, state = served.get("/v1/status")  # refused budgets changed nothing; the server keeps serving
    assert state["tasks"] == small and state["switches"] == 1 and state["budget"] == "35%"
    assert served.predict(png())[0] == 200
    assert any("budget 35%: levels" in line for line in served.lines)


def bomb() -> bytes:
    """A valid PNG of 6000 x 6000 pixels that compresses to a few kB."""
    return png((6000, 6000), mode="1")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


@pytest.mark.slow  # each server process takes seconds to start on a shared machine
@pytest.mark.parametrize(
    "body, query, headers, code, words",
    [
        (b"this is text, not an image", "", {}, 415, "not an image"),
        (png_header_only(16, 16), "", {}, 415, "cannot be decoded"),
        (png((12, 12))[:-30], "", {}, 415, "cannot be decoded"),
        (b"", "", {}, 400, "send an image"),
        (bomb(), "", {}, 413, "6000x6000 pixels, over the limit"),
        (png_header_only(100_000, 100_000), "", {}, 413, "decompression bomb"),
        (png((40, 40)), "", {}, 413, "40x40 pixels, over the limit of 1024"),
        (b"x" * 70_000, "", {}, 413, "over the limit of 65536 bytes"),
        (png(), "?task=nope", {}, 404, "unknown task 'nope'"),
        (png(), "?top=0", {}, 400, "top must be at least 1"),
        (png(), "?top=two", {}, 400, "whole number"),
        (b"--x--\r\n", "", {"Content-Type": "multipart/form-data; boundary=y"}, 400, "multipart"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "", {}, 415, "not an image"),
    ],
)
def test_bad_requests_are_4xx_one_line_and_the_server_keeps_serving(limited, body, query, headers, code, words):
    status, out = limited.predict(body, query, headers)
    assert status == code and list(out) == ["error"] and words in out["error"], out
    assert "\n" not in out["error"]
    assert limited.predict(png())[0] == 200


def test_multipart_parts_are_the_images_and_bad_bodies_are_4xx(model):
    """In process: the parts of a multipart body (python-multipart, once the body is read within its limits) are the
    images, named by file name, else by field name; more than MAX_IMAGES parts, a body that does not parse, one
    without parts or without a boundary are a 4xx in one line."""
    from dvn_cli.serve.model_engine import ModelEngine

    served = InProcess(ModelEngine(open_model(model[0])))
    try:
        body, headers = multipart({"red.png": png(), "grey.png": png(colour=(90, 90, 90))})
        status, out = served.request("POST", "/v1/predict?task=task0", body, headers)
        assert status == 200 and [r["image"] for r in out["rows"]] == ["red.png", "grey.png"], out
        field = b'--b\r\nContent-Disposition: form-data; name="photo"\r\n\r\n' + png() + b"\r\n--b--\r\n"
        status, out = served.request("POST", "/v1/predict", field, {"Content-Type": "multipart/form-data; boundary=b"})
        assert status == 200 and [r["image"] for r in out["rows"]] == ["photo", "photo"], out
        for body, headers, code, words in [
            (*multipart({f"{i}.png": png() for i in range(65)}), 413, "at most 64"),
            (b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=y"}, 400, "multipart body that does not"),
            (b"--y--\r\n", {"Content-Type": "multipart/form-data; boundary=y"}, 400, "without parts"),
            (png(), {"Content-Type": "multipart/form-data"}, 400, "boundary"),
        ]:
            status, out = served.request("POST", "/v1/predict", body, headers)
            assert status == code and list(out) == ["error"] and words in out["error"], out
            assert "\n" not in out["error"]
    finally:
        served.close()


def test_a_part_without_a_file_name_keeps_the_bytes_sent():
    """Starlette decodes a part without a file name as text (UTF-8, else Latin-1); an image whose bytes happen to be
    valid UTF-8 (a PPM of pixels 0xC3 0xA9) must still reach the decoder byte for byte, as a file part does."""
    import asyncio

    from starlette.datastructures import Headers

    from dvn_cli.serve.uploads import split_uploads

    ppm = b"P6\n2 2\n255\n" + b"\xc3\xa9" * 6  # valid UTF-8 throughout: 'e acute' six times
    latin = b"P6\n2 2\n255\n" + bytes([0xE9, 0x89, 0xFF]) * 4  # not UTF-8: Starlette's Latin-1 path
    body = (
        b"".join(
            b'--b\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\n%s\r\n' % (name, extra, data)
            for name, extra, data in [
                (b"utf8", b"", ppm),
                (b"latin", b"", latin),
                (b"file", b'; filename="f.ppm"', ppm),
            ]
        )
        + b"--b--\r\n"
    )
    headers = Headers({"content-type": "multipart/form-data; boundary=b"})
    assert asyncio.run(split_uploads(headers, body)) == [("utf8", ppm), ("latin", latin), ("f.ppm", ppm)]


@pytest.mark.slow
def test_unknown_paths_and_methods_are_json_too(limited):
    assert limited.request("GET", "/nowhere") == (404, {"error": "GET /nowhere: Not Found"})
    assert limited.request("GET", "/v1/predict") == (405, {"error": "GET /v1/predict: Method Not Allowed"})


@pytest.mark.slow
def test_too_many_images_in_one_request(limited):
    body, headers = multipart({f"{i}.png": png() for i in range(65)})
    status, out = limited.predict(body, "", headers)
    assert status == 413 and "at most 64" in out["error"]


@pytest.mark.slow
def test_cli_refusals_are_one_line(model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for args, words in [
        (["--budget", "1B"], "fits no plan"),
        (["--budget", "auto", "--reserve", "lots"], "--reserve 'lots' is not a size in bytes"),
        (["--host", "256.1.1.1"], "cannot listen on 256.1.1.1"),
    ]:
        command = [sys.executable, "-m", "dvn_cli", "serve", "-c", str(model[0]), "--port", "0", *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BOUND_S)
        assert done.returncode == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_slow_uploads_are_cut_off_and_at_most_max_uploads_are_read_at_once(model):
    """Clients that declare a 1000-byte body and then send a byte now and then (slowloris): a real server reads at
    most --max-uploads bodies at once and refuses the others at once (503), cuts each one it reads off after
    --body-timeout (408), and closes every connection itself, within seconds; then it still answers."""
    server = Served(model[0], "--body-timeout", "1", "--max-uploads", "4")
    clients: list[socket.socket] = []
    try:
        start = time.monotonic()
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S)
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: dvn\r\nContent-Length: 1000\r\n\r\nx")
            clients.append(sock)
        stop = threading.Event()

        def trickle() -> None:  # one byte to each client every 0.2 s, until the server has closed them all
            while not stop.wait(0.2):
                for sock in clients:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        for sock in clients:  # until the server closes the connection (a timeout fails the test)
            with contextlib.suppress(ConnectionResetError):  # closed with trickled bytes unread: a reset
                while sock.recv(4096):
                    pass
        elapsed = time.monotonic() - start
        stop.set()
        thread.join(BOUND_S)
        assert elapsed < 10, elapsed  # a 1 s body timeout: not held until the client stops
        assert server.predict(png())[0] == 200
        text = server.get("/metrics")[1]
        codes = {code: count(text, f'dvn_requests_total{{endpoint="predict",code="{code}"}} ') for code in (408, 503)}
        assert codes[408] >= 4 and codes[503] >= 1 and codes[408] + codes[503] == 12, codes
    finally:
        for sock in clients:
            sock.close()
        assert server.stop() == 0, "".join(server.lines)


def count(text: str, prefix: str) -> int:
    """The number after ``prefix`` on its line of ``text`` (0 without such a line)."""
    return next((int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0)


# ------------------------------------------------------------------------------------------------- auto


def test_reserve_and_hysteresis():
    assert reserve_bytes("0B") == 0 and reserve_bytes("2MB") == 2_000_000 and reserve_bytes("1TB") == 10**12
    for text in ["30%", "lots", "3", HUGE + "B"]:
        with pytest.raises(BadConfig, match=r"^--reserve '.*' is not a size in bytes; write e.g. 500MB"):
            reserve_bytes(text)
    auto = AutoBudget(reserve=100, margin=0.1)
    assert auto.budget(available=50, held=1000) == (950, True)  # the reserve eats into what is held: shrink now
    assert auto.budget(available=150, held=1000) == (945, False)  # fits: only a plan smaller than held, no switch
    assert auto.budget(available=1100, held=1000) == (1800, False)  # grow to a plan that fits with 10 % to spare


def test_auto_budget_refusals_name_the_memory_and_the_reserve(model, tmp_path):
    """In process: a reserve above the memory seen, or a room no plan fits, says both numbers, not "1 bytes"; a
    --reserve without --budget auto is refused, not ignored."""
    from dvn_cli.errors import BadBudget
    from dvn_cli.planning.budget_rules import format_bytes
    from dvn_cli.serve.model_engine import ModelEngine

    path, network = model
    engine = ModelEngine(open_model(path))
    memory = tmp_path / "free"
    memory.write_text(str(10**9))
    with pytest.raises(BadBudget) as info:
        InProcess(engine, budget="auto", reserve=900 * 10**9, memory_file=memory)
    assert str(info.value) == "--budget auto: 1.0 GB free, less --reserve 900.0 GB, leaves no room for any level"
    smallest = 4 * shared_memory_params(network, {"task0": 1, "task1": 1})
    memory.write_text(str(smallest + 1000))
    with pytest.raises(BadBudget) as info:
        InProcess(engine, budget="auto", reserve=2000, memory_file=memory)
    room = format_bytes((smallest - 1000) * 0.9)
    assert str(info.value).startswith(
        f"--budget auto: {format_bytes(smallest + 1000)} free, less --reserve 2.0 kB and the 10% margin, "
        f"leaves {room}: "
    )
    assert f"they need {format_bytes(smallest)}" in str(info.value)
    with pytest.raises(BadConfig, match=r"^--reserve is the memory --budget auto leaves free"):
        InProcess(engine, budget="30%", reserve=0)
    from typer.testing import CliRunner

    from dvn_cli.cli.app import app

    for args, words in [
        (["--reserve", "1TB"], "error: --reserve is the memory --budget auto leaves free"),
        (["--budget", "auto", "--reserve", "lots"], "error: --reserve 'lots' is not a size in bytes"),
    ]:
        done = CliRunner().invoke(app, ["serve", "-c", str(path), "--port", "0", *args])
        assert done.exit_code == 1 and done.output.startswith(words) and done.output.count("\n") == 1, done.output


def test_cgroup_room_is_the_tightest_limit(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "memory.max").write_text("1000\n")
    (tmp_path / "a" / "memory.current").write_text("400\n")
    (tmp_path / "a" / "b" / "memory.max").write_text("max\n")
    (tmp_path / "a" / "b" / "memory.current").write_text("300\n")
    membership = tmp_path / "cgroup"
    membership.write_text("0::/a/b\n")
    assert cgroup_available(tmp_path, membership) == 600
    (tmp_path / "a" / "memory.max").write_text("max\n")
    assert cgroup_available(tmp_path, membership) is None


@pytest.mark.slow
def test_auto_budget_follows_an_injected_memory_source(model, tmp_path):
    network = model[1]
    full = 4 * shared_memory_params(network, {"task0": 4, "task1": 4})
    memory = tmp_path / "free"
    write_atomically(memory, str(10 * full))
    reserve = full // 2
    server = Served(
        model[0], "--budget", "auto", "--reserve", f"{reserve}B", "--memory-file", str(memory), "--poll", "0.05"
    )
    try:
        assert server.get("/v1/status")[1]["tasks"] == {"task0": 4, "task1": 4}
        write_atomically(memory, "0")  # nothing free: the reserve must come out of what is held
        small = wait_for(server, lambda s: s["tasks"] != {"task0": 4, "task1": 4})
        assert small["held_bytes"] <= full - reserve and small["budget"].startswith("auto: ")
        assert server.predict(png())[0] == 200
        switches = small["switches"]
        write_atomically(
            memory, str(reserve + small["held_bytes"] // 20)
        )  # 5 % more room, within the margin: no switch
        time.sleep(0.5)
        assert server.get("/v1/status")[1]["switches"] == switches
        write_atomically(memory, str(10 * full))
        grown = wait_for(server, lambda s: s["tasks"] == {"task0": 4, "task1": 4})
        assert grown["held_bytes"] == full
        assert server.budget("50%")[0] == 409  # the budget follows the memory
        assert sum(line.startswith("budget auto: ") for line in server.lines) == grown["switches"] >= 2
    finally:
        assert server.stop() == 0, "".join(server.lines)


def write_atomically(path: Path, text: str) -> None:
    """The server may read the file at any time: never let it see half a number."""
    part = path.with_suffix(".part")
    part.write_text(text)
    part.replace(path)


def wait_for(server: Served, condition) -> dict:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        state = server.get("/v1/status")[1]
        if condition(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"status never met the condition: {state}")


# ------------------------------------------------------------------------------------- switches and drain


@pytest.mark.slow
def test_requests_during_switches_all_succeed_on_a_running_level(model, served):
    levels_seen = [{"task0": 4, "task1": 4}]
    results: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client():
        for _ in range(40):
            if stop.is_set():
                return
            results.append(served.predict(png()))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for budget in ["35%", "60%", "100%", "35%", "80%", "50%"] * 2:
        status, out = served.budget(budget)
        assert status == 200, out
        levels_seen.append(out["tasks"])
    for thread in threads:
        thread.join(BOUND_S)
    stop.set()
    assert len(results) == 160 and all(status == 200 for status, _ in results)
    allowed = {(task, level) for levels in levels_seen for task, level in levels.items()}
    assert {(r["task"], r["level"]) for _, out in results for r in out["rows"]} <= allowed
    assert served.get("/v1/status")[1]["switches"] == 12


@pytest.mark.slow
def test_sigterm_during_load_drains_and_exits_0(model):
    server = Served(model[0])
    image = png()
    statuses: list[int] = []

    def client():
        for _ in range(200):
            try:
                statuses.append(server.predict(image)[0])
            except OSError:  # after SIGTERM the server accepts no new connection
                return

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    # one request in flight for sure: its headers and half its body sent, the rest only after SIGTERM
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=BOUND_S)
    conn.putrequest("POST", "/v1/predict?task=task0")
    conn.putheader("Content-Length", str(len(image)))
    conn.endheaders()
    conn.send(image[:20])
    deadline = time.monotonic() + BOUND_S
    while len(statuses) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    conn.send(image[20:])
    response = conn.getresponse()
    rows = json.loads(response.read())["rows"]
    assert response.status == 200 and rows[0]["task"] == "task0"
    assert server.proc.wait(timeout=BOUND_S) == 0, "".join(server.lines)
    for thread in threads:
        thread.join(BOUND_S)
    assert statuses and set(statuses) == {200}


# ------------------------------------------------------------------------------------------ other files


@pytest.mark.slow
def test_a_shared_export_folder_is_served(model, tmp_path):
    path, network = model
    folder = tmp_path / "shared"
    export_shared(load_checkpoint(path), folder, [("task0", 2), ("task0", 4), ("task1", 3)], check=False)
    server = Served(folder)
    try:
        status, out = server.predict(png())
        assert status == 200 and [(r["task"], r["level"]) for r in out["rows"]] == [("task0", 4), ("task1", 3)]
        assert [c["class"] for c in out["rows"][0]["top"]] == expected_top(network, png(), "task0", 4)
        export = open_model(folder)
        budget = export.files.held_bytes([("task0", 2), ("task1", 3)])
        assert export.files.held_bytes([("task0", 4), ("task1", 3)]) > budget
        status, out = server.budget(f"{budget}B")  # fixed levels: what both hold together, each tensor once
        assert status == 200 and out["tasks"] == {"task0": 2, "task1": 3} and out["held_bytes"] == budget, out
        assert [r["level"] for r in server.predict(png())[1]["rows"]] == [2, 3]
    finally:
        assert server.stop() == 0, "".join(server.lines)


class NanEngine:
    """An engine whose one task answers NaN: what a damaged model could give."""

    tasks, choices, plans, shared = ["t"], {}, False, False

    def plan(self, budget):
        return {"t": 1}, None

    def switch(self, choices):
        self.choices = dict(choices)

    def held_bytes(self):
        return 0

    def decode(self, sources, on_skipped):
        from dvn_cli.runtime.images import ImageSet

        return ImageSet(list(sources), [], {})

    def classify(self, images, running, top):
        return [{"image": "image", "task": "t", "level": 1, "top": [{"class": "a", "probability": float("nan")}]}]


def test_an_answer_never_holds_nan():
    """A number JSON cannot write is null in the answer: not NaN (invalid JSON), not a 500."""
    served = InProcess(NanEngine())
    try:
        status, out = served.request("POST", "/v1/predict", png())
        assert status == 200 and out["rows"][0]["top"] == [{"class": "a", "probability": None}], out
    finally:
        served.close()


def test_waiting_predictions_for_the_same_tasks_form_one_batch():
    """The worker's grouping: in order, a switch alone, same-task predictions together up to max_batch images."""
    from dvn_cli.runtime.predict import ImageSet
    from dvn_cli.serve.jobs import Predict, Switch, groups

    def job(tasks, n):
        return Predict(tasks, ImageSet([f"i{k}" for k in range(n)], [], {}), 5)

    a1, a2, b, switch, a3, a4 = (
        job(("a",), 2),
        job(("a",), 3),
        job(("b",), 1),
        Switch({}),
        job(("a",), 4),
        job(("a",), 1),
    )
    assert groups([a1, a2, b, switch, a3, a4, None], max_batch=5) == [[a1, a2], [b], [switch], [a3, a4], None]
    assert groups([a1, a2, a3], max_batch=4) == [[a1], [a2], [a3]]  # 2 + 3 > 4
    assert groups([a1, a2], max_batch=1) == [[a1], [a2]]
