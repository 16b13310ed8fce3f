"""Meta (Facebook) Custom Audiences: customer-list audiences matched on hashed identifiers.

Each batch becomes at most two Graph API calls on the audience's ``users`` edge: ``POST`` for
adds and updates (re-adding a member is a set operation, so an update is an idempotent re-add),
``DELETE`` with the same body for removals::

    {"payload": {"schema": ["EMAIL", "FN"], "data": [["<sha256>", "<sha256>"], ...]},
     "session": {"session_id": 123, "batch_seq": 1, "last_batch_flag": false}}

Field mapping: the sync's identifier is the ``key_type`` column (``EMAIL`` unless set), and every
``destination_field`` named like a Meta multi-key schema key (``EMAIL``, ``PHONE``, ``FN``,
``LN``, ``FI``, ``GEN``, ``DOBY``, ``DOBM``, ``DOBD``, ``CT``, ``ST``, ``ZIP``, ``COUNTRY``,
``MADID``, ``EXTERN_ID``; any case) adds that key to the schema. Other fields are ignored
(a custom audience keeps no attributes) with one warning when the run starts. Values are
normalised and hashed by :mod:`audsync.identifiers`; an unusable identifier fails its row
(``invalid_email``, ``invalid_phone``), an unusable secondary value is sent blank.

The id kept for each member (``_audsync_destination_id``) is the value matched on for the key,
its hash: a removal sends exactly what was added, even if ``default_country`` or the mapping
changed between the two runs. Meta gives members no id of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from typing import Any, ClassVar, Mapping, Sequence

import orjson

from audsync.delivery.http import Verdict, json_object_answer
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    DestinationError,
    FatalDestinationError,
    RowError,
)
from audsync.destinations.common import (
    ListLifecycle,
    Once,
    json_object,
    default_country,
    json_error,
    match_value,
    open_list,
    opened_list,
    required,
    send_hashed,
    upper_choice,
)
from audsync.identifiers import META_RULES, InvalidIdentifier, Options, is_blank

logger = logging.getLogger("audsync.destinations.facebook")

# -- the API ------------------------------------------------------------------------------

GRAPH_URL = "https://graph.facebook.com"
API_VERSION = "v26.0"
"""The Graph API version by default (destinations.md, late 2026); ``api_version`` picks another."""
MAX_ROWS_PER_REQUEST = 10_000
"""Meta's limit on users in one ``/users`` request."""

KEY_TYPES = ("EMAIL", "PHONE", "MADID", "EXTERN_ID")
"""Schema keys the sync's own identifier can be (the others do not identify a person alone)."""

CUSTOMER_FILE_SOURCES = (
    "USER_PROVIDED_ONLY",
    "PARTNER_PROVIDED_ONLY",
    "BOTH_USER_AND_PARTNER_PROVIDED",
)

# Error codes in the answer's body (destinations.md). Meta signals rate limits in the body of a
# 4xx, not with 429, so the HttpClient's default policy would fail the rows instead of waiting.
RATE_LIMIT_CODES = frozenset({4, 17, 613, 80003})
TOKEN_CODES = frozenset({190, 102})
"""Bad or expired token (102: session key invalid, the older spelling of 190)."""
PERMISSION_CODES = frozenset({10}) | frozenset(range(200, 300))
"""destinations.md names 200 and 294; Meta's whole 2xx range and 10 are permission errors."""
INVALID_PARAMETER = 100
OBJECT_MISSING_SUBCODE = 33
"""Code 100 with subcode 33: the audience does not exist or this token cannot see it."""
TERMS_NOT_ACCEPTED = 2655
"""The ad account has not accepted the Custom Audience terms: no upload can succeed."""
UPLOAD_BLOCKED_SUBCODE = 1713230
"""Code 100 with subcode 1713230: uploads to this audience or account are blocked."""
USAGE_HEADER = "X-Business-Use-Case-Usage"
LIST_PAGE = 500
MAX_LIST_PAGES = 200
"""Pages of an ad account's audiences read to find one by name (100,000 audiences)."""


graph_error = json_error
"""The ``error`` object of a Graph API answer, or ``None``."""


def regain_access_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds until Meta lifts a rate limit, from ``X-Business-Use-Case-Usage``, or ``None``.

    The header maps business ids to lists of usage entries, each with
    ``estimated_time_to_regain_access`` in minutes. ``None`` (no header, or 0) leaves the wait
    to the client's backoff.
    """
    raw = headers.get(USAGE_HEADER)
    if not raw:
        return None
    try:
        usage = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    minutes = 0.0
    if isinstance(usage, dict):
        for entries in usage.values():
            for entry in entries if isinstance(entries, list) else [entries]:
                if isinstance(entry, dict):
                    try:
                        minutes = max(
                            minutes, float(entry.get("estimated_time_to_regain_access") or 0)
                        )
                    except (TypeError, ValueError):
                        continue
    return minutes * 60.0 if minutes > 0 else None


def new_session_id() -> int:
    """A fresh upload session id: 60 random bits (Meta takes a positive 64-bit integer).

    Random for every connector instance, not derived from the run id: a retried or resumed
    run must never replay a ``(session_id, batch_seq)`` an earlier attempt used, which Meta
    would take as a repeat of that batch.
    """
    return secrets.randbits(60) or 1


class FacebookCustomAudienceConnector(Connector):
    """Add members to and remove them from a Meta Custom Audience (customer list)."""

    type: ClassVar[str] = "facebook_custom_audience"
    description: ClassVar[str] = (
        "Meta Custom Audience (customer list): hashed identifiers added with POST and removed"
        " with DELETE on /{audience_id}/users"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "access_token",
            "a Marketing API access token (a system user's)",
            required=True,
            secret=True,
        ),
        ConfigKey("audience_id", "the custom audience's id (or let create_if_missing make one)"),
        ConfigKey(
            "ad_account_id",
            "the ad account (digits, with or without act_) to create the audience in",
        ),
        ConfigKey(
            "create_if_missing", "create the custom audience on the first run", default=False
        ),
        ConfigKey("audience_name", "name of a created audience (default: the sync's name)"),
        ConfigKey("audience_description", "description of a created audience"),
        ConfigKey(
            "customer_file_source",
            "how the data was collected, for a created audience: "
            + ", ".join(CUSTOMER_FILE_SOURCES),
            default="USER_PROVIDED_ONLY",
        ),
        ConfigKey(
            "key_type", "what the sync's identifier is: " + ", ".join(KEY_TYPES), default="EMAIL"
        ),
        ConfigKey("default_country", "ISO country of phone numbers written without a country code"),
        ConfigKey(
            "app_secret", "the app's secret, to send appsecret_proof with every call", secret=True
        ),
        ConfigKey("api_version", "Graph API version", default=API_VERSION),
    )
    max_batch_size: ClassVar[int] = MAX_ROWS_PER_REQUEST
    # Meta limits calls per ad account, not bytes: full batches make the fewest calls.
    default_batch_size: ClassVar[int | None] = MAX_ROWS_PER_REQUEST
    # Uploads to one audience in parallel are not documented as safe or as faster; the rate
    # limit is per ad account either way, so a little parallelism suffices (unconfirmed).
    max_concurrency: ClassVar[int] = 4
    default_concurrency: ClassVar[int] = 2
    returns_destination_ids: ClassVar[bool] = True
    cannot_list_reason: ClassVar[str] = (
        "Meta keeps only hashes and its API does not list a custom audience's members"
    )

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        self._token = required(self, "access_token")
        self._version = str(self.setting("api_version") or API_VERSION).strip("/")
        key_type = upper_choice(self, "key_type", KEY_TYPES, "EMAIL")
        self._key_type = key_type
        self._options = Options(
            default_country=default_country(name, self.setting("default_country"))
        )
        app_secret = self.setting("app_secret")
        self._proof = (
            hmac.new(str(app_secret).encode(), self._token.encode(), hashlib.sha256).hexdigest()
            if app_secret
            else None
        )
        if self._proof and hasattr(http, "add_secrets"):
            # The runner masks the configured secrets; the proof is derived from them, and
            # travels in the query string, which urllib3 writes in its DEBUG lines.
            http.add_secrets([self._proof])
        # The schema: the key first, then every mapped field named like a schema key, once.
        self._columns: list[tuple[str, str | None]] = [(key_type, None)]
        ignored = []
        for field_name in sync.fields:
            schema_key = str(field_name).strip().upper()
            if schema_key not in META_RULES:
                ignored.append(field_name)
            elif all(schema_key != key for key, _ in self._columns):
                self._columns.append((schema_key, field_name))
        if ignored:
            logger.warning(
                "destination %r: fields %s are not Meta match keys and are not sent (a custom"
                " audience keeps no attributes); Meta keys: %s",
                name, ", ".join(map(repr, ignored)), ", ".join(META_RULES),
            )  # fmt: skip
        self._schema = [key for key, _ in self._columns]
        self._audience_id: str | None = None
        self._lock = threading.Lock()
        self._batch_seq = {"add": 0, "remove": 0}
        self._sessions = {op: new_session_id() for op in self._batch_seq}
        self._last_rows: dict[str, list[str]] = {}
        """A row of each session's latest request, for the request that closes the session."""
        self._blanked = Once()

    # -- configuration --------------------------------------------------------------------

    @property
    def schema(self) -> list[str]:
        """The multi-key schema every request of the run sends."""
        return list(self._schema)

    def secret_values(self) -> list[str]:
        """The token, the app secret and the proof derived from them."""
        values = super().secret_values()
        if self._proof:
            values.append(self._proof)
        return values

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _params(self) -> dict[str, str] | None:
        # In the query string, so that GET, POST and DELETE carry it alike (as Meta's SDK does).
        return {"appsecret_proof": self._proof} if self._proof else None

    def _graph(self, path: str) -> str:
        return self.url(f"{self._version}/{path}", GRAPH_URL)

    # -- the answer policy ----------------------------------------------------------------

    def classify(self, response: Any) -> Verdict | None:
        """Sort a Graph API error by its body's ``code`` (rate limits arrive as a 400)."""
        if response.status_code < 400:
            return None
        error = graph_error(response)
        if error is None:
            return None
        try:
            code = int(error.get("code") or 0)
        except (TypeError, ValueError):
            code = 0
        subcode = error.get("error_subcode")
        text = str(error.get("message") or "").strip()
        label = f"Meta error {code}" + (f" (subcode {subcode})" if subcode else "")
        message = f"{label}: {text}" if text else label
        if code in RATE_LIMIT_CODES:
            return Verdict.retry(
                regain_access_seconds(response.headers), code=f"meta_{code}", message=message
            )
        if code in TOKEN_CODES:
            return Verdict.fatal(f"the access token is invalid or expired ({message})")
        if code in PERMISSION_CODES:
            return Verdict.fatal(f"the token lacks a permission for this audience ({message})")
        if code == INVALID_PARAMETER and str(subcode) == str(OBJECT_MISSING_SUBCODE):
            return Verdict.fatal(f"the custom audience does not exist or is not shared ({message})")
        # Account-level refusals stop the run (sync status error, with Meta's message) rather
        # than failing every row of every batch alike.
        if code == TERMS_NOT_ACCEPTED:
            return Verdict.fatal(
                f"the ad account has not accepted the Custom Audience terms ({message})"
            )
        if code == INVALID_PARAMETER and str(subcode) == str(UPLOAD_BLOCKED_SUBCODE):
            return Verdict.fatal(f"audience uploads are blocked for this account ({message})")
        if error.get("is_transient") is True or response.status_code >= 500:
            return Verdict.retry(code=f"meta_{code}", message=message)
        return Verdict.reject(f"meta_{code}", message)

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Find the audience (:func:`~audsync.destinations.common.open_list`): ``audience_id``,
        else the one an earlier run created, else one of the name in the ad account, else a
        new one (``create_if_missing``). Returns ``{"audience_id": ...}``."""
        self._audience_id, state = open_list(
            self,
            ListLifecycle(
                key="audience_id",
                what="custom audience",
                name=str(self.setting("audience_name") or self.sync.name),
                exists=self._audience_exists,
                find=self._find_audience,
                create=self._create_audience,
                how_to_create="create_if_missing: true and ad_account_id to create the audience",
            ),
        )
        return state

    def _account(self) -> str:
        account = str(self.setting("ad_account_id") or "").strip().removeprefix("act_")
        if not account.isdigit():
            raise FatalDestinationError(
                f"destination {self.name!r}: create_if_missing needs 'ad_account_id' (the ad"
                " account's number)"
            )
        return account

    def _audience_exists(self, audience_id: str) -> bool:
        """Whether the audience exists and this token sees it (code 100/33 when not)."""

        def missing_is_an_answer(response: Any) -> Verdict | None:
            error = graph_error(response) or {}
            if error.get("code") == INVALID_PARAMETER and str(error.get("error_subcode")) == str(
                OBJECT_MISSING_SUBCODE
            ):
                return Verdict.ok()
            return None

        response = self.http.request(
            "GET",
            self._graph(audience_id),
            params={**(self._params() or {}), "fields": "id"},
            headers=self._headers(),
            classify=missing_is_an_answer,
        )
        return response.status_code < 300

    def _find_audience(self, name: str) -> str | None:
        """The id of the ad account's audience named ``name`` (the lowest if several)."""
        account = self._account()
        found: list[str] = []
        after: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params = {**(self._params() or {}), "fields": "id,name", "limit": str(LIST_PAGE)}
            if after:
                params["after"] = after
            response = self.http.request(
                "GET",
                self._graph(f"act_{account}/customaudiences"),
                params=params,
                headers=self._headers(),
            )
            answer = json_object(response.content) or {}
            for item in answer.get("data") or []:
                if isinstance(item, dict) and item.get("name") == name and item.get("id"):
                    found.append(str(item["id"]))
            paging = answer.get("paging") or {}
            after = (paging.get("cursors") or {}).get("after") if paging.get("next") else None
            if not after:
                break
        return min(found, key=lambda i: (len(i), i)) if found else None

    def _create_audience(self, name: str, http: Any) -> str:
        """Create a customer-list custom audience through ``http`` (no retries); its id."""
        account = self._account()
        source = str(self.setting("customer_file_source") or "USER_PROVIDED_ONLY").upper()
        if source not in CUSTOMER_FILE_SOURCES:
            raise FatalDestinationError(
                f"destination {self.name!r}: key 'customer_file_source' must be one of"
                f" {', '.join(CUSTOMER_FILE_SOURCES)}, got {source!r}"
            )
        body = {
            "name": name,
            "subtype": "CUSTOM",
            "customer_file_source": source,
        }
        description = self.setting("audience_description")
        if description:
            body["description"] = str(description)
        response = http.request(
            "POST",
            self._graph(f"act_{account}/customaudiences"),
            json=body,
            headers=self._headers(),
            params=self._params(),
        )
        try:
            created = str(orjson.loads(response.content)["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise FatalDestinationError(
                f"destination {self.name!r}: creating the custom audience gave no id"
            ) from None
        return created

    def _audience(self) -> str:
        if self._audience_id is None:
            self._audience_id = opened_list(self, "audience_id", "custom audience")
        return self._audience_id

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Add (and update) with one POST, remove with one DELETE; bad identifiers fail alone."""
        audience = self._audience()

        def send(op: str, items: list[tuple[Change, list[str]]]) -> tuple[list[RowError], int]:
            method = "POST" if op == "add" else "DELETE"
            return [], self._upload(method, audience, op, [row for _, row in items])

        return send_hashed(batch, self._row, send)

    def _row(self, change: Change) -> tuple[list[str], str]:
        """The row of values in schema order, and the key's value (the member's id)."""
        match = match_value(change, META_RULES[self._key_type], self._options)
        row = [match]
        fields = change.fields or {}
        for schema_key, field_name in self._columns[1:]:
            raw = fields.get(field_name)
            if is_blank(raw):
                row.append("")
                continue
            try:
                row.append(META_RULES[schema_key].apply(raw, self._options))
            except InvalidIdentifier as exc:
                # A secondary key only helps matching: send the member without it.
                self._note_blank(field_name, exc)
                row.append("")
        return row, match

    def _note_blank(self, field_name: str, exc: InvalidIdentifier) -> None:
        if not self._blanked.first(field_name):
            return
        logger.warning(
            "destination %r: field %r has values that cannot be used (%s: %s); they are sent"
            " blank (this is said once a run)",
            self.name, field_name, exc.code, exc.message,
        )  # fmt: skip

    def _upload(self, method: str, audience: str, op: str, rows: list[list[str]]) -> int:
        """One ``/users`` call of the run's ``op`` session; returns ``num_invalid_entries``."""
        return self._post_session(method, audience, op, rows, last=False)

    def close(self, succeeded: bool) -> None:
        """End each upload session the run used with ``last_batch_flag: true``.

        The engine streams the plan from several threads, so no batch knows it is the last
        when it is sent; the session is closed instead by one more request after the last
        batch was answered, carrying one row of that session again (adding or removing a
        member twice is a set operation: nothing changes). A run that failed leaves its
        sessions open: Meta ends them itself.
        """
        if not succeeded or self._audience_id is None:
            return
        for op, method in (("add", "POST"), ("remove", "DELETE")):
            row = self._last_rows.get(op)
            if row is None:
                continue
            try:
                self._post_session(method, self._audience_id, op, [row], last=True)
            except DestinationError as exc:
                # Every batch was answered already: a session left open is ended by Meta, and
                # must not turn a run that delivered everything into a failed one.
                logger.warning(
                    "destination %r: closing the %s session failed (%s); Meta ends it itself",
                    self.name, op, exc,
                )  # fmt: skip

    def _post_session(
        self, method: str, audience: str, op: str, rows: list[list[str]], *, last: bool
    ) -> int:
        """One request of the ``op`` session; returns ``num_invalid_entries``."""
        with self._lock:
            self._batch_seq[op] += 1
            sequence = self._batch_seq[op]
            if not last:
                self._last_rows[op] = rows[-1]
        body = {
            "payload": {"schema": self._schema, "data": rows},
            "session": {
                "session_id": self._sessions[op],
                "batch_seq": sequence,
                "last_batch_flag": last,
            },
        }
        response = self.http.request(
            method,
            self._graph(f"{audience}/users"),
            json=body,
            headers=self._headers(),
            params=self._params(),
            # Issue 10: a 2xx that is not the Graph API's JSON answer is retried, never a success.
            classify=json_object_answer("a Graph API /users answer (a JSON object)"),
        )
        try:
            answer = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        received = answer.get("num_received")
        if isinstance(received, int) and received != len(rows):
            logger.warning(
                "destination %r: Meta received %d of %d rows of a %s",
                self.name, received, len(rows), method,
            )  # fmt: skip
        try:
            return int(answer.get("num_invalid_entries") or 0)
        except (TypeError, ValueError):
            return 0
