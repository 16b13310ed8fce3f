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
import threading
from typing import Any, ClassVar, Mapping, Sequence

import orjson

from audsync.delivery.http import Verdict, json_object_answer
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RequestRejected,
    RetriesExhausted,
)
from audsync.destinations.common import (
    Once,
    default_country,
    json_error,
    match_value,
    open_list,
    opened_list,
    request_failed,
    required,
    split_by_op,
    upper_choice,
)
from audsync.identifiers import META_RULES, InvalidIdentifier, Options, is_blank

logger = logging.getLogger("audsync.destinations.facebook")

# -- the API ------------------------------------------------------------------------------

GRAPH_URL = "https://graph.facebook.com"
API_VERSION = "v25.0"
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
USAGE_HEADER = "X-Business-Use-Case-Usage"


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


def session_id(run_id: str, op: str) -> int:
    """A session id for one run's adds or removals: stable for the run, unique across runs.

    Meta takes a 64-bit integer; 60 bits of a hash keep it positive and collision-free in
    practice, and a restarted attempt of the same run reuses it.
    """
    return int(hashlib.sha256(f"{run_id}:{op}".encode()).hexdigest()[:15], 16)


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
        self._sessions = {op: session_id(sync.run_id, op) for op in self._batch_seq}
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
        if error.get("is_transient") is True or response.status_code >= 500:
            return Verdict.retry(code=f"meta_{code}", message=message)
        return Verdict.reject(f"meta_{code}", message)

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Find the audience: ``audience_id``, else the one created on an earlier run, else
        create it (``create_if_missing``). Returns ``{"audience_id": ...}`` once created."""
        self._audience_id, state = open_list(
            self,
            "audience_id",
            self._create_audience,
            "create_if_missing: true and ad_account_id to create the audience",
        )
        return state

    def _create_audience(self) -> str:
        """Create a customer-list custom audience; return its id."""
        account = str(self.setting("ad_account_id") or "").strip()
        account = account.removeprefix("act_")
        if not account.isdigit():
            raise FatalDestinationError(
                f"destination {self.name!r}: create_if_missing needs 'ad_account_id' (the ad"
                " account's number)"
            )
        source = str(self.setting("customer_file_source") or "USER_PROVIDED_ONLY").upper()
        if source not in CUSTOMER_FILE_SOURCES:
            raise FatalDestinationError(
                f"destination {self.name!r}: key 'customer_file_source' must be one of"
                f" {', '.join(CUSTOMER_FILE_SOURCES)}, got {source!r}"
            )
        body = {
            "name": str(self.setting("audience_name") or self.sync.name),
            "subtype": "CUSTOM",
            "customer_file_source": source,
        }
        description = self.setting("audience_description")
        if description:
            body["description"] = str(description)
        response = self.http.request(
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
        logger.info("destination %r: created custom audience %s", self.name, created)
        return created

    def _audience(self) -> str:
        if self._audience_id is None:
            self._audience_id = opened_list(self, "audience_id", "custom audience")
        return self._audience_id

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Add (and update) with one POST, remove with one DELETE; bad identifiers fail alone."""
        audience = self._audience()
        rejected, ids, groups = split_by_op(batch, self._row)
        unmatched = 0
        for op, method in (("add", "POST"), ("remove", "DELETE")):
            items = groups[op]
            if not items:
                continue
            try:
                unmatched += self._upload(method, audience, op, [row for _, row in items])
            except (RequestRejected, RetriesExhausted) as exc:
                # Only this request's rows fail: the other one (adds or removes) went through.
                for row in request_failed(items, exc):
                    rejected.append(row)
                    ids.pop(row.key, None)
        return BatchResult(rejected=rejected, destination_ids=ids, unmatched=unmatched)

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
        """One ``/users`` call; returns ``num_invalid_entries``."""
        with self._lock:
            self._batch_seq[op] += 1
            sequence = self._batch_seq[op]
        body = {
            "payload": {"schema": self._schema, "data": rows},
            "session": {
                "session_id": self._sessions[op],
                "batch_seq": sequence,
                # The last batch of a run is not known when it is sent (the engine streams the
                # plan, several threads at once), and /users applies each batch on arrival, so
                # no batch claims to be the last (unconfirmed: no source says a session left
                # open has an effect on /users; it matters for /usersreplace, not used here).
                "last_batch_flag": False,
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
