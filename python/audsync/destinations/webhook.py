"""The webhook destination: audsync's own format (contract section 7).

Each batch is one ``POST`` of::

    {"sync": "S", "run_id": "...", "batch_id": "...", "sent_at": "2026-11-22T10:00:00Z",
     "operations": [{"op": "add", "key": "a@example.com", "fields": {...}}, ...]}

with ``Idempotency-Key: <batch_id>`` and, when a ``secret`` is set, ``X-Audsync-Timestamp`` and
``X-Audsync-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>">``. A 2xx accepts
every operation but those its JSON body lists under ``rejected``; a 2xx that is not such an
answer (:func:`rejected_in`) is retried like a 5xx and never counts as a success.

With ``list_url`` set, the webhook can list its members (``audsync verify``): ``GET list_url``
with ``limit=<n>`` (and ``cursor=<next>`` after the first page) in the query, the extra
headers, and with a secret the same two signature headers over ``"<timestamp>."`` (the body is
empty). The answer is ``{"members": [{"key": "...", "id": "..." or absent}, ...], "next":
"<cursor>" or null}`` (:func:`listing_in`); any other is an error naming the URL.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import time
from typing import Any, ClassVar, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import orjson

from audsync.delivery.http import Verdict, dumps, strip_query, unexpected_answer
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RowError,
)

SIGNATURE_HEADER = "X-Audsync-Signature"
TIMESTAMP_HEADER = "X-Audsync-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
LIST_PAGE = 500
"""Members asked for a listing page (the ``limit`` query parameter)."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Audsync-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret, timestamp.encode() + b".", hashlib.sha256)
    mac.update(body)  # not concatenated: a body is a few MB, hashed without a copy
    return "sha256=" + mac.hexdigest()


def batch_id(run_id: str, batch: Sequence[Change]) -> str:
    """The batch's id: the same for the same rows of the same run, so a retry reuses it.

    A plan's ``seq`` is unique within the run and batches are cut from the plan in order, so
    the first row's position names the batch.
    """
    return f"{run_id}-{batch[0].seq}"


def _json_safe(value: Any) -> Any:
    """``value`` with integers beyond 64 bits as JSON number fragments (orjson refuses them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return orjson.Fragment(str(value).encode())
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def encode_operations(batch: Sequence[Change]) -> tuple[list[dict[str, Any]], list[RowError]]:
    """Operations of ``batch`` that can be sent as JSON, and the rows that cannot.

    Used only when the fast encoding of a whole batch failed: each row is tried alone so that
    one bad value (``bytes``, a ``NaN`` decimal) fails its own row, not the batch.
    """
    operations: list[dict[str, Any]] = []
    invalid: list[RowError] = []
    for change in batch:
        operation = {"op": change.op, "key": change.key, "fields": change.fields}
        try:
            dumps(operation)
        except TypeError:
            operation = {"op": change.op, "key": change.key, "fields": _json_safe(change.fields)}
            try:
                dumps(operation)
            except TypeError as exc:
                invalid.append(
                    RowError(change.key, change.op, "invalid_value", _describe(change, exc))
                )
                continue
        operations.append(operation)
    return operations, invalid


def _describe(change: Change, exc: TypeError) -> str:
    """Which field of ``change`` cannot be sent as JSON, and why."""
    for name, value in (change.fields or {}).items():
        try:
            dumps(_json_safe(value))
        except TypeError:
            return f"field {name!r}: a {type(value).__name__} value cannot be sent as JSON"
    return f"the row cannot be sent as JSON ({exc})"


class WebhookConnector(Connector):
    """POST batches of operations to a URL, signed with HMAC-SHA256 when a secret is set."""

    type: ClassVar[str] = "webhook"
    description: ClassVar[str] = (
        "POST each batch as JSON to a URL (audsync's webhook format), signed with HMAC-SHA256"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey("url", "the URL batches are POSTed to", required=True),
        ConfigKey(
            "secret", "signs each request (X-Audsync-Signature: HMAC-SHA256)", secret=True
        ),
        ConfigKey(
            "headers",
            "extra request headers, a mapping (an Authorization header, say); masked as secrets",
            secret=True,
        ),
        ConfigKey(
            "list_url",
            "a URL that lists the members (GET, paged by cursor, signed like the POSTs):"
            " lets audsync verify read the webhook back",
        ),
    )
    # 10,000 operations of a typical 100 to 200 bytes make a 1 to 2 MB body: under the body
    # limits of the gateways that commonly front a webhook (API Gateway 10 MB, Lambda 6 MB,
    # nginx's default 1 MB being the one to raise), while large enough that per-request cost
    # (TLS, headers, the receiver's commit) stays small next to the rows.
    max_batch_size: ClassVar[int] = 10_000
    # A receiver is usually one service of ours: a handful of parallel requests keeps it busy
    # without overrunning it; up to 32 for one that scales out.
    max_concurrency: ClassVar[int] = 32
    default_concurrency: ClassVar[int] = 4
    accepts_encoded_batches: ClassVar[bool] = True
    cannot_list_reason: ClassVar[str] = (
        "no 'list_url' is set (the webhook's listing URL, which audsync verify reads back)"
    )

    @classmethod
    def listing_refused(cls, settings: Mapping[str, Any]) -> str | None:
        """A webhook lists its members only when it offers a listing URL (``list_url``)."""
        return None if settings.get("list_url") else cls.cannot_list_reason

    @property
    def can_list_members(self) -> bool:  # type: ignore[override]
        """Whether this webhook has a ``list_url``."""
        return self._list_url is not None

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        secret = self.setting("secret")
        self._secret: bytes | None = str(secret).encode() if secret else None
        headers = self.setting("headers") or {}
        if not isinstance(headers, Mapping):
            raise FatalDestinationError(
                f"destination {name!r}: key 'headers' must be a mapping of header names to"
                f" values, got a {type(headers).__name__}"
            )
        self._headers = {str(k): str(v) for k, v in headers.items()}
        self._url = self._target_url("url")
        self._list_url = self._target_url("list_url") if self.setting("list_url") else None

    # -- configuration --------------------------------------------------------------------

    def _target_url(self, key: str) -> str:
        """Setting ``key`` (``url``, ``list_url``), on ``base_url``'s scheme and host when that
        is set (a proxy, a fake)."""
        url = str(self.setting(key) or "")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            # Shown without its query string, which may carry a token.
            raise FatalDestinationError(
                f"destination {self.name!r}: key {key!r} must be an http(s) URL,"
                f" got {strip_query(url)!r}"
            )
        base = self.settings.get("base_url")
        if base:
            host = urlsplit(str(base))
            parts = parts._replace(scheme=host.scheme or parts.scheme, netloc=host.netloc)
        return urlunsplit(parts)

    def secret_values(self) -> list[str]:
        """The secret and every extra header's value."""
        values = [v for v in self._headers.values() if v]
        if self._secret:
            values.append(self._secret.decode())
        return values

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """POST ``batch``; rows listed under ``rejected`` in the answer fail alone."""
        the_batch_id = batch_id(self.sync.run_id, batch)
        sent_at = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        invalid: list[RowError] = []
        envelope: dict[str, Any] = {
            "sync": self.sync.name,
            "run_id": self.sync.run_id,
            "batch_id": the_batch_id,
            "sent_at": sent_at,
        }
        encoded = getattr(batch, "operations_json", None)
        if encoded is not None:
            # The warehouse encoded the operations (EncodedBatch): only the envelope is ours.
            head = dumps(envelope)
            body = b"".join((head[:-1], b',"operations":[', encoded, b"]}"))
        else:
            # One small dict a row, then one orjson call for the whole body.
            envelope["operations"] = [
                {"op": op, "key": key, "fields": fields} for _, op, key, fields, _ in batch
            ]
            try:
                body = dumps(envelope)
            except TypeError:
                envelope["operations"], invalid = encode_operations(batch)
                if not envelope["operations"]:
                    return BatchResult(rejected=invalid)
                body = dumps(envelope)

        headers = {
            **self._headers,
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: the_batch_id,
        }
        # The answer is read inside the request's classify hook, so that one that cannot be
        # understood is retried (then fails the batch as retryable) and never counts as a
        # success; the rows it rejects are kept for the result.
        answered: list[list[RowError]] = []

        def classify(response: Any) -> Verdict | None:
            if not 200 <= response.status_code < 300:
                return None
            parsed = rejected_in(response.content, batch)
            if isinstance(parsed, str):
                return unexpected_answer(response, parsed)
            answered[:] = [parsed]
            return Verdict.ok()

        self.http.request(
            "POST",
            self._url,
            data=body,
            headers=headers,
            sign=self._sign if self._secret else None,
            classify=classify,
        )
        return BatchResult(rejected=invalid + (answered[0] if answered else []))

    # -- reading the membership back (audsync verify) ---------------------------------------

    def list_members(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of ``GET list_url`` as (key, id), following ``next`` as ``cursor``."""
        if self._list_url is None:
            raise FatalDestinationError(
                f"destination {self.name!r}: {self.cannot_list_reason}"
            )
        url = self._list_url
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params = {"limit": str(LIST_PAGE)}
            if cursor is not None:
                params["cursor"] = cursor
            response = self.http.request(
                "GET",
                url,
                params=params,
                headers=self._headers,
                sign=(lambda _body: self._sign(b"")) if self._secret else None,
            )
            parsed = listing_in(response.content)
            if isinstance(parsed, str):
                raise FatalDestinationError(
                    f"destination {self.name!r}: the answer of GET {strip_query(url)} is not a"
                    f" member listing ({LISTING_RULES}): {parsed}"
                )
            page, cursor = parsed
            if page:
                yield page
            if cursor is None:
                return
            if cursor in seen:
                raise FatalDestinationError(
                    f"destination {self.name!r}: GET {strip_query(url)} gave the cursor"
                    f" {cursor[:100]!r} twice (the listing would never end)"
                )
            seen.add(cursor)

    def listed_key_casefold(self) -> bool:
        """Keys are compared as the audience gives them (trimmed), not lowercased."""
        return False

    def _sign(self, body: bytes) -> dict[str, str]:
        """Signature headers with a fresh timestamp, computed again for each attempt."""
        assert self._secret is not None
        timestamp = str(int(time.time()))
        return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self._secret, timestamp, body)}


ANSWER_RULES = (
    "an empty body, or a JSON object whose optional 'rejected' is a list of"
    " {\"key\": <a key of the batch>, \"error\": <text>} objects"
)
"""What a 2xx answer of the webhook may be (contract section 7), in words for errors."""


def rejected_in(content: bytes | None, batch: Sequence[Change]) -> list[RowError] | str:
    """The rows a 2xx answer rejects, or why the answer cannot be understood.

    An empty body accepts every operation; so does a JSON object without ``rejected`` (or with
    ``null`` or ``[]``). Anything else is not an answer of the webhook format and is refused
    whole (a string, the reason): a body that is not a JSON object (a proxy's HTML page),
    ``rejected`` that is not a list, an entry that is not an object with a string ``key``, a
    key that is not one of the batch's keys exactly as sent (echoed in another case, say), or
    an ``error`` that is neither text nor null. Trusting part of such an answer would count
    rows as accepted on a guess.
    """
    if not content or not content.strip():
        return []
    try:
        document = orjson.loads(content)
    except orjson.JSONDecodeError:
        return f"{ANSWER_RULES}: the body is not JSON"
    if not isinstance(document, dict):
        return f"{ANSWER_RULES}: the body is a JSON {type(document).__name__}, not an object"
    listed = document.get("rejected")
    if listed is None:
        return []
    if not isinstance(listed, list):
        return f"{ANSWER_RULES}: 'rejected' is a {type(listed).__name__}, not a list"
    ops = {change.key: change.op for change in batch}
    rejected: dict[str, RowError] = {}
    for position, item in enumerate(listed):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            return f"{ANSWER_RULES}: rejected entry {position} has no string 'key'"
        key = item["key"]
        if key not in ops:
            return (
                f"{ANSWER_RULES}: rejected entry {position} names key {key[:100]!r},"
                " which is not in the batch"
            )
        error = item.get("error")
        if error is not None and not isinstance(error, str):
            return f"{ANSWER_RULES}: rejected entry {position} has an 'error' that is not text"
        message = error if error else "rejected by the webhook"
        # A key listed twice fails once.
        rejected.setdefault(key, RowError(key, ops[key], "rejected", message[:500]))
    return list(rejected.values())


LISTING_RULES = (
    "a JSON object {\"members\": [{\"key\": <text>, \"id\": <text, optional>}, ...],"
    " \"next\": <a cursor or null>}"
)
"""What an answer of ``list_url`` must be, in words for errors."""


def listing_in(content: bytes | None) -> tuple[list[tuple[str, str | None]], str | None] | str:
    """The members (key trimmed, id or ``None``) and the next cursor of a listing answer, or
    why it is not one (a string).

    Nothing is guessed: an empty body, a body that is not a JSON object, ``members`` missing or
    not a list, an entry without a string ``key``, an ``id`` that is not text (or a number), or
    a ``next`` that is neither text nor null is refused whole, never read as an empty page.
    """
    if not content or not content.strip():
        return "the body is empty"
    try:
        document = orjson.loads(content)
    except orjson.JSONDecodeError:
        return "the body is not JSON"
    if not isinstance(document, dict):
        return f"the body is a JSON {type(document).__name__}, not an object"
    members = document.get("members")
    if not isinstance(members, list):
        return "'members' is missing or not a list"
    page: list[tuple[str, str | None]] = []
    for position, item in enumerate(members):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            return f"member {position} has no string 'key'"
        ident = item.get("id")
        if ident is not None and (
            isinstance(ident, bool) or not isinstance(ident, (str, int))
        ):
            return f"member {position} has an 'id' that is not text"
        key = item["key"].strip()
        if key:
            page.append((key, None if ident in (None, "") else str(ident)))
    if "next" not in document:
        return "'next' is missing (null on the last page)"
    cursor = document["next"]
    if cursor is not None and not isinstance(cursor, str):
        return f"'next' is a {type(cursor).__name__}, not a string or null"
    return page, (cursor or None)
