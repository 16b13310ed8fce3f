"""The HTTP plumbing every fake server of this folder shares.

A fake API is a :class:`FakeServer` subclass: it keeps its destination's state and answers one
request at a time in :meth:`FakeServer.handle`. This module serves it on 127.0.0.1 (a
``ThreadingHTTPServer`` in a daemon thread, HTTP/1.1 keep-alive, as clients use the real APIs)
and holds what every fake needs beside its API's own rules: the lifecycle (``start``,
``stop``, ``with``, ``port``, ``base_url``), the count of requests in flight
(``max_concurrent``), the protocol breaches a test asserts are absent (``violations``), and
the failures ``fail_next`` queues for the next requests (:class:`FailureQueue`).

Two failures below the API's own shapes are shared too: an answer of status :data:`DROP`
closes the connection without a byte of answer (a server that crashed after reading the
request), and :meth:`FakeServer.close_port` / :meth:`FakeServer.reopen_port` make the port
refuse connections, established keep-alive ones included, as a destination that went down.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from typing_extensions import Self

Answer = tuple[int, bytes, dict[str, str]]
"""What :meth:`FakeServer.handle` returns: status, body, and headers to send with them."""

DROP = -1
"""The status of an :data:`Answer` that is never sent: the connection is closed instead, so
the client sees the server hang up without answering (whatever the request did stays done)."""


class Failure:
    """One injected failure, waiting for the request it will spoil.

    ``kind`` names it in the fake's terms (``rate_limit``, ``timeout``, ...), ``options`` holds
    what ``fail_next`` was given with it; ``path`` and ``method``, when set, keep it for the
    first request whose path contains ``path`` and whose method is ``method``.
    """

    __slots__ = ("kind", "method", "options", "path")

    def __init__(
        self,
        kind: str,
        options: Mapping[str, Any] | None = None,
        *,
        path: str | None = None,
        method: str | None = None,
    ):
        self.kind = kind
        self.options = dict(options or {})
        self.path = path
        self.method = method

    def matches(self, method: str, path: str) -> bool:
        """Whether this failure is for a ``method`` request to ``path``."""
        return (self.path is None or self.path in path) and (
            self.method is None or self.method == method
        )


class FailureQueue:
    """The failures a fake's ``fail_next`` queued, each taken by the next request it matches.

    Args:
        kinds: the failure kinds the fake knows; ``add`` refuses others (empty: any kind).
    """

    def __init__(self, kinds: Iterable[str] = ()):
        self.kinds = tuple(kinds)
        self._queue: deque[Failure] = deque()
        self._lock = threading.Lock()

    def add(self, failure: Failure, n: int = 1) -> None:
        """Queue ``failure`` for the next ``n`` requests it matches."""
        if self.kinds and failure.kind not in self.kinds:
            raise ValueError(
                f"unknown failure kind {failure.kind!r}; known: {', '.join(self.kinds)}"
            )
        with self._lock:
            self._queue.extend(failure for _ in range(n))

    def pending(self, *, ignore: Iterable[str] = ()) -> int:
        """How many failures are still queued (of kinds not in ``ignore``)."""
        skip = frozenset(ignore)
        with self._lock:
            return sum(1 for failure in self._queue if failure.kind not in skip)

    def take(self, method: str = "", path: str = "") -> Failure | None:
        """The first queued failure for this request, removed from the queue; or ``None``."""
        if not self._queue:  # the common case, checked without the lock: the fake's hot path
            return None
        with self._lock:
            for index, failure in enumerate(self._queue):
                if failure.matches(method, path):
                    del self._queue[index]
                    return failure
        return None


def hold(
    failure: Failure | None, option: str, default: float, latency_s: float = 0.0
) -> Failure | None:
    """Hold the request ``latency_s``, and as long as a ``timeout`` failure says (its
    ``option``, else ``default`` seconds); return the failure left to answer with.

    A timeout leaves none: the request is then handled and applied normally, as by a real
    server whose answer was lost (the client, timed out, sends it again).
    """
    delay = latency_s
    if failure is not None and failure.kind == "timeout":
        delay += float(failure.options.get(option, default))
        failure = None
    if delay:
        time.sleep(delay)
    return failure


def media_type(headers: Any) -> str:
    """The request's ``Content-Type`` without parameters, lowercased (``""`` when absent)."""
    return (headers.get("Content-Type") or "").split(";")[0].strip().lower()


def json_answer(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Answer:
    """An answer whose body is ``payload`` as JSON."""
    return status, orjson.dumps(payload), dict(headers or {})


def target(path: str, query: str) -> str:
    """The request target again, from :meth:`FakeServer.handle`'s ``path`` and ``query``."""
    return f"{path}?{query}" if query else path


def seed_items(
    emails_to_fields: Mapping[str, Mapping[str, Any] | None] | Iterable[str],
) -> Iterator[tuple[str, Mapping[str, Any] | None]]:
    """``(email, fields)`` of what a test seeds: a mapping of emails to fields, or emails."""
    if isinstance(emails_to_fields, Mapping):
        return iter(emails_to_fields.items())
    return ((email, {}) for email in emails_to_fields)


def drop_none(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` applied, an override of ``None`` dropping its key (how a
    fake's ``destination_config`` lets a test leave a setting out)."""
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


class FakeServer:
    """A fake API on loopback: the lifecycle and bookkeeping a fake shares with the others.

    A subclass implements :meth:`handle` and extends :meth:`reset` with its own state (calling
    this one, under ``self._lock``, a reentrant lock its handling shares). ``failure_kinds``
    are the kinds its ``fail_next`` accepts, queued in ``self._failures``.

    Args:
        port: the port to listen on (0: any free one).
    """

    content_type: str | None = "application/json"
    """``Content-Type`` of an answer with a body and no ``Content-Type`` header of its own."""
    failure_kinds: tuple[str, ...] = ()

    def __init__(self, *, port: int = 0):
        self._port = port
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.refusing = False
        """The port is closed (:meth:`close_port`): every connection is refused or dropped."""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on 127.0.0.1 in a daemon thread; return self."""
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.fake = self
        self._server = server
        # Once bound, keep the port: reopen_port binds the same one again.
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close_port(self) -> None:
        """Stop listening, as a destination that went down: new connections are refused, and a
        request on a connection opened before (clients keep them alive) is dropped unanswered.
        :meth:`reopen_port` listens on the same port again. Safe to call from a handler."""
        with self._lock:
            if self.refusing:
                return
            self.refusing = True
        self.stop()

    def reopen_port(self) -> None:
        """Listen again on the port :meth:`close_port` closed."""
        with self._lock:
            if not self.refusing:
                return
            self.refusing = False
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port listened on (also while :meth:`close_port` has it closed)."""
        assert self._server is not None or self.refusing, "the fake is not started"
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: the ``base_url`` of a destination using this fake."""
        return f"http://127.0.0.1:{self.port}"

    # -- state ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget violations, the requests-in-flight count and injected failures."""
        with self._lock:
            self.violations: list[str] = []
            """Requests a correct client never sends, described; a test asserts none."""
            self.max_concurrent = 0
            """Most requests in flight at once."""
            self._concurrent = 0
            self._failures = FailureQueue(self.failure_kinds)

    def sync_config(self) -> dict[str, Any]:
        """The sync-level ``config``: nothing beyond the destination's."""
        return {}

    def fail_next(
        self,
        kind: str,
        n: int = 1,
        *,
        path: str | None = None,
        method: str | None = None,
        **options: Any,
    ) -> None:
        """Answer the next ``n`` requests (whose path contains ``path`` and whose method is
        ``method``, if given) with a failure of ``kind``, in the API's own shape; the fake's
        module doc lists its kinds and their ``options`` (``seconds`` or ``delay_s`` of a
        ``timeout``, for one)."""
        self._failures.add(Failure(kind, options, path=path, method=method), n)

    # -- handling (called on the server's threads) ------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes) -> Answer:
        """Check and serve one request; return status, body and extra headers.

        ``path`` is the request target up to ``?``, ``query`` the raw rest (``""`` when
        none), ``headers`` the request's (``email.message.Message``), ``body`` its bytes.
        """
        raise NotImplementedError

    def _record_violation(self, message: str) -> None:
        with self._lock:
            self.violations.append(message)

    @contextmanager
    def _in_flight(self) -> Iterator[int]:
        """Count the request in flight while the block runs; yield how many are, itself
        included (a fake that limits concurrent requests refuses those over its limit)."""
        with self._lock:
            self._concurrent += 1
            count = self._concurrent
            self.max_concurrent = max(self.max_concurrent, count)
        try:
            yield count
        finally:
            with self._lock:
                self._concurrent -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has closed its socket: writing the late answer fails. That
        # is expected in timeout tests and not worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as in production
    # Without TCP_NODELAY, a small answer written after its headers waits for the client's
    # delayed ACK (Nagle): 40 ms a request, which would make a fake the bottleneck.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log line."""

    def _drop(self) -> None:
        """Close the connection without answering."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client hung up first
            pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        fake = self.server.fake
        if fake.refusing:  # a keep-alive connection opened before the port closed
            self._drop()
            return
        status, answer, headers = fake.handle(self.command, path, query, self.headers, body)
        if status == DROP:
            self._drop()
            return
        self.send_response(status)
        if answer and fake.content_type and "Content-Type" not in headers:
            self.send_header("Content-Type", fake.content_type)
        self.send_header("Content-Length", str(len(answer)))
        for name, value in headers.items():
            self.send_header(name, value)
        # Headers and body in one write (end_headers would send the headers alone): with
        # the client's delayed ACKs, two writes cost a round trip a request.
        self._headers_buffer.append(b"\r\n" + answer)
        self.flush_headers()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve
