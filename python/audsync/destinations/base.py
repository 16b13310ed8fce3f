"""The connector interface: what every destination implements, and nothing more.

A connector declares its limits, its configuration keys and its identifier rules as class
attributes, and implements ``send_batch``: one batch of planned changes in, the rows the
destination rejected out. Batching, concurrency, rate limiting, retries and bookkeeping live
once, in :mod:`audsync.delivery`; a connector makes its HTTP calls through the
:class:`~audsync.delivery.http.HttpClient` it is given, which applies them.

Failures are sorted by what happens next (as the Singer SDK does):

* a transient failure of one request (timeout, 408, 429, 5xx, a rate limit signalled in the
  body) is retried by the ``HttpClient``; when retries run out, the batch's rows fail with
  ``retryable=True`` and are planned again by the next run;
* :class:`FatalDestinationError` (bad credentials, a missing list) stops the run, and so does
  its subclass :class:`DestinationUnreachable` (the circuit breaker of the ``HttpClient``);
* a rejected row is listed in :attr:`BatchResult.rejected` and fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Sequence


class Change(NamedTuple):
    """One planned change for one member, as frozen in the run's plan."""

    seq: int
    """Position in the run's plan (1-based)."""
    op: str
    """``add``, ``remove`` or ``update``."""
    key: str
    """The member's identifier (``_audsync_key``), as the audience gives it."""
    fields: dict[str, Any]
    """Mapped values by destination field name (``field_mapping``)."""
    destination_id: str | None
    """The id the destination gave the member when it was added, if known."""


class EncodedBatch(Sequence[Change]):
    """A batch of plan rows that the warehouse encoded as the webhook format's operations
    (``{"op": ..., "key": ..., "fields": {...}}``, comma-separated, without the brackets).

    It is a sequence of :class:`Change` like any batch, but builds them only when asked for
    more than its first and last rows (a rejection, a failed batch): on the usual path no
    Python object is made per row. The changes are decoded from the JSON itself, so they are
    what was sent.
    """

    __slots__ = ("operations_json", "_size", "_first", "_last", "_seqs", "_ids", "_changes")

    def __init__(self, operations_json: bytes, size: int, first: Change, last: Change,
                 seqs: Sequence[int] | None = None, ids: Sequence[str | None] | None = None):
        self.operations_json = operations_json
        self._size = size
        self._first = first
        self._last = last
        self._seqs = seqs
        """Every row's seq, or ``None`` when they run from ``first.seq`` without a gap."""
        self._ids = ids
        """Every row's destination id, or ``None`` when no row has one."""
        self._changes: list[Change] | None = None

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int) and self._size:
            if index in (0, -self._size):
                return self._first
            if index in (-1, self._size - 1):
                return self._last
        return self.changes()[index]

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes())

    def changes(self) -> list[Change]:
        """The rows as :class:`Change` objects (decoded once, then kept)."""
        if self._changes is None:
            import orjson

            operations = orjson.loads(b"[" + self.operations_json + b"]")
            first = self._first.seq
            seqs = self._seqs if self._seqs is not None else range(first, first + len(operations))
            ids = self._ids if self._ids is not None else [None] * len(operations)
            self._changes = [
                Change(seq, o["op"], o["key"], o["fields"], i)
                for seq, o, i in zip(seqs, operations, ids)
            ]
        return self._changes


@dataclass(frozen=True)
class RowError:
    """A row the destination did not take."""

    key: str
    op: str
    error_code: str
    error_message: str
    retryable: bool = False


@dataclass
class BatchResult:
    """What the destination did with one batch: every row not rejected was accepted."""

    rejected: list[RowError] = field(default_factory=list)
    destination_ids: dict[str, str] = field(default_factory=dict)
    """Ids the destination gave accepted members, by key (committed with the member)."""
    unmatched: int = 0
    """Rows accepted but reported as not matched to a user (Meta's ``num_invalid_entries``)."""


@dataclass(frozen=True)
class ConfigKey:
    """One setting of a destination in ``destinations.yml``."""

    name: str
    help: str
    required: bool = False
    secret: bool = False
    default: Any = None


@dataclass(frozen=True)
class SyncInfo:
    """What a connector may know about the sync it serves."""

    name: str
    mode: str
    run_id: str
    identifier: str
    fields: tuple[str, ...]
    """Destination field names, in ``field_mapping`` order."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The sync's ``config`` over the destination's own settings."""
    state: Mapping[str, Any] = field(default_factory=dict)
    """What :meth:`Connector.open` returned on an earlier run (a created list's id)."""
    project_dir: str | None = None
    """The dbt project's folder: relative paths in settings are relative to it."""
    remember: Callable[[Mapping[str, Any]], None] | None = None
    """Save state for later runs *now* (merged into ``audsync_syncs.destination_state``), for
    an id that must survive a crash before :meth:`Connector.open` returns (a created list's);
    ``None`` when the caller saves only what ``open`` returns."""


class DestinationError(Exception):
    """Base of the errors a connector raises."""


class FatalDestinationError(DestinationError):
    """The destination cannot be used for this run (auth, permissions, a missing list)."""


class DestinationUnreachable(FatalDestinationError):
    """The circuit breaker opened: requests in a row got no answer (connection refused, DNS
    failure, timeouts). The run stops sending; its message starts "destination unreachable"
    and ends with the last error."""


class RequestRejected(DestinationError):
    """A non-retriable answer to one request (a 4xx other than 401/403/408/429).

    The batch's rows fail with ``code`` and ``message`` as their error.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RetriesExhausted(DestinationError):
    """A transient failure outlasted ``max_retries``; the batch's rows fail as retryable."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Settings every destination takes (contract section 7).
COMMON_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("type", "the connector type", required=True),
    ConfigKey("batch_size", "rows a request (capped at the connector's maximum)"),
    ConfigKey("max_concurrency", "requests in flight at once"),
    ConfigKey("rate_limit", "requests per second (unset: no limit beyond the connector's)"),
    ConfigKey("timeout_s", "seconds to wait for one answer", default=30.0),
    ConfigKey("max_retries", "retries of a transient failure", default=5),
    ConfigKey("base_url", "another host for the API: a proxy, or a local fake in tests"),
    ConfigKey(
        "unreachable_after",
        "requests in a row without an answer (refused, DNS, timeout) that stop the run as"
        " 'destination unreachable' (0: never)",
        default=5,
    ),
    ConfigKey(
        "max_total_wait_s",
        "the most a run waits in total for Retry-After answers before failing batches as retryable",
        default=900.0,
    ),
)


class Connector:
    """Base class of destination connectors.

    Subclasses set the class attributes and implement :meth:`send_batch`. The engine creates one
    instance per run, calls :meth:`open` once, :meth:`send_batch` from up to
    ``max_concurrency`` threads at once (so it must not mutate shared state without a lock),
    and :meth:`close` once at the end.
    """

    type: ClassVar[str]
    """The ``type`` in ``destinations.yml``."""
    description: ClassVar[str] = ""
    config_keys: ClassVar[tuple[ConfigKey, ...]] = ()
    """Keys beyond :data:`COMMON_KEYS`."""
    max_batch_size: ClassVar[int] = 1000
    default_batch_size: ClassVar[int | None] = None
    """Batch size when the destination sets none (``None``: ``max_batch_size``)."""
    max_concurrency: ClassVar[int] = 4
    """Most requests in flight the API allows; the destination's setting is capped at it."""
    default_concurrency: ClassVar[int] = 4
    default_rate_limit: ClassVar[float | None] = None
    returns_destination_ids: ClassVar[bool] = False
    """True when accepted rows get an id from the destination that removal needs."""
    can_list_members: ClassVar[bool] = False
    """True when :meth:`list_members` can read the destination's membership back
    (``audsync verify``); ad platforms (Meta, Google) cannot."""
    cannot_list_reason: ClassVar[str] = "its API cannot list a list's members"
    accepts_encoded_batches: ClassVar[bool] = False
    """True when :meth:`send_batch` sends an :class:`EncodedBatch`'s ``operations_json`` as
    it is (the webhook format's operations), so that the runner may have the warehouse encode
    the rows instead of building a :class:`Change` per row."""

    @classmethod
    def listing_refused(cls, settings: Mapping[str, Any]) -> str | None:
        """Why a destination of this type with ``settings`` (the sync's ``config`` over the
        destination's) cannot list its members, or ``None`` when it can. By default the type
        decides (:attr:`can_list_members`); a webhook lists only with a ``list_url``."""
        return None if cls.can_list_members else cls.cannot_list_reason

    def __init__(self, name: str, settings: Mapping[str, Any], sync: SyncInfo, http: Any):
        self.name = name
        self.settings = dict(settings)
        self.sync = sync
        self.http = http

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Prepare the destination before the first batch (create a list, start a session).

        Returns state to remember for later runs (a created list's id), or ``None``.
        """
        return None

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Send one batch; return the rows rejected. Raise :class:`DestinationError` subclasses."""
        raise NotImplementedError

    def close(self, succeeded: bool) -> None:
        """Finish the upload (close a session, rename a file). ``succeeded`` is False on error."""

    def list_members(self) -> Iterator[list[tuple[str, str | None]]]:
        """The destination's members, a page at a time, as ``(key, destination id)``: the key
        in the form :meth:`listed_key_casefold` says, the id as ``send_batch`` returns it (or
        ``None``). Called after :meth:`open`; only when :attr:`can_list_members`."""
        raise NotImplementedError(f"{self.type}: {self.cannot_list_reason}")

    def listed_key_casefold(self) -> bool:
        """Whether listed keys are lowercased emails, so that audience keys compare to them
        trimmed and lowercased; ``False``: compared trimmed only."""
        return True

    def late_row_errors(self) -> list[RowError]:
        """Rows the destination refused after it accepted their request (Google's asynchronous
        processing errors), known once delivery is over. The runner calls it after delivery
        and before the commit, and records them as rejected rows (convention 5)."""
        return []

    # -- helpers -------------------------------------------------------------------------

    def setting(self, key: str, default: Any = None) -> Any:
        """A setting of the sync's ``config`` or else of the destination."""
        if key in self.sync.settings:
            return self.sync.settings[key]
        return self.settings.get(key, default)

    def url(self, path: str, default_base: str) -> str:
        """``path`` under ``base_url`` when set, else under the API's real host."""
        base = self.settings.get("base_url") or default_base
        return base.rstrip("/") + "/" + path.lstrip("/")

    def secret_values(self) -> list[str]:
        """Values to mask wherever text leaves the process."""
        keys = {k.name for k in self.config_keys if k.secret}
        return [str(v) for k, v in self.settings.items() if k in keys and v]

    @classmethod
    def all_config_keys(cls) -> tuple[ConfigKey, ...]:
        """Common keys followed by this connector's own."""
        return COMMON_KEYS + cls.config_keys
