"""A fake Meta Graph API for Custom Audiences that checks requests as the real one would.

:class:`FakeFacebook` is a real HTTP server on 127.0.0.1 (``ThreadingHTTPServer`` in a daemon
thread) serving:

* ``POST /v26.0/act_{ad_account}/customaudiences``: create a customer-list audience
  (``name``, ``subtype: CUSTOM``, ``customer_file_source``), answering ``{"id": ...}``;
* ``GET /v26.0/{audience_id}?fields=id,name``: the audience, or code 100 subcode 33;
* ``GET /v26.0/act_{ad_account}/customaudiences?fields=id,name&limit=n[&after=cursor]``: the
  account's audiences, paged with ``paging.cursors.after`` and ``paging.next`` as Graph does;
* ``POST`` and ``DELETE /v26.0/{audience_id}/users``: add and remove users, answering
  ``{"audience_id", "session_id", "num_received", "num_invalid_entries",
  "invalid_entry_samples"}``.

Every request is checked: version prefix, method and path, the token (``Authorization:
Bearer`` or ``access_token``), ``appsecret_proof`` when the fake has an app secret,
``Content-Type: application/json``, the body's keys, the payload's schema (known keys, no
repeats) and data (rows as long as the schema, hashed keys as 64 lowercase hex or blank, MADID
lowercase), at most 10,000 rows, and the session (``session_id``, ``batch_seq`` from 1, no
sequence number reused with other data). A breach answers Meta's error shape (code 100 mostly)
and is listed in :attr:`FakeFacebook.violations`.

Failures are injected in Meta's own shapes with :meth:`FakeFacebook.fail_next`: ``rate_limit``
(a 400 with code 80003 (or ``code=17``, 4, 613) and ``X-Business-Use-Case-Usage``, whose
``estimated_time_to_regain_access`` is option ``regain_minutes``),
``server_error`` (500, code 2, transient), ``expired_token`` (code 190, subcode 463),
``permission`` (code 200), ``invalid_parameter`` (code 100), ``terms_not_accepted`` (code 2655:
the ad account has not accepted the Custom Audience terms), ``upload_blocked`` (code 100,
subcode 1713230: uploads to the audience are blocked), ``timeout`` (the answer comes
after ``seconds``, the request is still applied, as when an answer is lost).
:meth:`FakeFacebook.reject_keys` makes rows come back as ``num_invalid_entries`` with
``invalid_entry_samples``, unapplied: Meta's per-row outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs

import orjson

from ._http import Answer, Failure, FakeServer, drop_none, hold, media_type, target

API_VERSION = "v26.0"
TOKEN = "EAAfakeMetaToken0123456789"
AD_ACCOUNT = "1234567890"
AUDIENCE = "23850000000000001"
MAX_ROWS = 10_000

KEYS = (
    "EMAIL",
    "PHONE",
    "FN",
    "LN",
    "FI",
    "GEN",
    "DOBY",
    "DOBM",
    "DOBD",
    "CT",
    "ST",
    "ZIP",
    "COUNTRY",
    "MADID",
    "EXTERN_ID",
)
UNHASHED = {"MADID", "EXTERN_ID"}
ID_KEYS = ("EMAIL", "PHONE", "MADID", "EXTERN_ID")
SINGLE_SCHEMAS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE", "MOBILE_ADVERTISER_ID": "MADID"}
FILE_SOURCES = {"USER_PROVIDED_ONLY", "PARTNER_PROVIDED_ONLY", "BOTH_USER_AND_PARTNER_PROVIDED"}
BODY_KEYS = {
    "payload",
    "session",
    "app_ids",
    "page_ids",
    "customer_consent",
    "access_token",
    "appsecret_proof",
}
SHA256 = re.compile(r"^[0-9a-f]{64}$")

RATE_LIMIT_MESSAGES = {
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    80003: "There have been too many calls to this ad-account. Wait a bit and try again.",
}


def email_hash(email: str) -> str:
    """Meta's EMAIL match value: SHA-256 of the trimmed, lowercased address."""
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def meta_error(code: int, message: str, subcode: int | None = None, **extra: Any) -> bytes:
    """A Graph API error body."""
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error.update(extra)
    error["fbtrace_id"] = "AfakeTrace01"
    return orjson.dumps({"error": error})


class FakeFacebook(FakeServer):
    """Meta's Custom Audiences API on loopback; state and counters are thread-safe.

    Args:
        access_token: the token requests must carry.
        app_secret: when set, every request must carry the matching ``appsecret_proof``.
        ad_account_id: the ad account audiences are created in.
        audience_id: an audience that exists from the start.
        latency_s: seconds each request waits before it is handled.
        port: the port (0: any free one).
    """

    content_type = "application/json; charset=UTF-8"
    failure_kinds = (
        "rate_limit",
        "server_error",
        "expired_token",
        "permission",
        "invalid_parameter",
        "terms_not_accepted",
        "upload_blocked",
        "timeout",
    )

    def __init__(
        self,
        *,
        access_token: str = TOKEN,
        app_secret: str | None = None,
        ad_account_id: str = AD_ACCOUNT,
        audience_id: str = AUDIENCE,
        version: str = API_VERSION,
        latency_s: float = 0.0,
        port: int = 0,
    ):
        super().__init__(port=port)
        self.access_token = access_token
        self.app_secret = app_secret
        self.ad_account_id = ad_account_id
        self.audience_id = audience_id
        self.version = version
        self.latency_s = latency_s
        self.reset()

    def reset(self) -> None:
        """Forget audiences, counters, injected failures and violations."""
        super().reset()
        with self._lock:
            self._audiences: dict[str, _Audience] = {self.audience_id: _Audience()}
            self.names: dict[str, str] = {self.audience_id: "audsync fake audience"}
            """Audience id -> name."""
            self.created: list[dict[str, Any]] = []
            """Bodies of the audiences created, in order."""
            self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
            """Every request: method, path with query, headers, body."""
            self._rejected_hashes: set[str] = set()
            self._session_rows: dict[tuple[int, int], bytes] = {}
            self.sessions: dict[int, list[int]] = {}
            """``batch_seq`` values received per ``session_id``, in arrival order."""
            self.closed_sessions: list[int] = []
            """Sessions ended by a request with ``last_batch_flag: true``, in order."""
            self.rows_applied = 0

    # -- the common fake surface ----------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry for this fake (``key=None`` drops a key)."""
        config: dict[str, Any] = {
            "type": "facebook_custom_audience",
            "access_token": self.access_token,
            "audience_id": self.audience_id,
            "ad_account_id": self.ad_account_id,
            "base_url": self.base_url,
        }
        if self.app_secret:
            config["app_secret"] = self.app_secret
        return drop_none(config, overrides)

    def field_mapping(self) -> list[dict[str, str]]:
        """email -> EMAIL and first_name -> FN; ltv has no Meta key and is not sent."""
        return [
            {"source_column": "email", "destination_field": "EMAIL"},
            {"source_column": "first_name", "destination_field": "FN"},
            {"source_column": "ltv", "destination_field": "ltv"},
        ]

    def members(
        self, candidates: Iterable[str] | None = None, *, audience_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Members of the audience: by email for ``candidates`` found in it (Meta keeps only
        hashes, so each candidate is hashed and looked up), else by ``sha256:<hash>``. Meta
        keeps no fields: every value is ``{}``."""
        with self._lock:
            audience = self._audiences.get(audience_id or self.audience_id)
            if audience is None:
                return {}
            emails = audience.emails()
        if candidates is None:
            return {f"sha256:{h}": {} for h in emails}
        return {c: {} for c in candidates if email_hash(c) in emails}

    def member_rows(self, audience_id: str | None = None) -> list[dict[str, str]]:
        """The stored rows (schema key -> value) of an audience."""
        with self._lock:
            audience = self._audiences.get(audience_id or self.audience_id)
            return [dict(row) for row in audience.rows.values()] if audience else []

    def seed_members(
        self, emails_to_fields: Mapping[str, Mapping[str, Any]] | Iterable[str]
    ) -> None:
        """Members the audience holds before a test (by email; fields are not kept)."""
        with self._lock:
            audience = self._audiences[self.audience_id]
            for email in emails_to_fields:
                audience.add({"EMAIL": email_hash(email)})

    def reject_keys(self, emails: Iterable[str]) -> None:
        """Rows with these emails come back as invalid entries and are not applied."""
        with self._lock:
            self._rejected_hashes = {email_hash(e) for e in emails}

    def audience_ids(self) -> list[str]:
        """Every audience that exists."""
        with self._lock:
            return list(self._audiences)

    # -- handling (called on the server's threads) -------------------------------------------

    def _violation(self, message: str, code: int = 100, subcode: int | None = None) -> Answer:
        self._record_violation(message)
        return 400, meta_error(code, f"(#{code}) {message}", subcode), {}

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes) -> Answer:
        """Check and apply one request; return status, body and extra headers."""
        with self._lock:
            self.requests.append((method, target(path, query), dict(headers.items()), body))
        action = self._failures.take(method, path)
        with self._in_flight():
            action = hold(action, "seconds", 2.0, self.latency_s)
            return self._handle(method, path, query, headers, body, action)

    def _handle(
        self, method: str, path: str, query: str, headers: Any, body: bytes, action: Failure | None
    ) -> Answer:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        match = re.match(r"^/(v\d+\.\d+)/(.+)$", path)
        if match is None:
            return self._violation(f"no version prefix in {path!r}", code=2500)
        if match.group(1) != self.version:
            return self._violation(f"version {match.group(1)} is not {self.version}", code=2635)
        path = match.group(2)

        # The token, then the proof: Meta checks credentials before anything else.
        authorization = headers.get("Authorization") or ""
        token = (
            authorization[7:] if authorization.startswith("Bearer ") else params.get("access_token")
        )
        if not token:
            return self._violation("An active access token must be used", code=2500)
        if token != self.access_token:
            return (
                400,
                meta_error(190, "Invalid OAuth access token - Cannot parse access token"),
                {},
            )
        if self.app_secret:
            proof = params.get("appsecret_proof")
            expected = hmac.new(
                self.app_secret.encode(), token.encode(), hashlib.sha256
            ).hexdigest()
            if not proof:
                return self._violation(
                    "API calls from the server require an appsecret_proof argument"
                )
            if not hmac.compare_digest(proof, expected):
                return self._violation("Invalid appsecret_proof provided in the API argument")
        if action is not None and action.kind == "expired_token":
            return (
                400,
                meta_error(
                    190,
                    "Error validating access token: Session has expired on Sunday, 22-Nov-26.",
                    463,
                ),
                {},
            )

        if method == "GET":
            return self._get(path, params, action)
        content_type = media_type(headers)
        if content_type != "application/json":
            return self._violation(f"Content-Type is {content_type!r}, not application/json")
        try:
            document = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return self._violation("the body is not JSON")
        if not isinstance(document, dict):
            return self._violation("the body is not a JSON object")

        created = re.match(r"^act_(\d+)/customaudiences$", path)
        users = re.match(r"^(\d+)/users$", path)
        if created and method == "POST":
            return self._create(created.group(1), document, action)
        if users and method in ("POST", "DELETE"):
            return self._users(method, users.group(1), document, action)
        return self._violation(f"Unknown path components: {method} /{path}", code=2500)

    def _failure(self, action: Failure) -> Answer:
        """The injected failure's answer (after the request passed every check)."""
        kind, options = action.kind, action.options
        if kind == "rate_limit":
            code = int(options.get("code", 80003))
            usage = {
                self.ad_account_id: [
                    {
                        "type": "custom_audience",
                        "call_count": 100,
                        "total_cputime": 12,
                        "total_time": 14,
                        "estimated_time_to_regain_access": int(options.get("regain_minutes", 0)),
                    }
                ]
            }
            subcode = 2446079 if code == 80003 else None
            return (
                400,
                meta_error(code, RATE_LIMIT_MESSAGES.get(code, "rate limited"), subcode),
                {"X-Business-Use-Case-Usage": orjson.dumps(usage).decode()},
            )
        if kind == "server_error":
            return 500, meta_error(2, "Service temporarily unavailable", is_transient=True), {}
        if kind == "permission":
            return 403, meta_error(200, "(#200) Permissions error"), {}
        if kind == "invalid_parameter":
            return 400, meta_error(100, "(#100) Invalid parameter", 1870034), {}
        if kind == "terms_not_accepted":
            return (
                400,
                meta_error(
                    2655,
                    "Terms of service has not been accepted. To accept, go to"
                    " https://www.facebook.com/customaudiences/app/tos/?act=" + self.ad_account_id,
                ),
                {},
            )
        if kind == "upload_blocked":
            return (
                400,
                meta_error(100, "(#100) Audience upload blocked for this ad account", 1713230),
                {},
            )
        raise AssertionError(kind)

    def _get(self, path: str, params: dict[str, str], action: Failure | None) -> Answer:
        """An audience by id, or the account's audiences a page at a time."""
        if action is not None:
            return self._failure(action)
        listing = re.match(r"^act_(\d+)/customaudiences$", path)
        if listing:
            if listing.group(1) != self.ad_account_id:
                return 400, meta_error(100, "(#100) Unknown ad account", 33), {}
            fields = set((params.get("fields") or "id").split(","))
            if not fields <= {"id", "name", "subtype", "approximate_count_lower_bound"}:
                return self._violation(f"unknown fields {sorted(fields)}")
            limit = int(params.get("limit") or 25)
            start = int(params.get("after") or 0)
            with self._lock:
                ids = sorted(self._audiences)
                names = dict(self.names)
            page = ids[start : start + limit]
            data = [{"id": i, **({"name": names.get(i, "")} if "name" in fields else {})} for i in page]
            answer: dict[str, Any] = {"data": data}
            if start + limit < len(ids):
                after = str(start + limit)
                answer["paging"] = {
                    "cursors": {"before": str(start), "after": after},
                    "next": f"{self.base_url}/{self.version}/{path}?fields={','.join(sorted(fields))}"
                    f"&limit={limit}&after={after}&access_token={self.access_token}",
                }
            return 200, orjson.dumps(answer), {}
        single = re.match(r"^(\d+)$", path)
        if single:
            with self._lock:
                exists = single.group(1) in self._audiences
                name = self.names.get(single.group(1), "")
            if not exists:
                return (
                    400,
                    meta_error(
                        100,
                        f"Unsupported get request. Object with ID '{single.group(1)}' does not"
                        " exist, cannot be loaded due to missing permissions, or does not"
                        " support this operation",
                        33,
                    ),
                    {},
                )
            return 200, orjson.dumps({"id": single.group(1), "name": name}), {}
        return self._violation(f"Unknown path components: GET /{path}", code=2500)

    def delete_audience(self, audience_id: str) -> None:
        """Delete an audience (as a user in Ads Manager would)."""
        with self._lock:
            self._audiences.pop(audience_id, None)
            self.names.pop(audience_id, None)

    def _create(self, account: str, document: dict, action: Failure | None) -> Answer:
        if account != self.ad_account_id:
            return 400, meta_error(100, f"(#100) Unknown ad account act_{account}", 33), {}
        name = document.get("name")
        if not isinstance(name, str) or not name:
            return self._violation("name is required")
        if document.get("subtype") != "CUSTOM":
            return self._violation(f"subtype must be CUSTOM, got {document.get('subtype')!r}")
        if document.get("customer_file_source") not in FILE_SOURCES:
            return self._violation("customer_file_source is required for a customer list")
        extra = set(document) - {"name", "subtype", "customer_file_source", "description"}
        if extra:
            return self._violation(f"unexpected parameters {sorted(extra)}")
        if action is not None:
            return self._failure(action)
        with self._lock:
            new_id = str(int(self.audience_id) + 1000 + len(self.created))
            self._audiences[new_id] = _Audience()
            self.names[new_id] = name
            self.created.append(dict(document))
        return 200, orjson.dumps({"id": new_id}), {}

    def _users(
        self, method: str, audience_id: str, document: dict, action: Failure | None
    ) -> Answer:
        extra = set(document) - BODY_KEYS
        if extra:
            return self._violation(f"unexpected parameters {sorted(extra)}")
        payload = document.get("payload")
        if not isinstance(payload, dict):
            return self._violation("payload is required and must be an object")
        problem, _, rows = _parse_payload(payload)
        if problem:
            return self._violation(problem)
        if len(rows) > MAX_ROWS:
            return self._violation(
                f"Too many users in the request: {len(rows)}; the maximum is {MAX_ROWS}",
                subcode=1870042,
            )
        session = document.get("session")
        problem = _check_session(session)
        if problem:
            return self._violation(problem)
        with self._lock:
            if session is not None:
                key = (session["session_id"], session["batch_seq"])
                data = orjson.dumps(payload)
                if key in self._session_rows and self._session_rows[key] != data:
                    self.violations.append(
                        f"batch_seq {key[1]} of session {key[0]} reused with other data"
                    )
                if session["session_id"] in self.closed_sessions:
                    self.violations.append(
                        f"session {session['session_id']} used after its last batch"
                    )
                if session.get("last_batch_flag"):
                    self.closed_sessions.append(session["session_id"])
                self._session_rows[key] = data
                self.sessions.setdefault(session["session_id"], []).append(session["batch_seq"])
            audience = self._audiences.get(audience_id)
        if audience is None:
            return (
                400,
                meta_error(
                    100,
                    f"Unsupported post request. Object with ID '{audience_id}' does not exist,"
                    " cannot be loaded due to missing permissions, or does not support this"
                    " operation",
                    33,
                ),
                {},
            )
        if action is not None:
            return self._failure(action)
        invalid: dict[str, str] = {}
        with self._lock:
            for row in rows:
                email = row.get("EMAIL", "")
                if not any(row.get(k) for k in ID_KEYS) or email in self._rejected_hashes:
                    invalid[email or "(blank)"] = "Invalid or unmatched entry"
                    continue
                (audience.add if method == "POST" else audience.remove)(row)
                self.rows_applied += 1
        answer = {
            "audience_id": audience_id,
            "session_id": str(session["session_id"]) if session else None,
            "num_received": len(rows),
            "num_invalid_entries": len(invalid),
            "invalid_entry_samples": dict(list(invalid.items())[:10]),
        }
        return 200, orjson.dumps(answer), {}


class _Audience:
    """Rows of one audience, found by any of their identifying keys (not thread-safe: the fake
    holds its lock)."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, str]] = {}
        self._index: dict[tuple[str, str], int] = {}
        self._next = 0

    def _find(self, row: Mapping[str, str]) -> int | None:
        for key in ID_KEYS:
            value = row.get(key)
            if value and (key, value) in self._index:
                return self._index[(key, value)]
        return None

    def add(self, row: Mapping[str, str]) -> None:
        found = self._find(row)
        if found is None:
            found = self._next
            self._next += 1
            self.rows[found] = {}
        stored = self.rows[found]
        for key, value in row.items():
            if value:
                stored[key] = value
                if key in ID_KEYS:
                    self._index[(key, value)] = found

    def remove(self, row: Mapping[str, str]) -> None:
        found = self._find(row)
        if found is None:
            return  # removing a non-member is not an error
        stored = self.rows.pop(found)
        for key, value in stored.items():
            self._index.pop((key, value), None)

    def emails(self) -> set[str]:
        return {row["EMAIL"] for row in self.rows.values() if row.get("EMAIL")}


def _parse_payload(payload: dict) -> tuple[str | None, list[str], list[dict[str, str]]]:
    """Problem (or ``None``), schema and rows as dicts, checked as Meta checks them."""
    schema = payload.get("schema")
    data = payload.get("data")
    extra = set(payload) - {"schema", "data", "is_raw", "app_ids", "page_ids", "data_source"}
    if extra:
        return f"unexpected payload keys {sorted(extra)}", [], []
    if not isinstance(data, list) or not data:
        return "payload.data must be a non-empty list", [], []
    if isinstance(schema, str):
        if schema not in SINGLE_SCHEMAS:
            return f"unknown schema {schema!r}", [], []
        keys = [SINGLE_SCHEMAS[schema]]
        flat = True
    elif isinstance(schema, list) and schema:
        if any(k not in KEYS for k in schema):
            return f"unknown keys in schema {schema}", [], []
        if len(set(schema)) != len(schema):
            return f"repeated keys in schema {schema}", [], []
        keys = list(schema)
        # destinations.md: one key takes a flat list; rows of one value are accepted too.
        flat = len(keys) == 1 and all(isinstance(v, str) for v in data)
    else:
        return "payload.schema must be a key name or a non-empty list of keys", [], []
    rows = []
    for index, item in enumerate(data):
        values = [item] if flat else item
        if not isinstance(values, list) or len(values) != len(keys):
            return f"data[{index}] does not have one value per schema key", [], []
        row = {}
        for key, value in zip(keys, values):
            if not isinstance(value, str):
                return f"data[{index}] {key} is not a string", [], []
            if value and key not in UNHASHED and not SHA256.match(value):
                return f"data[{index}] {key} is not a lowercase SHA-256 hex digest", [], []
            if key == "MADID" and value != value.lower():
                return f"data[{index}] MADID is not lowercase", [], []
            row[key] = value
        rows.append(row)
    return None, keys, rows


def _check_session(session: Any) -> str | None:
    if session is None:
        return None
    if not isinstance(session, dict):
        return "session must be an object"
    extra = set(session) - {"session_id", "batch_seq", "last_batch_flag", "estimated_num_total"}
    if extra:
        return f"unexpected session keys {sorted(extra)}"
    sid, seq = session.get("session_id"), session.get("batch_seq")
    if not isinstance(sid, int) or isinstance(sid, bool) or not 0 < sid < 2**63:
        return "session.session_id must be a positive 64-bit integer"
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "session.batch_seq must be an integer from 1"
    if not isinstance(session.get("last_batch_flag"), bool):
        return "session.last_batch_flag must be a boolean"
    total = session.get("estimated_num_total")
    if total is not None and (not isinstance(total, int) or total < 0):
        return "session.estimated_num_total must be a non-negative integer"
    return None
