"""A fake Braze REST API (``POST /users/track``) that checks requests like the real one.

:class:`FakeBraze` is a real HTTP server on 127.0.0.1 (a ``ThreadingHTTPServer`` in a daemon
thread). It keeps users (custom attributes by identifier) and checks every request as Braze
would: ``POST /users/track`` only, ``Authorization: Bearer <key>``, ``Content-Type:
application/json``, a body ``{"attributes": [...]}`` of at most 75 objects, each with exactly
one identifier, and array attributes written as ``{"add": [...]}`` / ``{"remove": [...]}``.
Anything a correct connector never sends is answered as Braze would and listed in
:attr:`FakeBraze.violations`; ``/users/delete`` is always a violation (removal from an audience
must never delete a profile).

Failures are injected in Braze's own shapes: ``fail_next("rate_limit")`` (429 with
``X-RateLimit-*`` headers and ``X-Ratelimit-Retry-After``), ``"server_error"`` (503),
``"expired_token"`` (401 ``{"message": "Invalid API key: <key>"}``, echoing the key as Braze
does), ``"timeout"`` (the answer comes after ``delay_s``; the request is applied, as a real
server whose answer was lost); :meth:`FakeBraze.reject_keys` makes the objects of those users
come back in ``errors[]`` with their ``index``.

    with FakeBraze() as braze:
        settings = braze.destination_config()
        ...
        assert braze.members() == {"a@example.com": {"email": "a@example.com", ...}}
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson

from ._http import Answer, Failure, FakeServer, hold, json_answer, media_type, target

API_KEY = "braze-rest-key-0123456789abcdef"
MAX_OBJECTS = 75
MEMBERSHIP_ATTRIBUTE = "audsync_audiences"
MEMBERSHIP_VALUE = "audsync_fake_audience"
FAILURE_KINDS = ("rate_limit", "server_error", "expired_token", "timeout")


class FakeBraze(FakeServer):
    """A fake Braze cluster on loopback; state and counters are thread-safe.

    Args:
        api_key: the REST key it accepts.
        identify_by: how :meth:`members` and :meth:`seed_members` key users: ``email`` (the
            generic test's audience key) or ``external_id``.
        membership: ``array`` or ``boolean``, as the connector's setting.
        membership_attribute: the attribute marking members.
        membership_value: the array value marking members (``array`` only).
    """

    failure_kinds = FAILURE_KINDS

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        identify_by: str = "email",
        membership: str = "array",
        membership_attribute: str = MEMBERSHIP_ATTRIBUTE,
        membership_value: str = MEMBERSHIP_VALUE,
    ):
        super().__init__()
        self.api_key = api_key
        self.identify_by = identify_by
        self.membership = membership
        self.membership_attribute = membership_attribute
        self.membership_value = membership_value
        self.reset()

    def reset(self) -> None:
        """Forget users, requests, violations and injected failures."""
        super().reset()
        with self._lock:
            self.users: list[dict[str, Any]] = []
            """Each user's attributes (identifiers included)."""
            self.requests: list[tuple[str, str]] = []
            """``(method, path)`` of every request, in arrival order."""
            self.bodies: list[Any] = []
            """The parsed body of every ``/users/track`` request."""
            self.batch_sizes: list[int] = []
            """Objects in each accepted ``/users/track`` request."""
            self.auth_failures = 0
            self.rejected: set[str] = set()

    # -- the generic surface --------------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry pointing at this fake."""
        config = {
            "type": "braze",
            "api_key": self.api_key,
            "base_url": self.base_url,
            "identify_by": self.identify_by,
            "membership": self.membership,
            "membership_attribute": self.membership_attribute,
        }
        if self.membership == "array":
            config["membership_value"] = self.membership_value
        config.update(overrides)
        return config

    @staticmethod
    def field_mapping() -> list[dict[str, str]]:
        """``email``, ``first_name`` and ``ltv`` as Braze's ``email``, ``first_name`` and a
        custom ``ltv`` attribute."""
        return [
            {"source_column": "email", "destination_field": "email"},
            {"source_column": "first_name", "destination_field": "first_name"},
            {"source_column": "ltv", "destination_field": "ltv"},
        ]

    def members(self, candidates: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Users in the audience, by key (email or external_id), with their attributes.

        The attributes are those a mapping can set: everything but ``external_id``, the
        membership attribute and Braze's control keys. With ``candidates``, keys are the
        candidates as given (matched after normalisation) and only those are returned.
        """
        with self._lock:
            found = {}
            for user in self.users:
                if not self._is_member(user):
                    continue
                key = user.get(self.identify_by)
                if key is None:
                    continue
                fields = {
                    k: v
                    for k, v in user.items()
                    if k not in ("external_id", "braze_id", self.membership_attribute)
                }
                found[key] = fields
        if candidates is None:
            return found
        result = {}
        for candidate in candidates:
            lookup = candidate.strip().lower() if self.identify_by == "email" else candidate
            if lookup in found:
                result[candidate] = found[lookup]
        return result

    def seed_members(self, emails_to_fields: dict[str, dict[str, Any]]) -> None:
        """Users already in the audience (keyed like :meth:`members`), with attributes."""
        with self._lock:
            for key, fields in emails_to_fields.items():
                user = self._find(self.identify_by, key)
                if user is None:
                    user = {self.identify_by: key}
                    self.users.append(user)
                user.update(fields or {})
                if self.membership == "array":
                    values = user.setdefault(self.membership_attribute, [])
                    if self.membership_value not in values:
                        values.append(self.membership_value)
                else:
                    user[self.membership_attribute] = True

    def reject_keys(self, keys: Iterable[str]) -> None:
        """Objects for these users (email or external_id) come back in ``errors[]``."""
        with self._lock:
            self.rejected = {k.strip().lower() if "@" in k else k for k in keys}

    # -- handling ---------------------------------------------------------------------------

    def user(self, key: str) -> dict[str, Any] | None:
        """The user whose email or external_id is ``key`` (a copy), or ``None``."""
        with self._lock:
            user = self._find(self.identify_by, key)
            return dict(user) if user is not None else None

    def _find(self, id_key: str, value: Any) -> dict[str, Any] | None:
        for user in self.users:
            if id_key in user and user[id_key] == value:
                return user
        return None

    def _is_member(self, user: dict[str, Any]) -> bool:
        value = user.get(self.membership_attribute)
        if self.membership == "array":
            return isinstance(value, list) and self.membership_value in value
        return value is True

    def handle(self, method: str, route: str, query: str, headers: Any, body: bytes) -> Answer:
        """Check and apply one request; return status, body and headers."""
        path = target(route, query)
        with self._lock:
            self.requests.append((method, path))
        action = self._failures.take(method, path)
        with self._in_flight():
            action = hold(action, "delay_s", 1.0)
            return self._handle(method, route, path, headers, body, action)

    def _handle(
        self, method: str, route: str, path: str, headers: Any, body: bytes, action: Failure | None
    ) -> Answer:
        if route == "/users/delete":
            self._record_violation(
                f"{method} /users/delete: an audience removal must not delete users"
            )
            return json_answer(400, {"message": "not allowed in this fake"})
        if route != "/users/track":
            self._record_violation(f"{method} {path}: not an endpoint the connector may call")
            return json_answer(404, {"message": "Not Found"})
        if method != "POST":
            self._record_violation(f"{method} /users/track: only POST")
            return json_answer(405, {"message": "Method Not Allowed"})
        auth = headers.get("Authorization") or ""
        if auth != f"Bearer {self.api_key}":
            with self._lock:
                self.auth_failures += 1
            self._record_violation("Authorization is not 'Bearer <the REST key>'")
            return json_answer(401, {"message": "Invalid API key: " + auth.removeprefix("Bearer ")})
        content_type = media_type(headers)
        if content_type != "application/json":
            self._record_violation(f"Content-Type is {content_type!r}, not application/json")
            return json_answer(400, {"message": "Invalid Content-Type"})
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._record_violation("body is not JSON")
            return json_answer(400, {"message": "Received unparseable request body"})
        problem = _check_body(document)
        if problem is not None:
            self._record_violation(problem)
            return json_answer(400, {"message": problem})
        with self._lock:
            self.bodies.append(document)

        # Injected failures come after the checks, as a real server checks auth and shape
        # before it decides it is busy.
        if action is not None:
            return self._failure(action.kind)

        errors = []
        with self._lock:
            for index, obj in enumerate(document["attributes"]):
                problem = _check_object(obj)
                if problem is not None:
                    self._record_violation(f"attributes[{index}]: {problem}")
                    errors.append(_error(problem, index))
                    continue
                id_key = _identifier(obj)
                value = obj[id_key]
                if value in self.rejected:
                    errors.append(_error(f"Invalid '{id_key}' value", index))
                    continue
                self._apply(id_key, value, obj)
            self.batch_sizes.append(len(document["attributes"]))
        answer: dict[str, Any] = {
            "message": "success",
            "attributes_processed": len(document["attributes"]) - len(errors),
        }
        if errors:
            answer["errors"] = errors
        return json_answer(201, answer, _rate_headers(remaining=2999))

    def _apply(self, id_key: str, value: Any, obj: dict[str, Any]) -> None:
        user = self._find(id_key, value)
        if user is None:
            if obj.get("_update_existing_only") is True:
                return  # Update Only mode: no profile is created
            user = {id_key: value}
            self.users.append(user)
        for name, attribute in obj.items():
            if name in ("_update_existing_only", "push_token_import", id_key):
                continue
            if isinstance(attribute, dict) and set(attribute) <= {"add", "remove"}:
                values = user.get(name)
                values = list(values) if isinstance(values, list) else []
                for item in attribute.get("add", []):
                    if item not in values:  # a set, as every connector we read assumes
                        values.append(item)
                for item in attribute.get("remove", []):
                    values = [v for v in values if v != item]
                user[name] = values
            elif attribute is None:
                user.pop(name, None)
            else:
                user[name] = attribute

    def _failure(self, kind: str) -> Answer:
        if kind == "rate_limit":
            reset = int(time.time()) + 1
            headers = {**_rate_headers(remaining=0, reset=reset), "X-Ratelimit-Retry-After": "1"}
            return json_answer(429, {"message": "API rate limit exceeded"}, headers)
        if kind == "server_error":
            return json_answer(503, {"message": "Service Unavailable"})
        if kind == "expired_token":
            return json_answer(401, {"message": f"Invalid API key: {self.api_key}"})
        raise AssertionError(kind)


def _identifier(obj: dict[str, Any]) -> str | None:
    """The key that identifies the object's user: ``external_id``, ``braze_id`` or
    ``user_alias`` when one is there (``email`` and ``phone`` are then profile fields), else
    ``email``, else ``phone``."""
    for key in ("external_id", "braze_id", "user_alias", "email", "phone"):
        if key in obj:
            return key
    return None


def _check_body(document: Any) -> str | None:
    """What is wrong with a ``/users/track`` body as a whole, or ``None``."""
    if not isinstance(document, dict):
        return "body is not a JSON object"
    extra = set(document) - {"attributes", "events", "purchases"}
    if extra:
        return f"body has unexpected keys {sorted(extra)}"
    attributes = document.get("attributes")
    if not isinstance(attributes, list) or not attributes:
        return "'attributes' is missing or not a non-empty list"
    if len(attributes) > MAX_OBJECTS:
        return f"Received {len(attributes)} attribute objects; the maximum is {MAX_OBJECTS}"
    for key in ("events", "purchases"):
        if key in document:
            return f"the connector sends no {key}"
    return None


def _check_object(obj: Any) -> str | None:
    """What is wrong with one attributes object, or ``None``."""
    if not isinstance(obj, dict):
        return "not an object"
    strong = [k for k in ("external_id", "braze_id", "user_alias") if k in obj]
    if len(strong) > 1:
        return f"more than one identifier: {strong}"
    id_key = _identifier(obj)
    if id_key is None:
        return "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
    value = obj[id_key]
    if not isinstance(value, str) or not value:
        return f"'{id_key}' must be a non-empty string"
    if id_key == "email" and (value != value.strip().lower() or "@" not in value):
        return f"email {value!r} is not normalised"
    if "_update_existing_only" in obj and not isinstance(obj["_update_existing_only"], bool):
        return "'_update_existing_only' must be a boolean"
    for name, attribute in obj.items():
        if isinstance(attribute, dict):
            if not attribute or not set(attribute) <= {"add", "remove"}:
                return (
                    f"attribute {name!r}: an object must be {{'add': [...]}} or {{'remove': [...]}}"
                )
            if not all(isinstance(v, list) for v in attribute.values()):
                return f"attribute {name!r}: 'add'/'remove' take a list"
    return None


def _error(message: str, index: int) -> dict[str, Any]:
    return {"type": message, "input_array": "attributes", "index": index}


def _rate_headers(remaining: int, reset: int | None = None) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": "3000",
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(reset if reset is not None else int(time.time()) + 3),
    }
