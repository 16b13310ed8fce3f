"""A lean webhook receiver on loopback that only counts rows, for the benchmark.

It answers every ``POST`` with ``200 {}`` once it has parsed the JSON body (orjson) and counted
its rows: ``operations`` (audsync's webhook format), ``rows`` (the drt batch template of the
benchmark), or a top-level list. It keeps no members, checks no signature, so it stays fast and
small at 10M rows. ``GET /_count`` answers ``{"rows": n, "requests": n, "ops": {...}}`` and
``POST /_reset`` zeroes the counters.

Run it as a program (``python -m bench.receiver --port 0``); it prints ``READY <url>``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.request import Request, urlopen

import orjson


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.rows = 0
        self.requests = 0
        self.bytes = 0
        self.ops: Counter[str] = Counter()


def _count(document: Any) -> tuple[int, Counter[str]]:
    if isinstance(document, list):
        return len(document), Counter()
    if isinstance(document, dict):
        operations = document.get("operations")
        if isinstance(operations, list):
            return len(operations), Counter(op.get("op") for op in operations)
        rows = document.get("rows")
        if isinstance(rows, list):
            return len(rows), Counter()
        return 1, Counter()
    return 0, Counter()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    counts: _Counts


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the per-request log line."""

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n" + body)
        self.flush_headers()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        counts = self.server.counts
        if self.path == "/_reset":
            with counts.lock:
                counts.reset()
            self._answer(200, b"{}")
            return
        try:
            rows, ops = _count(orjson.loads(body))
        except orjson.JSONDecodeError:
            self._answer(400, b'{"error": "body is not JSON"}')
            return
        with counts.lock:
            counts.rows += rows
            counts.requests += 1
            counts.bytes += len(body)
            if ops:
                counts.ops.update(ops)
        self._answer(200, b"{}")

    def do_GET(self) -> None:  # noqa: N802
        counts = self.server.counts
        with counts.lock:
            body = orjson.dumps({"rows": counts.rows, "requests": counts.requests,
                                 "bytes": counts.bytes, "ops": dict(counts.ops)})
        self._answer(200, body)


class Receiver:
    """The receiver in a child process: ``with Receiver() as r: r.url; r.count(); r.reset()``."""

    def __init__(self, python: str = sys.executable):
        self.python = python
        self.url = ""
        self.pid = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> "Receiver":
        self._process = subprocess.Popen([self.python, "-m", "bench.receiver", "--port", "0"],
                                         stdout=subprocess.PIPE, text=True)
        self.pid = self._process.pid
        line = self._process.stdout.readline().strip()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            self._process.kill()
            raise RuntimeError(f"the receiver did not start: {line!r}")
        self.url = line.split(" ", 1)[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    @property
    def base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def count(self) -> dict[str, Any]:
        with urlopen(self.base + "/_count", timeout=30) as answer:  # noqa: S310 - loopback
            return orjson.loads(answer.read())

    def reset(self) -> None:
        request = Request(self.base + "/_reset", data=b"{}", method="POST")
        with urlopen(request, timeout=30):  # noqa: S310 - loopback
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a lean counting webhook receiver")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = _Server(("127.0.0.1", args.port), _Handler)
    server.counts = _Counts()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    print(f"READY http://127.0.0.1:{server.server_address[1]}/hook", flush=True)
    while not stop.wait(0.2):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
