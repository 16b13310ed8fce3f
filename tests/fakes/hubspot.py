"""A fake HubSpot CRM API (contacts and lists) that checks requests like the real one.

:class:`FakeHubSpot` is a real HTTP server on 127.0.0.1 (a ``ThreadingHTTPServer`` in a daemon
thread) serving the part of the API the ``hubspot_list`` connector uses, in HubSpot's shapes:

* ``POST /crm/v3/objects/contacts/batch/upsert`` (at most 100 inputs; contacts keyed by their
  lowercased email; 200, or 207 with ``errors[]``/``numErrors`` when some inputs fail; results
  come back in **reverse** input order, because HubSpot does not promise any order),
* ``POST /crm/v3/objects/contacts/batch/read`` (by ``idProperty``; 207 with an
  ``OBJECT_NOT_FOUND`` error naming absent ids),
* ``POST /crm/v3/lists``, ``GET /crm/v3/lists/{id}``,
  ``GET /crm/v3/lists/object-type-id/{type}/name/{name}``, ``GET /crm/v3/lists/{id}/memberships``,
* ``PUT /crm/v3/lists/{id}/memberships/add-and-remove`` (MANUAL/SNAPSHOT lists only; answer
  ``recordsIdsAdded`` (sic), ``recordIdsRemoved``, ``recordIdsMissing``).

Paths are served in HubSpot's date-versioned spelling (``/crm/objects/2026-03/...``,
``/crm/lists/2026-03/...``, published 2026-03-30) and in the legacy v3 one shown above; the
versions served are ``api_versions`` (a v3 request to a fake that no longer serves v3 is a
404, as after September 2027), and :attr:`FakeHubSpot.versions_seen` records each request's.
``GET .../lists/{id}/memberships?limit=n&after=cursor`` pages with ``paging.next.after``.

Every request is checked: method and path, ``Authorization: Bearer <token>``, JSON content type,
body keys and types (property values are strings, record ids strings, as the official SDK's
models type them), batch limits. A breach is answered as HubSpot would (400 ``VALIDATION_ERROR``,
404) and listed in :attr:`FakeHubSpot.violations`, which a test asserts is empty.

Failures in HubSpot's own shapes: ``fail_next(kind, n, path=...)`` with ``rate_limit``
(429 ``TEN_SECONDLY_ROLLING``), ``secondly_limit``, ``daily_limit`` (429 ``DAILY``),
``server_error`` (502), ``expired_token`` (401 ``EXPIRED_AUTHENTICATION``), ``timeout`` (the
request is held ``timeout_s`` seconds, then applied: the answer is lost, as with a real server);
``reject_keys(emails)`` fails those contacts' upserts in a multi-status answer (or, with
``reject_mode="batch_400"``, the whole upsert with a 400 naming them).
"""

from __future__ import annotations

import datetime as _dt
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

import orjson

from ._http import Answer, FakeServer, drop_none, media_type, seed_items

TOKEN = "pat-na1-fake-hubspot-token"
CONTACT_TYPE = "0-1"
MAX_INPUTS = 100
DEFAULT_LIST_NAME = "audsync fake list"
# Properties a contact may be given; HubSpot refuses others (PROPERTY_DOESNT_EXIST).
KNOWN_PROPERTIES = frozenset(
    {"email", "firstname", "lastname", "phone", "company", "lifetime_value", "customer_id"}
)
UNIQUE_PROPERTIES = frozenset({"email", "customer_id"})
SYSTEM_PROPERTIES = ("hs_object_id", "createdate", "lastmodifieddate")
KINDS = (
    "rate_limit",
    "secondly_limit",
    "daily_limit",
    "server_error",
    "expired_token",
    "timeout",
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_DIGITS = re.compile(r"^[0-9]+$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _error(message: str, category: str = "VALIDATION_ERROR", **extra: Any) -> bytes:
    """HubSpot's error body."""
    return orjson.dumps(
        {
            "status": "error",
            "message": message,
            "correlationId": str(uuid.uuid4()),
            "category": category,
            **extra,
        }
    )


def _no_list(list_id: str) -> Answer:
    """HubSpot's answer for a list id it does not know."""
    return 404, _error(f"List does not exist with ID {list_id}.", "OBJECT_NOT_FOUND"), {}


class FakeHubSpot(FakeServer):
    """A HubSpot CRM API on loopback; state and counters are thread-safe.

    Args:
        token: the access token it accepts.
        port: the port (0: any free one).
        timeout_s: how long a ``timeout`` failure holds its request.
        membership_limit: most record ids one add-and-remove call may carry (HubSpot's is
            unconfirmed; destinations.md advises a few thousand at most).
        reject_mode: how ``reject_keys`` fail: ``multi_status`` (207, per input) or
            ``batch_400`` (the whole upsert refused with a 400 quoting the emails).
    """

    content_type = "application/json;charset=utf-8"
    failure_kinds = KINDS

    def __init__(
        self,
        token: str = TOKEN,
        *,
        port: int = 0,
        timeout_s: float = 2.0,
        membership_limit: int = 10_000,
        reject_mode: str = "multi_status",
        api_versions: tuple[str, ...] = ("2026-03", "v3"),
    ):
        super().__init__(port=port)
        self.api_versions = api_versions
        self.token = token
        self.timeout_s = timeout_s
        self.membership_limit = membership_limit
        self.reject_mode = reject_mode
        self.reset()

    # -- lifecycle --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget contacts, lists, counters and injected failures; make the default list."""
        super().reset()
        with self._lock:
            self.contacts: dict[str, dict[str, Any]] = {}
            """Record id -> {"id", "properties", "createdAt", "updatedAt"}."""
            self._by_email: dict[str, str] = {}
            self.lists: dict[str, dict[str, Any]] = {}
            """List id -> the list's description plus ``members`` (record id -> joined at)."""
            self._next_contact = 1001
            self._next_list = 11
            self.calls: list[tuple[str, str, Any]] = []
            """(method, path, JSON body) of every request, in arrival order."""
            self.requests = 0
            self._reject: set[str] = set()
            self.versions_seen: list[str] = []
            """The API version of every request, in arrival order."""
        self.default_list_id = self.add_list(DEFAULT_LIST_NAME, "MANUAL")

    # -- the common surface -----------------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry for this fake; an override of ``None`` drops
        the key (``list_id=None, create_if_missing=True`` to test list creation)."""
        config = {
            "type": "hubspot_list",
            "access_token": self.token,
            "list_id": self.default_list_id,
            "base_url": self.base_url,
        }
        return drop_none(config, overrides)

    def field_mapping(self) -> list[dict[str, str]]:
        """``email``, ``first_name`` and ``ltv`` mapped to contact properties."""
        return [
            {"source_column": "email", "destination_field": "email"},
            {"source_column": "first_name", "destination_field": "firstname"},
            {"source_column": "ltv", "destination_field": "lifetime_value"},
        ]

    def members(
        self, candidates: Iterable[str] | None = None, *, list_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """The list's members by email, each with its contact properties (HubSpot's strings,
        system properties left out). ``candidates`` is not needed: HubSpot keeps emails."""
        with self._lock:
            the_list = self.lists[str(list_id or self.default_list_id)]
            members = {}
            for record_id in the_list["members"]:
                contact = self.contacts.get(record_id)
                if contact is None:
                    continue
                properties = {
                    k: v for k, v in contact["properties"].items() if k not in SYSTEM_PROPERTIES
                }
                members[properties.get("email", record_id)] = properties
            return members

    def seed_members(
        self,
        emails_to_fields: Mapping[str, Mapping[str, Any]] | Iterable[str],
        *,
        list_id: str | None = None,
    ) -> dict[str, str]:
        """Create contacts (fields by property name) in the list; return email -> record id."""
        ids = {}
        with self._lock:
            the_list = self.lists[str(list_id or self.default_list_id)]
            for email, fields in seed_items(emails_to_fields):
                properties = {k: "" if v is None else str(v) for k, v in (fields or {}).items()}
                record_id, _ = self._upsert_contact(email.strip().lower(), properties)
                the_list["members"].setdefault(record_id, _now())
                ids[email] = record_id
        return ids

    def reject_keys(self, emails: Iterable[str]) -> None:
        """Fail the upserts of these emails from now on (HubSpot's per-input error shape)."""
        with self._lock:
            self._reject = {e.strip().lower() for e in emails}

    # -- helpers for tests ------------------------------------------------------------------

    def add_list(self, name: str, processing_type: str = "MANUAL") -> str:
        """Create a list directly; return its id."""
        with self._lock:
            list_id = str(self._next_list)
            self._next_list += 1
            self.lists[list_id] = {
                "listId": list_id,
                "name": name,
                "objectTypeId": CONTACT_TYPE,
                "processingType": processing_type,
                "processingStatus": "COMPLETE",
                "listVersion": 1,
                "createdAt": _now(),
                "updatedAt": _now(),
                "members": {},
            }
            return list_id

    def delete_contact(self, email: str) -> None:
        """Delete a contact (its id becomes ``recordIdsMissing`` in membership calls)."""
        with self._lock:
            record_id = self._by_email.pop(email.strip().lower())
            del self.contacts[record_id]

    def record_id(self, email: str) -> str | None:
        """The record id of the contact with this email, if any."""
        with self._lock:
            return self._by_email.get(email.strip().lower())

    def calls_to(self, fragment: str) -> list[tuple[str, str, Any]]:
        """The calls whose path contains ``fragment``."""
        with self._lock:
            return [c for c in self.calls if fragment in c[1]]

    # -- handling ---------------------------------------------------------------------------

    def _violation(self, message: str, status: int = 400) -> Answer:
        self._record_violation(message)
        category = "OBJECT_NOT_FOUND" if status == 404 else "VALIDATION_ERROR"
        return status, _error(message, category), {}

    def handle(self, method: str, path: str, query: str, headers: Any, raw: bytes) -> Answer:
        """Check and serve one request; return status, body and extra headers."""
        path = unquote(path)
        with self._lock:
            self.requests += 1
        with self._in_flight():
            return self._handle(method, path, headers, raw, query)

    def _handle(self, method: str, path: str, headers: Any, raw: bytes, query: str = "") -> Answer:
        body: Any = None
        authorization = headers.get("Authorization") or ""
        if not authorization.startswith("Bearer "):
            self._violation(f"{method} {path}: no 'Authorization: Bearer' header")
            return (
                401,
                _error("Authentication credentials not found.", "INVALID_AUTHENTICATION"),
                {},
            )
        if authorization != f"Bearer {self.token}":
            return (
                401,
                _error(
                    "Authentication credentials not found. This API supports OAuth 2.0"
                    " authentication",
                    "INVALID_AUTHENTICATION",
                ),
                {},
            )
        if method in ("POST", "PUT", "PATCH"):
            content_type = media_type(headers)
            if content_type != "application/json":
                return self._violation(f"{method} {path}: Content-Type {content_type!r}")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._violation(f"{method} {path}: body is not JSON ({exc})")
        with self._lock:
            self.calls.append((method, path, body))
        route = self._route(method, path)
        if route is None:
            return self._violation(f"no such endpoint: {method} {path}", 404)
        handler, args = route
        if handler == self._get_memberships:
            args = (*args, query)
        # Shape checks come first, as a real API's validation does: a broken request is
        # recorded even when a failure is injected for it.
        problem = self._check(handler, body)
        if problem is not None:
            return problem
        failure = self._failures.take(method, path)
        if failure is not None:
            if failure.kind == "timeout":
                time.sleep(self.timeout_s)
            else:
                return self._failure_answer(failure.kind)
        return handler(body, *args)

    def _failure_answer(self, kind: str) -> Answer:
        limits = {
            "X-HubSpot-RateLimit-Max": "100",
            "X-HubSpot-RateLimit-Remaining": "0",
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
            "X-HubSpot-RateLimit-Daily": "250000",
            "X-HubSpot-RateLimit-Daily-Remaining": "0" if kind == "daily_limit" else "1000",
        }
        if kind in ("rate_limit", "secondly_limit", "daily_limit"):
            policy = {
                "rate_limit": "TEN_SECONDLY_ROLLING",
                "secondly_limit": "SECONDLY",
                "daily_limit": "DAILY",
            }[kind]
            body = orjson.dumps(
                {
                    "status": "error",
                    "message": f"You have reached your {policy.lower()} limit.",
                    "errorType": "RATE_LIMIT",
                    "correlationId": str(uuid.uuid4()),
                    "policyName": policy,
                    "groupName": "privateapp:1234",
                }
            )
            return 429, body, limits
        if kind == "server_error":
            return 502, _error("Bad Gateway", "INTERNAL_ERROR"), {}
        if kind == "expired_token":
            return (
                401,
                _error(
                    "The OAuth token used to make this call expired 2 hour(s) ago.",
                    "EXPIRED_AUTHENTICATION",
                    context={"expire time": ["2 hour(s) ago"]},
                ),
                {},
            )
        raise AssertionError(kind)

    def _route(self, method: str, path: str) -> tuple[Any, tuple[str, ...]] | None:
        parts = [p for p in path.split("/") if p]
        # /crm/{objects|lists}/{YYYY-MM}/... is the dated spelling of /crm/v3/{objects|lists}/...
        if len(parts) >= 3 and parts[0] == "crm" and re.match(r"^\d{4}-\d{2}$", parts[2]):
            version = parts[2]
            parts = ["crm", "v3", parts[1], *parts[3:]]
        elif parts[:2] == ["crm", "v3"]:
            version = "v3"
        else:
            return None
        if version not in self.api_versions:
            return None
        with self._lock:
            self.versions_seen.append(version)
        if parts[:3] == ["crm", "v3", "objects"] and parts[3:4] == ["contacts"]:
            if parts[4:] == ["batch", "upsert"] and method == "POST":
                return self._upsert, ()
            if parts[4:] == ["batch", "read"] and method == "POST":
                return self._read, ()
            return None
        if parts[:3] != ["crm", "v3", "lists"]:
            return None
        rest = parts[3:]
        if not rest and method == "POST":
            return self._create_list, ()
        if len(rest) == 1 and method == "GET":
            return self._get_list, (rest[0],)
        if len(rest) == 4 and rest[0] == "object-type-id" and rest[2] == "name" and method == "GET":
            return self._get_list_by_name, (rest[1], rest[3])
        if len(rest) == 2 and rest[1] == "memberships" and method == "GET":
            return self._get_memberships, (rest[0],)
        if rest[1:] == ["memberships", "add-and-remove"] and method == "PUT":
            return self._add_and_remove, (rest[0],)
        return None

    # -- shape checks -----------------------------------------------------------------------

    def _check(self, handler: Any, body: Any) -> tuple[int, bytes, dict[str, str]] | None:
        name = handler.__name__
        if name == "_upsert":
            return self._check_upsert(body)
        if name == "_read":
            return self._check_read(body)
        if name == "_create_list":
            return self._check_create_list(body)
        if name == "_add_and_remove":
            return self._check_membership(body)
        return None

    def _check_upsert(self, body: Any) -> tuple[int, bytes, dict[str, str]] | None:
        if not isinstance(body, dict) or set(body) != {"inputs"}:
            return self._violation(
                f"upsert body must be {{'inputs': [...]}}, got {str(body)[:200]}"
            )
        inputs = body["inputs"]
        if not isinstance(inputs, list) or not inputs:
            return self._violation("upsert 'inputs' must be a non-empty list")
        if len(inputs) > MAX_INPUTS:
            return self._violation(
                f"Batch input too large: {len(inputs)} inputs, the limit is {MAX_INPUTS}"
            )
        seen: set[str] = set()
        for index, item in enumerate(inputs):
            if not isinstance(item, dict) or not set(item) <= {
                "idProperty",
                "id",
                "properties",
                "objectWriteTraceId",
            }:
                return self._violation(
                    f"upsert input {index} has unexpected keys: {str(item)[:200]}"
                )
            if not isinstance(item.get("id"), str) or not item["id"]:
                return self._violation(f"upsert input {index}: 'id' must be a non-empty string")
            if item.get("idProperty") not in UNIQUE_PROPERTIES:
                return self._violation(
                    f"upsert input {index}: idProperty {item.get('idProperty')!r} is not a"
                    " unique property"
                )
            properties = item.get("properties")
            if not isinstance(properties, dict):
                return self._violation(f"upsert input {index}: 'properties' must be an object")
            for key, value in properties.items():
                if not isinstance(value, str):
                    return self._violation(
                        f"upsert input {index}: property {key!r} is a {type(value).__name__},"
                        " not a string"
                    )
            identity = item["id"].lower() if item["idProperty"] == "email" else item["id"]
            if identity in seen:
                return self._violation(f"Duplicate IDs found in batch input: {item['id']}")
            seen.add(identity)
        unknown = sorted({k for i in inputs for k in i["properties"]} - KNOWN_PROPERTIES)
        if unknown:
            # The user's mapping, not the connector's protocol: HubSpot's answer, no violation.
            details = [
                {
                    "isValid": False,
                    "message": f'Property "{name}" does not exist',
                    "error": "PROPERTY_DOESNT_EXIST",
                    "name": name,
                }
                for name in unknown
            ]
            return (
                400,
                _error(f"Property values were not valid: {orjson.dumps(details).decode()}"),
                {},
            )
        return None

    def _check_read(self, body: Any) -> tuple[int, bytes, dict[str, str]] | None:
        if not isinstance(body, dict) or not set(body) <= {
            "idProperty",
            "inputs",
            "properties",
            "propertiesWithHistory",
        }:
            return self._violation(f"batch read body has unexpected keys: {str(body)[:200]}")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            return self._violation("batch read 'inputs' must be a non-empty list")
        if len(inputs) > MAX_INPUTS:
            return self._violation(
                f"Batch input too large: {len(inputs)} inputs, the limit is {MAX_INPUTS}"
            )
        if not isinstance(body.get("properties"), list):
            return self._violation("batch read 'properties' must be a list")
        if body.get("idProperty", "hs_object_id") not in UNIQUE_PROPERTIES | {"hs_object_id"}:
            return self._violation(
                f"batch read idProperty {body.get('idProperty')!r} is not unique"
            )
        for index, item in enumerate(inputs):
            if not isinstance(item, dict) or set(item) != {"id"} or not isinstance(item["id"], str):
                return self._violation(f"batch read input {index} must be {{'id': str}}")
        return None

    def _check_create_list(self, body: Any) -> tuple[int, bytes, dict[str, str]] | None:
        if not isinstance(body, dict):
            return self._violation("list create body must be an object")
        for key in ("name", "objectTypeId", "processingType"):
            if not isinstance(body.get(key), str) or not body[key]:
                return self._violation(f"list create: {key!r} is required")
        if body["processingType"] not in ("MANUAL", "SNAPSHOT", "DYNAMIC"):
            return self._violation(f"list create: processingType {body['processingType']!r}")
        if body["processingType"] == "DYNAMIC" and "filterBranch" not in body:
            return self._violation("list create: a DYNAMIC list needs a filterBranch")
        return None

    def _check_membership(self, body: Any) -> tuple[int, bytes, dict[str, str]] | None:
        if not isinstance(body, dict) or set(body) != {"recordIdsToAdd", "recordIdsToRemove"}:
            return self._violation(
                "add-and-remove body must be {'recordIdsToAdd': [...], 'recordIdsToRemove': [...]},"
                f" got {str(body)[:200]}"
            )
        total = 0
        for key in ("recordIdsToAdd", "recordIdsToRemove"):
            ids = body[key]
            if not isinstance(ids, list) or not all(
                isinstance(i, str) and _DIGITS.match(i) for i in ids
            ):
                return self._violation(f"{key} must be a list of record ids (digit strings)")
            total += len(ids)
        if total == 0:
            return self._violation("add-and-remove with no record ids")
        if total > self.membership_limit:
            return self._violation(
                f"too many record ids in one call: {total}, the limit is {self.membership_limit}"
            )
        return None

    # -- endpoints (bodies already checked) -------------------------------------------------

    def _upsert_contact(
        self, email_or_id: str, properties: dict[str, str], id_property: str = "email"
    ) -> tuple[str, bool]:
        """Create or update a contact (lock held); return its id and whether it is new."""
        if id_property == "email":
            record_id = self._by_email.get(email_or_id)
        else:
            record_id = self._find_by(id_property, email_or_id)
        now = _now()
        if record_id is None:
            record_id = str(self._next_contact)
            self._next_contact += 1
            self.contacts[record_id] = {
                "id": record_id,
                "properties": {"hs_object_id": record_id, "createdate": now},
                "createdAt": now,
            }
            new = True
        else:
            new = False
        contact = self.contacts[record_id]
        merged = dict(properties)
        merged[id_property] = email_or_id
        if "email" in merged:
            merged["email"] = merged["email"].strip().lower()
        contact["properties"].update(merged)
        contact["properties"]["lastmodifieddate"] = now
        contact["updatedAt"] = now
        email = contact["properties"].get("email")
        if email:
            self._by_email[email] = record_id
        return record_id, new

    def _find_by(self, id_property: str, value: str) -> str | None:
        """The id of a contact whose ``id_property`` is ``value`` (lock held): emails have an
        index, the other unique properties (``customer_id``) are looked for in every contact."""
        return next(
            (c["id"] for c in self.contacts.values() if c["properties"].get(id_property) == value),
            None,
        )

    def _upsert(self, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        started = _now()
        results, errors, bad = [], [], []
        with self._lock:
            reject = set(self._reject)
            good = []
            for item in body["inputs"]:
                identity = item["id"]
                if item["idProperty"] == "email":
                    identity = identity.strip().lower()
                    if not _EMAIL.match(identity) or identity in reject:
                        bad.append(item["id"])
                        continue
                good.append((identity, item))
            if bad and self.reject_mode == "batch_400":
                # The whole upsert is refused before anything is written.
                details = [
                    {
                        "isValid": False,
                        "message": f"Email address {email} is invalid",
                        "error": "INVALID_EMAIL",
                        "name": "email",
                    }
                    for email in bad
                ]
                return (
                    400,
                    _error(f"Property values were not valid: {orjson.dumps(details).decode()}"),
                    {},
                )
            for identity, item in good:
                record_id, new = self._upsert_contact(
                    identity, item["properties"], item["idProperty"]
                )
                contact = self.contacts[record_id]
                results.append(
                    {
                        "id": record_id,
                        "properties": dict(contact["properties"]),
                        "createdAt": contact["createdAt"],
                        "updatedAt": contact["updatedAt"],
                        "archived": False,
                        "new": new,
                    }
                )
        for email in bad:
            errors.append(
                {
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": f"Email address {email} is invalid",
                    "context": {"ids": [email]},
                    "links": {},
                    "errors": [],
                    "subCategory": "INVALID_EMAIL",
                }
            )
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": list(reversed(results)),  # HubSpot promises no order
            "requestedAt": started,
            "startedAt": started,
            "completedAt": _now(),
        }
        if errors:
            answer["errors"] = errors
            answer["numErrors"] = len(errors)
            return 207, orjson.dumps(answer), {}
        return 200, orjson.dumps(answer), {}

    def _read(self, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        id_property = body.get("idProperty", "hs_object_id")
        wanted = body["properties"]
        results, missing = [], []
        with self._lock:
            for item in body["inputs"]:
                value = item["id"]
                if id_property == "email":
                    record_id = self._by_email.get(value.strip().lower())
                elif id_property == "hs_object_id":
                    record_id = value if value in self.contacts else None
                else:
                    record_id = self._find_by(id_property, value)
                if record_id is None:
                    missing.append(value)
                    continue
                contact = self.contacts[record_id]
                results.append(
                    {
                        "id": record_id,
                        "properties": {
                            k: contact["properties"].get(k)
                            for k in [*wanted, "hs_object_id", "createdate", "lastmodifieddate"]
                        },
                        "createdAt": contact["createdAt"],
                        "updatedAt": contact["updatedAt"],
                        "archived": False,
                    }
                )
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": _now(),
            "completedAt": _now(),
        }
        if missing:
            answer["numErrors"] = 1
            answer["errors"] = [
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "message": "Could not get some CONTACT objects, they may be deleted or not"
                    " exist. Check that ids are valid.",
                    "context": {"ids": missing},
                    "links": {},
                    "errors": [],
                }
            ]
            return 207, orjson.dumps(answer), {}
        return 200, orjson.dumps(answer), {}

    @staticmethod
    def _public(the_list: dict[str, Any]) -> dict[str, Any]:
        public = {k: v for k, v in the_list.items() if k != "members"}
        public["size"] = len(the_list["members"])
        return public

    def _create_list(self, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            taken = any(l["name"] == body["name"] for l in self.lists.values())
        if taken:
            return (
                400,
                _error(
                    f"A list with the name '{body['name']}' already exists.", "VALIDATION_ERROR"
                ),
                {},
            )
        list_id = self.add_list(body["name"], body["processingType"])
        with self._lock:
            return 200, orjson.dumps({"list": self._public(self.lists[list_id])}), {}

    def _get_list(self, body: Any, list_id: str) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            the_list = self.lists.get(list_id)
            if the_list is None:
                return _no_list(list_id)
            return 200, orjson.dumps({"list": self._public(the_list)}), {}

    def _get_list_by_name(
        self, body: Any, object_type: str, name: str
    ) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            for the_list in self.lists.values():
                if the_list["name"] == name and the_list["objectTypeId"] == object_type:
                    return 200, orjson.dumps({"list": self._public(the_list)}), {}
        return 404, _error(f"List does not exist with name {name}.", "OBJECT_NOT_FOUND"), {}

    def _get_memberships(
        self, body: Any, list_id: str, query: str = ""
    ) -> tuple[int, bytes, dict[str, str]]:
        from urllib.parse import parse_qs

        params = {k: v[-1] for k, v in parse_qs(query).items()}
        limit = min(int(params.get("limit") or 100), 250)
        after = params.get("after")
        with self._lock:
            the_list = self.lists.get(list_id)
            if the_list is None:
                return _no_list(list_id)
            ordered = sorted(the_list["members"].items(), key=lambda x: int(x[0]))
        if after:
            ordered = [m for m in ordered if int(m[0]) > int(after)]
        page = ordered[:limit]
        answer: dict[str, Any] = {
            "results": [{"recordId": r, "membershipTimestamp": t} for r, t in page],
            "total": len(the_list["members"]),
        }
        if len(ordered) > limit:
            answer["paging"] = {"next": {"after": page[-1][0]}}
        return 200, orjson.dumps(answer), {}

    def _add_and_remove(
        self, body: dict[str, Any], list_id: str
    ) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            the_list = self.lists.get(list_id)
            if the_list is None:
                return _no_list(list_id)
            if the_list["processingType"] not in ("MANUAL", "SNAPSHOT"):
                return (
                    400,
                    _error(
                        f"List {list_id} is a {the_list['processingType']} list; memberships can"
                        " only be changed for MANUAL or SNAPSHOT lists.",
                        "VALIDATION_ERROR",
                    ),
                    {},
                )
            members = the_list["members"]
            added, removed, missing = [], [], []
            for record_id in body["recordIdsToAdd"]:
                if record_id not in self.contacts:
                    missing.append(record_id)
                elif record_id not in members:
                    members[record_id] = _now()
                    added.append(record_id)
            for record_id in body["recordIdsToRemove"]:
                if record_id not in self.contacts:
                    missing.append(record_id)
                elif members.pop(record_id, None) is not None:
                    removed.append(record_id)
        return (
            200,
            orjson.dumps(
                {"recordIdsRemoved": removed, "recordsIdsAdded": added, "recordIdsMissing": missing}
            ),
            {},
        )
