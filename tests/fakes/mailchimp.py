"""A fake Mailchimp Marketing API (``/3.0``) that checks requests like the real one.

:class:`FakeMailchimp` is a real HTTP server on 127.0.0.1 (a ``ThreadingHTTPServer`` in a
daemon thread) holding one audience (list) with members, their merge fields and tags. It
serves what the connector may call, and checks each request as Mailchimp would:

* ``GET /3.0/lists/{id}``: the audience (404 problem when unknown);
* ``POST /3.0/lists/{id}``: the batch upsert ``{"members": [...], "update_existing": bool}``,
  at most 500 members, each with ``email_address``, a ``status`` or ``status_if_new`` of the
  five statuses and ``merge_fields`` naming merge fields the audience has; answered 200 with
  ``new_members``, ``updated_members`` and ``errors[]`` (``email_address``, ``error``,
  ``error_code``) even when members fail. With ``update_existing`` an existing member's merge
  fields are updated and its status changes only if ``status`` (not ``status_if_new``) is sent;
* ``POST /3.0/lists/{id}/members/{hash}/tags``: ``{"tags": [{"name", "status":
  "active"|"inactive"}]}``, 204, or a 404 problem when no member has that hash;
* ``DELETE /3.0/lists/{id}/members/{hash}``: archive, 204;
* ``GET /3.0/lists/{id}/members/{hash}``: a member;
* tags as static segments: ``GET /3.0/lists/{id}/segments?type=static&count=n&offset=k``
  (``segments[]`` with ``id``, ``name``, ``type``, ``member_count``; ``total_items``),
  ``POST /3.0/lists/{id}/segments`` ``{"name", "static_segment": []}`` (a new tag),
  ``POST /3.0/lists/{id}/segments/{segment_id}`` ``{"members_to_add": [...],
  "members_to_remove": [...]}`` (at most 500 each; addresses not in the audience come back in
  ``errors[]`` with ``email_addresses``; answer ``members_added``, ``members_removed``,
  ``total_added``, ``total_removed``, ``error_count``), and
  ``GET /3.0/lists/{id}/segments/{segment_id}/members?count=n&offset=k`` (paged
  ``members[]``, ``total_items``).

Every request needs Basic auth with the key as password (any user name) or ``Bearer <key>``;
bodies need ``Content-Type: application/json``. More than 10 requests at once get Mailchimp's
429 ("simultaneous connections"). Errors are ``application/problem+json``. A request a
correct connector never sends (an unknown path, a bad shape, a batch over 500, an invalid or
unnormalised email, an unknown merge field) is answered as Mailchimp would and listed in
:attr:`FakeMailchimp.violations`.

Failures: ``fail_next("rate_limit" | "server_error" | "expired_token" | "timeout")`` (a
timeout holds the request ``delay_s``, default 1, then applies it) and
:meth:`FakeMailchimp.reject_keys` (those addresses come back in the upsert's ``errors[]`` as a
permanently deleted contact does).
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Iterable
from typing import Any

import orjson

from ._http import Answer, Failure, FakeServer, hold, json_answer, media_type, target

API_KEY = "0123456789abcdef0123456789abcdef-us21"
LIST_ID = "a1b2c3d4e5"
TAG = "audsync-fake-audience"
MAX_MEMBERS = 500
MAX_CONNECTIONS = 10
STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional")
MERGE_FIELDS = ("FNAME", "LNAME", "LTV", "PHONE", "BIRTHDAY", "ADDRESS", "COMPANY")
MEMBER_KEYS = frozenset(
    {
        "email_address",
        "email_type",
        "status",
        "status_if_new",
        "merge_fields",
        "interests",
        "language",
        "vip",
        "location",
        "ip_signup",
        "timestamp_signup",
        "ip_opt",
        "timestamp_opt",
        "tags",
    }
)
FAILURE_KINDS = ("rate_limit", "server_error", "expired_token", "timeout")
_HASH = re.compile(r"^[0-9a-f]{32}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ERRORS_DOC = "https://mailchimp.com/developer/marketing/docs/errors/"


def subscriber_hash(email: str) -> str:
    """MD5 hex of the lowercased address (the fake's own, independent of the connector's)."""
    return hashlib.md5(email.lower().encode()).hexdigest()


class FakeMailchimp(FakeServer):
    """A fake Mailchimp data centre on loopback; state and counters are thread-safe.

    Args:
        api_key: the key it accepts.
        list_id: the one audience it holds.
        tag: the tag :meth:`members` reads as membership (and :meth:`destination_config` sets).
        latency_s: seconds each API request waits first (to make concurrency observable).

    The connector adds ``/3.0`` to :attr:`base_url`.
    """

    content_type = "application/json; charset=utf-8"
    failure_kinds = FAILURE_KINDS

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        list_id: str = LIST_ID,
        tag: str = TAG,
        latency_s: float = 0.0,
    ):
        super().__init__()
        self.api_key = api_key
        self.list_id = list_id
        self.tag = tag
        self.latency_s = latency_s
        self.reset()

    def reset(self) -> None:
        """Forget members, requests, violations and injected failures."""
        super().reset()
        with self._lock:
            self.list_members: dict[str, dict[str, Any]] = {}
            """Members by subscriber hash: ``email_address``, ``status``, ``merge_fields``,
            ``tags`` (a set of active tag names)."""
            self.requests: list[tuple[str, str]] = []
            self.upserts: list[dict[str, Any]] = []
            """The body of every batch upsert that passed the checks."""
            self.rejected: set[str] = set()
            self.segments: dict[int, str] = {}
            """Static segment id -> tag name (a tag is a static segment)."""
            self._next_segment = 4001
            self.segment_calls = 0
            self.segment_bodies: list[dict[str, Any]] = []
            """The body of every bulk segment request, in order."""
            """Bulk ``members_to_add`` / ``members_to_remove`` requests received."""

    # -- the generic surface --------------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry pointing at this fake."""
        config = {
            "type": "mailchimp",
            "api_key": self.api_key,
            "list_id": self.list_id,
            "tag": self.tag,
            "base_url": self.base_url,
        }
        config.update(overrides)
        return config

    @staticmethod
    def field_mapping() -> list[dict[str, str]]:
        """``email`` as the member's address, ``first_name`` as ``FNAME``, ``ltv`` as ``LTV``."""
        return [
            {"source_column": "email", "destination_field": "email_address"},
            {"source_column": "first_name", "destination_field": "FNAME"},
            {"source_column": "ltv", "destination_field": "LTV"},
        ]

    def members(self, candidates: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Members tagged with :attr:`tag` and not archived, by address, with
        ``email_address`` and their merge fields. With ``candidates``, keys are the candidates
        as given (looked up by subscriber hash) and only those are returned."""
        with self._lock:
            found = {
                h: {"email_address": m["email_address"], **m["merge_fields"]}
                for h, m in self.list_members.items()
                if self.tag in m["tags"] and m["status"] != "archived"
            }
        if candidates is None:
            return {fields["email_address"]: fields for fields in found.values()}
        return {
            c: found[subscriber_hash(c.strip())]
            for c in candidates
            if subscriber_hash(c.strip()) in found
        }

    def seed_members(self, emails_to_fields: dict[str, dict[str, Any]]) -> None:
        """Subscribed members already tagged with :attr:`tag`, with merge fields (named as
        merge fields, or as the audience's columns of :meth:`field_mapping`)."""
        renames = {m["source_column"]: m["destination_field"] for m in self.field_mapping()}
        with self._lock:
            for email, fields in emails_to_fields.items():
                member = self._create(email.strip().lower(), "subscribed")
                for name, value in (fields or {}).items():
                    name = renames.get(name, name)
                    if name != "email_address":
                        member["merge_fields"][name] = "" if value is None else value
                member["tags"].add(self.tag)

    def reject_keys(self, emails: Iterable[str]) -> None:
        """These addresses come back in the batch upsert's ``errors[]``."""
        with self._lock:
            self.rejected = {e.strip().lower() for e in emails}

    def member(self, email: str) -> dict[str, Any] | None:
        """The member with this address (a copy), archived ones included, or ``None``."""
        with self._lock:
            member = self.list_members.get(subscriber_hash(email))
            return None if member is None else {**member, "tags": set(member["tags"])}

    # -- handling ---------------------------------------------------------------------------

    def _create(self, email: str, status: str) -> dict[str, Any]:
        member = {"email_address": email, "status": status, "merge_fields": {}, "tags": set()}
        self.list_members[subscriber_hash(email)] = member
        return member

    def handle(self, method: str, route: str, query: str, headers: Any, body: bytes) -> Answer:
        """Check and apply one request; return status, body and headers."""
        path = target(route, query)
        with self._lock:
            self.requests.append((method, path))
        action = self._failures.take(method, path)
        with self._in_flight() as in_flight:
            action = hold(action, "delay_s", 1.0, self.latency_s)
            if in_flight > MAX_CONNECTIONS:
                return _problem(
                    429,
                    "Too Many Requests",
                    "You have exceeded the limit of 10 simultaneous connections.",
                )
            return self._handle(method, route, path, headers, body, action)

    def _authorised(self, headers: Any) -> bool:
        auth = headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            return auth[7:] == self.api_key
        if auth.startswith("Basic "):
            try:
                user_key = base64.b64decode(auth[6:]).decode()
            except ValueError:
                return False
            return user_key.partition(":")[2] == self.api_key
        return False

    def _handle(
        self, method: str, route: str, path: str, headers: Any, body: bytes, action: Failure | None
    ) -> Answer:
        route = route.rstrip("/")
        parts = route.split("/")[1:]  # "3.0", "lists", id, ...
        if len(parts) < 3 or parts[0] != "3.0" or parts[1] != "lists":
            self._record_violation(f"{method} {path}: not an endpoint the connector may call")
            return _problem(404, "Resource Not Found", "The requested resource could not be found.")
        if not self._authorised(headers):
            self._record_violation("Authorization is not Basic auth with the API key (or Bearer)")
            return self._failure("expired_token")
        document = None
        if method in ("POST", "PUT", "PATCH"):
            content_type = media_type(headers)
            if content_type != "application/json":
                self._record_violation(f"{method} {route}: Content-Type is {content_type!r}")
                return _problem(400, "Invalid Resource", "The request body is not JSON.")
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._record_violation(f"{method} {route}: body is not JSON")
                return _problem(
                    400, "JSON Parse Error", "We encountered an unspecified JSON parsing error."
                )
        if parts[2] != self.list_id:
            return _problem(404, "Resource Not Found", "The requested resource could not be found.")
        rest = parts[3:]
        if not rest and method == "GET":
            handler = self._get_list
        elif not rest and method == "POST":
            handler = self._batch
        elif len(rest) == 2 and rest[0] == "members" and method in ("GET", "DELETE"):
            handler = self._member_get if method == "GET" else self._archive
        elif len(rest) == 3 and rest[0] == "members" and rest[2] == "tags" and method == "POST":
            handler = self._tags
        elif rest[:1] == ["segments"]:
            return self._segments(method, rest[1:], path, document, action)
        else:
            self._record_violation(f"{method} {path}: not an endpoint the connector may call")
            return _problem(
                405, "Method Not Allowed", "The requested method and resource are not compatible."
            )
        if len(rest) >= 2 and not _HASH.match(rest[1]):
            self._record_violation(f"{rest[1]!r} is not a lowercase MD5 subscriber hash")
            return _problem(404, "Resource Not Found", "The requested resource could not be found.")
        return handler(rest, document, action)

    def _get_list(self, rest: list[str], document: Any, action: Failure | None) -> Answer:
        if action is not None:
            return self._failure(action.kind)
        return json_answer(
            200,
            {
                "id": self.list_id,
                "name": "Fake audience",
                "stats": {"member_count": len(self.list_members)},
            },
        )

    def _member_get(self, rest: list[str], document: Any, action: Failure | None) -> Answer:
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            member = self.list_members.get(rest[1])
            if member is None:
                return _problem(
                    404, "Resource Not Found", "The requested resource could not be found."
                )
            return json_answer(200, _member_json(rest[1], member))

    def _batch(self, rest: list[str], document: Any, action: Failure | None) -> Answer:
        problem = _check_batch(document)
        if problem is not None:
            self._record_violation(f"batch upsert: {problem}")
            return _problem(400, "Invalid Resource", problem)
        if action is not None:
            return self._failure(action.kind)
        update_existing = document.get("update_existing", False)
        new, updated, errors = [], [], []
        seen: set[str] = set()
        with self._lock:
            self.upserts.append(document)
            for index, item in enumerate(document["members"]):
                email = item["email_address"]
                if not _EMAIL.match(email) or email != email.strip().lower():
                    self._record_violation(
                        f"members[{index}]: email {email!r} is not a normalised address"
                    )
                    errors.append(
                        _member_error(
                            email,
                            f"{email} looks fake or invalid, please enter a real email address.",
                        )
                    )
                    continue
                if email in seen:
                    self._record_violation(f"members[{index}]: {email} twice in one batch")
                    errors.append(_member_error(email, f"{email} is a duplicate in this request."))
                    continue
                seen.add(email)
                unknown = set(item.get("merge_fields") or {}) - set(MERGE_FIELDS)
                if unknown:
                    self._record_violation(
                        f"members[{index}]: unknown merge fields {sorted(unknown)}"
                    )
                    errors.append(
                        _member_error(email, "Your merge fields were invalid.", field=min(unknown))
                    )
                    continue
                if email in self.rejected:
                    errors.append(
                        _member_error(
                            email,
                            f"{email} was permanently deleted and cannot be re-imported. The"
                            " contact must re-subscribe to get back on the list.",
                        )
                    )
                    continue
                member = self.list_members.get(subscriber_hash(email))
                if member is not None and member["status"] != "archived":
                    if not update_existing:
                        errors.append(
                            _member_error(
                                email,
                                f"{email} is already a list member. Use PUT to insert or"
                                " update list members.",
                                code="ERROR_CONTACT_EXISTS",
                            )
                        )
                        continue
                    if "status" in item:
                        member["status"] = item["status"]
                    member["merge_fields"].update(item.get("merge_fields") or {})
                    updated.append(_member_json(subscriber_hash(email), member))
                    continue
                member = self._create(email, item.get("status") or item["status_if_new"])
                member["merge_fields"].update(item.get("merge_fields") or {})
                member["tags"].update(item.get("tags") or [])
                new.append(_member_json(subscriber_hash(email), member))
        return json_answer(
            200,
            {
                "new_members": new,
                "updated_members": updated,
                "errors": errors,
                "total_created": len(new),
                "total_updated": len(updated),
                "error_count": len(errors),
                "_links": [],
            },
        )

    def _tags(self, rest: list[str], document: Any, action: Failure | None) -> Answer:
        problem = _check_tags(document)
        if problem is not None:
            self._record_violation(f"tags: {problem}")
            return _problem(400, "Invalid Resource", problem)
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            member = self.list_members.get(rest[1])
            if member is None or member["status"] == "archived":
                return _problem(
                    404, "Resource Not Found", "The requested resource could not be found."
                )
            for tag in document["tags"]:
                if tag["status"] == "active":
                    member["tags"].add(tag["name"])
                else:
                    member["tags"].discard(tag["name"])
        return 204, b"", {}

    def segment_id(self, tag: str | None = None) -> int | None:
        """The static segment of ``tag`` (default :attr:`tag`), if it exists."""
        with self._lock:
            for segment_id, name in self.segments.items():
                if name == (tag or self.tag):
                    return segment_id
        return None

    def _segments(
        self, method: str, rest: list[str], path: str, document: Any, action: Failure | None
    ) -> Answer:
        from urllib.parse import parse_qs, urlsplit

        if action is not None:
            return self._failure(action.kind)
        params = {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}
        count = int(params.get("count") or 10)
        offset = int(params.get("offset") or 0)
        if count > 1000:
            self._record_violation(f"count={count} over Mailchimp's 1000")
        with self._lock:
            # Every tag set on a member is a static segment too, as in Mailchimp.
            for member in self.list_members.values():
                for tag in member["tags"]:
                    if tag not in self.segments.values():
                        self.segments[self._next_segment] = tag
                        self._next_segment += 1
            if not rest and method == "GET":
                rows = sorted(self.segments.items())
                page = rows[offset : offset + count]
                return json_answer(200, {
                    "segments": [
                        {"id": i, "name": n, "type": "static",
                         "member_count": sum(n in m["tags"] for m in self.list_members.values())}
                        for i, n in page
                    ],
                    "total_items": len(rows),
                })  # fmt: skip
            if not rest and method == "POST":
                if (
                    not isinstance(document, dict)
                    or not isinstance(document.get("name"), str)
                    or document.get("static_segment") != []
                ):
                    self._record_violation("segment create: body must be {name, static_segment: []}")
                    return _problem(400, "Invalid Resource", "The resource submitted could not be validated.")
                if document["name"] in self.segments.values():
                    return _problem(400, "Invalid Resource", "Sorry, that tag already exists.")
                segment_id = self._next_segment
                self._next_segment += 1
                self.segments[segment_id] = document["name"]
                return json_answer(200, {"id": segment_id, "name": document["name"], "type": "static"})
            if not rest or not rest[0].isdigit() or int(rest[0]) not in self.segments:
                return _problem(404, "Resource Not Found", "The requested resource could not be found.")
            tag = self.segments[int(rest[0])]
            if len(rest) == 1 and method == "POST":
                return self._segment_members(tag, document)
            if rest[1:] == ["members"] and method == "GET":
                tagged = sorted(
                    (m for h, m in self.list_members.items()
                     if tag in m["tags"] and m["status"] != "archived"),
                    key=lambda m: m["email_address"],
                )  # fmt: skip
                page = tagged[offset : offset + count]
                return json_answer(200, {
                    "members": [_member_json(subscriber_hash(m["email_address"]), m) for m in page],
                    "total_items": len(tagged),
                })  # fmt: skip
        self._record_violation(f"{method} {path}: not an endpoint the connector may call")
        return _problem(405, "Method Not Allowed", "The requested method and resource are not compatible.")

    def _segment_members(self, tag: str, document: Any) -> Answer:
        """``members_to_add`` / ``members_to_remove`` of a static segment (lock held)."""
        if not isinstance(document, dict) or set(document) - {"members_to_add", "members_to_remove"}:
            self._record_violation("segment members: body must hold members_to_add / members_to_remove")
            return _problem(400, "Invalid Resource", "The resource submitted could not be validated.")
        adding = document.get("members_to_add") or []
        removing = document.get("members_to_remove") or []
        if len(adding) > MAX_MEMBERS or len(removing) > MAX_MEMBERS:
            self._record_violation("segment members: more than 500 addresses in one list")
            return _problem(400, "Invalid Resource", "You may only add or remove 500 members at a time.")
        self.segment_calls += 1
        self.segment_bodies.append(dict(document))
        added, removed, errors = [], [], []
        for email, bucket, active in [(e, added, True) for e in adding] + [
            (e, removed, False) for e in removing
        ]:
            if not isinstance(email, str) or email != email.strip().lower():
                self._record_violation(f"segment members: {email!r} is not a normalised address")
            member = self.list_members.get(subscriber_hash(str(email)))
            if member is None or member["status"] == "archived":
                errors.append({"email_addresses": [email], "error": "Email address is not subscribed to the list"})
                continue
            if active:
                member["tags"].add(tag)
            else:
                member["tags"].discard(tag)
            bucket.append(_member_json(subscriber_hash(email), member))
        return json_answer(200, {
            "members_added": added, "members_removed": removed, "errors": errors,
            "total_added": len(added), "total_removed": len(removed), "error_count": len(errors),
        })  # fmt: skip

    def _archive(self, rest: list[str], document: Any, action: Failure | None) -> Answer:
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            member = self.list_members.get(rest[1])
            if member is None or member["status"] == "archived":
                return _problem(
                    404, "Resource Not Found", "The requested resource could not be found."
                )
            member["status"] = "archived"
        return 204, b"", {}

    def _failure(self, kind: str) -> Answer:
        if kind == "rate_limit":
            return _problem(
                429,
                "Too Many Requests",
                "You have exceeded the limit of 10 simultaneous connections.",
            )
        if kind == "server_error":
            return _problem(
                500,
                "Internal Server Error",
                "An unexpected internal error has occurred. Please contact Support.",
            )
        if kind == "expired_token":
            return _problem(
                401,
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
            )
        raise AssertionError(kind)


def _check_batch(document: Any) -> str | None:
    """What is wrong with a batch upsert body, or ``None``."""
    if not isinstance(document, dict):
        return "body is not a JSON object"
    extra = set(document) - {"members", "update_existing", "sync_tags"}
    if extra:
        return f"body has unexpected keys {sorted(extra)}"
    members = document.get("members")
    if not isinstance(members, list) or not members:
        return "'members' is missing or not a non-empty list"
    if len(members) > MAX_MEMBERS:
        return f"'members' has {len(members)} items; the maximum is {MAX_MEMBERS}"
    if not isinstance(document.get("update_existing", False), bool):
        return "'update_existing' must be a boolean"
    for index, member in enumerate(members):
        if not isinstance(member, dict):
            return f"members[{index}] is not an object"
        extra = set(member) - MEMBER_KEYS
        if extra:
            return f"members[{index}] has unexpected keys {sorted(extra)}"
        if not isinstance(member.get("email_address"), str):
            return f"members[{index}].email_address is required"
        statuses = [member[k] for k in ("status", "status_if_new") if k in member]
        if not statuses or any(s not in STATUSES for s in statuses):
            return f"members[{index}] needs a status or status_if_new in {STATUSES}"
        merge = member.get("merge_fields", {})
        if not isinstance(merge, dict) or any(v is None for v in merge.values()):
            return f"members[{index}].merge_fields must be an object without nulls"
    return None


def _check_tags(document: Any) -> str | None:
    if not isinstance(document, dict) or set(document) - {"tags", "is_syncing"}:
        return "body must be {'tags': [...]} (and optionally 'is_syncing')"
    tags = document.get("tags")
    if not isinstance(tags, list) or not tags:
        return "'tags' must be a non-empty list"
    for tag in tags:
        if not isinstance(tag, dict) or set(tag) != {"name", "status"}:
            return "each tag must be {'name', 'status'}"
        if not isinstance(tag["name"], str) or not tag["name"].strip():
            return "a tag name must be a non-empty string"
        if tag["status"] not in ("active", "inactive"):
            return "a tag status must be 'active' or 'inactive'"
    return None


def _member_json(hash_: str, member: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": hash_,
        "email_address": member["email_address"],
        "status": member["status"],
        "merge_fields": dict(member["merge_fields"]),
        "tags": [{"name": t} for t in sorted(member["tags"])],
    }


def _member_error(email: str, error: str, *, code: str = "ERROR_GENERIC", field: str = "") -> dict:
    return {
        "email_address": email,
        "error": error,
        "error_code": code,
        "field": field,
        "field_message": "",
    }


def _problem(status: int, title: str, detail: str) -> Answer:
    body = {
        "type": _ERRORS_DOC,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": str(uuid.uuid4()),
    }
    return status, orjson.dumps(body), {"Content-Type": "application/problem+json; charset=utf-8"}
