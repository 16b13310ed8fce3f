"""A fake Salesforce REST API (Contact, Campaign, CampaignMember) that checks requests.

:class:`FakeSalesforce` is a real HTTP server on 127.0.0.1 (a ``ThreadingHTTPServer`` in a
daemon thread) holding a tiny org, and serving under ``/services/data/{version}``:

* ``GET /query?q=SOQL`` (and ``/query/{locator}`` pages): a **parsed** SOQL subset,
  ``SELECT f, ... FROM Object [WHERE f = lit | f IN (lit, ...) [AND ...]] [LIMIT n]``, string
  literals with the SOQL escapes; anything else is ``MALFORMED_QUERY``, an unknown field
  ``INVALID_FIELD`` (both recorded as violations). Text comparisons ignore case, as SOQL's do.
* ``POST /composite/sobjects`` (create, at most 200 records, ``allOrNone`` false): a
  CampaignMember for a contact already in the campaign fails with ``DUPLICATE_VALUE``.
* ``PATCH /composite/sobjects/Contact/{ExternalIdField}`` (upsert; only an External ID field;
  creating a contact without ``LastName`` fails with ``REQUIRED_FIELD_MISSING``, as Salesforce's
  does).
* ``DELETE /composite/sobjects?ids=...&allOrNone=false`` (at most 200; an unknown id fails with
  ``ENTITY_IS_DELETED``).
* ``GET /sobjects/Campaign/{id}``, ``POST /sobjects/Campaign``.

Every request is checked: the version prefix, ``Authorization: Bearer <token>``, JSON content
type, body keys, ``attributes.type``, field names against a small schema, collection limits.
Breaches are answered in Salesforce's error shape (a JSON array of ``{"message",
"errorCode"}``) and listed in :attr:`FakeSalesforce.violations`. Every answer carries
``Sforce-Limit-Info: api-usage=n/15000``.

Failures in Salesforce's shapes (``fail_next(kind, n, path=...)``): ``rate_limit`` (403
``REQUEST_LIMIT_EXCEEDED`` "TotalRequests Limit exceeded.", the daily allocation: fatal),
``concurrent_limit`` (403 ``REQUEST_LIMIT_EXCEEDED`` "ConcurrentPerOrgLongTxn Limit exceeded."),
``server_error`` (503 ``SERVER_UNAVAILABLE``), ``expired_token`` (401 ``INVALID_SESSION_ID``),
``lock_row`` (400 ``UNABLE_TO_LOCK_ROW`` for the request), ``lock_records`` (200, every record
of the collection failing ``UNABLE_TO_LOCK_ROW``), ``timeout`` (held ``timeout_s``, then
applied). ``reject_keys(emails)`` fails those members' contact upserts, member creates and
deletes per record with ``FIELD_CUSTOM_VALIDATION_EXCEPTION``.

OAuth: :meth:`FakeSalesforce.use_oauth` serves ``/services/oauth2/token``
(:class:`tests.fakes._oauth.TokenIssuer`): the refresh-token flow (``client_id``,
``client_secret``, ``refresh_token``) and the JWT bearer flow (``iss`` the connected app's
consumer key, ``sub`` the username, ``aud`` the login URL, at most three minutes of life);
answers carry ``instance_url`` and no ``expires_in``, as Salesforce's do. Issued sessions end
after a lifetime or a number of requests, then answer 401 ``INVALID_SESSION_ID``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from ._http import Answer, FakeServer, drop_none, media_type, seed_items, target
from ._oauth import TokenIssuer

TOKEN = "00Dfake!AQcAQFakeSalesforceSessionToken"
API_VERSION = "v66.0"
COLLECTION_LIMIT = 200
KEY_FIELD = "Audsync_Key__c"
URI_LIMIT = 16_384
SOQL_LIMIT = 100_000
API_LIMIT = 15_000
PREFIXES = {"Contact": "003", "Lead": "00Q", "Campaign": "701", "CampaignMember": "00v"}
SCHEMA: dict[str, frozenset[str]] = {
    "Contact": frozenset({"Id", "Email", "FirstName", "LastName", "Phone", "LTV__c", KEY_FIELD}),
    # A Lead needs LastName and Company, as Salesforce's does.
    "Lead": frozenset(
        {"Id", "Email", "FirstName", "LastName", "Company", "Phone", "LTV__c", KEY_FIELD}
    ),
    "Campaign": frozenset({"Id", "Name", "IsActive", "Status"}),
    "CampaignMember": frozenset({"Id", "CampaignId", "ContactId", "LeadId", "Status"}),
}
EXTERNAL_IDS = {"Contact": frozenset({KEY_FIELD}), "Lead": frozenset({KEY_FIELD})}
KINDS = (
    "rate_limit",
    "concurrent_limit",
    "server_error",
    "expired_token",
    "lock_row",
    "lock_records",
    "timeout",
)


def _errors(code: str, message: str) -> bytes:
    """Salesforce's request-level error body."""
    return orjson.dumps([{"message": message, "errorCode": code}])


def _record_failure(code: str, message: str, fields: list[str] | None = None) -> dict[str, Any]:
    return {
        "success": False,
        "errors": [{"statusCode": code, "message": message, "fields": fields or []}],
    }


# ----------------------------------------------------------------------------------------
# SOQL
# ----------------------------------------------------------------------------------------


class SoqlError(ValueError):
    """A query outside the subset, or malformed."""


_TOKEN = re.compile(
    r"\s*(?:(?P<string>')|(?P<number>-?\d+(?:\.\d+)?)|(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)"
    r"|(?P<punct>[(),=]))"
)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}


def tokenize(soql: str) -> list[tuple[str, Any]]:
    """SOQL tokens: ``("string", text)``, ``("number", text)``, ``("ident", name)``,
    ``("punct", c)``. String literals are unescaped; a bad escape is an error."""
    tokens: list[tuple[str, Any]] = []
    position = 0
    while position < len(soql):
        if soql[position:].strip() == "":
            break
        match = _TOKEN.match(soql, position)
        if not match:
            raise SoqlError(
                f"unexpected character at {position}: {soql[position : position + 20]!r}"
            )
        if match.group("string") is not None:
            index = match.end()
            text = []
            while True:
                if index >= len(soql):
                    raise SoqlError("unterminated string literal")
                char = soql[index]
                if char == "\\":
                    if index + 1 >= len(soql) or soql[index + 1] not in _ESCAPES:
                        raise SoqlError(f"invalid escape sequence at {index}")
                    text.append(_ESCAPES[soql[index + 1]])
                    index += 2
                    continue
                if char == "'":
                    index += 1
                    break
                if char in "\n\r":
                    raise SoqlError("line break inside a string literal")
                text.append(char)
                index += 1
            tokens.append(("string", "".join(text)))
            position = index
            continue
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def parse_soql(soql: str) -> dict[str, Any]:
    """The subset: ``{"fields", "object", "where": [(field, values)], "limit"}``.

    ``where`` holds one ``(field, [values])`` per condition, ``=`` taking one value.
    """
    tokens = tokenize(soql)
    position = 0

    def peek() -> tuple[str, Any] | None:
        return tokens[position] if position < len(tokens) else None

    def take(kind: str | None = None, value: str | None = None) -> Any:
        nonlocal position
        token = peek()
        if token is None:
            raise SoqlError(f"unexpected end of query, expected {value or kind}")
        if kind and token[0] != kind:
            raise SoqlError(f"expected {value or kind}, got {token[1]!r}")
        if value and str(token[1]).upper() != value:
            raise SoqlError(f"expected {value}, got {token[1]!r}")
        position += 1
        return token[1]

    def literal() -> Any:
        nonlocal position
        token = peek()
        if token is None:
            raise SoqlError("unexpected end of query, expected a value")
        position += 1
        kind, value = token
        if kind == "string":
            return value
        if kind == "number":
            return float(value) if "." in value else int(value)
        if kind == "ident" and value.upper() in ("TRUE", "FALSE", "NULL"):
            return {"TRUE": True, "FALSE": False, "NULL": None}[value.upper()]
        raise SoqlError(f"expected a value, got {value!r} (a string must be quoted)")

    def keyword(value: str) -> bool:
        token = peek()
        return token is not None and token[0] == "ident" and token[1].upper() == value

    take("ident", "SELECT")
    fields = [take("ident")]
    while peek() == ("punct", ","):
        take("punct")
        fields.append(take("ident"))
    take("ident", "FROM")
    obj = take("ident")
    where: list[tuple[str, list[Any]]] = []
    if keyword("WHERE"):
        take("ident")
        while True:
            field = take("ident")
            if peek() == ("punct", "="):
                take("punct")
                where.append((field, [literal()]))
            elif keyword("IN"):
                take("ident")
                take("punct", "(")
                values = [literal()]
                while peek() == ("punct", ","):
                    take("punct")
                    values.append(literal())
                take("punct", ")")
                where.append((field, values))
            else:
                raise SoqlError(f"expected = or IN after {field}")
            if keyword("AND"):
                take("ident")
                continue
            break
    limit = None
    if keyword("LIMIT"):
        take("ident")
        limit = int(take("number"))
    if peek() is not None:
        raise SoqlError(f"unexpected {peek()[1]!r} after the query")
    return {"fields": fields, "object": obj, "where": where, "limit": limit}


# ----------------------------------------------------------------------------------------
# The fake
# ----------------------------------------------------------------------------------------


class FakeSalesforce(FakeServer):
    """A Salesforce org's REST API on loopback; state and counters are thread-safe.

    Args:
        token: the access token it accepts.
        api_version: the version prefix it serves (``v66.0``).
        port: the port (0: any free one).
        timeout_s: how long a ``timeout`` failure holds its request.
        page_size: records in one query answer before ``nextRecordsUrl``.
    """

    content_type = "application/json;charset=UTF-8"
    failure_kinds = KINDS

    def __init__(
        self,
        token: str = TOKEN,
        *,
        api_version: str = API_VERSION,
        port: int = 0,
        timeout_s: float = 2.0,
        page_size: int = 2000,
    ):
        super().__init__(port=port)
        self.token = token
        self.api_version = api_version
        self.timeout_s = timeout_s
        self.page_size = page_size
        self.oauth: TokenIssuer | None = None
        """The token endpoint, once :meth:`use_oauth` is called."""
        self.reset()

    def use_oauth(
        self, *, public_key: str | None = None, username: str = "sync@example.com", **options: Any
    ) -> TokenIssuer:
        """Serve ``/services/oauth2/token``; the sessions it issues are accepted beside the
        static token. ``public_key`` enables the JWT bearer flow for ``username``."""
        self.oauth = TokenIssuer(
            lambda: self.base_url + "/services/oauth2/token",
            self._record_violation,
            client_id="3MVG9fakeConsumerKey",
            public_key=public_key,
            issuer="3MVG9fakeConsumerKey",
            audience=self.base_url,
            subject=username if public_key else None,
            max_assertion_s=180,
            state_expires_in=False,
            extra=lambda: {"instance_url": self.base_url, "id": "fake-id", "issued_at": "0"},
            **options,
        )
        return self.oauth

    # -- lifecycle --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the org's records, counters and failures; make the default campaign."""
        super().reset()
        with self._lock:
            self.records: dict[str, dict[str, dict[str, Any]]] = {o: {} for o in SCHEMA}
            """Object -> id -> fields (``Id`` included)."""
            self._counters = {o: 0 for o in SCHEMA}
            self.calls: list[tuple[str, str, Any]] = []
            """(method, path with query, JSON body) of every request."""
            self.queries: list[str] = []
            """Every SOQL query received, decoded."""
            self.requests = 0
            self._reject: set[str] = set()
            self._pages: dict[str, list[dict[str, Any]]] = {}
        self.default_campaign_id = self.add_record(
            "Campaign", Name="audsync fake campaign", IsActive=True
        )

    # -- the common surface -----------------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry; an override of ``None`` drops the key."""
        config = {
            "type": "salesforce_campaign",
            "instance_url": self.base_url,
            "access_token": self.token,
            "campaign_id": self.default_campaign_id,
            "api_version": self.api_version,
            "base_url": self.base_url,
        }
        return drop_none(config, overrides)

    def sync_config(self) -> dict[str, Any]:
        """Contacts upserted by the external id field ``Audsync_Key__c`` (the email), so that
        an audience's members need no contacts made beforehand."""
        return {"upsert_contacts": True, "contact_match_field": KEY_FIELD}

    def field_mapping(self) -> list[dict[str, str]]:
        """``email`` -> ``Email``, ``first_name`` -> ``LastName``, ``ltv`` -> ``LTV__c``.

        ``first_name`` goes to ``LastName`` because Salesforce refuses to create a Contact
        without one and the test audience has no last-name column.
        """
        return [
            {"source_column": "email", "destination_field": "Email"},
            {"source_column": "first_name", "destination_field": "LastName"},
            {"source_column": "ltv", "destination_field": "LTV__c"},
        ]

    def members(
        self, candidates: Iterable[str] | None = None, *, campaign_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """The campaign's members by key (the contact's ``Audsync_Key__c``, else its email
        lowercased), each with its Contact fields but ``Id`` and the key field."""
        campaign = campaign_id or self.default_campaign_id
        with self._lock:
            found = {}
            for member in self.records["CampaignMember"].values():
                if member["CampaignId"] != campaign:
                    continue
                contact = self.records["Contact"].get(member.get("ContactId") or "") or self.records[
                    "Lead"
                ].get(member.get("LeadId") or "")
                if contact is None:
                    continue
                key = contact.get(KEY_FIELD) or (contact.get("Email") or "").lower()
                found[key] = {k: v for k, v in contact.items() if k not in ("Id", KEY_FIELD)}
            return found

    def seed_members(
        self,
        emails_to_fields: Mapping[str, Mapping[str, Any]] | Iterable[str],
        *,
        campaign_id: str | None = None,
    ) -> dict[str, str]:
        """Make contacts (key and ``Email`` = the email, plus the fields) members of the
        campaign; return email -> CampaignMember id."""
        members = {}
        for email, fields in seed_items(emails_to_fields):
            contact_id = self.add_contact(email, **dict(fields or {}))
            members[email] = self.add_record(
                "CampaignMember",
                CampaignId=campaign_id or self.default_campaign_id,
                ContactId=contact_id,
                Status="Sent",
            )
        return members

    def reject_keys(self, emails: Iterable[str]) -> None:
        """Fail these members' records from now on (a validation rule's per-record error)."""
        with self._lock:
            self._reject = {e.strip().lower() for e in emails}

    # -- helpers for tests ------------------------------------------------------------------

    def add_record(self, obj: str, **fields: Any) -> str:
        """Insert a record directly; return its id."""
        with self._lock:
            return self._insert(obj, fields)

    def add_contact(self, email: str, *, key: str | None = None, **fields: Any) -> str:
        """A contact with ``Email`` (and ``Audsync_Key__c``, default the email lowercased)."""
        values = {"Email": email, KEY_FIELD: key if key is not None else email.strip().lower()}
        values.update(fields)
        return self.add_record("Contact", **values)

    def member_id(self, email: str, campaign_id: str | None = None) -> str | None:
        """The CampaignMember id of the contact with this key or email, if a member."""
        campaign = campaign_id or self.default_campaign_id
        with self._lock:
            for member in self.records["CampaignMember"].values():
                contact = self.records["Contact"].get(
                    member.get("ContactId") or ""
                ) or self.records["Lead"].get(member.get("LeadId") or "", {})
                if member["CampaignId"] == campaign and email.lower() in (
                    (contact.get(KEY_FIELD) or "").lower(),
                    (contact.get("Email") or "").lower(),
                ):
                    return member["Id"]
        return None

    def calls_to(self, fragment: str, method: str | None = None) -> list[tuple[str, str, Any]]:
        """The calls whose path contains ``fragment`` (and of ``method``, if given)."""
        with self._lock:
            return [
                c for c in self.calls if fragment in c[1] and (method is None or c[0] == method)
            ]

    # -- handling ---------------------------------------------------------------------------

    def _record_url(self, obj: str, record_id: str) -> str:
        return f"/services/data/{self.api_version}/sobjects/{obj}/{record_id}"

    def _insert(self, obj: str, fields: Mapping[str, Any]) -> str:
        """Insert a record (lock held); return its id."""
        self._counters[obj] += 1
        record_id = f"{PREFIXES[obj]}{self._counters[obj]:012d}AAA"
        self.records[obj][record_id] = {"Id": record_id, **fields}
        return record_id

    def _violation(self, message: str, status: int = 400, code: str = "INVALID_REQUEST") -> Answer:
        self._record_violation(message)
        return status, _errors(code, message), {}

    def _limit_header(self) -> dict[str, str]:
        with self._lock:
            return {"Sforce-Limit-Info": f"api-usage={self.requests}/{API_LIMIT}"}

    def handle(self, method: str, path: str, query: str, headers: Any, raw: bytes) -> Answer:
        """Check and serve one request; return status, body and extra headers."""
        if path == "/services/oauth2/token" and self.oauth is not None:
            return self.oauth.handle(method, headers, raw)
        with self._lock:
            self.requests += 1
        with self._in_flight():
            status, body, extra = self._handle(method, path, query, headers, raw)
            return status, body, {**self._limit_header(), **extra}

    def _handle(
        self, method: str, raw_path: str, raw_query: str, headers: Any, raw: bytes
    ) -> Answer:
        uri = target(raw_path, raw_query)
        if len(uri) > URI_LIMIT:
            return self._violation(
                f"URI of {len(uri)} bytes is over {URI_LIMIT}", 414, "URI_TOO_LONG"
            )
        path = unquote(raw_path)
        query = parse_qs(raw_query, keep_blank_values=True)
        prefix = f"/services/data/{self.api_version}/"
        if not path.startswith(prefix):
            return self._violation(f"{method} {path}: not under {prefix}", 404, "NOT_FOUND")
        authorization = headers.get("Authorization") or ""
        if not authorization.startswith("Bearer "):
            self._violation(f"{method} {path}: no 'Authorization: Bearer' header", 401)
            return 401, _errors("INVALID_SESSION_ID", "Session expired or invalid"), {}
        if authorization != f"Bearer {self.token}" and (
            self.oauth is None or self.oauth.check(authorization[7:]) is not None
        ):
            return 401, _errors("INVALID_SESSION_ID", "Session expired or invalid"), {}
        body: Any = None
        if method in ("POST", "PATCH"):
            content_type = media_type(headers)
            if content_type != "application/json":
                return self._violation(
                    f"{method} {path}: Content-Type {content_type!r}", 415, "UNSUPPORTED_MEDIA_TYPE"
                )
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._violation(
                    f"{method} {path}: body is not JSON ({exc})", 400, "JSON_PARSER_ERROR"
                )
        with self._lock:
            self.calls.append((method, target(path, raw_query), body))
        rest = [p for p in path[len(prefix) :].split("/") if p]
        route = self._route(method, rest)
        if route is None:
            return self._violation(f"no such endpoint: {method} {path}", 404, "NOT_FOUND")
        handler, args = route
        checked = handler(query, body, *args, check_only=True)
        if checked is not None:
            return checked
        failure = self._failures.take(method, path)
        if failure is not None:
            if failure.kind == "timeout":
                time.sleep(self.timeout_s)
            elif failure.kind == "lock_records" and handler.__name__ in (
                "_create",
                "_upsert",
                "_delete",
            ):
                count = (
                    len(body["records"])
                    if isinstance(body, dict)
                    else len(query["ids"][0].split(","))
                )
                return (
                    200,
                    orjson.dumps(
                        [
                            _record_failure(
                                "UNABLE_TO_LOCK_ROW",
                                "unable to obtain exclusive access to this record",
                            )
                            for _ in range(count)
                        ]
                    ),
                    {},
                )
            else:
                return self._failure_answer(failure.kind)
        return handler(query, body, *args, check_only=False)

    def _failure_answer(self, kind: str) -> Answer:
        if kind == "rate_limit":
            return 403, _errors("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."), {}
        if kind == "concurrent_limit":
            return (
                403,
                _errors("REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded."),
                {},
            )
        if kind == "server_error":
            return (
                503,
                _errors("SERVER_UNAVAILABLE", "Server temporarily unavailable, please retry."),
                {},
            )
        if kind == "expired_token":
            return 401, _errors("INVALID_SESSION_ID", "Session expired or invalid"), {}
        if kind == "lock_row":
            return (
                400,
                _errors("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record"),
                {},
            )
        return 400, _errors("UNKNOWN", kind), {}  # lock_records on a non-collection call

    def _route(self, method: str, rest: list[str]) -> tuple[Any, tuple[str, ...]] | None:
        if rest == ["query"] and method == "GET":
            return self._query, ()
        if len(rest) == 2 and rest[0] == "query" and method == "GET":
            return self._query_page, (rest[1],)
        if rest == ["composite", "sobjects"]:
            if method == "POST":
                return self._create, ()
            if method == "DELETE":
                return self._delete, ()
            return None
        if len(rest) == 4 and rest[:2] == ["composite", "sobjects"] and method == "PATCH":
            return self._upsert, (rest[2], rest[3])
        if len(rest) == 3 and rest[:2] == ["sobjects", "Campaign"] and method == "GET":
            return self._get_campaign, (rest[2],)
        if rest == ["sobjects", "Campaign"] and method == "POST":
            return self._create_campaign, ()
        return None

    # -- endpoints: each checks (check_only=True: an answer for a bad request, else None) ---

    def _query(self, query: dict[str, list[str]], body: Any, *, check_only: bool) -> Any:
        soqls = query.get("q")
        if not soqls or len(soqls) != 1:
            return self._violation("query without exactly one q parameter", 400, "MALFORMED_QUERY")
        soql = soqls[0]
        if len(soql) > SOQL_LIMIT:
            return self._violation(f"SOQL of {len(soql)} characters", 400, "MALFORMED_QUERY")
        try:
            parsed = parse_soql(soql)
        except SoqlError as exc:
            return self._violation(f"malformed SOQL {soql[:200]!r}: {exc}", 400, "MALFORMED_QUERY")
        obj = parsed["object"]
        if obj not in SCHEMA:
            return self._violation(f"sObject type '{obj}' is not supported.", 400, "INVALID_TYPE")
        for field in [*parsed["fields"], *(f for f, _ in parsed["where"])]:
            if field not in SCHEMA[obj]:
                return self._violation(
                    f"No such column '{field}' on entity '{obj}'.", 400, "INVALID_FIELD"
                )
        if check_only:
            return None
        with self._lock:
            self.queries.append(soql)
            matched = []
            for record in self.records[obj].values():
                if all(_matches(record.get(f), values) for f, values in parsed["where"]):
                    matched.append(
                        {
                            "attributes": {
                                "type": obj,
                                "url": self._record_url(obj, record["Id"]),
                            },
                            **{f: record.get(f) for f in parsed["fields"]},
                        }
                    )
            if parsed["limit"] is not None:
                matched = matched[: parsed["limit"]]
            return self._page(matched, 0)

    def _page(
        self, matched: list[dict[str, Any]], offset: int
    ) -> tuple[int, bytes, dict[str, str]]:
        """One page of a query answer (lock held)."""
        chunk = matched[offset : offset + self.page_size]
        done = offset + self.page_size >= len(matched)
        answer: dict[str, Any] = {"totalSize": len(matched), "done": done, "records": chunk}
        if not done:
            locator = f"01gFAKE{len(self._pages):08d}"
            self._pages[locator] = matched
            answer["nextRecordsUrl"] = (
                f"/services/data/{self.api_version}/query/{locator}-{offset + self.page_size}"
            )
        return 200, orjson.dumps(answer), {}

    def _query_page(self, query: Any, body: Any, locator: str, *, check_only: bool) -> Any:
        name, _, offset = locator.rpartition("-")
        with self._lock:
            matched = self._pages.get(name)
        if matched is None or not offset.isdigit():
            return self._violation(
                f"unknown query locator {locator!r}", 400, "INVALID_QUERY_LOCATOR"
            )
        if check_only:
            return None
        with self._lock:
            return self._page(matched, int(offset))

    def _check_collection(self, body: Any, obj: str | None, *, upsert: bool = False) -> Any:
        if not isinstance(body, dict) or not set(body) <= {"allOrNone", "records"}:
            return self._violation(
                f"collection body has unexpected keys: {str(body)[:200]}", 400, "JSON_PARSER_ERROR"
            )
        if body.get("allOrNone") is not False:
            return self._violation(
                "allOrNone must be false: one bad record must not fail the batch"
            )
        records = body.get("records")
        if not isinstance(records, list) or not records:
            return self._violation("records must be a non-empty list")
        if len(records) > COLLECTION_LIMIT:
            return self._violation(
                "record limit reached. cannot submit more than 200 records into this call",
                400,
                "EXCEEDED_ID_LIMIT",
            )
        for index, record in enumerate(records):
            attributes = record.get("attributes") if isinstance(record, dict) else None
            kind = attributes.get("type") if isinstance(attributes, dict) else None
            if kind not in SCHEMA or (obj is not None and kind != obj):
                return self._violation(
                    f"record {index}: attributes.type {kind!r}", 400, "INVALID_TYPE"
                )
            if "Id" in record:
                return self._violation(
                    f"record {index}: an Id in a create or upsert", 400, "INVALID_FIELD"
                )
            for field in record:
                if field != "attributes" and field not in SCHEMA[kind]:
                    return self._violation(
                        f"No such column '{field}' on sobject of type {kind}", 400, "INVALID_FIELD"
                    )
        return None

    def _create(self, query: Any, body: Any, *, check_only: bool) -> Any:
        problem = self._check_collection(body, None)
        if problem is not None or check_only:
            return problem
        results = []
        with self._lock:
            for record in body["records"]:
                kind = record["attributes"]["type"]
                fields = {k: v for k, v in record.items() if k != "attributes"}
                results.append(self._create_one(kind, fields))
        return 200, orjson.dumps(results), {}

    def _key_of_contact(self, contact_id: Any) -> str:
        contact = self.records["Contact"].get(contact_id or "") or self.records["Lead"].get(
            contact_id or "", {}
        )
        return str(contact.get(KEY_FIELD) or contact.get("Email") or "").lower()

    def _create_one(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Create one record of a collection (lock held); its result."""
        if kind == "CampaignMember":
            missing = [f for f in ("CampaignId",) if not fields.get(f)]
            if not fields.get("ContactId") and not fields.get("LeadId"):
                missing.append("ContactId")
            if missing:
                return _record_failure(
                    "REQUIRED_FIELD_MISSING", f"Required fields are missing: {missing}", missing
                )
            if fields["CampaignId"] not in self.records["Campaign"]:
                return _record_failure(
                    "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", ["CampaignId"]
                )
            if fields.get("ContactId") and fields["ContactId"] not in self.records["Contact"]:
                return _record_failure(
                    "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", ["ContactId"]
                )
            if fields.get("LeadId") and fields["LeadId"] not in self.records["Lead"]:
                return _record_failure(
                    "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", ["LeadId"]
                )
            if self._key_of_contact(fields.get("ContactId") or fields.get("LeadId")) in self._reject:
                return _record_failure(
                    "FIELD_CUSTOM_VALIDATION_EXCEPTION", "Rejected by a validation rule (fake)"
                )
            for member in self.records["CampaignMember"].values():
                if member["CampaignId"] == fields["CampaignId"] and (
                    member.get("ContactId"),
                    member.get("LeadId"),
                ) == (fields.get("ContactId"), fields.get("LeadId")):
                    return _record_failure("DUPLICATE_VALUE", "Already a campaign member.")
        if kind == "Contact" and not fields.get("LastName"):
            return _record_failure(
                "REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", ["LastName"]
            )
        if kind == "Lead" and not (fields.get("LastName") and fields.get("Company")):
            return _record_failure(
                "REQUIRED_FIELD_MISSING",
                "Required fields are missing: [LastName, Company]",
                ["LastName", "Company"],
            )
        record_id = self._insert(kind, fields)
        return {"id": record_id, "success": True, "errors": []}

    def _upsert(self, query: Any, body: Any, obj: str, field: str, *, check_only: bool) -> Any:
        if obj not in SCHEMA:
            return self._violation(f"sObject type '{obj}' is not supported.", 404, "NOT_FOUND")
        if field not in EXTERNAL_IDS.get(obj, ()):
            return self._violation(
                f"Field {field} is not an External ID or indexed field for {obj}",
                400,
                "INVALID_FIELD",
            )
        problem = self._check_collection(body, obj, upsert=True)
        if problem is not None:
            return problem
        values = [r.get(field) for r in body["records"]]
        if not all(isinstance(v, str) and v for v in values):
            return self._violation(f"every record of an upsert needs its {field}")
        if len({v.lower() for v in values}) != len(values):
            return self._violation(
                f"duplicate {field} values in one upsert", 400, "DUPLICATE_EXTERNAL_ID"
            )
        if check_only:
            return None
        results = []
        with self._lock:
            for record in body["records"]:
                fields = {k: v for k, v in record.items() if k != "attributes"}
                value = fields[field]
                if value.lower() in self._reject:
                    results.append(
                        _record_failure(
                            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                            "Rejected by a validation rule (fake)",
                        )
                    )
                    continue
                existing = next(
                    (
                        r
                        for r in self.records[obj].values()
                        if str(r.get(field) or "").lower() == value.lower()
                    ),
                    None,
                )
                if existing is not None:
                    existing.update(fields)
                    results.append(
                        {"id": existing["Id"], "success": True, "errors": [], "created": False}
                    )
                    continue
                result = self._create_one(obj, fields)
                if result.get("success"):
                    result["created"] = True
                results.append(result)
        return 200, orjson.dumps(results), {}

    def _delete(self, query: dict[str, list[str]], body: Any, *, check_only: bool) -> Any:
        if query.get("allOrNone") != ["false"]:
            return self._violation("delete without allOrNone=false")
        ids = query.get("ids", [""])[0].split(",") if query.get("ids") else []
        if not ids or not all(ids):
            return self._violation("delete without ids")
        if len(ids) > COLLECTION_LIMIT:
            return self._violation(
                "record limit reached. cannot submit more than 200 records into this call",
                400,
                "EXCEEDED_ID_LIMIT",
            )
        if check_only:
            return None
        results = []
        with self._lock:
            for record_id in ids:
                obj = next((o for o in self.records if record_id in self.records[o]), None)
                if obj is None:
                    results.append(
                        {
                            "id": record_id,
                            **_record_failure("ENTITY_IS_DELETED", "entity is deleted"),
                        }
                    )
                    continue
                record = self.records[obj][record_id]
                if (
                    obj == "CampaignMember"
                    and self._key_of_contact(record.get("ContactId") or record.get("LeadId")) in self._reject
                ):
                    results.append(
                        {
                            "id": record_id,
                            **_record_failure("DELETE_FAILED", "Rejected by a trigger (fake)"),
                        }
                    )
                    continue
                del self.records[obj][record_id]
                results.append({"id": record_id, "success": True, "errors": []})
        return 200, orjson.dumps(results), {}

    def _get_campaign(self, query: Any, body: Any, campaign_id: str, *, check_only: bool) -> Any:
        if check_only:
            return None
        with self._lock:
            record = self.records["Campaign"].get(campaign_id)
            if record is None:
                return 404, _errors("NOT_FOUND", "The requested resource does not exist"), {}
            return (
                200,
                orjson.dumps(
                    {
                        "attributes": {
                            "type": "Campaign",
                            "url": self._record_url("Campaign", campaign_id),
                        },
                        **record,
                    }
                ),
                {},
            )

    def _create_campaign(self, query: Any, body: Any, *, check_only: bool) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("Name"), str) or not body["Name"]:
            return self._violation("a campaign needs a Name", 400, "REQUIRED_FIELD_MISSING")
        for field in body:
            if field not in SCHEMA["Campaign"] or field == "Id":
                return self._violation(
                    f"No such column '{field}' on sobject of type Campaign", 400, "INVALID_FIELD"
                )
        if check_only:
            return None
        campaign_id = self.add_record("Campaign", **body)
        return 201, orjson.dumps({"id": campaign_id, "success": True, "errors": []}), {}


def _matches(value: Any, wanted: list[Any]) -> bool:
    """SOQL ``=`` / ``IN``: text compared without case, as SOQL compares text fields."""
    if isinstance(value, str):
        return any(isinstance(w, str) and w.lower() == value.lower() for w in wanted)
    return value in wanted
