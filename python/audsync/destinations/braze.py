"""Braze: audience membership as a custom attribute of each user, through ``/users/track``.

Braze has no list object a REST key can write (cohort import is for partners only), so a sync
marks its members with a custom attribute:

* ``membership: array`` (the default): one array attribute shared by every sync
  (``membership_attribute``, default ``audsync_audiences``) holding one value per sync
  (``membership_value``, default the sync's name): ``{"add": [value]}`` when a member enters,
  ``{"remove": [value]}`` when it leaves. Segments filter on "includes value".
* ``membership: boolean``: one attribute per sync (default ``audsync_<sync>``), ``true`` on
  enter and ``false`` on exit.

Each change is one attributes object of one ``POST /users/track`` (at most 75 a request);
mapped fields are set as attributes on add and update. A member is identified by
``external_id`` (the default: the audience key is the Braze user id) or by ``email``
(``identify_by: email``: the key is normalised, trimmed and lowercased).

Safe to repeat: setting an attribute is idempotent, and an array ``add``/``remove`` is treated
as a set operation (unconfirmed in Braze's documentation; it is how every connector we read
uses it). Removals carry ``_update_existing_only: true`` so that leaving an audience can never
create a profile. ``/users/delete`` deletes profiles and is never called.

Answers: 2xx with ``{"message": "success", "errors": [{"type", "input_array", "index"}]}``,
each error naming the object (so the row) it concerns; 429 is retried after
``X-Ratelimit-Retry-After``, ``Retry-After`` or ``X-RateLimit-Reset`` (epoch seconds); 401 and
403 stop the run; another 4xx fails the batch with Braze's ``message``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from audsync.delivery.http import Verdict, dumps, json_object_answer, parse_retry_after
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RowError,
)
from audsync.destinations.common import flag, json_list, required
from audsync.identifiers import InvalidIdentifier, normalize_email

logger = logging.getLogger("audsync.destinations.braze")

# -- identifier rules --------------------------------------------------------------------

# With ``identify_by: email`` the key goes through audsync.identifiers.normalize_email
# (trimmed, lowercased, one "@"; an invalid one fails its row, ``invalid_email``, unsent). An
# ``external_id`` is sent exactly as the audience has it: Braze ids are case-sensitive.

IDENTIFY_BY = ("external_id", "email")
"""How a member is found in Braze: by the audience key as ``external_id``, or as ``email``."""

MEMBERSHIP_KINDS = ("array", "boolean")
DEFAULT_ARRAY_ATTRIBUTE = "audsync_audiences"

# Keys of an attributes object that identify the user or steer the call: not attributes a
# mapping may set. (``email`` and ``phone`` are profile fields a mapping may set when users are
# identified by ``external_id``; with ``identify_by: email`` the email is the key's.)
_RESERVED = frozenset(
    {"external_id", "user_alias", "braze_id", "_update_existing_only", "push_token_import"}
)

# An epoch timestamp rather than a number of seconds (any value after 2001-09-09).
_EPOCH_THRESHOLD = 1_000_000_000


def _seconds(value: str | None) -> float | None:
    """A rate-limit header as seconds to wait: a delay, an HTTP date, or epoch seconds."""
    seconds = parse_retry_after(value)
    if seconds is not None and seconds > _EPOCH_THRESHOLD:
        seconds = max(0.0, seconds - time.time())
    return seconds


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429 asks to wait: ``X-Ratelimit-Retry-After``, ``Retry-After``, else the reset.

    ``X-RateLimit-Reset`` is the epoch second the window reopens (destinations.md).
    """
    for name in ("X-Ratelimit-Retry-After", "Retry-After", "X-RateLimit-Reset"):
        seconds = _seconds(headers.get(name))
        if seconds is not None:
            return seconds
    return None


class BrazeConnector(Connector):
    """Mark audience members in Braze with a custom attribute, through ``/users/track``."""

    type: ClassVar[str] = "braze"
    description: ClassVar[str] = (
        "Braze users marked with a custom attribute (an array value or a boolean per sync)"
        " through /users/track"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "api_key", "a REST API key with the users.track permission", required=True, secret=True
        ),
        ConfigKey(
            "rest_endpoint",
            "your cluster's REST endpoint, e.g. https://rest.iad-01.braze.com (or just iad-01);"
            " required unless base_url is set",
        ),
        ConfigKey(
            "identify_by",
            "external_id (the audience key is the Braze external_id) or email (the key is an"
            " email address, normalised)",
            default="external_id",
        ),
        ConfigKey(
            "membership",
            "array (a value in a shared array attribute) or boolean (an attribute per sync)",
            default="array",
        ),
        ConfigKey(
            "membership_attribute",
            f"the custom attribute marking members; default {DEFAULT_ARRAY_ATTRIBUTE} (array)"
            " or audsync_<sync> (boolean)",
        ),
        ConfigKey(
            "membership_value",
            "the value the array attribute holds for this sync; default: the sync's name",
        ),
        ConfigKey(
            "update_existing_only",
            "true: only update users Braze has already, never create one (removals never create"
            " one either way)",
            default=False,
        ),
    )
    max_batch_size: ClassVar[int] = 75  # attribute objects a /users/track request
    # 3,000 requests every 3 s is far above what a few threads send; 16 threads at most keeps
    # one run from crowding out an app's own tracking calls on the same key.
    max_concurrency: ClassVar[int] = 16
    default_concurrency: ClassVar[int] = 4
    returns_destination_ids: ClassVar[bool] = False

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        self._api_key = required(self, "api_key")
        self._identify_by = self._choice("identify_by", IDENTIFY_BY, "external_id")
        self._membership = self._choice("membership", MEMBERSHIP_KINDS, "array")
        default_attribute = (
            DEFAULT_ARRAY_ATTRIBUTE if self._membership == "array" else f"audsync_{sync.name}"
        )
        self._attribute = str(self.setting("membership_attribute") or default_attribute)
        if self._attribute in _RESERVED or self._attribute in ("email", "phone"):
            raise FatalDestinationError(
                f"destination {name!r}: membership_attribute {self._attribute!r} is one of"
                " Braze's identifier keys; choose a custom attribute name"
            )
        self._value = str(self.setting("membership_value") or sync.name)
        self._update_existing_only = flag(self.setting("update_existing_only", False))
        self._track_url = self.url("/users/track", self._default_base())
        self._headers = {"Authorization": f"Bearer {self._api_key}"}

    # -- configuration --------------------------------------------------------------------

    def _choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = str(self.setting(key) or default)
        if value not in allowed:
            raise FatalDestinationError(
                f"destination {self.name!r}: {key} must be one of {', '.join(allowed)},"
                f" got {value!r}"
            )
        return value

    def _default_base(self) -> str:
        """The cluster's REST endpoint: a URL as given, or ``iad-01`` made into one."""
        endpoint = str(self.setting("rest_endpoint") or "").strip()
        if not endpoint:
            if self.settings.get("base_url"):
                return str(self.settings["base_url"])
            raise FatalDestinationError(
                f"destination {self.name!r}: key 'rest_endpoint' is required (your Braze"
                " cluster's REST endpoint, e.g. https://rest.iad-01.braze.com)"
            )
        if "://" in endpoint:
            return endpoint
        if re.fullmatch(r"[a-z]{2,4}-\d{2}", endpoint):
            return f"https://rest.{endpoint}.braze.com"
        raise FatalDestinationError(
            f"destination {self.name!r}: rest_endpoint must be a URL or a cluster like iad-01,"
            f" got {endpoint!r}"
        )

    # -- the HTTP policy ------------------------------------------------------------------

    def classify(self, response: Any) -> Verdict | None:
        """429 waits as long as Braze's rate-limit headers ask; the rest is the default."""
        if response.status_code == 429:
            return Verdict.retry(retry_after(response.headers), code="429", message="rate limited")
        return None

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """One ``/users/track`` request for the batch; objects Braze lists in ``errors`` fail."""
        rejected: list[RowError] = []
        objects: list[dict[str, Any]] = []
        sent: list[Change] = []  # sent[i] is the row of attributes[i]
        for change in batch:
            built = self._attributes_object(change)
            if isinstance(built, RowError):
                rejected.append(built)
            elif built is not None:
                objects.append(built)
                sent.append(change)
        if not objects:
            return BatchResult(rejected=rejected)
        try:
            body = dumps({"attributes": objects})
        except TypeError:
            objects, sent, invalid = _encodable(objects, sent)
            rejected += invalid
            if not objects:
                return BatchResult(rejected=rejected)
            body = dumps({"attributes": objects})
        response = self.http.request(
            "POST",
            self._track_url,
            data=body,
            headers={**self._headers, "Content-Type": "application/json"},
            # Issue 10: a 2xx that is not Braze's JSON answer is retried, never a success.
            classify=json_object_answer("a Braze /users/track answer (a JSON object)"),
        )
        rejected += self._errors_in(response.content, sent)
        return BatchResult(rejected=rejected)

    def _identifier(self, change: Change) -> tuple[str, str] | RowError:
        """The identifier key and value of ``change``'s user, or why it has none."""
        if self._identify_by == "email":
            try:
                return "email", normalize_email(change.key)
            except InvalidIdentifier as exc:
                return RowError(change.key, change.op, exc.code, f"{exc.message}; not sent")
        external_id = "" if change.key is None else str(change.key)
        if not external_id.strip():
            return RowError(change.key, change.op, "invalid_external_id", "empty external_id")
        # External ids are case-sensitive in Braze: sent exactly as the audience has them.
        return "external_id", external_id

    def _attributes_object(self, change: Change) -> dict[str, Any] | RowError | None:
        """The attributes object of one change (``None``: nothing to send)."""
        identifier = self._identifier(change)
        if isinstance(identifier, RowError):
            return identifier
        id_key, id_value = identifier
        obj: dict[str, Any] = {id_key: id_value}
        if change.op in ("add", "update"):
            for name, value in (change.fields or {}).items():
                if name in _RESERVED or name == id_key or name == self._attribute:
                    # The identifier is the (normalised) key; membership is ours to set.
                    continue
                if name == "email" and isinstance(value, str):
                    value = _email_or_as_is(value)
                obj[name] = value
        if change.op == "add":
            obj[self._attribute] = self._enter_value()
            if self._update_existing_only:
                obj["_update_existing_only"] = True
        elif change.op == "update":
            # The member is in the audience already; an update sends its new values (and in
            # boolean mode re-asserts membership, which is idempotent). In array mode the
            # value is not added again, so a set-semantics doubt costs nothing here.
            if self._membership == "boolean":
                obj[self._attribute] = True
            if len(obj) == 1:
                return None  # no field to set
            if self._update_existing_only:
                obj["_update_existing_only"] = True
        elif change.op == "remove":
            obj[self._attribute] = self._exit_value()
            # Leaving an audience must never create a profile.
            obj["_update_existing_only"] = True
        else:
            return RowError(change.key, change.op, "unknown_op", f"unknown op {change.op!r}")
        return obj

    def _enter_value(self) -> Any:
        return {"add": [self._value]} if self._membership == "array" else True

    def _exit_value(self) -> Any:
        return {"remove": [self._value]} if self._membership == "array" else False

    def _errors_in(self, content: bytes, sent: Sequence[Change]) -> list[RowError]:
        """Rows of the objects the answer's ``errors`` name by ``index``."""
        errors = json_list(content, "errors")
        if not errors:
            return []
        rejected: dict[int, RowError] = {}
        unknown = 0
        for error in errors:
            if not isinstance(error, dict):
                unknown += 1
                continue
            index = error.get("index")
            array = error.get("input_array", "attributes")
            if array != "attributes" or not isinstance(index, int) or not 0 <= index < len(sent):
                unknown += 1
                continue
            change = sent[index]
            message = str(error.get("type") or "rejected by Braze")[:500]
            rejected.setdefault(index, RowError(change.key, change.op, "rejected", message))
        if unknown:
            logger.warning(
                "destination %r: %d errors in a /users/track answer name no object of the"
                " request; ignored",
                self.name,
                unknown,
            )
        return list(rejected.values())


def _email_or_as_is(value: str) -> str:
    """A mapped email attribute normalised, or as it is when it is no address (Braze then
    lists it in ``errors[]`` for its row)."""
    try:
        return normalize_email(value)
    except InvalidIdentifier:
        return value


def _encodable(
    objects: list[dict[str, Any]], sent: list[Change]
) -> tuple[list[dict[str, Any]], list[Change], list[RowError]]:
    """The objects that can be sent as JSON, their rows, and the rows that cannot."""
    keep_objects: list[dict[str, Any]] = []
    keep_rows: list[Change] = []
    invalid: list[RowError] = []
    for obj, change in zip(objects, sent):
        try:
            dumps(obj)
        except TypeError as exc:
            invalid.append(RowError(change.key, change.op, "invalid_value", str(exc)[:500]))
            continue
        keep_objects.append(obj)
        keep_rows.append(change)
    return keep_objects, keep_rows, invalid
