"""Pieces several connectors share: reading settings and answers, sorting a batch's rows, and
matching members of a hashed audience.

Each is here because two or more connectors carried the same code; what is particular to one
API stays in its connector's module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from audsync.destinations.base import (
    Change,
    Connector,
    FatalDestinationError,
    RequestRejected,
    RetriesExhausted,
    RowError,
)
from audsync.identifiers import (
    InvalidIdentifier,
    Options,
    Rule,
    is_hashed,
    is_region,
    normalize_email,
)

_T = TypeVar("_T")

# -- settings -----------------------------------------------------------------------------

TRUE_WORDS = ("1", "true", "yes", "on")
"""Text read as yes in a yes/no setting, in any case."""


def flag(value: Any, words: Sequence[str] = TRUE_WORDS) -> bool:
    """A yes/no setting: a YAML boolean, or text, as ``env_var`` renders every value."""
    if isinstance(value, str):
        return value.strip().lower() in words
    return bool(value)


def required(connector: Connector, key: str, *, strip: bool = False) -> str:
    """Setting ``key`` as text (trimmed when ``strip``); fatal when it is unset or empty."""
    value = str(connector.setting(key) or "")
    if strip:
        value = value.strip()
    if not value:
        raise FatalDestinationError(f"destination {connector.name!r}: key {key!r} is required")
    return value


def upper_choice(connector: Connector, key: str, allowed: Sequence[str], default: str) -> str:
    """Setting ``key`` (``default`` when unset) trimmed and uppercased; fatal unless it is one
    of ``allowed``, so that a typo stops the run before anything is sent."""
    value = str(connector.setting(key) or default).strip().upper()
    if value not in allowed:
        raise FatalDestinationError(
            f"destination {connector.name!r}: key {key!r} must be one of {', '.join(allowed)},"
            f" got {value!r}"
        )
    return value


def default_country(name: str, value: Any) -> str | None:
    """``default_country`` checked once, so that a typo stops the run instead of every phone."""
    if value in (None, ""):
        return None
    if not is_region(str(value)):
        raise FatalDestinationError(
            f"destination {name!r}: key 'default_country' must be an ISO 3166 alpha-2 code"
            f" (GB, US, FR), got {value!r}"
        )
    return str(value).strip().upper()


def open_list(
    connector: Connector, key: str, create: Callable[[], str], how_to_create: str
) -> tuple[str, dict[str, Any] | None]:
    """Find the list a connector writes to, for :meth:`Connector.open`: setting ``key``, else
    the one an earlier run created (in the sync's state under ``key``), else a new one from
    ``create`` when ``create_if_missing`` is on. Returns its id, and the state to keep
    (``{key: id}``) when it was created."""
    configured = connector.setting(key)
    if configured:
        return str(configured).strip(), None
    remembered = (connector.sync.state or {}).get(key)
    if remembered:
        return str(remembered), None
    if not flag(connector.setting("create_if_missing")):
        raise FatalDestinationError(
            f"destination {connector.name!r}: no {key!r}; set it, or set {how_to_create}"
        )
    created = create()
    return created, {key: created}


def opened_list(connector: Connector, key: str, what: str) -> str:
    """The list :func:`open_list` finds without creating one, for a ``send_batch`` called
    before ``open`` (a caller that skips it); fatal when there is none."""
    configured = connector.setting(key) or (connector.sync.state or {}).get(key)
    if not configured:
        raise FatalDestinationError(f"destination {connector.name!r}: no {what}; call open() first")
    return str(configured)


# -- answers ------------------------------------------------------------------------------


def json_body(response: Any) -> Any:
    """The answer's JSON, or ``None`` when it has none (or it is not JSON)."""
    try:
        return orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return None


def json_object(content: bytes | None) -> dict[str, Any] | None:
    """An answer's body as a JSON object, or ``None`` when it is not one.

    A body that does not start with ``{`` (a proxy's HTML page, an empty 204) is not parsed.
    """
    if not content or content.lstrip()[:1] != b"{":
        return None
    try:
        document = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def json_list(content: bytes | None, key: str) -> list[Any]:
    """The list under ``key`` of a JSON object answer (the rows it refused, its errors);
    empty when there is none."""
    document = json_object(content)
    listed = document.get(key) if document is not None else None
    return listed if isinstance(listed, list) else []


def json_error(response: Any) -> dict[str, Any] | None:
    """The ``error`` object of an answer (Meta's Graph API error, Google's
    ``google.rpc.Status``), or ``None``."""
    document = json_object(getattr(response, "content", b"") or b"")
    error = document.get("error") if document is not None else None
    return error if isinstance(error, dict) else None


# -- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """How a CRM connector writes audience keys as the CRM matches them: email addresses
    (:func:`audsync.identifiers.normalize_email`), or other text, trimmed.

    ``what`` names the key in the error of an empty one.
    """

    email: bool
    what: str = "identifier"

    def normalise(self, value: Any) -> str:
        """The key in normal form.

        Raises:
            InvalidIdentifier: not an email (when keys are emails), or empty.
        """
        if self.email:
            return normalize_email(value)
        text = str(value).strip() if value is not None else ""
        if not text:
            raise InvalidIdentifier("invalid_identifier", f"the {self.what} is empty")
        return text

    def known(self, value: Any) -> str | None:
        """A value from an answer in normal form, or ``None`` when it has none."""
        try:
            return self.normalise(value) if value is not None else None
        except InvalidIdentifier:
            return None


def known_changes(
    batch: Sequence[Change], normalise: Callable[[Any], str], rejected: list[RowError]
) -> Iterator[tuple[Change, str]]:
    """Each change of ``batch`` with its key normalised; a change whose key cannot be, or
    whose op is unknown, is appended to ``rejected`` instead (in batch order)."""
    for change in batch:
        try:
            normalised = normalise(change.key)
        except InvalidIdentifier as exc:
            # Never sent raw; the message does not quote the value (personal data).
            rejected.append(RowError(change.key, change.op, exc.code, f"{exc.message}: not sent"))
            continue
        if change.op not in ("add", "update", "remove"):
            rejected.append(
                RowError(change.key, change.op, "unknown_op", f"unknown op {change.op!r}")
            )
            continue
        yield change, normalised


class Once:
    """Keys already seen, thread-safe: for a warning said once a run rather than once a row
    (``send_batch`` runs on several threads)."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """Whether ``key`` is seen for the first time."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True


# -- hashed audiences (Meta, Google) --------------------------------------------------------


def match_value(change: Change, rule: Rule, options: Options) -> str:
    """The value a member of a hashed audience is matched on, kept as its destination id.

    A removal sends the id stored when the member was added, so that it removes exactly what
    was added even if the mapping or a normalisation setting changed in between; otherwise
    the key is normalised (and hashed, when ``rule`` hashes).
    """
    stored = change.destination_id
    if change.op == "remove" and stored:
        if rule.hashed and is_hashed(stored):
            return stored.strip().lower()
        if not rule.hashed and str(stored).strip():
            return str(stored)
    return rule.apply(change.key, options)


def split_by_op(
    batch: Sequence[Change], build: Callable[[Change], tuple[_T, str]]
) -> tuple[list[RowError], dict[str, str], dict[str, list[tuple[Change, _T]]]]:
    """A hashed audience's batch sorted for its two requests.

    ``build`` makes a change's entry and its match value (raising
    :class:`~audsync.identifiers.InvalidIdentifier` for an unusable identifier). Returns the
    rows rejected, the match value of each add and update (its destination id), and the
    entries by request: ``add`` (adds and updates: adding again is idempotent) and ``remove``.
    """
    rejected: list[RowError] = []
    ids: dict[str, str] = {}
    groups: dict[str, list[tuple[Change, _T]]] = {"add": [], "remove": []}
    for change in batch:
        try:
            entry, match = build(change)
        except InvalidIdentifier as exc:
            rejected.append(RowError(change.key, change.op, exc.code, exc.message))
            continue
        if change.op == "remove":
            groups["remove"].append((change, entry))
        else:
            groups["add"].append((change, entry))
            ids[change.key] = match
    return rejected, ids, groups


def request_failed(
    items: Sequence[tuple[Change, Any]], exc: RequestRejected | RetriesExhausted
) -> list[RowError]:
    """The rows of one request that failed whole; retryable when retries ran out."""
    retryable = isinstance(exc, RetriesExhausted)
    return [RowError(c.key, c.op, exc.code, exc.message, retryable) for c, _ in items]
