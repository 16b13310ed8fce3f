"""A fake Klaviyo API (``/api``, JSON:API) that checks requests like the real one.

:class:`FakeKlaviyo` is a real HTTP server on 127.0.0.1 (a ``ThreadingHTTPServer`` in a daemon
thread) holding profiles and lists. It serves what the list connector may call:

* ``POST /api/profiles/`` (201, or 409 with ``errors[0].meta.duplicate_profile_id`` when a
  profile has the address), ``PATCH /api/profiles/{id}/`` (200, 404 when unknown),
  ``GET /api/profiles/?filter=equals(email,"...")``;
* ``GET /api/lists/`` (``filter=equals(name,"...")``), ``POST /api/lists/`` (201),
  ``GET /api/lists/{id}/``;
* ``GET /api/lists/{id}/profiles/?fields[profile]=email&page[size]=n[&page[cursor]=c]``: the
  list's profiles, paged with ``links.next`` (a URL carrying ``page[cursor]``), at most 100 a
  page as Klaviyo allows;
* ``POST`` / ``DELETE /api/lists/{id}/relationships/profiles/`` with ``{"data": [{"type":
  "profile", "id"}]}``, at most 1,000 ids, answered 204.

Paths are taken with or without the trailing slash, as Klaviyo does. Every request is checked
as Klaviyo would: ``Authorization: Klaviyo-API-Key <key>``, a ``revision`` date header,
``Accept`` and (with a body) ``Content-Type`` of ``application/vnd.api+json``, the JSON:API
shape of each body, profile attributes Klaviyo knows, a normalised email, a well-formed
``filter``. A request a correct connector never sends is answered with Klaviyo's JSON:API
error and listed in :attr:`FakeKlaviyo.violations`.

Failures: ``fail_next("rate_limit")`` (429 with ``Retry-After`` and ``RateLimit-*``),
``"server_error"`` (503), ``"expired_token"`` (401 ``authentication_failed``), ``"timeout"``
(the answer comes after ``delay_s``, the request applied); :meth:`FakeKlaviyo.reject_keys`
makes creating or updating those profiles fail with a 400 pointing at the email.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import orjson

from ._http import Answer, FakeServer, drop_none, hold, json_answer, media_type

API_KEY = "pk_fake_0123456789abcdef0123456789abcdef"
LIST_ID = "Xk9Lm2"
JSON_API = "application/vnd.api+json"
MAX_IDS = 1000
FAILURE_KINDS = ("rate_limit", "server_error", "expired_token", "timeout")
PROFILE_ATTRIBUTES = frozenset(
    {
        "email",
        "phone_number",
        "external_id",
        "first_name",
        "last_name",
        "organization",
        "locale",
        "title",
        "image",
        "location",
        "properties",
    }
)
LOCATION_KEYS = frozenset(
    {
        "address1",
        "address2",
        "city",
        "country",
        "latitude",
        "longitude",
        "region",
        "zip",
        "timezone",
        "ip",
    }
)
_REVISION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_FILTER = re.compile(r'^equals\((email|name),("(?:[^"\\]|\\.)*")\)$')
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ULID = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _new_id(length: int = 26) -> str:
    return "".join(secrets.choice(_ULID) for _ in range(length))


class FakeKlaviyo(FakeServer):
    """A fake Klaviyo account on loopback; state and counters are thread-safe.

    Args:
        api_key: the private key it accepts.
        list_id: the id of the list that exists from the start (the generic tests' list).

    The connector adds ``/api`` to :attr:`base_url`.
    """

    content_type = JSON_API
    failure_kinds = FAILURE_KINDS

    def __init__(self, *, api_key: str = API_KEY, list_id: str = LIST_ID):
        super().__init__()
        self.api_key = api_key
        self.list_id = list_id
        self.reset()

    def reset(self) -> None:
        """Forget profiles, lists (but the first), requests, violations and failures."""
        super().reset()
        with self._lock:
            self.profiles: dict[str, dict[str, Any]] = {}
            """Profiles by id: their attributes (``properties`` and ``location`` nested)."""
            self.lists: dict[str, dict[str, Any]] = {
                self.list_id: {"name": "Fake list", "members": set()}
            }
            self.lists_created = 0
            self.requests: list[tuple[str, str]] = []
            """``(method, path without query)`` of every request, in arrival order."""
            self.relationship_sizes: list[int] = []
            self.bodies: list[tuple[str, str, Any]] = []
            """``(method, path, parsed body)`` of every request with a JSON body."""
            self.revisions: set[str] = set()
            self.rejected: set[str] = set()

    # -- the generic surface --------------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry pointing at this fake."""
        config = {
            "type": "klaviyo_list",
            "api_key": self.api_key,
            "list_id": self.list_id,
            "base_url": self.base_url,
        }
        return drop_none(config, overrides)

    @staticmethod
    def field_mapping() -> list[dict[str, str]]:
        """``email`` as the profile's address, ``first_name`` as Klaviyo's ``first_name``,
        ``ltv`` as a custom property."""
        return [
            {"source_column": "email", "destination_field": "email"},
            {"source_column": "first_name", "destination_field": "first_name"},
            {"source_column": "ltv", "destination_field": "ltv"},
        ]

    def members(
        self, candidates: Iterable[str] | None = None, *, list_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Profiles on the list, by address, with their attributes and custom properties
        (flattened, as the mapping names them). With ``candidates``, keys are the candidates
        as given (matched after normalisation) and only those are returned."""
        with self._lock:
            members = self.lists.get(list_id or self.list_id, {"members": set()})["members"]
            found = {}
            for profile_id in members:
                profile = self.profiles.get(profile_id)
                if profile is None or "email" not in profile:
                    continue
                fields = {k: v for k, v in profile.items() if k not in ("properties", "location")}
                fields.update(profile.get("properties") or {})
                found[profile["email"]] = fields
        if candidates is None:
            return found
        return {c: found[c.strip().lower()] for c in candidates if c.strip().lower() in found}

    def seed_members(self, emails_to_fields: dict[str, dict[str, Any]]) -> None:
        """Profiles already on the list; fields Klaviyo knows become attributes, the rest
        properties."""
        with self._lock:
            for email, fields in emails_to_fields.items():
                email = email.strip().lower()
                profile_id = self._by_email(email) or self._create({"email": email})
                for name, value in (fields or {}).items():
                    if name in PROFILE_ATTRIBUTES:
                        self.profiles[profile_id][name] = value
                    else:
                        self.profiles[profile_id].setdefault("properties", {})[name] = value
                self.lists[self.list_id]["members"].add(profile_id)

    def reject_keys(self, emails: Iterable[str]) -> None:
        """Creating or updating profiles with these addresses fails with a 400."""
        with self._lock:
            self.rejected = {e.strip().lower() for e in emails}

    def profile_id(self, email: str) -> str | None:
        """The id of the profile with this address, or ``None``."""
        with self._lock:
            return self._by_email(email.strip().lower())

    def delete_profile(self, email: str) -> None:
        """Delete a profile, as a Klaviyo user (or a merge) would."""
        with self._lock:
            profile_id = self._by_email(email)
            self.profiles.pop(profile_id, None)
            for entry in self.lists.values():
                entry["members"].discard(profile_id)

    def count(self, method: str, prefix: str) -> int:
        """Requests with this method whose path starts with ``prefix``."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    # -- handling ---------------------------------------------------------------------------

    def _by_email(self, email: str) -> str | None:
        for profile_id, profile in self.profiles.items():
            if profile.get("email") == email:
                return profile_id
        return None

    def _create(self, attributes: dict[str, Any]) -> str:
        profile_id = _new_id()
        self.profiles[profile_id] = {}
        self._set(profile_id, attributes)
        return profile_id

    def _set(self, profile_id: str, attributes: dict[str, Any]) -> None:
        """Set attributes as a PATCH does: given keys set, ``null`` clears, others stay."""
        profile = self.profiles[profile_id]
        for name, value in attributes.items():
            if name in ("properties", "location") and isinstance(value, dict):
                nested = profile.setdefault(name, {})
                for key, item in value.items():
                    if item is None:
                        nested.pop(key, None)
                    else:
                        nested[key] = item
            elif value is None:
                profile.pop(name, None)
            else:
                profile[name] = value

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes) -> Answer:
        """Check and apply one request; return status, body and headers."""
        with self._lock:
            self.requests.append((method, path))
        action = self._failures.take(method, path)
        with self._in_flight():
            action = hold(action, "delay_s", 1.0)
            return self._handle(method, path.rstrip("/"), parse_qs(query), headers, body, action)

    def _handle(
        self, method: str, path: str, query: dict, headers: Any, body: bytes, action: Any
    ) -> Answer:
        if headers.get("Authorization") != f"Klaviyo-API-Key {self.api_key}":
            self._record_violation("Authorization is not 'Klaviyo-API-Key <key>'")
            return self._failure("expired_token")
        revision = headers.get("revision") or ""
        if not _REVISION.match(revision):
            self._record_violation(f"revision header {revision!r} is not a date revision")
            return _error(
                400, "invalid", "Invalid revision header.", f"{revision!r} is not a valid revision"
            )
        with self._lock:
            self.revisions.add(revision)
        if JSON_API not in (headers.get("Accept") or ""):
            self._record_violation(f"Accept {headers.get('Accept')!r} does not take {JSON_API}")
            return _error(406, "not_acceptable", "Could not satisfy the request Accept header.", "")
        document = None
        if method in ("POST", "PATCH") or (method == "DELETE" and body):
            content_type = media_type(headers)
            if content_type != JSON_API:
                self._record_violation(
                    f"{method} {path}: Content-Type is {content_type!r}, not {JSON_API}"
                )
                return _error(415, "unsupported_media_type", "Unsupported media type.", "")
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._record_violation(f"{method} {path}: body is not JSON")
                return _error(400, "parse_error", "Malformed request.", "JSON parse error")
            with self._lock:
                self.bodies.append((method, path, document))

        segments = path.split("/")[1:]
        if segments[:1] != ["api"]:
            return self._unknown(method, path)
        segments = segments[1:]
        if segments == ["profiles"] and method == "POST":
            handler = self._create_profile
        elif segments == ["profiles"] and method == "GET":
            handler = self._get_profiles
        elif len(segments) == 2 and segments[0] == "profiles" and method == "PATCH":
            handler = self._patch_profile
        elif segments == ["lists"] and method in ("GET", "POST"):
            handler = self._get_lists if method == "GET" else self._create_list
        elif len(segments) == 2 and segments[0] == "lists" and method == "GET":
            handler = self._get_list
        elif len(segments) == 3 and segments[0] == "lists" and segments[2] == "profiles" and method == "GET":
            handler = self._list_profiles
        elif (
            len(segments) == 4
            and segments[0] == "lists"
            and segments[2:] == ["relationships", "profiles"]
            and method in ("POST", "DELETE")
        ):
            handler = self._relationships
        else:
            return self._unknown(method, path)
        return handler(method, segments, query, document, action)

    def _unknown(self, method: str, path: str) -> Answer:
        self._record_violation(f"{method} {path}: not an endpoint the connector may call")
        return _error(404, "not_found", "Not found.", f"{path} was not found")

    def _filter(self, query: dict, field: str) -> tuple[str | None, tuple | None]:
        """The value of ``filter=equals(<field>,"...")``, or an error answer."""
        values = query.get("filter")
        if not values:
            return None, None
        match = _FILTER.match(values[0])
        if not match or match.group(1) != field:
            self._record_violation(f'filter {values[0]!r} is not equals({field},"...")')
            return None, _error(
                400,
                "invalid",
                "Invalid input.",
                f"Invalid filter {values[0]!r}",
                pointer=None,
                parameter="filter",
            )
        return json.loads(match.group(2)), None

    def _check_profile(self, data: Any, *, with_id: str | None = None) -> str | None:
        if not isinstance(data, dict) or data.get("type") != "profile":
            return "data must be {'type': 'profile', ...}"
        if with_id is not None and data.get("id") != with_id:
            return f"data.id {data.get('id')!r} is not the path's id {with_id!r}"
        attributes = data.get("attributes")
        if not isinstance(attributes, dict) or not attributes:
            return "data.attributes must be a non-empty object"
        unknown = set(attributes) - PROFILE_ATTRIBUTES
        if unknown:
            return f"unknown profile attributes {sorted(unknown)}"
        email = attributes.get("email")
        if email is not None and (
            not isinstance(email, str) or not _EMAIL.match(email) or email != email.strip().lower()
        ):
            return f"email {email!r} is not a normalised address"
        if with_id is None and not any(
            attributes.get(k) for k in ("email", "phone_number", "external_id")
        ):
            return "a profile needs an email, phone_number or external_id"
        if not isinstance(attributes.get("properties", {}), dict):
            return "properties must be an object"
        location = attributes.get("location", {})
        if not isinstance(location, dict) or set(location) - LOCATION_KEYS:
            return "location must be an object of Klaviyo's location keys"
        return None

    def _create_profile(self, method, segments, query, document, action):
        data = document.get("data") if isinstance(document, dict) else None
        problem = self._check_profile(data)
        if problem is not None:
            self._record_violation(f"POST /api/profiles: {problem}")
            return _error(400, "invalid", "Invalid input.", problem, pointer="/data")
        if action is not None:
            return self._failure(action.kind)
        attributes = data["attributes"]
        with self._lock:
            if attributes.get("email") in self.rejected:
                return _rejected()
            existing = self._by_email(attributes.get("email"))
            if existing is not None:
                return _error(
                    409,
                    "duplicate_profile",
                    "Conflict.",
                    "A profile already exists with one of these identifiers.",
                    pointer="/data/attributes",
                    meta={"duplicate_profile_id": existing},
                )
            profile_id = self._create(attributes)
            return json_answer(201, {"data": _profile_json(profile_id, self.profiles[profile_id])})

    def _patch_profile(self, method, segments, query, document, action):
        profile_id = segments[1]
        data = document.get("data") if isinstance(document, dict) else None
        problem = self._check_profile(data, with_id=profile_id)
        if problem is not None:
            self._record_violation(f"PATCH /api/profiles/{profile_id}: {problem}")
            return _error(400, "invalid", "Invalid input.", problem, pointer="/data")
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            if profile_id not in self.profiles:
                return _error(
                    404,
                    "not_found",
                    "Not found.",
                    f"A profile with id {profile_id} does not exist.",
                )
            email = data["attributes"].get("email", self.profiles[profile_id].get("email"))
            if email in self.rejected:
                return _rejected()
            other = self._by_email(email) if email else None
            if other is not None and other != profile_id:
                return _error(
                    409,
                    "duplicate_profile",
                    "Conflict.",
                    "A profile already exists with one of these identifiers.",
                    meta={"duplicate_profile_id": other},
                )
            self._set(profile_id, data["attributes"])
            return json_answer(200, {"data": _profile_json(profile_id, self.profiles[profile_id])})

    def _get_profiles(self, method, segments, query, document, action):
        email, failure = self._filter(query, "email")
        if failure is not None:
            return failure
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            ids = [self._by_email(email)] if email is not None else list(self.profiles)
            data = [_profile_json(i, self.profiles[i]) for i in ids if i is not None]
        return json_answer(200, {"data": data, "links": {"self": "", "next": None, "prev": None}})

    def _get_lists(self, method, segments, query, document, action):
        name, failure = self._filter(query, "name")
        if failure is not None:
            return failure
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            data = [
                _list_json(i, entry)
                for i, entry in self.lists.items()
                if name is None or entry["name"] == name
            ]
        return json_answer(200, {"data": data, "links": {"self": "", "next": None, "prev": None}})

    def _get_list(self, method, segments, query, document, action):
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            entry = self.lists.get(segments[1])
            if entry is None:
                return _error(
                    404, "not_found", "Not found.", f"A list with id {segments[1]} does not exist."
                )
            return json_answer(200, {"data": _list_json(segments[1], entry)})

    def _list_profiles(self, method, segments, query, document, action):
        """A page of the list's profiles (id and the email attribute)."""
        if action is not None:
            return self._failure(action.kind)
        size = int((query.get("page[size]") or ["20"])[0])
        if not 1 <= size <= 100:
            self._record_violation(f"page[size]={size}: Klaviyo allows 1 to 100")
            return _error(400, "invalid", "Invalid input.", "page[size] must be 1 to 100")
        start = int((query.get("page[cursor]") or ["0"])[0])
        with self._lock:
            entry = self.lists.get(segments[1])
            if entry is None:
                return _error(
                    404, "not_found", "Not found.", f"A list with id {segments[1]} does not exist."
                )
            ids = sorted(entry["members"])
            page = ids[start : start + size]
            data = [
                {"type": "profile", "id": i,
                 "attributes": {"email": (self.profiles.get(i) or {}).get("email")}}
                for i in page
            ]  # fmt: skip
        links: dict[str, Any] = {"self": f"/api/lists/{segments[1]}/profiles/", "next": None}
        if start + size < len(ids):
            links["next"] = (
                f"{self.base_url}/api/lists/{segments[1]}/profiles/?fields%5Bprofile%5D=email"
                f"&page%5Bsize%5D={size}&page%5Bcursor%5D={start + size}"
            )
        return json_answer(200, {"data": data, "links": links})

    def _create_list(self, method, segments, query, document, action):
        data = document.get("data") if isinstance(document, dict) else None
        if (
            not isinstance(data, dict)
            or data.get("type") != "list"
            or set(data.get("attributes") or {}) != {"name"}
            or not str(data["attributes"]["name"]).strip()
        ):
            self._record_violation(
                "POST /api/lists: data must be {'type': 'list', 'attributes': {'name'}}"
            )
            return _error(400, "invalid", "Invalid input.", "a list needs a name", pointer="/data")
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            list_id = _new_id(6)
            self.lists[list_id] = {"name": data["attributes"]["name"], "members": set()}
            self.lists_created += 1
            return json_answer(201, {"data": _list_json(list_id, self.lists[list_id])})

    def _relationships(self, method, segments, query, document, action):
        list_id = segments[1]
        data = document.get("data") if isinstance(document, dict) else None
        problem = None
        if not isinstance(data, list) or not data:
            problem = "data must be a non-empty list of {'type': 'profile', 'id'}"
        elif len(data) > MAX_IDS:
            problem = f"data has {len(data)} items; the maximum is {MAX_IDS}"
        elif any(
            not isinstance(d, dict)
            or set(d) != {"type", "id"}
            or d["type"] != "profile"
            or not isinstance(d["id"], str)
            for d in data
        ):
            problem = "each item must be exactly {'type': 'profile', 'id': str}"
        if problem is not None:
            self._record_violation(f"{method} lists/{list_id}/relationships/profiles: {problem}")
            return _error(400, "invalid", "Invalid input.", problem, pointer="/data")
        if action is not None:
            return self._failure(action.kind)
        with self._lock:
            entry = self.lists.get(list_id)
            if entry is None:
                return _error(
                    404, "not_found", "Not found.", f"A list with id {list_id} does not exist."
                )
            ids = [d["id"] for d in data]
            if method == "POST":
                for index, profile_id in enumerate(ids):
                    if profile_id not in self.profiles:
                        return _error(
                            400,
                            "invalid",
                            "Invalid input.",
                            f"Profile {profile_id} does not exist.",
                            pointer=f"/data/{index}/id",
                        )
                entry["members"].update(ids)
            else:
                entry["members"].difference_update(ids)
            self.relationship_sizes.append(len(ids))
        return 204, b"", {}

    def _failure(self, kind: str) -> Answer:
        if kind == "rate_limit":
            status, body, headers = _error(
                429,
                "throttled",
                "Request was throttled.",
                "Request was throttled. Expected available in 1 second.",
            )
            headers.update(
                {
                    "Retry-After": "1",
                    "RateLimit-Limit": "10",
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": "1",
                }
            )
            return status, body, headers
        if kind == "server_error":
            return _error(503, "error", "A server error occurred.", "Service unavailable.")
        if kind == "expired_token":
            return _error(
                401,
                "authentication_failed",
                "Incorrect authentication credentials.",
                "Incorrect authentication credentials.",
            )
        raise AssertionError(kind)


def _rejected() -> Answer:
    return _error(
        400, "invalid", "Invalid input.", "Invalid email address", pointer="/data/attributes/email"
    )


def _profile_json(profile_id: str, profile: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "profile",
        "id": profile_id,
        "attributes": dict(profile),
        "links": {"self": f"/api/profiles/{profile_id}/"},
    }


def _list_json(list_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"type": "list", "id": list_id, "attributes": {"name": entry["name"]}}


def _error(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    pointer: str | None = None,
    parameter: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Answer:
    error: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code,
        "title": title,
        "detail": detail,
    }
    if pointer or parameter:
        error["source"] = {"pointer": pointer} if pointer else {"parameter": parameter}
    error["meta"] = meta or {}
    return status, orjson.dumps({"errors": [error]}), {"Content-Type": JSON_API}
