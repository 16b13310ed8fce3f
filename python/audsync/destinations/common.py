"""Pieces several connectors share: reading settings and answers, sorting a batch's rows, and
matching members of a hashed audience.

Each is here because two or more connectors carried the same code; what is particular to one
API stays in its connector's module.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from audsync.destinations.base import (
    BatchResult,
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
logger = logging.getLogger("audsync.destinations")

# -- settings -----------------------------------------------------------------------------

TRUE_WORDS = ("1", "true", "yes", "on", "y")
"""Text read as yes in a yes/no setting, in any case."""
FALSE_WORDS = ("0", "false", "no", "off", "n", "")
"""Text read as no in a yes/no setting, in any case."""


def flag(value: Any, words: Sequence[str] = TRUE_WORDS) -> bool:
    """A yes/no setting: a YAML boolean, or text, as ``env_var`` renders every value."""
    if isinstance(value, str):
        return value.strip().lower() in words
    return bool(value)


def yes_no(connector: Connector, key: str, default: bool = False) -> bool:
    """A yes/no setting read strictly: a YAML boolean, or one of :data:`TRUE_WORDS` /
    :data:`FALSE_WORDS`; anything else is fatal (``create_if_missing: "ture"`` must not
    quietly mean no)."""
    value = connector.setting(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise FatalDestinationError(
        f"destination {connector.name!r}: key {key!r} must be true or false, got {value!r}"
    )


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


@dataclass
class ListLifecycle:
    """How one destination finds, checks and creates the list (audience, campaign) it writes
    to; :func:`open_list` runs the one lifecycle every list-making connector shares.

    ``exists(id)`` says whether a list of that id exists (raising
    :class:`FatalDestinationError` when it exists but cannot be used); ``find(name)`` returns
    the id of a list of that name or ``None``; ``create(name, http)`` creates one and returns
    its id, sending through the ``http`` it is given, which never retries (a create is not
    idempotent). ``key`` is the setting and the state key of the id (``audience_id``),
    ``what`` names the list in messages, ``name`` is the name a created list gets.
    """

    key: str
    what: str
    name: str
    exists: Callable[[str], bool]
    find: Callable[[str], str | None]
    create: Callable[[str, Any], str]
    how_to_create: str = "create_if_missing: true"


FIND_AFTER_CREATE_TRIES = 3
"""Name look-ups after a create whose answer was lost (a list a vendor just made may take a
moment to be listed)."""
FIND_AFTER_CREATE_WAIT_S = 0.5


def no_retry_client(http: Any) -> Any:
    """The run's HTTP client without retries, for a request that must not be sent twice (a
    create): a shallow copy sharing its sessions, masking and classify hook."""
    once = copy.copy(http)
    if hasattr(once, "max_retries"):
        once.max_retries = 0
    return once


def open_list(connector: Connector, life: ListLifecycle) -> tuple[str, dict[str, Any] | None]:
    """Find the list a connector writes to, for :meth:`Connector.open`, one way everywhere:

    1. the configured id (setting ``life.key``), which must exist;
    2. else the id remembered from an earlier run (the sync's state), checked to exist;
    3. else, with ``create_if_missing`` (:func:`yes_no`), a list named ``life.name`` looked up
       by name (one made by a run that crashed before recording it), else created, its id
       recorded at once (:attr:`SyncInfo.remember`). A create is sent once: after a timeout
       or a server error the name is looked up instead of creating again.

    Returns the id and the state to keep (``{key: id}``), or ``None`` for a configured id.
    """
    where = f"destination {connector.name!r}"
    configured = connector.setting(life.key)
    if configured not in (None, ""):
        list_id = str(configured).strip()
        if not life.exists(list_id):
            raise FatalDestinationError(f"{where}: there is no {life.what} {list_id} ({life.key})")
        return list_id, None
    create = yes_no(connector, "create_if_missing")
    remembered = (connector.sync.state or {}).get(life.key)
    if remembered not in (None, ""):
        if life.exists(str(remembered)):
            return str(remembered), None
        if not create:
            raise FatalDestinationError(
                f"{where}: the {life.what} {remembered} an earlier run created no longer exists;"
                f" set {life.how_to_create} to create another, or set {life.key}"
            )
        logger.warning(
            "%s: the %s %s an earlier run created is gone; looking for %r or creating it",
            where, life.what, remembered, life.name,
        )  # fmt: skip
    elif not create:
        raise FatalDestinationError(f"{where}: set {life.key}, or {life.how_to_create}")
    found = life.find(life.name)
    if found:
        logger.info("%s: using the existing %s %s named %r", where, life.what, found, life.name)
    else:
        try:
            found = life.create(life.name, no_retry_client(connector.http))
            logger.info("%s: created the %s %s named %r", where, life.what, found, life.name)
        except (RetriesExhausted, RequestRejected) as exc:
            # The answer was lost (a timeout), the server failed, or the vendor refused a
            # duplicate name (Google's DISPLAY_NAME_ALREADY_USED): the list may exist now.
            found = _find_after_failed_create(life)
            if not found:
                raise FatalDestinationError(
                    f"{where}: creating the {life.what} {life.name!r} failed ({exc.code}) and no"
                    f" {life.what} of that name exists; the next run tries again"
                ) from None
            logger.info(
                "%s: the create of %r went unanswered; found it as %s", where, life.name, found
            )
    state = {life.key: found}
    if connector.sync.remember is not None:
        connector.sync.remember(state)
    return found, state


def _find_after_failed_create(life: ListLifecycle) -> str | None:
    for attempt in range(FIND_AFTER_CREATE_TRIES):
        found = life.find(life.name)
        if found:
            return found
        if attempt + 1 < FIND_AFTER_CREATE_TRIES:
            time.sleep(FIND_AFTER_CREATE_WAIT_S)
    return None


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


def send_hashed(
    batch: Sequence[Change],
    build: Callable[[Change], tuple[_T, str]],
    send: Callable[[str, list[tuple[Change, _T]]], tuple[list[RowError], int]],
) -> BatchResult:
    """A hashed audience's batch (Meta, Google), sent once for both: entries built by
    ``build`` (:func:`split_by_op`), then ``send(op, items)`` for ``add`` and for ``remove``,
    returning the rows it refused and the rows accepted but unmatched. A request refused whole
    fails only its own rows (the other request went through), retryable when retries ran out;
    a failed row keeps no destination id."""
    rejected, ids, groups = split_by_op(batch, build)
    unmatched = 0
    for op in ("add", "remove"):
        items = groups[op]
        if not items:
            continue
        try:
            failed, not_matched = send(op, items)
            unmatched += not_matched
        except (RequestRejected, RetriesExhausted) as exc:
            failed = request_failed(items, exc)
        rejected.extend(failed)
        for row in failed:
            ids.pop(row.key, None)
    return BatchResult(rejected=rejected, destination_ids=ids, unmatched=unmatched)


def request_failed(
    items: Sequence[tuple[Change, Any]], exc: RequestRejected | RetriesExhausted
) -> list[RowError]:
    """The rows of one request that failed whole; retryable when retries ran out."""
    retryable = isinstance(exc, RetriesExhausted)
    return [RowError(c.key, c.op, exc.code, exc.message, retryable) for c, _ in items]
