"""Klaviyo lists: membership by profile id, profiles created (or found) from the email.

Klaviyo's list membership takes **profile ids**, not addresses. For each batch:

1. **Adds and updates.** A row with a profile id from an earlier run (``destination_id``) is
   updated in place (``PATCH /api/profiles/{id}/``) with its mapped fields. A row without one
   creates its profile (``POST /api/profiles/``) with the address and mapped fields; when the
   profile exists, Klaviyo answers 409 with ``errors[0].meta.duplicate_profile_id``, the id is
   taken from there and the fields are set with a ``PATCH``. (A ``PATCH`` answered 404, the
   profile having been deleted or merged, falls back to creating it.) Then one
   ``POST /api/lists/{id}/relationships/profiles/`` adds every id (at most 1,000, 204).
   Profile ids are returned as ``destination_ids`` and kept in the snapshot.
2. **Removals.** The ids come from the snapshot; a row without one is looked up
   (``GET /api/profiles/?filter=equals(email,"...")``, the value quoted as a JSON string);
   an address with no profile is not on the list, so there is nothing to do. One
   ``DELETE /api/lists/{id}/relationships/profiles/`` removes them all (204).

The bulk import job (``/api/profile-bulk-import-jobs``) is not used: it is asynchronous (a
batch would have to poll it), and its per-profile errors and profile ids come from separate
calls, whereas one profile call per row gives each row its id and its own error at once.
Profile creation is the cost, so the default batch is 100 rows and the default rate 10
requests a second (Klaviyo's steady profile limit is 700 a minute).

Every step is safe to repeat: a second create meets the 409 and reuses the id, a ``PATCH``
sets the same values, and adding an existing member (or removing an absent one) changes
nothing.

Mapped fields go to the profile: Klaviyo's own attributes by name (``first_name``,
``last_name``, ``phone_number``, ``external_id``, ``organization``, ``locale``, ``title``,
``image``), ``location.<key>`` into ``location``, and any other name (or
``properties.<name>``) into ``properties``. The address is always the normalised key. A
null value clears the field (``PATCH`` with ``null``); a new profile is created without them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

from audsync.delivery.http import Verdict, dumps
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RowError,
)
from audsync.destinations.common import (
    ListLifecycle,
    json_list,
    json_object,
    open_list,
    required,
)
from audsync.identifiers import InvalidIdentifier, normalize_email

logger = logging.getLogger("audsync.destinations.klaviyo")

DEFAULT_BASE = "https://a.klaviyo.com"
DEFAULT_REVISION = "2026-10-15"
"""The revision by default (destinations.md, late 2026); ``revision`` picks another."""
JSON_API = "application/vnd.api+json"
PROFILES_PAGE = 100
"""Profiles a page of a list's members (Klaviyo's most)."""


def _cursor_of(next_url: Any) -> str | None:
    """The ``page[cursor]`` of a JSON:API ``links.next`` URL, or ``None``."""
    if not next_url:
        return None
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(str(next_url)).query).get("page[cursor]")
    return values[0] if values else None
MAX_LIST_IDS = 1000  # profile ids a list relationship request

# -- identifier rules --------------------------------------------------------------------

# The key is the address: audsync.identifiers.normalize_email (trimmed, lowercased, one "@";
# an invalid one fails its row, ``invalid_email``, unsent).

# Profile attributes of Klaviyo's own; any other mapped name is a custom property.
PROFILE_ATTRIBUTES = frozenset(
    {
        "phone_number",
        "external_id",
        "first_name",
        "last_name",
        "organization",
        "locale",
        "title",
        "image",
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
IDENTIFIER_FIELDS = frozenset({"email"})


def email_filter(email: str) -> str:
    """Klaviyo's ``filter`` for one address: ``equals(email,"...")``, the value JSON-quoted so
    that a quote or backslash in it cannot end the string early."""
    return f"equals(email,{json.dumps(email, ensure_ascii=False)})"


def profile_attributes(email: str, fields: Mapping[str, Any] | None) -> dict[str, Any]:
    """The profile's attributes: the address, Klaviyo's own fields, location and properties."""
    attributes: dict[str, Any] = {"email": email}
    location: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    for name, value in (fields or {}).items():
        if name in IDENTIFIER_FIELDS:
            continue  # the normalised key is the address
        if name in PROFILE_ATTRIBUTES:
            attributes[name] = value
        elif name.startswith("location.") and name[9:] in LOCATION_KEYS:
            location[name[9:]] = value
        elif name.startswith("properties.") and len(name) > 11:
            properties[name[11:]] = value
        else:
            properties[name] = value
    if location:
        attributes["location"] = location
    if properties:
        attributes["properties"] = properties
    return attributes


def _errors(content: bytes) -> list[dict[str, Any]]:
    """The ``errors`` of a JSON:API error answer (empty when it has none)."""
    return [e for e in json_list(content, "errors") if isinstance(e, dict)]


def _describe(errors: list[dict[str, Any]], status: int) -> tuple[str, str]:
    """An error code and message from JSON:API errors."""
    if not errors:
        return str(status), f"HTTP {status}"
    first = errors[0]
    code = str(first.get("code") or status)
    message = "; ".join(
        str(e.get("detail") or e.get("title") or e.get("code") or status) for e in errors
    )
    return code, message[:500]


class KlaviyoListConnector(Connector):
    """Keep a Klaviyo list's membership, creating profiles (with mapped fields) as needed."""

    type: ClassVar[str] = "klaviyo_list"
    description: ClassVar[str] = (
        "Klaviyo list membership by profile id; profiles created or updated with mapped fields"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "api_key",
            "a private API key with profiles:write and lists:write",
            required=True,
            secret=True,
        ),
        ConfigKey("list_id", "the list's id (here or in the sync's config)"),
        ConfigKey(
            "create_if_missing",
            "without list_id: create a list named list_name on the first run and reuse it",
            default=False,
        ),
        ConfigKey(
            "list_name", "the name of the list create_if_missing makes; default: the sync's name"
        ),
        ConfigKey(
            "revision", "the API revision (a date) sent in every request", default=DEFAULT_REVISION
        ),
    )
    max_batch_size: ClassVar[int] = MAX_LIST_IDS
    default_batch_size: ClassVar[int] = 100
    # List endpoints allow 10 requests a second in bursts; more threads would only wait.
    max_concurrency: ClassVar[int] = 10
    default_concurrency: ClassVar[int] = 4
    default_rate_limit: ClassVar[float | None] = 10.0
    returns_destination_ids: ClassVar[bool] = True
    can_list_members: ClassVar[bool] = True

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        api_key = required(self, "api_key", strip=True)
        revision = str(self.setting("revision") or DEFAULT_REVISION)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(\.[a-z]+)?", revision):
            raise FatalDestinationError(
                f"destination {name!r}: revision must be a date like {DEFAULT_REVISION},"
                f" got {revision!r}"
            )
        self._headers = {
            "Authorization": f"Klaviyo-API-Key {api_key}",
            "revision": revision,
            "Accept": JSON_API,
            "Content-Type": JSON_API,
        }
        self._list_id: str | None = None

    # -- the HTTP policy ------------------------------------------------------------------

    def classify(self, response: Any) -> Verdict | None:
        """A refused request fails its rows with the JSON:API error's code and detail."""
        status = response.status_code
        if 400 <= status < 500 and status not in (401, 403, 408, 429):
            errors = _errors(response.content)
            if errors:
                code, message = _describe(errors, status)
                return Verdict.reject(code, f"{status}: {message}")
        return None

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.http.request(
            method, self.url(path, DEFAULT_BASE), headers=self._headers, **kwargs
        )

    def _list_path(self) -> str:
        if self._list_id is None:
            raise FatalDestinationError(f"destination {self.name!r}: open() was not called")
        return f"/api/lists/{quote(self._list_id, safe='')}/relationships/profiles/"

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Find the list (:func:`~audsync.destinations.common.open_list`): ``list_id``, else
        the one an earlier run created, else one named ``list_name``, else a new one
        (``create_if_missing``). Returns ``{"list_id": ...}``."""
        self._list_id, state = open_list(
            self,
            ListLifecycle(
                key="list_id",
                what="Klaviyo list",
                name=str(self.setting("list_name") or self.sync.name),
                exists=self._list_exists,
                find=self._find_list,
                create=self._create_list,
                how_to_create="create_if_missing: true to have audsync create the list",
            ),
        )
        return state

    def _list_exists(self, list_id: str) -> bool:
        response = self._request(
            "GET", f"/api/lists/{quote(list_id, safe='')}/", classify=_ok_if(404)
        )
        return response.status_code != 404

    def _find_list(self, name: str) -> str | None:
        response = self._request(
            "GET", "/api/lists/", params={"filter": f"equals(name,{json.dumps(name)})"}
        )
        for item in _data(response.content):
            if (item.get("attributes") or {}).get("name") == name and item.get("id"):
                return str(item["id"])
        return None

    def _create_list(self, name: str, http: Any) -> str:
        """Create the list through ``http`` (no retries); its id."""
        response = http.request(
            "POST",
            self.url("/api/lists/", DEFAULT_BASE),
            headers=self._headers,
            json={"data": {"type": "list", "attributes": {"name": name}}},
        )
        created = _data(response.content)
        if not created or not created[0].get("id"):
            raise FatalDestinationError(
                f"destination {self.name!r}: creating list {name!r} returned no id"
            )
        return str(created[0]["id"])

    # -- reading the membership back (audsync verify) -------------------------------------

    def list_members(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of the list's profiles as (email, profile id), following ``links.next``'s
        ``page[cursor]`` (the next URL is not followed as is, so ``base_url`` still holds)."""
        path = f"/api/lists/{quote(str(self._list_id), safe='')}/profiles/"
        cursor: str | None = None
        while True:
            params = {"fields[profile]": "email", "page[size]": str(PROFILES_PAGE)}
            if cursor:
                params["page[cursor]"] = cursor
            response = self._request("GET", path, params=params)
            page = []
            for item in _data(response.content):
                try:
                    email = normalize_email((item.get("attributes") or {}).get("email"))
                except InvalidIdentifier:
                    continue
                if item.get("id"):
                    page.append((email, str(item["id"])))
            if page:
                yield page
            links = (json_object(response.content) or {}).get("links") or {}
            cursor = _cursor_of(links.get("next"))
            if not cursor:
                return

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Profiles for the adds and updates, then one list add and one list removal."""
        rejected: list[RowError] = []
        joining: list[tuple[Change, str]] = []
        leaving: list[tuple[Change, str]] = []
        for change in batch:
            try:
                email = normalize_email(change.key)
            except InvalidIdentifier as exc:
                rejected.append(
                    RowError(change.key, change.op, exc.code, f"{exc.message}; not sent")
                )
                continue
            if change.op in ("add", "update"):
                found = self._upsert_profile(change, email)
                if isinstance(found, RowError):
                    rejected.append(found)
                else:
                    joining.append((change, found))
            elif change.op == "remove":
                found = change.destination_id or self._lookup(email)
                if found:
                    leaving.append((change, found))
                # No profile with this address: it is on no list, nothing to remove.
            else:
                rejected.append(
                    RowError(change.key, change.op, "unknown_op", f"unknown op {change.op!r}")
                )

        # An update re-adds the member: idempotent, and it mends a membership removed by hand.
        failed = self._relationships("POST", joining)
        rejected += failed
        failed_keys = {r.key for r in failed}
        ids = {c.key: pid for c, pid in joining if c.key not in failed_keys}
        rejected += self._relationships("DELETE", leaving)
        return BatchResult(rejected=rejected, destination_ids=ids)

    def _upsert_profile(self, change: Change, email: str) -> str | RowError:
        """The profile id of ``change``'s member, with its fields set; or the row's error."""
        attributes = profile_attributes(email, change.fields)
        try:
            dumps(attributes)
        except TypeError as exc:
            return RowError(change.key, change.op, "invalid_value", str(exc)[:500])
        if change.destination_id:
            result = self._patch(change, change.destination_id, attributes)
            if result is not None:
                return result
            # Deleted or merged in Klaviyo since: create it again.
        # A null clears a value in a PATCH; a new profile has nothing to clear, so its nulls
        # are left out.
        response = self._request(
            "POST",
            "/api/profiles/",
            json={"data": {"type": "profile", "attributes": _without_nulls(attributes)}},
            classify=_ok_if(400, 409),
        )
        if response.status_code == 409:
            errors = _errors(response.content)
            duplicate = (
                (errors[0].get("meta") or {}).get("duplicate_profile_id") if errors else None
            )
            if not duplicate:
                code, message = _describe(errors, 409)
                return RowError(change.key, change.op, code, message)
            if len(attributes) == 1:
                return str(duplicate)  # nothing but the address to set
            patched = self._patch(change, str(duplicate), attributes)
            return (
                patched
                if patched is not None
                else RowError(
                    change.key,
                    change.op,
                    "not_found",
                    "the duplicate profile Klaviyo named is gone",
                )
            )
        if response.status_code == 400:
            code, message = _describe(_errors(response.content), 400)
            return RowError(change.key, change.op, code, message)
        created = _data(response.content)
        if not created or not created[0].get("id"):
            return RowError(
                change.key, change.op, "no_id", "Klaviyo created the profile without an id"
            )
        return str(created[0]["id"])

    def _patch(
        self, change: Change, profile_id: str, attributes: dict[str, Any]
    ) -> str | RowError | None:
        """Set the profile's attributes; its id, the row's error, or ``None`` if not found."""
        response = self._request(
            "PATCH",
            f"/api/profiles/{quote(profile_id, safe='')}/",
            json={"data": {"type": "profile", "id": profile_id, "attributes": attributes}},
            classify=_ok_if(400, 404, 409),
        )
        if response.status_code == 404:
            return None
        if response.status_code in (400, 409):  # 409: another profile has this address
            code, message = _describe(_errors(response.content), response.status_code)
            return RowError(change.key, change.op, code, message)
        return profile_id

    def _lookup(self, email: str) -> str | None:
        """The id of the profile with this address, or ``None``."""
        response = self._request(
            "GET",
            "/api/profiles/",
            params={"filter": email_filter(email), "fields[profile]": "email"},
        )
        for item in _data(response.content):
            if item.get("id"):
                return str(item["id"])
        return None

    def _relationships(self, method: str, rows: list[tuple[Change, str]]) -> list[RowError]:
        """Add (``POST``) or remove (``DELETE``) profiles; the rows of ids Klaviyo refused.

        A 400 refuses the whole request. When its errors point at ids (``/data/3/id``), those
        rows fail and the request is sent once more without them; otherwise every row fails.
        """
        pending = list(dict.fromkeys(pid for _, pid in rows))
        refused: dict[str, tuple[str, str]] = {}  # id -> (code, message)
        last: tuple[str, str] = ("rejected", "refused by Klaviyo")
        for _attempt in range(2):
            if not pending:
                break
            response = self._request(
                method,
                self._list_path(),
                json={"data": [{"type": "profile", "id": pid} for pid in pending]},
                classify=_list_answer(self._list_id or ""),
            )
            if response.status_code < 400:
                pending = []
                break
            errors = _errors(response.content)
            last = _describe(errors, response.status_code)
            named = _pointed_ids(errors, pending)
            for pid, error in named.items():
                refused[pid] = _describe([error], response.status_code)
            pending = [pid for pid in pending if pid not in named]
            if not named:
                break
        # Ids still pending were refused whole, or not confirmed after a second refusal.
        refused.update({pid: last for pid in pending})
        return [RowError(c.key, c.op, *refused[pid]) for c, pid in rows if pid in refused]


def _pointed_ids(errors: list[dict[str, Any]], ids: list[str]) -> dict[str, dict[str, Any]]:
    """The ids that errors point at (``source.pointer`` ``/data/<i>/...``), with their error."""
    named: dict[str, dict[str, Any]] = {}
    for error in errors:
        pointer = str((error.get("source") or {}).get("pointer") or "")
        match = re.fullmatch(r"/data/(\d+)(/.*)?", pointer)
        if match and int(match.group(1)) < len(ids):
            named.setdefault(ids[int(match.group(1))], error)
    return named


def _without_nulls(attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` without null values (nested ``location`` and ``properties`` too)."""
    kept: dict[str, Any] = {}
    for name, value in attributes.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
            if not value:
                continue
        if value is not None:
            kept[name] = value
    return kept


def _data(content: bytes) -> list[dict[str, Any]]:
    """The ``data`` of a JSON:API answer as a list of resources."""
    document = json_object(content)
    data = document.get("data") if document is not None else None
    if isinstance(data, dict):
        return [data]
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _ok_if(*statuses: int) -> Callable[[Any], Verdict | None]:
    """A per-request hook: these statuses are answers the connector reads itself."""

    def classify(response: Any) -> Verdict | None:
        return Verdict.ok() if response.status_code in statuses else None

    return classify


def _list_answer(list_id: str) -> Callable[[Any], Verdict | None]:
    """A list relationship call: 404 is a missing list (fatal); 400 names the refused ids."""

    def classify(response: Any) -> Verdict | None:
        if response.status_code == 404:
            return Verdict.fatal(f"Klaviyo list {list_id!r} not found")
        if response.status_code == 400:
            return Verdict.ok()
        return None

    return classify
