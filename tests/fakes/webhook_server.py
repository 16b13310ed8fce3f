"""A fake webhook receiver that checks every request against the contract (section 7).

:class:`FakeWebhook` is a real HTTP server on 127.0.0.1 (a ``ThreadingHTTPServer`` in a
background thread). It keeps the destination's state (``members``: key -> fields; ``add`` and
``update`` set, ``remove`` deletes), counts what it receives, and can be told to fail:

    with FakeWebhook(secret="s3cret") as hook:
        hook.fail_next(2, 429, retry_after=1)
        ...  # point a webhook destination at hook.url
        assert hook.violations == [] and hook.bad_signatures == 0

The failures it injects, each for the next ``n`` hook requests after ``after`` more have
passed untouched (so a fault lands mid-delivery):

* :meth:`~FakeWebhook.fail_next`: an answer (5xx, 429 with ``Retry-After``, 4xx), nothing
  applied;
* :meth:`~FakeWebhook.delay_next`: the request held, then applied and answered (a client
  that timed out first never learns it was applied);
* :meth:`~FakeWebhook.apply_then_fail`: the batch applied, then the answer is an error, or
  the connection is dropped, or the answer is held past the client's timeout: the outcomes
  a client cannot tell from "not applied";
* :meth:`~FakeWebhook.hold_next`: the request held, unapplied, until
  :meth:`~FakeWebhook.release_held`, then applied and answered (a request of a stalled
  sender that reaches the destination only after another run took over);
* ``reject_keys``: rows rejected (not applied) in every 2xx answer;
* :meth:`~FakeWebhook.go_dead`: a dead destination, either ``hang`` (requests are read and
  never answered, then dropped unapplied) or ``refuse`` (the port closes: connections are
  refused or dropped), until :meth:`~FakeWebhook.revive` or ``for_s`` seconds.

Counters beside the state say what happened: ``applied_unanswered`` (batches applied whose
client got no success), ``answers_dropped``, ``dead_requests``, ``in_flight`` (hook requests
being handled now: a test waits for 0 before it reads a settled state), ``injected`` (faults
taken, by kind) and ``pending_failures`` (still queued).

Every request is checked: ``POST`` to the hook path, ``Content-Type: application/json``, the
body's shape, ``Idempotency-Key`` equal to the body's ``batch_id``, and, with a secret, the
HMAC signature (401 and :attr:`FakeWebhook.bad_signatures` counted on a bad one). A breach of
the contract answers 400 and is listed in :attr:`FakeWebhook.violations`.

The listing of ``audsync verify`` (the ``list_url`` setting) is served on ``list_path``
(``/hook/members`` by default): ``GET ?limit=<n>&cursor=<c>`` answers ``{"members": [{"key",
"id"}, ...], "next": <cursor or null>}`` in key order, at most ``list_page_size`` members a page
(and at most ``limit``); with a secret, the request must carry a good signature over
``"<timestamp>."`` (an empty body), else 401 and ``bad_signatures``. ``listing_body`` replaces
every listing answer's body (a malformed listing). :meth:`~FakeWebhook.drop_members` removes
members by hand, :meth:`~FakeWebhook.seed_members` adds some (a drift for ``verify``).

For an audsync run in another process, run the server as a program::

    python tests/fakes/webhook_server.py --port 0 --secret S --state-file state.json

It prints ``READY <url>`` once listening, serves ``GET /_fake/state`` (the state as JSON),
``POST /_fake/inject`` (:meth:`FakeWebhook.inject`) and ``POST /_fake/reset``, revives on
SIGUSR1 (a closed port takes no control request), and writes the state to ``--state-file``
when it stops (SIGTERM or SIGINT). :class:`FakeWebhookProcess` wraps all that.

Speed: bodies are parsed with orjson and each operation costs a few dictionary operations, so
the server absorbs well over 500,000 rows a second and is never the bottleneck of a benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.request import Request, urlopen

import orjson

try:
    from ._http import DROP, Answer, Failure, FakeServer, hold, media_type, target
except ImportError:  # run as a program (FakeWebhookProcess): this folder is on sys.path
    from _http import DROP, Answer, Failure, FakeServer, hold, media_type, target  # type: ignore[no-redef]

OPS = frozenset({"add", "remove", "update"})
ENVELOPE_KEYS = ("sync", "run_id", "batch_id", "sent_at")
SENT_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
CONTROL_PREFIX = "/_fake/"
DEAD_MODES = ("hang", "refuse")


class FakeWebhook(FakeServer):
    """A contract-checking webhook receiver on loopback; state and counters are thread-safe.

    Args:
        secret: the signing secret; ``None`` takes requests without checking signatures.
        path: the hook's path.
        port: the port (0: any free one).
        latency_s: seconds every hook request waits before it is handled (to make
            concurrency observable).
        timestamp_tolerance_s: how old (or new) ``X-Audsync-Timestamp`` may be.
        list_path: the path of the member listing (``None``: ``<path>/members``).
        list_page_size: the most members a listing page holds.
    """

    def __init__(
        self,
        secret: str | None = None,
        *,
        path: str = "/hook",
        port: int = 0,
        latency_s: float = 0.0,
        timestamp_tolerance_s: float = 300.0,
        list_path: str | None = None,
        list_page_size: int = 100,
    ):
        super().__init__(port=port)
        self.secret = secret.encode() if secret else None
        self.path = path
        self.list_path = list_path or path.rstrip("/") + "/members"
        self.list_page_size = int(list_page_size)
        self.latency_s = latency_s
        self.timestamp_tolerance_s = timestamp_tolerance_s
        self.dead: str | None = None
        """``hang`` or ``refuse`` while :meth:`go_dead` is in force, else ``None``."""
        self._alive = threading.Event()
        self._alive.set()
        self._revive_timer: threading.Timer | None = None
        self._release = threading.Event()
        """Set by :meth:`release_held` for the requests held until then."""
        self.reset()

    @property
    def url(self) -> str:
        """The hook's URL."""
        return self.base_url + self.path

    @property
    def list_url(self) -> str:
        """The member listing's URL (the webhook's ``list_url`` setting)."""
        return self.base_url + self.list_path

    # -- state ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget state, counters and injected failures."""
        super().reset()
        with self._lock:
            self._members: dict[str, Any] = {}
            # Applied bodies not yet replayed into _members: (body, keys rejected in it).
            self._pending: list[tuple[bytes, frozenset[str]]] = []
            self.requests = 0
            """Hook requests received (failed ones included)."""
            self.accepted_requests = 0
            """Requests answered 2xx and applied."""
            self.rows = 0
            """Operations applied (a batch applied twice counts twice)."""
            self.rows_rejected = 0
            self.bad_signatures = 0
            self.list_requests = 0
            """Listing requests received (``GET list_path``)."""
            self.listing_body: bytes | None = None
            """When set, the body of every listing answer (a malformed listing)."""
            self.request_times: list[float] = []
            """``time.monotonic()`` at each hook request's arrival."""
            self.idempotency_keys: list[str] = []
            """Each hook request's ``Idempotency-Key``, in arrival order."""
            self.applied_batches: Counter[str] = Counter()
            """Times each ``batch_id`` was applied."""
            self.ops: Counter[str] = Counter()
            self.last_request: tuple[dict[str, str], bytes] | None = None
            """The headers and raw body of the latest hook request."""
            self.reject_keys: set[str] = set()
            """Keys listed as rejected (and not applied) in every 200 answer."""
            self.applied_unanswered = 0
            """Batches applied whose client got no success (an error, a drop, a late answer)."""
            self.answers_dropped = 0
            """Connections closed without an answer (applied or not)."""
            self.dead_requests = 0
            """Hook requests that reached a dead destination (not counted in ``requests``)."""
            self.injected: Counter[str] = Counter()
            """Injected failures taken by a request, by kind (``answer``, ``timeout``, ...)."""
            self.held: list[str] = []
            """Idempotency keys of the requests :meth:`hold_next` holds now."""
            self.batch_keys: dict[str, list[str]] | None = None
            """The keys of each applied batch, by ``batch_id``, once ``record_batches`` is on
            (off by default: a benchmark's millions of rows would cost memory)."""
        self.release_held()

    def _queue(self, failure: Failure, n: int, after: int) -> None:
        """Queue ``failure`` for ``n`` requests, after ``after`` requests that pass untouched."""
        with self._lock:  # the passes and the failures stay together
            if after:
                self._failures.add(Failure("pass"), int(after))
            self._failures.add(failure, int(n))

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: Any = None,
        body: str | bytes | None = None,
        after: int = 0,
    ) -> None:
        """Answer the next ``n`` hook requests (after ``after`` others) with ``status`` (and
        ``Retry-After``), unapplied."""
        data = body.encode() if isinstance(body, str) else body
        answer = {"status": status, "retry_after": retry_after, "body": data}
        self._queue(Failure("answer", answer), n, after)

    def delay_next(self, n: int, seconds: float, *, after: int = 0) -> None:
        """Hold the next ``n`` hook requests (after ``after`` others) ``seconds`` before
        handling them normally.

        A client that times out first still has the request applied, as with a real server
        whose answer was lost: the retry applies it again (under the same idempotency key).
        """
        self._queue(Failure("timeout", {"seconds": seconds}), n, after)

    def apply_then_fail(
        self,
        n: int = 1,
        *,
        status: int = 500,
        drop: bool = False,
        delay_s: float = 0.0,
        after: int = 0,
    ) -> None:
        """Apply the next ``n`` hook requests (after ``after`` others), then fail to answer:

        * ``drop``: close the connection without an answer;
        * else ``delay_s`` > 0: hold the answer ``delay_s`` seconds, then answer normally (a
          client whose timeout is shorter has given up);
        * else answer ``status`` (a 5xx from a proxy or a crash after the commit).
        """
        options = {"status": int(status), "drop": bool(drop), "delay_s": float(delay_s)}
        self._queue(Failure("applied", options), n, after)

    def hold_next(self, n: int = 1, *, after: int = 0) -> None:
        """Hold the next ``n`` hook requests (after ``after`` others), unapplied, until
        :meth:`release_held`; then handle them normally. Their keys are in ``held`` meanwhile."""
        self._queue(Failure("held"), n, after)

    def release_held(self) -> None:
        """Let the held requests go on (applied and answered, in no set order)."""
        with self._lock:
            release, self._release = self._release, threading.Event()
        release.set()

    def clear_failures(self) -> None:
        """Forget the failures still queued, and the keys to reject; release held requests."""
        with self._lock:
            self._failures = type(self._failures)(self.failure_kinds)
            self.reject_keys = set()
        self.release_held()

    def go_dead(self, mode: str = "hang", *, for_s: float | None = None) -> None:
        """Stop answering, as a destination that went down, until :meth:`revive` (or for
        ``for_s`` seconds).

        ``hang``: hook requests are read and never answered; on revival they are dropped
        unapplied (the client has timed out long before). Control requests still work.
        ``refuse``: the port closes: connections are refused, and requests on connections
        opened before are dropped unanswered; control requests too, so revive with
        :meth:`revive` (SIGUSR1 for the program) or ``for_s``.
        """
        if mode not in DEAD_MODES:
            raise ValueError(f"unknown dead mode {mode!r}; expected one of {', '.join(DEAD_MODES)}")
        with self._lock:
            if self.dead is not None:
                return
            self.dead = mode
            self._alive.clear()
            if for_s is not None:
                self._revive_timer = threading.Timer(float(for_s), self.revive)
                self._revive_timer.daemon = True
                self._revive_timer.start()
        if mode == "refuse":
            self.close_port()

    def revive(self) -> None:
        """Answer again after :meth:`go_dead`; hung requests are dropped, unapplied."""
        with self._lock:
            mode, self.dead = self.dead, None
            timer, self._revive_timer = self._revive_timer, None
        if timer is not None:
            timer.cancel()
        if mode == "refuse":
            self.reopen_port()
        self._alive.set()

    def duplicate_batches(self) -> dict[str, int]:
        """Batch ids applied more than once."""
        with self._lock:
            return {k: v for k, v in self.applied_batches.items() if v > 1}

    def snapshot(self, members: bool = True) -> dict[str, Any]:
        """The state as plain JSON-able data."""
        with self._lock:
            state = {
                "requests": self.requests,
                "accepted_requests": self.accepted_requests,
                "rows": self.rows,
                "rows_rejected": self.rows_rejected,
                "bad_signatures": self.bad_signatures,
                "list_requests": self.list_requests,
                "violations": list(self.violations),
                "max_concurrent": self.max_concurrent,
                "idempotency_keys": list(self.idempotency_keys),
                "applied_batches": dict(self.applied_batches),
                "batch_keys": dict(self.batch_keys or {}),
                "ops": dict(self.ops),
                "member_count": len(self._replay()),
                "applied_unanswered": self.applied_unanswered,
                "answers_dropped": self.answers_dropped,
                "dead_requests": self.dead_requests,
                "dead": self.dead,
                "in_flight": self._concurrent,
                "injected": dict(self.injected),
                "pending_failures": self._failures.pending(ignore=("pass",)),
                "held": list(self.held),
            }
            if members:
                state["members"] = dict(self._members)
        return state

    def inject(self, spec: dict[str, Any]) -> None:
        """Apply a control request (the body of ``POST /_fake/inject``), its keys in this order:

        ``{"clear": true}`` (:meth:`clear_failures`), ``"revive": true``,
        ``"fail": {"n", "status", "retry_after", "body", "after"}``,
        ``"delay": {"n", "seconds", "after"}``,
        ``"apply_then_fail": {"n", "status", "drop", "delay_s", "after"}``,
        ``"reject_keys": [...]``, ``"record_batches": bool``, ``"latency_s": x``,
        ``"seed_members": {key: fields}``, ``"drop_members": [key, ...]``,
        ``"list_page_size": n``, ``"listing_body": text or null``,
        ``"dead": {"mode": "hang" | "refuse", "for_s": x}``,
        ``"hold": {"n", "after"}`` (:meth:`hold_next`), ``"release_held": true``.
        """
        if spec.get("clear"):
            self.clear_failures()
        if spec.get("revive"):
            self.revive()
        if "fail" in spec:
            fail = spec["fail"]
            self.fail_next(
                int(fail.get("n", 1)),
                int(fail["status"]),
                retry_after=fail.get("retry_after"),
                body=fail.get("body"),
                after=int(fail.get("after", 0)),
            )
        if "delay" in spec:
            delay = spec["delay"]
            self.delay_next(
                int(delay.get("n", 1)), float(delay["seconds"]), after=int(delay.get("after", 0))
            )
        if "apply_then_fail" in spec:
            options = dict(spec["apply_then_fail"])
            self.apply_then_fail(int(options.pop("n", 1)), **options)
        if "reject_keys" in spec:
            with self._lock:
                self.reject_keys = set(spec["reject_keys"])
        if "record_batches" in spec:
            with self._lock:
                self.batch_keys = {} if spec["record_batches"] else None
        if "latency_s" in spec:
            self.latency_s = float(spec["latency_s"])
        if "seed_members" in spec:
            self.seed_members(dict(spec["seed_members"]))
        if "drop_members" in spec:
            self.drop_members(list(spec["drop_members"]))
        if "list_page_size" in spec:
            self.list_page_size = int(spec["list_page_size"])
        if "listing_body" in spec:
            body = spec["listing_body"]
            with self._lock:
                self.listing_body = body.encode() if isinstance(body, str) else body
        if "dead" in spec:
            dead = spec["dead"]
            self.go_dead(dead.get("mode", "hang"), for_s=dead.get("for_s"))
        if "hold" in spec:
            held = spec["hold"]
            self.hold_next(int(held.get("n", 1)), after=int(held.get("after", 0)))
        if spec.get("release_held"):
            self.release_held()

    # -- handling (called on the server's threads) ------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes) -> Answer:
        """Serve one request: the hook, a control path, or a violation."""
        if method == "POST":
            if path.startswith(CONTROL_PREFIX):
                return self._control(path, body)
            if path != self.path:
                return self._violation(f"POST to {path!r}, not the hook path {self.path!r}")
            return self.handle_hook(headers, body)
        if method == "GET" and path == CONTROL_PREFIX + "state":
            return 200, orjson.dumps(self.snapshot(members="members=0" not in query)), {}
        if method == "GET" and path == self.list_path:
            return self.handle_listing(query, headers, body)
        return self._violation(f"{method} {target(path, query)}: only POST")

    def handle_listing(self, query: str, headers: Any, body: bytes) -> Answer:
        """One page of the members in key order; the cursor is the last key of the page before."""
        with self._lock:
            self.list_requests += 1
        if body:
            return self._violation("a listing request has a body")
        if self.secret is not None:
            problem = self._check_signature(headers, b"")
            if problem is not None:
                with self._lock:
                    self.bad_signatures += 1
                return 401, orjson.dumps({"error": problem}), {}
        params = parse_qs(query, keep_blank_values=True)
        try:
            limit = int(params.get("limit", [str(self.list_page_size)])[0])
        except ValueError:
            return self._violation(f"listing limit {params.get('limit')!r} is not a number")
        if limit < 1:
            return self._violation(f"listing limit {limit} is not positive")
        cursor = params.get("cursor", [None])[0]
        with self._lock:
            if self.listing_body is not None:
                return 200, self.listing_body, {}
            keys = sorted(self._replay())
        if cursor is not None:
            keys = [k for k in keys if k > cursor]
        size = min(limit, self.list_page_size)
        page = keys[:size]
        more = len(keys) > size
        answer = {
            "members": [{"key": k, "id": "wh-" + hashlib.sha256(k.encode()).hexdigest()[:12]} for k in page],
            "next": page[-1] if more else None,
        }
        return 200, orjson.dumps(answer), {}

    def _control(self, path: str, body: bytes) -> Answer:
        if path == CONTROL_PREFIX + "inject":
            self.inject(orjson.loads(body or b"{}"))
        elif path == CONTROL_PREFIX + "reset":
            self.reset()
        else:
            return 404, b'{"error": "unknown control path"}', {}
        return 200, b"{}", {}

    def _arrive(self, key: str) -> Failure | None:
        with self._lock:
            self.requests += 1
            self.request_times.append(time.monotonic())
            self.idempotency_keys.append(key)
        return self._failures.take()

    def _violation(self, message: str) -> Answer:
        self._record_violation(message)
        return 400, orjson.dumps({"error": message}), {}

    def _check_signature(self, headers: Any, body: bytes) -> str | None:
        """Why the signature is bad, or ``None`` when it is good."""
        timestamp = headers.get("X-Audsync-Timestamp")
        signature = headers.get("X-Audsync-Signature")
        if not timestamp or not signature:
            return "missing X-Audsync-Timestamp or X-Audsync-Signature"
        if not timestamp.isdigit():
            return f"X-Audsync-Timestamp is not unix seconds: {timestamp!r}"
        if abs(time.time() - int(timestamp)) > self.timestamp_tolerance_s:
            return "X-Audsync-Timestamp is too old or in the future"
        assert self.secret is not None
        expected = hmac.new(
            self.secret, timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(signature, "sha256=" + expected):
            return "bad X-Audsync-Signature"
        return None

    def handle_hook(self, headers: Any, body: bytes) -> Answer:
        """Check and apply one hook request; return status, body and extra headers."""
        if self.dead is not None:
            # Never answered: held until revived (the client times out), then dropped.
            with self._lock:
                self.dead_requests += 1
            self._alive.wait()
            with self._lock:
                self.answers_dropped += 1
            return DROP, b"", {}
        with self._in_flight():
            action = self._arrive(headers.get("Idempotency-Key") or "")
            if action is not None and action.kind == "pass":
                action = None
            if action is not None:
                with self._lock:
                    self.injected[action.kind] += 1
            if action is not None and action.kind == "held":
                key = headers.get("Idempotency-Key") or ""
                with self._lock:
                    release = self._release
                    self.held.append(key)
                release.wait(300)  # bounded: a test that forgot to release leaks no thread for ever
                with self._lock:
                    if key in self.held:  # a reset meanwhile forgot it
                        self.held.remove(key)
                action = None
            answer = self._hook(action, headers, body)
            if action is not None and action.kind == "applied" and answer[0] == 200:
                return self._fail_after_applying(action, answer)
            return answer

    def _fail_after_applying(self, action: Failure, applied: Answer) -> Answer:
        """The answer to a request that was applied and whose client must not learn it."""
        options = action.options
        with self._lock:
            self.applied_unanswered += 1
        if options["drop"]:
            with self._lock:
                self.answers_dropped += 1
            return DROP, b"", {}
        if options["delay_s"] > 0:
            time.sleep(options["delay_s"])
            return applied
        status = options["status"]
        return status, orjson.dumps({"error": f"injected {status} after applying"}), {}

    def _hook(self, action: Failure | None, headers: Any, body: bytes) -> Answer:
        self.last_request = (dict(headers.items()), body)
        action = hold(action, "seconds", 0.0, self.latency_s)
        # The checks come first, as a real receiver's would: a request that breaks the
        # contract is recorded even when a failure is injected for it.
        content_type = media_type(headers)
        if content_type != "application/json":
            return self._violation(f"Content-Type is {content_type!r}")
        if self.secret is not None:
            problem = self._check_signature(headers, body)
            if problem is not None:
                with self._lock:
                    self.bad_signatures += 1
                return 401, orjson.dumps({"error": problem}), {}
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._violation(f"body is not JSON: {exc}")
        problem = _check_envelope(document)
        if problem is None and headers.get("Idempotency-Key") != document["batch_id"]:
            problem = (
                f"Idempotency-Key {headers.get('Idempotency-Key')!r} is not the"
                f" batch_id {document['batch_id']!r}"
            )
        if problem is not None:
            return self._violation(problem)
        operations = document["operations"]
        problem = _check_operations(operations)
        if problem is not None:
            return self._violation(problem)

        if action is not None and action.kind == "answer":
            status, retry_after = action.options["status"], action.options["retry_after"]
            extra = {} if retry_after is None else {"Retry-After": str(retry_after)}
            text = action.options["body"] or orjson.dumps({"error": f"injected {status}"})
            return status, text, extra
        return 200, self._apply(document["batch_id"], body, operations), {}

    def _apply(self, batch_id: str, body: bytes, operations: list[dict[str, Any]]) -> bytes:
        """Record an accepted request; answer with the rows of ``reject_keys`` it holds.

        The body is kept as bytes and replayed into :attr:`members` when they are read. A
        dictionary of millions of members, each a dictionary of fields, is millions of objects
        the garbage collector walks again and again, halving the fake's speed; bytes it skips.
        """
        rejected: list[dict[str, str]] = []
        counts = Counter(map(_op, operations))
        with self._lock:
            reject = self.reject_keys
            if reject:
                for operation in operations:
                    if operation["key"] in reject:
                        rejected.append({"key": operation["key"], "error": "rejected by the fake"})
                        counts[operation["op"]] -= 1
            self._pending.append((body, frozenset(r["key"] for r in rejected)))
            self.ops.update(counts)
            self.rows += len(operations) - len(rejected)
            self.rows_rejected += len(rejected)
            self.accepted_requests += 1
            self.applied_batches[batch_id] += 1
            if self.batch_keys is not None:
                self.batch_keys.setdefault(batch_id, sorted({op["key"] for op in operations}))
        answer: dict[str, Any] = {"accepted": len(operations) - len(rejected)}
        if rejected:
            answer["rejected"] = rejected
        return orjson.dumps(answer)

    @property
    def members(self) -> dict[str, Any]:
        """The destination's members: key -> fields, every accepted request applied in order."""
        with self._lock:
            return self._replay()

    def seed_members(self, members: dict[str, Any]) -> None:
        """Members the destination holds before any sync (for the ``remove`` mode)."""
        with self._lock:
            self._replay().update(members)

    def drop_members(self, keys: list[str]) -> None:
        """Remove members by hand, as someone would in the receiving system (a drift)."""
        with self._lock:
            members = self._replay()
            for key in keys:
                members.pop(key, None)

    def _replay(self) -> dict[str, Any]:
        members = self._members
        for body, rejected in self._pending:
            operations = orjson.loads(body)["operations"]
            if not rejected and all(op["op"] != "remove" for op in operations):
                members.update(zip(map(_key, operations), map(_fields, operations)))
                continue
            for operation in operations:
                key = operation["key"]
                if key in rejected:
                    continue
                if operation["op"] == "remove":
                    members.pop(key, None)
                else:
                    members[key] = operation["fields"]
        self._pending = []
        return members


def _check_envelope(document: Any) -> str | None:
    """What is wrong with the body's envelope, or ``None``."""
    if not isinstance(document, dict):
        return "body is not a JSON object"
    for key in ENVELOPE_KEYS:
        if not isinstance(document.get(key), str) or not document[key]:
            return f"body key {key!r} is missing or not a non-empty string"
    if not SENT_AT.match(document["sent_at"]):
        return f"sent_at {document['sent_at']!r} is not ISO 8601 with a time zone"
    operations = document.get("operations")
    if not isinstance(operations, list) or not operations:
        return "body key 'operations' is missing or not a non-empty list"
    extra = set(document) - set(ENVELOPE_KEYS) - {"operations"}
    if extra:
        return f"body has unexpected keys {sorted(extra)}"
    return None


def _check_operations(operations: list[Any]) -> str | None:
    """What is wrong with the first bad operation, or ``None``.

    It runs for every row, so the common case is checked in C-level passes (``map`` over the
    list); the slow loop that names the bad operation runs only when one is wrong.
    """
    try:
        good = (
            set(map(type, operations)) == _DICT
            and set(map(len, operations)) == _THREE
            and set(map(_op, operations)) <= OPS
            and set(map(type, map(_key, operations))) == _STR
            and set(map(type, map(_fields, operations))) == _DICT
        )
    except (KeyError, TypeError):
        good = False
    if good:
        return None
    for index, operation in enumerate(operations):
        if (
            type(operation) is not dict
            or len(operation) != 3
            or operation.get("op") not in OPS
            or type(operation.get("key")) is not str
            or type(operation.get("fields")) is not dict
        ):
            return (
                f"operation {index} is not {{'op': add|remove|update, 'key': str, 'fields':"
                f" object}}: {str(operation)[:200]}"
            )
    return "operations are malformed"


_op, _key, _fields = itemgetter("op"), itemgetter("key"), itemgetter("fields")
_DICT, _STR, _THREE = {dict}, {str}, {3}


# ----------------------------------------------------------------------------------------
# Another process
# ----------------------------------------------------------------------------------------


def _task_state(task: Path) -> str | None:
    """A thread's state letter from ``/proc/<pid>/task/<tid>/stat`` (None once it is gone)."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


class FakeWebhookProcess:
    """:class:`FakeWebhook` in a child process, for an audsync run in a subprocess of its own.

    Args:
        secret: the signing secret, or ``None``.
        state_file: where the child writes its state when it stops.
        latency_s: as for :class:`FakeWebhook`.
        list_page_size: as for :class:`FakeWebhook` (the listing is on ``<url>/members``).
    """

    def __init__(
        self,
        secret: str | None = None,
        *,
        state_file: str | os.PathLike[str] | None = None,
        latency_s: float = 0.0,
        list_page_size: int = 100,
    ):
        self.secret = secret
        self.state_file = Path(state_file) if state_file else None
        self.latency_s = latency_s
        self.list_page_size = list_page_size
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> "FakeWebhookProcess":
        command = [sys.executable, str(Path(__file__).resolve()), "--port", "0"]
        if self.secret:
            command += ["--secret", self.secret]
        if self.state_file:
            command += ["--state-file", str(self.state_file)]
        if self.latency_s:
            command += ["--latency", str(self.latency_s)]
        command += ["--list-page-size", str(self.list_page_size)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith("READY "):
            self._process.kill()
            raise RuntimeError(f"the fake webhook did not start: {line!r}")
        self.url = line.split(" ", 1)[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the child (it writes the state file first), stopped (SIGSTOP) or not."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return self.url.rsplit("/", 1)[0]

    @property
    def list_url(self) -> str:
        """The member listing's URL (the webhook's ``list_url`` setting)."""
        return self.url.rstrip("/") + "/members"

    @property
    def pid(self) -> int:
        """The child's process id (to SIGSTOP the whole destination, say)."""
        assert self._process is not None, "the fake webhook process is not started"
        return self._process.pid

    def suspend(self) -> None:
        """SIGSTOP the whole destination and return once every thread of it has stopped.

        ``kill`` returns before the signal takes effect: a thread already running on the other
        core can still answer a request sent right after it, so wait for the kernel to report
        each thread stopped (state ``T`` in ``/proc/<pid>/task/*/stat``)."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        tasks = Path(f"/proc/{self.pid}/task")
        while not all(_task_state(task) in ("T", "t", None) for task in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fake webhook (pid {self.pid}) did not stop within 10 s")
            time.sleep(0.01)

    def resume(self) -> None:
        """SIGCONT after :meth:`suspend`."""
        os.kill(self.pid, signal.SIGCONT)

    def revive(self) -> None:
        """End :meth:`FakeWebhook.go_dead` in the child (by SIGUSR1: a closed port takes no
        control request); return once it answers control requests again."""
        assert self._process is not None, "the fake webhook process is not started"
        self._process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.state(members=False)["dead"] is None:
                    return
            except OSError:  # the port is not open again yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the fake webhook did not revive within 10 s")
            time.sleep(0.05)

    def _call(self, path: str, payload: Any = None) -> Any:
        data = None if payload is None else orjson.dumps(payload)
        request = Request(self.base_url + path, data=data, method="GET" if data is None else "POST")
        with urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback only
            return orjson.loads(answer.read())

    def state(self, members: bool = True) -> dict[str, Any]:
        """The child's state (:meth:`FakeWebhook.snapshot`)."""
        return self._call(CONTROL_PREFIX + "state" + ("" if members else "?members=0"))

    def inject(self, **spec: Any) -> None:
        """Inject failures (:meth:`FakeWebhook.inject`), e.g. ``fail={"n": 2, "status": 503}``.

        With ``dead={"mode": "refuse"}`` the answer may never come (the port closes under
        it); that is not an error here."""
        try:
            self._call(CONTROL_PREFIX + "inject", spec)
        except OSError:
            if spec.get("dead", {}).get("mode") != "refuse":
                raise

    def reset(self) -> None:
        """Forget the child's state."""
        self._call(CONTROL_PREFIX + "reset", {})


def main(argv: list[str] | None = None) -> int:
    """Run a fake webhook until SIGTERM or SIGINT; print ``READY <url>`` once listening."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", default=None)
    parser.add_argument("--path", default="/hook")
    parser.add_argument("--state-file", default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--list-page-size", type=int, default=100)
    args = parser.parse_args(argv)

    fake = FakeWebhook(
        args.secret, path=args.path, port=args.port, latency_s=args.latency,
        list_page_size=args.list_page_size,
    )
    stop = threading.Event()
    revive = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: revive.set())
    with fake:
        print(f"READY {fake.url}", flush=True)
        # Wait in short steps: the signal handlers run between them.
        while not stop.wait(0.05):
            if revive.is_set():
                revive.clear()
                fake.revive()
        fake.revive()  # hung requests let go, so the server stops promptly
    if args.state_file:
        target = Path(args.state_file)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_bytes(orjson.dumps(fake.snapshot()))
        os.replace(temporary, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
