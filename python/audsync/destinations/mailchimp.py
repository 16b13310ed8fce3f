"""Mailchimp: audience membership as a tag on members of one audience (list).

A batch is sent in two steps:

1. **Upsert** the batch's adds and updates in one ``POST /3.0/lists/{list_id}`` with
   ``{"members": [...], "update_existing": true}`` (at most 500): each member carries
   ``email_address``, ``status_if_new`` and the mapped fields as ``merge_fields``. Mailchimp
   answers 200 even when members fail, listing them in ``errors[]`` (``email_address``,
   ``error``, ``error_code``): those rows fail alone.
2. **Tag**, in bulk: a tag is a static segment, so one
   ``POST /3.0/lists/{list_id}/segments/{segment_id}`` with ``{"members_to_add": [...],
   "members_to_remove": [...]}`` (at most 500 each, the batch's cap) tags every member that
   entered and untags every one that left (destinations.md, "Corrections": one request per
   member is the slow path). An address the answer's ``errors[]`` names failed: a joiner's row
   fails, a leaver that is no member has nothing to remove. With ``archive_on_remove: true`` a
   leaver is archived instead (``DELETE .../members/{hash}``, one request each). Updates are
   tagged too: in bulk it costs nothing, and it heals a tag removed by hand (``audsync verify
   --repair`` marks such a member, and the next run may send it as an update). :meth:`MailchimpConnector.open` finds
   the tag's segment by name (``GET .../segments?type=static``), creating it when missing.

Every step is safe to repeat: the upsert is an upsert, and setting a tag active or inactive
twice changes nothing. ``subscriber_hash`` is the MD5 hex of the lowercased email.

**Consent.** Only ``status_if_new`` is ever sent, never ``status``, so an existing member's
subscription status (an unsubscribe, above all) is never changed by a sync. New members get
``transactional`` by default: a contact that can be tagged and targeted by automations but is
*not* subscribed to marketing email, because audsync cannot know that a warehouse row gave
consent. ``subscribed`` would claim a consent nobody recorded; ``pending`` would email every
new member a double opt-in confirmation as a side effect of a sync. Choose ``subscribed``
only for an audience whose members all opted in. (Whether the batch endpoint honours
``status_if_new`` is not settled by a primary source: if it does not, Mailchimp lists every
new member in ``errors[]``, so the rows fail visibly and nothing is subscribed.)

**create_if_missing.** A tag is created whenever it is missing (a tag is only a name), so the
key is accepted and does nothing. The list itself must exist; :meth:`MailchimpConnector.open`
checks it does.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

from audsync.delivery.http import Verdict, answer_text, dumps
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RequestRejected,
    RetriesExhausted,
    RowError,
)
from audsync.destinations.common import flag, json_object, required
from audsync.identifiers import InvalidIdentifier, normalize_email
from audsync.identifiers import mailchimp_subscriber_hash as subscriber_hash

logger = logging.getLogger("audsync.destinations.mailchimp")

API_PREFIX = "/3.0"
SEGMENT_PAGE = 1000
"""Segments a page (Mailchimp's most for ``count``)."""
MAX_SEGMENT_PAGES = 100

# -- identifier rules --------------------------------------------------------------------

# The key is the address: audsync.identifiers.normalize_email (trimmed, lowercased, one "@";
# an invalid one fails its row, ``invalid_email``, unsent); the member is found by
# audsync.identifiers.mailchimp_subscriber_hash (MD5 of the lowercased address).

# The API key ends with its data centre: "0123...cdef-us21".
_DATA_CENTRE = re.compile(r"-([a-z]+[0-9]+)$")

STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional")
DEFAULT_STATUS_IF_NEW = "transactional"

# Destination field names that name the member's address rather than a merge field.
IDENTIFIER_FIELDS = frozenset({"email_address", "email", "EMAIL"})


def data_centre(api_key: str) -> str | None:
    """The data centre an API key belongs to (``us21`` of ``...-us21``), or ``None``."""
    match = _DATA_CENTRE.search(api_key.strip())
    return match.group(1) if match else None


def _problem(content: bytes) -> dict[str, Any]:
    """An ``application/problem+json`` answer as a dict (empty when it is not one)."""
    return json_object(content) or {}


def _slug(title: str) -> str:
    """``"Invalid Resource"`` as ``invalid_resource``: a problem title as an error code."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "rejected"


class MailchimpConnector(Connector):
    """Tag members of a Mailchimp audience, upserting them with their merge fields."""

    type: ClassVar[str] = "mailchimp"
    description: ClassVar[str] = (
        "Mailchimp audience members upserted with merge fields and marked with a tag per sync"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "api_key",
            "a Marketing API key; its suffix (-us21) names the data centre",
            required=True,
            secret=True,
        ),
        ConfigKey("list_id", "the audience (list) id; here or in the sync's config"),
        ConfigKey("tag", "the tag marking this sync's members; default: the sync's name"),
        ConfigKey(
            "status_if_new",
            "status of members the sync creates: transactional (default: no marketing consent"
            " assumed), subscribed (only if every member opted in), pending (sends each a"
            " confirmation email), unsubscribed or cleaned",
            default=DEFAULT_STATUS_IF_NEW,
        ),
        ConfigKey(
            "archive_on_remove",
            "true: archive members who leave the audience instead of removing the tag",
            default=False,
        ),
        ConfigKey(
            "create_if_missing",
            "accepted, and nothing to do: Mailchimp creates a tag when it is first used",
            default=False,
        ),
    )
    max_batch_size: ClassVar[int] = 500  # members a batch upsert, addresses a segment list
    # Two requests a batch (upsert, then the tag in bulk): full batches make the fewest.
    default_batch_size: ClassVar[int] = 500
    max_concurrency: ClassVar[int] = 10  # Mailchimp's simultaneous connections per key
    # Half of them, so that the account's other integrations still get connections.
    default_concurrency: ClassVar[int] = 5
    returns_destination_ids: ClassVar[bool] = False  # the subscriber hash is derived
    can_list_members: ClassVar[bool] = True

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        self._api_key = required(self, "api_key", strip=True)
        list_id = self.setting("list_id")
        if not list_id:
            raise FatalDestinationError(
                f"destination {name!r}: key 'list_id' is required (in destinations.yml or the"
                f" sync's config): the Mailchimp audience id"
            )
        self._list_id = str(list_id)
        self._tag = str(self.setting("tag") or sync.name)
        status = str(self.setting("status_if_new") or DEFAULT_STATUS_IF_NEW)
        if status not in STATUSES:
            raise FatalDestinationError(
                f"destination {name!r}: status_if_new must be one of {', '.join(STATUSES)},"
                f" got {status!r}"
            )
        self._status_if_new = status
        self._archive = flag(self.setting("archive_on_remove", False))
        self._base = self._default_base()
        self._list_path = f"{API_PREFIX}/lists/{quote(self._list_id, safe='')}"
        # Basic auth with any user name, as Mailchimp documents; requests builds the header.
        self._auth = ("audsync", self._api_key)
        self._segment_id: str | None = None
        self._segment_lock = threading.Lock()

    def _default_base(self) -> str:
        dc = data_centre(self._api_key)
        if dc is None:
            if self.settings.get("base_url"):
                return str(self.settings["base_url"])
            # The key is not quoted: it is a secret.
            raise FatalDestinationError(
                f"destination {self.name!r}: the api_key does not end with its data centre"
                " (like -us21); copy the whole key from Mailchimp"
            )
        return f"https://{dc}.api.mailchimp.com"

    # -- the HTTP policy ------------------------------------------------------------------

    def classify(self, response: Any) -> Verdict | None:
        """A missing audience stops the run; another refused request fails its rows with the
        problem's title and detail. (Per-member calls read their 404s themselves.)"""
        status = response.status_code
        if status == 404:
            return Verdict.fatal(f"Mailchimp audience {self._list_id!r} not found")
        if 400 <= status < 500 and status not in (401, 403, 408, 429):
            problem = _problem(response.content)
            if problem.get("title") or problem.get("detail"):
                title = str(problem.get("title") or status)
                detail = str(problem.get("detail") or title)
                return Verdict.reject(_slug(title), f"{status} {title}: {detail}"[:500])
        return None

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.http.request(method, self.url(path, self._base), auth=self._auth, **kwargs)

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Check the audience exists (a wrong list id stops the run before any row is sent)
        and find the tag's static segment, creating it when there is none."""
        self._request(
            "GET",
            self._list_path,
            params={"fields": "id,name"},
            classify=_fatal_if_missing(f"Mailchimp audience {self._list_id!r} not found"),
        )
        self._segment_id = self._find_segment() or self._create_segment()
        return None

    def _find_segment(self) -> str | None:
        """The id of the static segment named like the tag, paging through the segments."""
        offset = 0
        for _ in range(MAX_SEGMENT_PAGES):
            response = self._request(
                "GET",
                f"{self._list_path}/segments",
                params={"type": "static", "count": str(SEGMENT_PAGE), "offset": str(offset)},
            )
            answer = json_object(response.content) or {}
            segments = [s for s in answer.get("segments") or [] if isinstance(s, dict)]
            for segment in segments:
                if segment.get("name") == self._tag and segment.get("id") is not None:
                    return str(segment["id"])
            offset += len(segments)
            if not segments or offset >= int(answer.get("total_items") or 0):
                return None
        return None

    def _create_segment(self) -> str:
        """Create the tag as a static segment with no members; its id. A lost answer is
        followed by a look-up (the name is unique, so a repeat is refused, not doubled)."""
        try:
            response = self._request(
                "POST", f"{self._list_path}/segments", json={"name": self._tag, "static_segment": []}
            )
            created = (json_object(response.content) or {}).get("id")
        except (RequestRejected, RetriesExhausted):
            created = None
        found = str(created) if created is not None else self._find_segment()
        if not found:
            raise FatalDestinationError(
                f"destination {self.name!r}: could not create or find the tag {self._tag!r}"
            )
        return found

    def _segment_path(self) -> str:
        with self._segment_lock:
            if self._segment_id is None:  # a caller that skipped open()
                self._segment_id = self._find_segment() or self._create_segment()
        return f"{self._list_path}/segments/{quote(self._segment_id, safe='')}"

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Upsert the adds and updates, then tag who entered and untag (or archive) who left."""
        rejected: list[RowError] = []
        upserts: dict[str, list[Change]] = {}  # email -> its rows (two keys may share one)
        removes: dict[str, list[Change]] = {}
        for change in batch:
            try:
                email = normalize_email(change.key)
            except InvalidIdentifier as exc:
                rejected.append(
                    RowError(change.key, change.op, exc.code, f"{exc.message}; not sent")
                )
                continue
            if change.op in ("add", "update"):
                upserts.setdefault(email, []).append(change)
            elif change.op == "remove":
                removes.setdefault(email, []).append(change)
            else:
                rejected.append(
                    RowError(change.key, change.op, "unknown_op", f"unknown op {change.op!r}")
                )

        if upserts:
            failed, _created, invalid = self._upsert(upserts)
            rejected += invalid
            for email in failed:
                upserts.pop(email, None)
        # Every upserted member, updates too (see the module's doc).
        joining = dict(upserts)
        leaving = {} if self._archive else removes
        if joining or leaving:
            rejected += self._tag_in_bulk(joining, leaving)
        if self._archive:
            for email, rows in removes.items():
                rejected += self._archive_member(email, rows)
        return BatchResult(rejected=rejected)

    def list_members(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of the tag's members (``GET .../segments/{id}/members``, ``count``/``offset``)."""
        path = self._segment_path() + "/members"
        offset = 0
        while True:
            response = self._request(
                "GET",
                path,
                params={"count": str(SEGMENT_PAGE), "offset": str(offset),
                        "fields": "members.email_address,total_items"},
            )  # fmt: skip
            answer = json_object(response.content) or {}
            members = [m for m in answer.get("members") or [] if isinstance(m, dict)]
            page = []
            for member in members:
                try:
                    page.append((normalize_email(member.get("email_address")), None))
                except InvalidIdentifier:
                    continue
            if page:
                yield page
            offset += len(members)
            if not members or offset >= int(answer.get("total_items") or 0):
                return

    def _tag_in_bulk(
        self, joining: dict[str, list[Change]], leaving: dict[str, list[Change]]
    ) -> list[RowError]:
        """Tag the joiners and untag the leavers in one request to the tag's segment; the
        joiners the answer names fail, the leavers it names were not members."""
        try:
            response = self._request(
                "POST",
                self._segment_path(),
                json={"members_to_add": list(joining), "members_to_remove": list(leaving)},
            )
        except (RequestRejected, RetriesExhausted) as exc:
            retryable = isinstance(exc, RetriesExhausted)
            return [
                RowError(c.key, c.op, exc.code, exc.message, retryable)
                for rows in (*joining.values(), *leaving.values())
                for c in rows
            ]
        rejected: list[RowError] = []
        for error in (json_object(response.content) or {}).get("errors") or []:
            if not isinstance(error, dict):
                continue
            message = str(error.get("error") or "refused by Mailchimp")[:500]
            for address in error.get("email_addresses") or []:
                email = str(address).strip().lower()
                rows = joining.get(email)
                if rows:
                    rejected += [RowError(c.key, c.op, "not_a_member", message) for c in rows]
                # A leaver named here is no member of the audience: nothing to remove.
        return rejected

    def _upsert(
        self, upserts: dict[str, list[Change]]
    ) -> tuple[set[str], set[str], list[RowError]]:
        """Upsert members; return the emails that failed, those created, and the rows' errors."""
        members: list[dict[str, Any]] = []
        invalid: list[RowError] = []
        failed: set[str] = set()
        for email, rows in upserts.items():
            member = {
                "email_address": email,
                "status_if_new": self._status_if_new,
                "merge_fields": _merge_fields(rows[-1].fields),
            }
            try:
                dumps(member)
            except TypeError as exc:
                failed.add(email)
                invalid += [RowError(c.key, c.op, "invalid_value", str(exc)[:500]) for c in rows]
                continue
            members.append(member)
        if not members:
            return failed, set(), invalid
        response = self._request(
            "POST", self._list_path, json={"members": members, "update_existing": True}
        )
        answer = _problem(response.content)
        created = {
            str(m.get("email_address", "")).lower()
            for m in answer.get("new_members") or []
            if isinstance(m, dict)
        }
        unknown = 0
        for error in answer.get("errors") or []:
            if not isinstance(error, dict):
                unknown += 1
                continue
            email = str(error.get("email_address") or "").strip().lower()
            rows = upserts.get(email)
            if not rows or email in failed:
                unknown += 1
                continue
            failed.add(email)
            code = str(error.get("error_code") or "ERROR_GENERIC")
            message = str(error.get("error") or "rejected by Mailchimp")[:500]
            invalid += [RowError(c.key, c.op, code, message) for c in rows]
        if unknown:
            logger.warning(
                "destination %r: %d errors in a batch upsert answer name no member of the"
                " batch; ignored",
                self.name,
                unknown,
            )
        return failed, created, invalid

    def _member_path(self, email: str) -> str:
        return f"{self._list_path}/members/{subscriber_hash(email)}"

    def _tag_member(self, email: str, rows: list[Change], status: str) -> list[RowError]:
        """Set the sync's tag ``active`` or ``inactive`` on one member."""
        response = self._request(
            "POST",
            self._member_path(email) + "/tags",
            json={"tags": [{"name": self._tag, "status": status}]},
            classify=_per_member,
        )
        if response.status_code == 404:
            if status == "inactive":
                return []  # not a member of the list: nothing to remove
            return _row_errors(rows, "not_a_member", response)
        if response.status_code >= 400:
            return _row_errors(rows, None, response)
        return []

    def _archive_member(self, email: str, rows: list[Change]) -> list[RowError]:
        """Archive one member (``archive_on_remove``); an unknown one is gone already."""
        response = self._request("DELETE", self._member_path(email), classify=_per_member)
        if response.status_code == 404:
            return []
        if response.status_code >= 400:
            return _row_errors(rows, None, response)
        return []


def _merge_fields(fields: Mapping[str, Any] | None) -> dict[str, Any]:
    """Mapped fields as merge fields: the address is the member's, null clears a value."""
    merge: dict[str, Any] = {}
    for name, value in (fields or {}).items():
        if name in IDENTIFIER_FIELDS:
            continue
        # Mailchimp refuses null merge values; an empty string clears the field.
        merge[name] = "" if value is None else value
    return merge


def _per_member(response: Any) -> Verdict | None:
    """400 and 404 of a per-member call are that member's answer, not the batch's."""
    if response.status_code in (400, 404, 405):
        return Verdict.ok()
    return None


def _fatal_if_missing(message: str) -> Callable[[Any], Verdict | None]:
    def classify(response: Any) -> Verdict | None:
        if response.status_code == 404:
            return Verdict.fatal(message)
        return None

    return classify


def _row_errors(rows: list[Change], code: str | None, response: Any) -> list[RowError]:
    """Every row of one member failed with the problem the answer gives."""
    problem = _problem(response.content)
    title = str(problem.get("title") or response.status_code)
    detail = str(problem.get("detail") or answer_text(response) or title)
    message = f"{response.status_code} {title}: {detail}"[:500]
    return [RowError(c.key, c.op, code or _slug(title), message) for c in rows]
