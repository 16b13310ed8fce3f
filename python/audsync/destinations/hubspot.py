"""HubSpot static lists: contacts upserted by email, then added to or removed from a list.

HubSpot lists hold **record ids, not emails** (destinations.md, "HubSpot"), so each batch is
(paths shown in the v3 spelling; by default the date-versioned APIs are used,
``/crm/objects/2026-03/...`` and ``/crm/lists/2026-03/...``, ``api_version`` naming another
date or ``v3``, which HubSpot supports until September 2027):

1. ``POST /crm/v3/objects/contacts/batch/upsert`` for the batch's adds and updates (at most 100
   inputs, the API's limit and so this connector's batch size), mapped fields as contact
   properties. The answer's record ids are returned as ``destination_ids``, and the snapshot
   keeps them, so that a later removal needs no lookup.
2. For removals whose record id is unknown (``Change.destination_id`` is ``None``), a
   ``POST /crm/v3/objects/contacts/batch/read`` by ``idProperty`` email: a contact that does not
   exist is in no list, so it counts as removed.
3. One ``PUT /crm/v3/lists/{listId}/memberships/add-and-remove`` with both sets of ids. A batch
   holds at most 100 rows, so one call carries at most 100 ids: far below any limit (the
   maximum per call is unconfirmed; destinations.md advises a few thousand at most), so this
   connector never splits it. Adding a member again, or removing a non-member, is ignored by
   HubSpot: the call is safe to repeat, as at-least-once delivery needs.

Failures: a 429 whose body names the ``TEN_SECONDLY_ROLLING`` or ``SECONDLY`` policy is retried;
``DAILY`` stops the run (no wait inside a run cures it); 401 stops the run; a multi-status
answer's ``errors[]`` fail the rows their ``context`` names.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from audsync.delivery.http import Verdict
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RowError,
)
from audsync.destinations.common import (
    KeyRule,
    ListLifecycle,
    json_body,
    known_changes,
    open_list,
)

logger = logging.getLogger("audsync.destinations.hubspot")

# -- the API ------------------------------------------------------------------------------

API_BASE = "https://api.hubapi.com"
DEFAULT_API_VERSION = "2026-03"
"""HubSpot's date-versioned CRM APIs (published 2026-03-30); ``api_version: v3`` selects the
legacy paths while HubSpot still serves them."""
_DATED = re.compile(r"^\d{4}-\d{2}$")


def api_paths(version: str) -> tuple[str, str]:
    """The objects and lists prefixes for ``version`` (``2026-03`` or ``v3``)."""
    if version == "v3":
        return "/crm/v3/objects", "/crm/v3/lists"
    return f"/crm/objects/{version}", f"/crm/lists/{version}"

CONTACT_OBJECT_TYPE_ID = "0-1"
MAX_BATCH_INPUTS = 100
MEMBERSHIP_PAGE = 250
"""Record ids a page of list memberships (HubSpot's most)."""
"""Inputs of one batch upsert or batch read (HubSpot's limit)."""
WRITABLE_LIST_TYPES = frozenset({"MANUAL", "SNAPSHOT"})
"""Processing types whose membership the API lets us change (DYNAMIC lists are filter-driven)."""
DAILY_POLICY = "DAILY"
"""The one 429 policy that stops the run; TEN_SECONDLY_ROLLING and SECONDLY are retried."""
NO_RESULT_MESSAGE = (
    "HubSpot's answer to the upsert listed neither a record nor an error for this contact"
)
UPSERT_ROUNDS = 3
"""Upserts of one batch after whole-batch validation errors took their rows out."""

# -- identifiers --------------------------------------------------------------------------

EMAIL_PROPERTY = "email"
"""The default ``id_property``: keys are emails, trimmed and lowercased by
:func:`audsync.identifiers.normalize_email` (HubSpot stores contact emails lowercased)."""
_EMAIL_LIKE = re.compile(r"[^\s\"'<>,;:\[\]()\\{}]+@[^\s\"'<>,;:\[\]()\\{}]+")


def property_value(value: Any) -> str:
    """A mapped value as a HubSpot property value: HubSpot properties are strings on the wire.

    ``None`` becomes ``""``, which clears the property (an update must be able to blank a
    field); booleans ``true``/``false``; numbers without exponent; dates ISO 8601; a list is a
    multi-select value (``;``-separated).

    Raises:
        ValueError: a value with no property form (``NaN``, infinity, a mapping, bytes).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a finite number")
        return format(value, "f")
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return ";".join(property_value(v) for v in value)
    raise ValueError(f"a {type(value).__name__} value has no HubSpot property form")


def _accept_not_found(response: requests.Response) -> Verdict | None:
    """Per-request hook: HubSpot's own 404 (a JSON error) says the list or contact does not
    exist, an answer to read. A 404 without it (a proxy, a wrong ``base_url``) is left to the
    default policy, so that it is never taken for "nothing there"."""
    if response.status_code != 404:
        return None
    answer = json_body(response)
    return Verdict.ok() if isinstance(answer, dict) and answer.get("status") == "error" else None


def _accept_validation_error(response: requests.Response) -> Verdict | None:
    """Per-request hook for upserts: a 400 is read, to fail only the rows it names."""
    return Verdict.ok() if response.status_code == 400 else None


class HubspotListConnector(Connector):
    """Keep a HubSpot MANUAL or SNAPSHOT contact list in step with an audience.

    Adds and updates upsert the contact by email (mapped fields become contact properties) and
    add its record id to the list; removals take the record id out of the list (the contact
    itself is kept: removing a member from an audience never deletes a CRM record).
    """

    type: ClassVar[str] = "hubspot_list"
    description: ClassVar[str] = (
        "HubSpot contact list (MANUAL/SNAPSHOT): contacts upserted by email, membership by id"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "access_token",
            "a private app token or OAuth access token (scopes crm.objects.contacts.write,"
            " crm.lists.write)",
            required=True,
            secret=True,
        ),
        ConfigKey("list_id", "the id of a MANUAL or SNAPSHOT contact list"),
        ConfigKey(
            "create_if_missing",
            "create a MANUAL list named list_name when no list_id is set (once; reused after)",
            default=False,
        ),
        ConfigKey("list_name", "the name of the list to create (default: the sync's name)"),
        ConfigKey(
            "api_version",
            "the CRM API version: a date version (YYYY-MM) or v3",
            default=DEFAULT_API_VERSION,
        ),
        ConfigKey(
            "id_property",
            "the unique contact property the audience key matches (emails are trimmed and"
            " lowercased; other properties are trimmed)",
            default=EMAIL_PROPERTY,
        ),
    )
    max_batch_size: ClassVar[int] = MAX_BATCH_INPUTS
    default_batch_size: ClassVar[int | None] = MAX_BATCH_INPUTS
    # HubSpot limits requests per 10 s per account (100 on the smallest plans, up to 250), not
    # connections; a few threads keep the pipe full, and the rate limit below does the pacing.
    max_concurrency: ClassVar[int] = 10
    default_concurrency: ClassVar[int] = 4
    # 100 requests per 10 s is the lowest plan's allowance: stay under it unless told more.
    default_rate_limit: ClassVar[float | None] = 10.0
    returns_destination_ids: ClassVar[bool] = True
    can_list_members: ClassVar[bool] = True

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        self._token = str(self.setting("access_token") or "")
        if not self._token:
            raise FatalDestinationError(f"destination {name!r}: key 'access_token' is not set")
        self._id_property = str(self.setting("id_property") or EMAIL_PROPERTY).strip()
        # Keys as HubSpot stores the id property's values.
        self._keys = KeyRule(email=self._id_property == EMAIL_PROPERTY, what=self._id_property)
        self._headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        self._list_id: str | None = None
        version = str(self.setting("api_version") or DEFAULT_API_VERSION).strip().lower()
        if version != "v3" and not _DATED.match(version):
            raise FatalDestinationError(
                f"destination {name!r}: api_version must be a date version such as"
                f" {DEFAULT_API_VERSION} or v3, got {version!r}"
            )
        self.api_version = version
        objects, lists = api_paths(version)
        self._upsert_path = f"{objects}/contacts/batch/upsert"
        self._read_path = f"{objects}/contacts/batch/read"
        self._lists_path = lists

    def secret_values(self) -> list[str]:
        """The access token, wherever it was set (destination or sync config)."""
        return [v for v in {*super().secret_values(), self._token} if v]

    # -- answers ----------------------------------------------------------------------------

    def classify(self, response: requests.Response) -> Verdict | None:
        """Sort HubSpot's rate limits (policy in the 429 body) and auth failures."""
        status = response.status_code
        if status == 429:
            answer = json_body(response)
            policy = answer.get("policyName") if isinstance(answer, dict) else None
            if policy == DAILY_POLICY:
                return Verdict.fatal(
                    "HubSpot's DAILY API limit for this account is used up; it resets at"
                    " midnight in the account's time zone, and the next run sends the rest"
                )
            # TEN_SECONDLY_ROLLING, SECONDLY, or no policy named: a window of seconds.
            return Verdict.retry(
                code="rate_limit", message=f"HubSpot rate limit {policy or '(no policy named)'}"
            )
        if status == 401:
            answer = json_body(response)
            category = answer.get("category") if isinstance(answer, dict) else None
            return Verdict.fatal(
                f"HubSpot refused the access token (401 {category or 'unauthorized'}):"
                " it is invalid or expired; set a fresh one in access_token"
            )
        return None

    # -- the list ---------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Find the list (:func:`~audsync.destinations.common.open_list`): ``list_id``, else
        the one an earlier run created, else one named ``list_name``, else a new MANUAL list
        (``create_if_missing``). Returns ``{"list_id": ...}``.

        Raises:
            FatalDestinationError: no list configured and ``create_if_missing`` off, the list
                does not exist, or it is a DYNAMIC list whose membership cannot be set.
        """
        self._list_id, state = open_list(
            self,
            ListLifecycle(
                key="list_id",
                what="list",
                name=str(self.setting("list_name") or self.sync.name),
                exists=self._writable_list_exists,
                find=self._find_list,
                create=self._create_list,
                how_to_create="create_if_missing: true to create a MANUAL list",
            ),
        )
        return state

    def _writable_list_exists(self, list_id: str) -> bool:
        found = self._fetch_list(list_id)
        if found is None:
            return False
        self._check_writable(found, list_id)
        return True

    def _fetch_list(self, list_id: str) -> dict[str, Any] | None:
        """The list's description, or ``None`` when it does not exist."""
        response = self.http.request(
            "GET",
            self.url(f"{self._lists_path}/{quote(list_id, safe='')}", API_BASE),
            headers=self._headers,
            classify=_accept_not_found,
        )
        if response.status_code == 404:
            return None
        answer = json_body(response)
        found = answer.get("list") if isinstance(answer, dict) else None
        return found if isinstance(found, dict) else None

    def _check_writable(self, found: Mapping[str, Any], list_id: str) -> None:
        processing = found.get("processingType")
        if processing not in WRITABLE_LIST_TYPES:
            raise FatalDestinationError(
                f"destination {self.name!r}: list {list_id} is {processing or 'of unknown type'};"
                " only MANUAL and SNAPSHOT lists take members through the API"
            )
        object_type = found.get("objectTypeId")
        if object_type not in (None, CONTACT_OBJECT_TYPE_ID):
            raise FatalDestinationError(
                f"destination {self.name!r}: list {list_id} holds objects of type"
                f" {object_type}, not contacts ({CONTACT_OBJECT_TYPE_ID})"
            )

    def _find_list(self, list_name: str) -> str | None:
        """The id of the contact list named ``list_name`` (HubSpot's names are unique)."""
        response = self.http.request(
            "GET",
            self.url(
                f"{self._lists_path}/object-type-id/{CONTACT_OBJECT_TYPE_ID}/name/"
                f"{quote(list_name, safe='')}",
                API_BASE,
            ),
            headers=self._headers,
            classify=_accept_not_found,
        )
        if response.status_code == 404:
            return None
        answer = json_body(response)
        found = answer.get("list") if isinstance(answer, dict) else None
        if isinstance(found, dict) and found.get("listId") not in (None, ""):
            list_id = str(found["listId"])
            self._check_writable(found, list_id)
            return list_id
        return None

    def _create_list(self, list_name: str, http: Any) -> str:
        """Create a MANUAL contact list through ``http`` (no retries); its id."""
        response = http.request(
            "POST",
            self.url(self._lists_path, API_BASE),
            json={
                "name": list_name,
                "objectTypeId": CONTACT_OBJECT_TYPE_ID,
                "processingType": "MANUAL",
            },
            headers=self._headers,
        )
        answer = json_body(response)
        created = answer.get("list") if isinstance(answer, dict) else None
        if not isinstance(created, dict) or created.get("listId") in (None, ""):
            raise FatalDestinationError(
                f"destination {self.name!r}: HubSpot's answer to creating list {list_name!r}"
                " has no listId"
            )
        return str(created["listId"])

    # -- reading the membership back (audsync verify) ---------------------------------------

    def list_members(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of the list's members: record ids from ``.../memberships`` (cursor
        ``paging.next.after``), their id property read in batches of 100."""
        list_id = self._require_list_id()
        after: str | None = None
        while True:
            params = {"limit": str(MEMBERSHIP_PAGE)}
            if after:
                params["after"] = after
            response = self.http.request(
                "GET",
                self.url(f"{self._lists_path}/{quote(list_id, safe='')}/memberships", API_BASE),
                params=params,
                headers=self._headers,
            )
            answer = json_body(response) or {}
            ids = [str(r["recordId"]) for r in answer.get("results") or [] if r.get("recordId")]
            for start in range(0, len(ids), MAX_BATCH_INPUTS):
                yield self._keys_of(ids[start : start + MAX_BATCH_INPUTS])
            after = ((answer.get("paging") or {}).get("next") or {}).get("after")
            if not after or not ids:
                return

    def _keys_of(self, record_ids: list[str]) -> list[tuple[str, str | None]]:
        response = self.http.request(
            "POST",
            self.url(self._read_path, API_BASE),
            json={"inputs": [{"id": i} for i in record_ids], "properties": [self._id_property]},
            headers=self._headers,
        )
        found = []
        for result in (json_body(response) or {}).get("results") or []:
            key = self._keys.known((result.get("properties") or {}).get(self._id_property))
            if key is not None and result.get("id"):
                found.append((key, str(result["id"])))
        return found

    def listed_key_casefold(self) -> bool:
        """Emails are compared lowercased; another id property as it is."""
        return self._keys.email

    def _require_list_id(self) -> str:
        if self._list_id is None:
            raise FatalDestinationError(
                f"destination {self.name!r}: the connector was not opened (no list id)"
            )
        return self._list_id

    # -- sending ----------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Upsert the adds and updates, look up unknown removals, then one membership call."""
        list_id = self._require_list_id()
        rejected: list[RowError] = []
        # Contacts to upsert: normalised id -> properties, and the changes behind each (two
        # keys of the audience may normalise to one contact: both get its record id).
        properties: dict[str, dict[str, str]] = {}
        upsert_changes: dict[str, list[Change]] = {}
        removals: list[tuple[Change, str]] = []
        for change, normalised in known_changes(batch, self._keys.normalise, rejected):
            if change.op == "remove":
                removals.append((change, normalised))
                continue
            try:
                values = {
                    str(name): property_value(value)
                    for name, value in (change.fields or {}).items()
                }
            except ValueError as exc:
                rejected.append(RowError(change.key, change.op, "invalid_value", str(exc)))
                continue
            # The id property is set too: a contact created by this upsert gets its email.
            values[self._id_property] = normalised
            properties[normalised] = values
            upsert_changes.setdefault(normalised, []).append(change)

        record_ids, upsert_errors = self._upsert(properties)
        for normalised, (code, message, retryable) in upsert_errors.items():
            for change in upsert_changes[normalised]:
                rejected.append(RowError(change.key, change.op, code, message, retryable))

        add_ids = {record_ids[n]: n for n in upsert_changes if n in record_ids}
        remove_ids: dict[str, list[Change]] = {}
        unknown = [(c, n) for c, n in removals if not c.destination_id]
        found = self._lookup([n for _, n in unknown]) if unknown else {}
        for change, normalised in removals:
            record_id = change.destination_id or found.get(normalised)
            # No record id: the contact does not exist, so it is in no list; removed already.
            if record_id:
                remove_ids.setdefault(str(record_id), []).append(change)
        # One record both added and removed (two audience keys for one contact, one leaving
        # and one joining): it stays, as the member still in the audience asks.
        for record_id in add_ids:
            remove_ids.pop(record_id, None)

        missing: set[str] = set()
        if add_ids or remove_ids:
            missing = self._change_membership(list_id, sorted(add_ids), sorted(remove_ids))

        destination_ids: dict[str, str] = {}
        for record_id, normalised in add_ids.items():
            for change in upsert_changes[normalised]:
                if record_id in missing:
                    # Upserted a moment ago yet unknown to the list: deleted or merged since.
                    rejected.append(
                        RowError(
                            change.key,
                            change.op,
                            "record_missing",
                            f"HubSpot listed record {record_id} as missing when adding it to"
                            " the list",
                            retryable=True,
                        )
                    )
                else:
                    destination_ids[change.key] = record_id
        # Removals of missing records succeed: a record that does not exist is in no list.
        return BatchResult(rejected=rejected, destination_ids=destination_ids)

    def _upsert(
        self, properties: Mapping[str, dict[str, str]]
    ) -> tuple[dict[str, str], dict[str, tuple[str, str, bool]]]:
        """Upsert contacts; return record ids and errors, both by normalised id.

        A multi-status answer (207) lists failed inputs under ``errors[]`` with the ids in
        ``context``. Whether HubSpot ever fails a whole batch with a 400 for one bad input is
        **unconfirmed**; if it does, the inputs its errors name are failed and the others sent
        again, and a 400 that names none fails every contact of the upsert.
        """
        pending = dict(properties)
        record_ids: dict[str, str] = {}
        errors: dict[str, tuple[str, str, bool]] = {}
        for _ in range(UPSERT_ROUNDS):
            if not pending:
                break
            body = {
                "inputs": [
                    {"idProperty": self._id_property, "id": normalised, "properties": values}
                    for normalised, values in pending.items()
                ]
            }
            response = self.http.request(
                "POST",
                self.url(self._upsert_path, API_BASE),
                json=body,
                headers=self._headers,
                classify=_accept_validation_error,
            )
            answer = json_body(response)
            if response.status_code == 400:
                blamed = self._blame(answer, pending)
                if not blamed:
                    # Nothing names a row: every contact of this upsert fails with the answer
                    # (the batch's removals still go ahead).
                    message = answer.get("message") if isinstance(answer, dict) else None
                    category = answer.get("category") if isinstance(answer, dict) else None
                    text = str(message or response.text or "HubSpot refused the upsert")[:500]
                    code = str(category or "400").lower()
                    for normalised in pending:
                        errors[normalised] = (code, text, False)
                    pending = {}
                    break
                errors.update(blamed)
                for normalised in blamed:
                    pending.pop(normalised, None)
                continue
            unplaced: list[str] = []
            for normalised, record_id in self._records(answer):
                if normalised in pending:
                    record_ids[normalised] = record_id
                else:
                    unplaced.append(record_id)
            left = {n: v for n, v in pending.items() if n not in record_ids}
            # A result without the id property can still be placed when one input is left.
            if len(unplaced) == 1 and len(left) == 1:
                record_ids[next(iter(left))] = unplaced[0]
                left = {}
            errors.update(self._blame(answer, left))
            for normalised in left:
                errors.setdefault(
                    normalised,
                    ("no_result", NO_RESULT_MESSAGE, True),
                )
            break
        for normalised in pending:
            if normalised not in record_ids:
                errors.setdefault(
                    normalised,
                    ("not_sent", "the upsert was refused repeatedly for other rows", True),
                )
        return record_ids, errors

    def _blame(self, answer: Any, candidates: Iterable[str]) -> dict[str, tuple[str, str, bool]]:
        """Errors of an answer, by the normalised ids among ``candidates`` that each names.

        An error names its rows in ``context`` (``{"ids": [...]}`` and the like); failing that,
        the email addresses its message quotes.
        """
        wanted = set(candidates)
        if not isinstance(answer, dict) or not wanted:
            return {}
        listed = answer.get("errors")
        errors = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
        if not errors and answer.get("category"):
            errors = [answer]  # a 400 that is itself the error
        blamed: dict[str, tuple[str, str, bool]] = {}
        for error in errors:
            category = str(error.get("category") or error.get("code") or "error")
            message = str(error.get("message") or category)[:500]
            named: set[str] = set()
            context = error.get("context")
            if isinstance(context, dict):
                for values in context.values():
                    for value in values if isinstance(values, list) else [values]:
                        normalised = self._keys.known(value) if isinstance(value, str) else None
                        if normalised in wanted:
                            named.add(normalised)
            if not named:
                texts = [message] + [
                    str(d.get("message") or "")
                    for d in error.get("errors") or []
                    if isinstance(d, dict)
                ]
                for text in texts:
                    for found in _EMAIL_LIKE.findall(text):
                        normalised = self._keys.known(found)
                        if normalised in wanted:
                            named.add(normalised)
            for normalised in named:
                blamed.setdefault(normalised, (category.lower(), message, False))
        return blamed

    def _lookup(self, normalised: Sequence[str]) -> dict[str, str]:
        """Record ids of existing contacts by normalised id; absent contacts are left out."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(normalised))
        for start in range(0, len(unique), MAX_BATCH_INPUTS):
            chunk = unique[start : start + MAX_BATCH_INPUTS]
            response = self.http.request(
                "POST",
                self.url(self._read_path, API_BASE),
                json={
                    "idProperty": self._id_property,
                    "inputs": [{"id": n} for n in chunk],
                    "properties": [self._id_property],
                    "propertiesWithHistory": [],
                },
                headers=self._headers,
                # A 404 here means none of them exists (OBJECT_NOT_FOUND): nothing to remove.
                classify=_accept_not_found,
            )
            if response.status_code == 404:
                continue
            wanted = set(chunk)
            for key, record_id in self._records(json_body(response)):
                if key in wanted:
                    found[key] = record_id
        return found

    def _records(self, answer: Any) -> Iterator[tuple[str | None, str]]:
        """``(id property in normal form, record id)`` of each record in an answer's
        ``results`` (an upsert's or a batch read's); ``None`` for a value it cannot place."""
        results = answer.get("results") if isinstance(answer, dict) else None
        for result in results if isinstance(results, list) else []:
            if not isinstance(result, dict) or result.get("id") in (None, ""):
                continue
            value = (result.get("properties") or {}).get(self._id_property)
            yield self._keys.known(value), str(result["id"])

    def _change_membership(
        self, list_id: str, add: Sequence[str], remove: Sequence[str]
    ) -> set[str]:
        """Add and remove record ids in one call; return the ids HubSpot reports missing."""

        def list_gone(response: requests.Response) -> Verdict | None:
            if response.status_code == 404:
                return Verdict.fatal(f"HubSpot has no list {list_id} (deleted during the run?)")
            return None

        response = self.http.request(
            "PUT",
            self.url(
                f"{self._lists_path}/{quote(list_id, safe='')}/memberships/add-and-remove",
                API_BASE,
            ),
            json={"recordIdsToAdd": list(add), "recordIdsToRemove": list(remove)},
            headers=self._headers,
            classify=list_gone,
        )
        answer = json_body(response)
        missing = answer.get("recordIdsMissing") if isinstance(answer, dict) else None
        return {str(m) for m in missing} if isinstance(missing, list) else set()


HubSpotListConnector = HubspotListConnector
"""The same class under the brief's spelling; the registry names ``HubspotListConnector``."""
