"""``dvn serve`` under bounded loopback load: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients for
the two tasks of the main job, from one block store against per-pair models (resident memory of both); the same
load while the budget switches every second; ``--budget auto`` under an injected memory reading that shrinks and
grows; and concurrent requests batched (``--max-batch 32``) against one at a time (``--max-batch 1``).

    .venv/bin/python benchmarks/serve.py [-c runs/dvn/model.safetensors] [--requests 300] [--seconds 30]

Every load is a fixed number of requests, cut at ``--seconds``. The clients run on the same machine as the server
(threads over http.client), so the figures are for the whole loop on this CPU. Without a checkpoint it builds an
untrained network of the main job's shape (speed does not depend on the weights) whose checkpoint carries a made-up
validation table, so that budgets have something to plan with.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.modelfile.checkpoint import save_checkpoint

TASKS = ("mnist", "fashion-mnist")
SRC = Path(__file__).resolve().parents[1] / "src"


def main_job_checkpoint(folder: Path) -> Path:
    config = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
    torch.manual_seed(0)
    network = build_network(config, [TaskSpec(t, tuple("0123456789"), (0.5,), (0.25,)) for t in TASKS]).eval()
    made_up = {"mnist": [0.95, 0.97, 0.98, 0.985], "fashion-mnist": [0.80, 0.85, 0.87, 0.88]}
    return save_checkpoint(network, folder / "model.safetensors", training={"val_accuracy": made_up})


class Server:
    def __init__(self, model: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "400"}
        command = [sys.executable, "-m", "dvn_cli", "serve", "-c", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        line = ""
        deadline = time.monotonic() + 120
        while "http://" not in line and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.log.append(line)
            if not line and self.proc.poll() is not None:
                raise SystemExit("".join(self.log))
        self.port = int(line.rsplit(":", 1)[1])
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if call(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)

    def memory_kb(self) -> dict[str, int]:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def load(port: int, clients: int, requests: int, seconds: float, image: bytes) -> dict:
    """``requests`` predictions (tasks alternating) from ``clients`` threads, cut at ``seconds``."""
    latencies, failures, levels = [], [], []
    started = time.perf_counter()
    deadline = started + seconds
    count = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next(count, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                status, out = call(port, "POST", f"/v1/predict?task={TASKS[i % 2]}", image)
            except OSError as exc:
                status, out = 0, {"error": str(exc)}
            end = time.perf_counter()
            with lock:
                if status == 200:
                    latencies.append(end - start)
                    levels.append((start, end, out["rows"][0]["task"], out["rows"][0]["level"]))
                else:
                    failures.append(out)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ms = sorted(1000 * t for t in latencies)
    return {
        "clients": clients,
        "ok": len(ms),
        "failed": len(failures),
        "req_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None,
        "levels": levels,
    }


def switching(server: Server, args, image: bytes, budgets: list[str]) -> dict:
    """4 clients while the budget switches every second; each response's level checked against the levels running
    at some time between its request and its answer."""
    history = [(0.0, call(server.port, "GET", "/v1/status")[1]["tasks"])]
    stop = threading.Event()

    def switcher() -> None:
        for i in range(10_000):
            if stop.wait(1.0):
                return
            status, out = call(server.port, "PUT", "/v1/budget", json.dumps({"budget": budgets[i % 4]}).encode())
            history.append((time.perf_counter(), out["tasks"]))

    thread = threading.Thread(target=switcher)
    thread.start()
    result = load(server.port, 4, args.requests * 2, args.seconds, image)
    stop.set()
    thread.join()
    wrong = 0
    for start, end, task, level in result["levels"]:
        running = [
            lv[task]
            for i, (at, lv) in enumerate(history)
            if at <= end and (i + 1 == len(history) or history[i + 1][0] >= start)
        ]
        wrong += level not in running
    return {**result, "switches": len(history) - 1, "wrong_level": wrong}


def auto(model: Path, args, image: bytes) -> dict:
    """``--budget auto`` while the injected free memory shrinks and grows every 1.5 s."""
    with tempfile.TemporaryDirectory() as tmp:
        memory = Path(tmp) / "free"
        memory.write_text(str(10**9))
        server = Server(model, "--budget", "auto", "--reserve", "2MB", "--memory-file", str(memory), "--poll", "0.2")
        stop = threading.Event()
        seen = []

        def follow() -> None:
            for free in [0, 10**9, 500_000, 10**9, 0, 10**9] * 100:
                memory.write_text(str(free))
                if stop.wait(1.5):
                    return
                seen.append(call(server.port, "GET", "/v1/status")[1]["tasks"])

        thread = threading.Thread(target=follow)
        thread.start()
        result = load(server.port, 4, args.requests * 2, args.seconds, image)
        stop.set()
        thread.join()
        switches = call(server.port, "GET", "/v1/status")[1]["switches"]
        code = server.stop()
    return {
        **result,
        "switches": switches,
        "levels_seen": [dict(t) for t in {tuple(s.items()) for s in seen}],
        "exit": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint", type=Path)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = io.BytesIO()
    Image.effect_noise((28, 28), 60).save(out, "PNG")
    image = out.getvalue()
    report: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load": {}}
    report["load"]["before"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.checkpoint or main_job_checkpoint(Path(tmp))
        report["model"] = str(args.checkpoint or "untrained, main job's shape")
        for name, extra in [
            ("shared", []),
            ("per-pair", ["--per-pair"]),
            ("shared, --max-batch 1", ["--max-batch", "1"]),
        ]:
            server = Server(model, *extra)
            rows = [load(server.port, c, args.requests, args.seconds, image) for c in (1, 4, 16)]
            report[name] = {
                "rows": [{k: v for k, v in r.items() if k != "levels"} for r in rows],
                "held_bytes": call(server.port, "GET", "/v1/status")[1]["held_bytes"],
                **server.memory_kb(),
                "exit": server.stop(),
            }
            print(name, json.dumps(report[name]), flush=True)
        server = Server(model)
        result = switching(server, args, image, ["40%", "100%", "25%", "70%"])
        report["switching"] = {k: v for k, v in result.items() if k != "levels"} | {"exit": server.stop()}
        print("switching", json.dumps(report["switching"]), flush=True)
        report["auto"] = {k: v for k, v in auto(model, args, image).items() if k != "levels"}
        print("auto", json.dumps(report["auto"]), flush=True)
    report["load"]["after"] = os.getloadavg()
    print(json.dumps(report["load"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
