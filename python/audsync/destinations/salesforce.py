"""Salesforce campaign members: audience members become CampaignMembers of one campaign.

Each batch (at most 200 rows, the sObject Collections limit) runs, under
``{instance_url}/services/data/{api_version}`` with ``Authorization: Bearer <token>``:

1. **Contacts.** Adds and updates need a Contact id. By default contacts are found, not
   created: a SOQL query ``SELECT Id, <match field> FROM Contact WHERE <match field> IN (...)``
   (values escaped as SOQL string literals, the ``IN`` list cut so that the URL stays short); a
   member with no contact fails alone with ``contact_not_found``. With ``upsert_contacts: true``
   the contacts are upserted instead by an external id field
   (``PATCH /composite/sobjects/Contact/{field}``), mapped fields as Contact fields.
2. **Members.** ``POST /composite/sobjects`` with ``allOrNone: false`` creates the
   CampaignMembers. Create is not idempotent: a member that exists fails with
   ``DUPLICATE_VALUE``, which counts as success, and its id is looked up
   (``SELECT Id, ContactId FROM CampaignMember WHERE CampaignId = ... AND ContactId IN (...)``).
   The member ids are returned as ``destination_ids``.
3. **Removals.** ``DELETE /composite/sobjects?ids=...&allOrNone=false`` with the member ids the
   snapshot kept; for a member without one, the contact and then the member are looked up
   first. A member already deleted counts as removed (at-least-once delivery repeats deletes).

Members are Contacts by default; ``member_type: Lead`` makes them of Leads (``LeadId``), found
or upserted the same way.

Credentials (:mod:`audsync.destinations.auth`): the OAuth refresh-token flow (``client_id``,
``client_secret``, ``refresh_token``), the JWT bearer flow (``client_id``, ``username``, and
the connected app's certificate key as ``private_key`` or ``private_key_file``), or a static
``access_token``. Both flows post to ``{login_url}/services/oauth2/token`` (``token_url``
overrides it); the answer's ``instance_url`` is used when ``instance_url`` is not set.
Salesforce states no expiry: a session is renewed after a 401 ``INVALID_SESSION_ID`` (once per
request, the request then sent again) or after ``token_lifetime_s`` when set.

Failures: a 401 that a refresh does not cure and 403 ``REQUEST_LIMIT_EXCEEDED`` stop the run; 503 and
``UNABLE_TO_LOCK_ROW`` (for a whole request, or for records inside a collection answer) are
retried; other per-record errors fail their rows with Salesforce's ``statusCode``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from pathlib import Path
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from audsync.delivery.http import Verdict, dumps
from audsync.destinations.auth import (
    BearerAuth,
    JwtBearerGrant,
    RefreshTokenGrant,
    StaticToken,
    TokenSource,
)
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
    yes_no,
)

logger = logging.getLogger("audsync.destinations.salesforce")

# -- the API ------------------------------------------------------------------------------

DEFAULT_API_VERSION = "v66.0"
"""Spring '26 (destinations.md, "Versions to default to"); ``api_version`` picks another."""
LOGIN_URL = "https://login.salesforce.com"
JWT_LIFETIME_S = 180
"""Salesforce refuses a JWT bearer assertion whose ``exp`` is more than three minutes away."""
COLLECTION_LIMIT = 200
"""Records of one sObject Collections request (create, upsert, delete)."""
QUERY_URL_BUDGET = 6000
"""Most characters of an encoded SOQL query in one URL. Salesforce refuses URIs over 16,384
bytes; staying far below leaves room for the host, path and a proxy's own limits."""
LOCK_RETRIES = 3
"""Resends of records failing with ``UNABLE_TO_LOCK_ROW`` inside one collection answer."""
LOCK_BACKOFF_S = 0.25
USAGE_WARNING = 0.9
"""Share of the daily API allocation (``Sforce-Limit-Info``) over which a warning is logged."""

DUPLICATE_MEMBER = "DUPLICATE_VALUE"
ALREADY_DELETED = frozenset({"ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"})
"""Delete answers meaning the record is gone already. Which code a delete of a deleted or
unknown id gets is **unconfirmed** (ENTITY_IS_DELETED for a record in the recycle bin is
documented); both are taken as "removed", the safe reading for a repeated delete."""
RETRIABLE_RECORD_ERRORS = frozenset({"UNABLE_TO_LOCK_ROW"})

# -- identifiers and names -----------------------------------------------------------------

EMAIL_FIELD = "Email"
MEMBER_TYPES = {"Contact": "ContactId", "Lead": "LeadId"}
"""The records a CampaignMember can be made of, and the member's field naming each."""
_API_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SALESFORCE_ID = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")
_API_VERSION = re.compile(r"^v?(\d{2,3})(?:\.(\d))?$")
# SOQL string literal escapes (the SOQL reference's "Quoted String Escape Sequences"; the same
# table simple-salesforce uses).
_SOQL_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "'": "\\'",
        '"': '\\"',
        "\n": "\\n",
        "\r": "\\r",
        "\t": "\\t",
        "\b": "\\b",
        "\f": "\\f",
    }
)


def soql_quote(value: str) -> str:
    """``value`` as a SOQL string literal: quoted, with backslash escapes."""
    return "'" + value.translate(_SOQL_ESCAPES) + "'"


def api_version(value: Any) -> str:
    """``62``, ``"62.0"`` or ``"v62.0"`` as ``"v62.0"``.

    Raises:
        ValueError: anything else.
    """
    match = _API_VERSION.match(str(value).strip())
    if not match:
        raise ValueError(f"api_version must look like v62.0, got {value!r}")
    return f"v{match.group(1)}.{match.group(2) or '0'}"


def _errors_of(answer: Any) -> list[tuple[str, str]]:
    """``(errorCode, message)`` of a request-level error answer (a JSON array of errors)."""
    items = answer if isinstance(answer, list) else [answer] if isinstance(answer, dict) else []
    found = []
    for item in items:
        if isinstance(item, dict) and (item.get("errorCode") or item.get("message")):
            found.append((str(item.get("errorCode") or ""), str(item.get("message") or "")))
    return found


def _record_error(result: Any) -> tuple[str, str]:
    """The first ``(statusCode, message)`` of a collection result that did not succeed."""
    errors = result.get("errors") if isinstance(result, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        message = str(first.get("message") or first.get("statusCode") or "error")
        fields = first.get("fields")
        if fields:
            message += f" (fields: {', '.join(map(str, fields))})"
        return str(first.get("statusCode") or "ERROR"), message[:500]
    return "ERROR", "Salesforce reported a failure without an error"


def _retriable(result: Any) -> bool:
    """Whether a collection result failed with an error worth sending again (a lock)."""
    if isinstance(result, dict) and result.get("success"):
        return False
    return _record_error(result)[0] in RETRIABLE_RECORD_ERRORS


def _one_each(answer: Any, count: int) -> list[Any]:
    """A collection answer's results, one for each of the ``count`` records sent (``None``
    for a record it has no result for)."""
    answer = answer if isinstance(answer, list) else []
    return [answer[position] if position < len(answer) else None for position in range(count)]


def _resend_locked(count: int, send: Callable[[list[int]], list[Any]]) -> list[Any]:
    """The results of ``count`` records in order, sent by ``send`` (record indexes in, their
    results in the same order out).

    Records failing with ``UNABLE_TO_LOCK_ROW`` are sent again a few times, after a short
    pause: another transaction holds the row (the campaign, usually) for a moment.
    """
    results: list[Any] = [None] * count
    pending = list(range(count))
    for attempt in range(LOCK_RETRIES + 1):
        if attempt:
            time.sleep(LOCK_BACKOFF_S * 2 ** (attempt - 1))
        retry: list[int] = []
        for index, result in zip(pending, send(pending)):
            results[index] = result
            if _retriable(result):
                retry.append(index)
        pending = retry
        if not pending:
            break
    return results


def _accept_not_found(response: requests.Response) -> Verdict | None:
    """Per-request hook: Salesforce's own 404 (``NOT_FOUND``) is an answer to read; another
    404 (a proxy, a wrong ``base_url``) is left to the default policy."""
    if response.status_code != 404:
        return None
    codes = {code for code, _ in _errors_of(json_body(response))}
    return Verdict.ok() if "NOT_FOUND" in codes else None


def _invalid_number(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Decimal):
        return not value.is_finite()
    return False


class SalesforceCampaignConnector(Connector):
    """Keep the members of a Salesforce campaign in step with an audience (by Contact).

    Mapped fields are written only with ``upsert_contacts`` (as Contact fields); without it the
    connector sets membership alone, and an update re-adds the member (idempotently). Removal
    deletes the CampaignMember, never the Contact.
    """

    type: ClassVar[str] = "salesforce_campaign"
    description: ClassVar[str] = (
        "Salesforce campaign members: contacts found (or upserted) by email or an external id"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "instance_url",
            "the org's URL, e.g. https://yourorg.my.salesforce.com (default: the one the token"
            " endpoint answers)",
        ),
        ConfigKey("client_id", "the connected app's consumer key (refresh-token or JWT flow)"),
        ConfigKey("client_secret", "the connected app's consumer secret", secret=True),
        ConfigKey("refresh_token", "an OAuth refresh token (refresh-token flow)", secret=True),
        ConfigKey("username", "the user the JWT bearer flow acts as"),
        ConfigKey(
            "private_key", "PEM private key of the connected app's certificate (JWT flow)",
            secret=True,
        ),
        ConfigKey("private_key_file", "path of that PEM key (relative to the dbt project)"),
        ConfigKey(
            "login_url",
            "https://login.salesforce.com, https://test.salesforce.com for a sandbox, or the"
            " org's My Domain URL",
            default=LOGIN_URL,
        ),
        ConfigKey("token_url", "the token endpoint (default: {login_url}/services/oauth2/token)"),
        ConfigKey(
            "token_lifetime_s", "renew the session after this many seconds (default: on a 401)"
        ),
        ConfigKey("access_token", "a static OAuth access token (session id)", secret=True),
        ConfigKey("campaign_id", "the campaign whose members the audience sets"),
        ConfigKey(
            "create_if_missing",
            "create an active campaign named campaign_name when no campaign_id is set (once)",
            default=False,
        ),
        ConfigKey("campaign_name", "the name of the campaign to create (default: the sync's name)"),
        ConfigKey("api_version", "the REST API version", default=DEFAULT_API_VERSION),
        ConfigKey(
            "contact_match_field",
            "the Contact field the audience key matches: Email, or an external id field",
            default=EMAIL_FIELD,
        ),
        ConfigKey(
            "upsert_contacts",
            "create or update contacts by contact_match_field (an external id field), mapped"
            " fields as Contact fields; otherwise a member without a contact fails",
            default=False,
        ),
        ConfigKey(
            "identifier_type",
            "email (keys trimmed and lowercased, invalid ones refused) or text (trimmed)",
            default="email",
        ),
        ConfigKey("member_status", "the CampaignMember Status to set (default: the campaign's)"),
        ConfigKey(
            "member_type",
            "Contact or Lead: the records campaign members are made of (found, or upserted,"
            " by contact_match_field)",
            default="Contact",
        ),
    )
    max_batch_size: ClassVar[int] = COLLECTION_LIMIT
    default_batch_size: ClassVar[int | None] = COLLECTION_LIMIT
    # Members of one campaign contend for the campaign's row lock (its member counts), so
    # parallel inserts mostly buy UNABLE_TO_LOCK_ROW; two threads overlap a query with a write.
    max_concurrency: ClassVar[int] = 8
    default_concurrency: ClassVar[int] = 2
    # Salesforce meters a daily allocation, not a rate: no pacing by default.
    default_rate_limit: ClassVar[float | None] = None
    returns_destination_ids: ClassVar[bool] = True
    can_list_members: ClassVar[bool] = True

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        where = f"destination {name!r}"
        self._key_secrets: list[str] = []
        self._auth = BearerAuth(self._token_source(), http)
        instance = str(self.setting("instance_url") or self.settings.get("base_url") or "")
        if instance and not instance.startswith(("https://", "http://")):
            raise FatalDestinationError(
                f"{where}: key 'instance_url' must be the org's https URL, got {instance!r}"
            )
        if not instance and not self._auth.source.refreshable:
            raise FatalDestinationError(f"{where}: key 'instance_url' is not set")
        self._instance = instance.rstrip("/") or None
        try:
            self._version = api_version(self.setting("api_version") or DEFAULT_API_VERSION)
        except ValueError as exc:
            raise FatalDestinationError(f"{where}: {exc}") from None
        person = str(self.setting("member_type") or "Contact").strip().capitalize()
        if person not in MEMBER_TYPES:
            raise FatalDestinationError(
                f"{where}: member_type must be Contact or Lead, got {person!r}"
            )
        self._person = person
        self._person_field = MEMBER_TYPES[person]
        self._match_field = str(self.setting("contact_match_field") or EMAIL_FIELD).strip()
        if not _API_NAME.match(self._match_field):
            raise FatalDestinationError(
                f"{where}: contact_match_field {self._match_field!r} is not a field API name"
            )
        self._upsert = yes_no(self, "upsert_contacts")
        if self._upsert and self._match_field.lower() == EMAIL_FIELD.lower():
            # Salesforce upserts only by an External ID field, and Email cannot be one.
            raise FatalDestinationError(
                f"{where}: upsert_contacts needs contact_match_field set to an External ID"
                " field of Contact (Email cannot be one)"
            )
        kind = str(self.setting("identifier_type") or "email").strip().lower()
        if kind not in ("email", "text"):
            raise FatalDestinationError(
                f"{where}: identifier_type must be email or text, got {kind!r}"
            )
        # Keys as matched against the Contact field; matching on Email always means emails.
        self._keys = KeyRule(
            email=kind == "email" or self._match_field.lower() == EMAIL_FIELD.lower()
        )
        status = self.setting("member_status")
        self._member_status = str(status) if status not in (None, "") else None
        self._headers = {"Accept": "application/json"}
        self._campaign_id: str | None = None
        self._usage_lock = threading.Lock()
        self._usage_warned = False

    def _token_source(self) -> TokenSource:
        """The credentials: the JWT bearer flow, else the refresh-token flow, else a static
        token."""
        where = f"destination {self.name!r}"
        login = str(self.setting("login_url") or LOGIN_URL).strip().rstrip("/")
        token_url = str(self.setting("token_url") or f"{login}/services/oauth2/token").strip()
        lifetime = self.setting("token_lifetime_s")
        try:
            lifetime_s = float(lifetime) if lifetime not in (None, "") else None
        except (TypeError, ValueError):
            raise FatalDestinationError(
                f"{where}: token_lifetime_s must be a number of seconds, got {lifetime!r}"
            ) from None
        key = self.setting("private_key")
        key_file = self.setting("private_key_file")
        if key or key_file:
            if not key:
                path = Path(self.sync.project_dir or ".") / Path(str(key_file)).expanduser()
                try:
                    key = path.read_text("utf-8")
                except OSError as exc:
                    raise FatalDestinationError(
                        f"{where}: cannot read private_key_file {str(path)!r}"
                        f" ({exc.strerror or exc})"
                    ) from None
                self._key_secrets.append(str(key))
            client_id = str(self.setting("client_id") or "").strip()
            username = str(self.setting("username") or "").strip()
            if not client_id or not username:
                raise FatalDestinationError(
                    f"{where}: the JWT bearer flow needs client_id (the consumer key) and"
                    " username beside the private key"
                )
            return JwtBearerGrant(
                self.name,
                token_url,
                claims={"iss": client_id, "sub": username, "aud": login},
                private_key=str(key),
                assertion_lifetime_s=JWT_LIFETIME_S,
                lifetime_s=lifetime_s,
            )
        if self.setting("refresh_token"):
            client_id = str(self.setting("client_id") or "").strip()
            if not client_id:
                raise FatalDestinationError(f"{where}: the refresh-token flow needs client_id")
            return RefreshTokenGrant(
                self.name,
                token_url,
                client_id=client_id,
                client_secret=str(self.setting("client_secret") or "").strip() or None,
                refresh_token=str(self.setting("refresh_token")).strip(),
                lifetime_s=lifetime_s,
            )
        token = str(self.setting("access_token") or "")
        if not token:
            raise FatalDestinationError(
                f"{where}: no credentials; set client_id and refresh_token (refresh-token"
                " flow), client_id, username and private_key_file (JWT bearer flow), or"
                " access_token"
            )
        return StaticToken(self.name, token)

    def secret_values(self) -> list[str]:
        """The settings' secrets (the access token wherever it was set) and a key file's key."""
        static = self._auth.source.value if isinstance(self._auth.source, StaticToken) else ""
        return [v for v in {*super().secret_values(), static, *self._key_secrets} if v]

    def _api(self, path: str) -> str:
        """A URL under ``/services/data/{version}`` of the org (or of ``base_url``)."""
        if self._instance is None:
            # Not set: the org's URL comes with the first token.
            self._auth.source.token()
            instance = str(self._auth.source.extra.get("instance_url") or "")
            if not instance.startswith(("https://", "http://")):
                raise FatalDestinationError(
                    f"destination {self.name!r}: the token endpoint gave no instance_url;"
                    " set instance_url"
                )
            self._instance = instance.rstrip("/")
        return self.url(f"/services/data/{self._version}/{path.lstrip('/')}", self._instance)

    # -- answers ----------------------------------------------------------------------------

    def classify(self, response: requests.Response) -> Verdict | None:
        """Sort Salesforce's error codes; warn once when the daily allocation runs low."""
        self._watch_usage(response)
        status = response.status_code
        if status < 400:
            return None
        errors = _errors_of(json_body(response))
        codes = {code for code, _ in errors}
        if status == 401 or "INVALID_SESSION_ID" in codes:
            if self._auth.source.refreshable:
                return Verdict.fatal(
                    "Salesforce refused a freshly obtained session (INVALID_SESSION_ID): check"
                    " the connected app's policies and the user's permissions"
                )
            return Verdict.fatal(
                "Salesforce refused the access token (INVALID_SESSION_ID): the session expired"
                " or is invalid; set a fresh access_token, or use the refresh-token or JWT"
                " bearer flow"
            )
        if "REQUEST_LIMIT_EXCEEDED" in codes:
            message = " ".join(m for c, m in errors if c == "REQUEST_LIMIT_EXCEEDED")
            if "concurrent" in message.lower():
                # ConcurrentPerOrgLongTxn: too many long requests in flight at this moment, a
                # condition of seconds, unlike the daily allocation below.
                return Verdict.retry(code="REQUEST_LIMIT_EXCEEDED", message=message[:300])
            return Verdict.fatal(
                "Salesforce's API request allocation for this org is used up"
                " (REQUEST_LIMIT_EXCEEDED); the next run sends the rest"
            )
        if codes & {"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"}:
            code = min(codes & {"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"})
            return Verdict.retry(code=code, message=" ".join(m for _, m in errors)[:300])
        if status == 403:
            text = "; ".join(f"{c}: {m}" for c, m in errors) or "403 Forbidden"
            return Verdict.fatal(f"Salesforce refused the request: {text[:300]}")
        return None

    def _watch_usage(self, response: requests.Response) -> None:
        info = response.headers.get("Sforce-Limit-Info") or ""
        match = re.search(r"api-usage=(\d+)/(\d+)", info)
        if not match or self._usage_warned:
            return
        used, limit = int(match.group(1)), int(match.group(2))
        if limit and used / limit >= USAGE_WARNING:
            with self._usage_lock:
                if self._usage_warned:
                    return
                self._usage_warned = True
            logger.warning(
                "destination %r: %d of the org's %d daily API requests are used",
                self.name,
                used,
                limit,
            )

    # -- the campaign -----------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Find the campaign (:func:`~audsync.destinations.common.open_list`):
        ``campaign_id``, else the one an earlier run created, else one named
        ``campaign_name``, else a new active one (``create_if_missing``).

        Raises:
            FatalDestinationError: no campaign configured and ``create_if_missing`` off, or
                the campaign does not exist.
        """
        self._campaign_id, state = open_list(
            self,
            ListLifecycle(
                key="campaign_id",
                what="campaign",
                name=str(self.setting("campaign_name") or self.sync.name),
                exists=self._campaign_exists,
                find=self._find_campaign,
                create=self._create_campaign,
                how_to_create="create_if_missing: true to create a campaign",
            ),
        )
        return state

    def _campaign_exists(self, campaign_id: str) -> bool:
        if not _SALESFORCE_ID.match(campaign_id):
            raise FatalDestinationError(
                f"destination {self.name!r}: {campaign_id!r} is not a Salesforce id"
            )
        response = self._auth.request(
            "GET",
            self._api(f"sobjects/Campaign/{campaign_id}") + "?fields=Id",
            headers=self._headers,
            classify=_accept_not_found,
        )
        return response.status_code != 404

    def _find_campaign(self, name: str) -> str | None:
        """The id of the campaign named ``name`` (the lowest if several), or ``None``."""
        records = self._query(f"SELECT Id FROM Campaign WHERE Name = {soql_quote(name)}")
        ids = sorted(str(r["Id"]) for r in records if r.get("Id"))
        return ids[0] if ids else None

    def _create_campaign(self, name: str, http: Any) -> str:
        """Create an active campaign through ``http`` (no retries); its id."""
        response = BearerAuth(self._auth.source, http).request(
            "POST",
            self._api("sobjects/Campaign"),
            json={"Name": name, "IsActive": True},
            headers=self._headers,
        )
        answer = json_body(response)
        created = answer.get("id") if isinstance(answer, dict) else None
        if not created:
            raise FatalDestinationError(
                f"destination {self.name!r}: Salesforce's answer to creating campaign"
                f" {name!r} has no id"
            )
        return str(created)

    def _require_campaign(self) -> str:
        if self._campaign_id is None:
            raise FatalDestinationError(
                f"destination {self.name!r}: the connector was not opened (no campaign id)"
            )
        return self._campaign_id

    # -- sending ----------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Find or upsert contacts, create members, delete departed members."""
        campaign_id = self._require_campaign()
        rejected: list[RowError] = []
        joining: dict[str, list[Change]] = {}
        fields: dict[str, dict[str, Any]] = {}
        leaving: list[tuple[Change, str]] = []
        for change, normalised in known_changes(batch, self._keys.normalise, rejected):
            if change.op == "remove":
                leaving.append((change, normalised))
                continue
            if self._upsert:
                problem = self._field_problem(change.fields or {})
                if problem:
                    rejected.append(RowError(change.key, change.op, "invalid_value", problem))
                    continue
                fields[normalised] = dict(change.fields or {})
            joining.setdefault(normalised, []).append(change)

        def fail(normalised: str, code: str, message: str, retryable: bool = False) -> None:
            for change in joining.pop(normalised, []):
                rejected.append(RowError(change.key, change.op, code, message, retryable))

        # 1. Contacts of the joining members.
        if self._upsert:
            contacts, errors = self._upsert_contacts(fields)
        else:
            contacts, errors = self._find_contacts(list(joining)), {}
        for normalised, (code, message, retryable) in errors.items():
            fail(normalised, code, message, retryable)
        for normalised in list(joining):
            if normalised not in contacts:
                fail(
                    normalised,
                    "contact_not_found",
                    f"no {self._person} has {self._match_field} = this key (set"
                    " upsert_contacts to create them)",
                )

        # 2. Members.
        by_contact: dict[str, list[str]] = {}
        for normalised in joining:
            by_contact.setdefault(contacts[normalised], []).append(normalised)
        members, member_errors = self._create_members(campaign_id, list(by_contact))
        destination_ids: dict[str, str] = {}
        for contact_id, normalised_keys in by_contact.items():
            for normalised in normalised_keys:
                if contact_id in member_errors:
                    fail(normalised, *member_errors[contact_id])
                    continue
                for change in joining.get(normalised, []):
                    destination_ids[change.key] = members[contact_id]

        # 3. Removals.
        rejected.extend(self._remove(campaign_id, leaving, keep=set(members.values())))
        return BatchResult(rejected=rejected, destination_ids=destination_ids)

    def _field_problem(self, values: Mapping[str, Any]) -> str | None:
        """Why these mapped values cannot be sent as Contact fields, or ``None``."""
        for name, value in values.items():
            if not _API_NAME.match(str(name)):
                return f"{name!r} is not a Salesforce field API name"
            if _invalid_number(value):
                return f"field {name!r}: {value} is not a finite number"
            try:
                dumps(value)
            except TypeError:
                return f"field {name!r}: a {type(value).__name__} value cannot be sent as JSON"
        return None

    # -- contacts ---------------------------------------------------------------------------

    def _find_contacts(self, keys: Sequence[str]) -> dict[str, str]:
        """Contact ids by normalised key; keys without a contact are left out.

        Several contacts may share an email: the one with the smallest id is taken, the same
        one every run, so that a member is never added twice under two contacts.
        """
        found: dict[str, str] = {}
        if not keys:
            return found
        field = self._match_field
        for values in self._in_chunks(
            keys, f"SELECT Id, {field} FROM {self._person} WHERE {field} IN "
        ):
            soql = f"SELECT Id, {field} FROM {self._person} WHERE {field} IN ({values})"
            for record in self._query(soql):
                key = self._keys.known(record.get(field))
                contact_id = record.get("Id")
                if key is None or not contact_id:
                    continue
                if key not in found or str(contact_id) < found[key]:
                    found[key] = str(contact_id)
        return found

    def _upsert_contacts(
        self, fields: Mapping[str, dict[str, Any]]
    ) -> tuple[dict[str, str], dict[str, tuple[str, str, bool]]]:
        """Upsert contacts by the external id field; return ids and errors by normalised key."""
        keys = list(fields)
        records = []
        for normalised in keys:
            record = {"attributes": {"type": self._person}}
            record.update(
                {k: v for k, v in fields[normalised].items() if k not in ("Id", "attributes")}
            )
            record[self._match_field] = normalised
            records.append(record)
        results = self._collection(
            "PATCH", f"composite/sobjects/{self._person}/{self._match_field}", records
        )
        contacts: dict[str, str] = {}
        errors: dict[str, tuple[str, str, bool]] = {}
        for normalised, result in zip(keys, results):
            if isinstance(result, dict) and result.get("success") and result.get("id"):
                contacts[normalised] = str(result["id"])
            else:
                code, message = _record_error(result)
                errors[normalised] = (code, message, code in RETRIABLE_RECORD_ERRORS)
        return contacts, errors

    # -- members ----------------------------------------------------------------------------

    def _create_members(
        self, campaign_id: str, contact_ids: Sequence[str]
    ) -> tuple[dict[str, str], dict[str, tuple[str, str, bool]]]:
        """Member ids and errors by contact id; an existing member (DUPLICATE_VALUE) succeeds."""
        members: dict[str, str] = {}
        errors: dict[str, tuple[str, str, bool]] = {}
        if not contact_ids:
            return members, errors
        records = []
        for contact_id in contact_ids:
            record: dict[str, Any] = {
                "attributes": {"type": "CampaignMember"},
                "CampaignId": campaign_id,
                self._person_field: contact_id,
            }
            if self._member_status:
                record["Status"] = self._member_status
            records.append(record)
        results = self._collection("POST", "composite/sobjects", records)
        duplicates = []
        for contact_id, result in zip(contact_ids, results):
            if isinstance(result, dict) and result.get("success") and result.get("id"):
                members[contact_id] = str(result["id"])
                continue
            code, message = _record_error(result)
            if code == DUPLICATE_MEMBER:
                duplicates.append(contact_id)
            else:
                errors[contact_id] = (code, message, code in RETRIABLE_RECORD_ERRORS)
        if duplicates:
            existing = self._find_members(campaign_id, duplicates)
            for contact_id in duplicates:
                if contact_id in existing:
                    members[contact_id] = existing[contact_id]
                else:
                    # Reported a member, yet none found: deleted in between; the next run
                    # plans the row again.
                    errors[contact_id] = (
                        "member_not_found",
                        "Salesforce reported a duplicate member but no member was found",
                        True,
                    )
        return members, errors

    def _find_members(self, campaign_id: str, contact_ids: Sequence[str]) -> dict[str, str]:
        """CampaignMember ids of the campaign by contact id."""
        found: dict[str, str] = {}
        person = self._person_field
        prefix = (
            f"SELECT Id, {person} FROM CampaignMember WHERE CampaignId = "
            f"{soql_quote(campaign_id)} AND {person} IN "
        )
        for values in self._in_chunks(contact_ids, prefix):
            for record in self._query(f"{prefix}({values})"):
                if record.get(person) and record.get("Id"):
                    found[str(record[person])] = str(record["Id"])
        return found

    def _remove(
        self, campaign_id: str, leaving: Sequence[tuple[Change, str]], keep: set[str]
    ) -> list[RowError]:
        """Delete the members of ``leaving``; return the rows that failed."""
        if not leaving:
            return []
        by_member: dict[str, list[Change]] = {}
        unknown: list[tuple[Change, str]] = []
        for change, normalised in leaving:
            member_id = str(change.destination_id or "")
            if _SALESFORCE_ID.match(member_id):
                by_member.setdefault(member_id, []).append(change)
            else:
                unknown.append((change, normalised))
        if unknown:
            contacts = self._find_contacts([n for _, n in unknown])
            members = self._find_members(campaign_id, sorted(set(contacts.values())))
            for change, normalised in unknown:
                member_id = members.get(contacts.get(normalised, ""))
                # No contact, or no member: nothing to remove, the row succeeds.
                if member_id:
                    by_member.setdefault(member_id, []).append(change)
        # A member that another key of this batch joins stays (two keys, one contact).
        for member_id in keep:
            by_member.pop(member_id, None)
        rejected: list[RowError] = []
        ids = sorted(by_member)
        for start in range(0, len(ids), COLLECTION_LIMIT):
            chunk = ids[start : start + COLLECTION_LIMIT]
            results = self._delete(chunk)
            for member_id, result in zip(chunk, results):
                if isinstance(result, dict) and result.get("success"):
                    continue
                code, message = _record_error(result)
                if code in ALREADY_DELETED:
                    continue
                for change in by_member[member_id]:
                    rejected.append(
                        RowError(
                            change.key, change.op, code, message, code in RETRIABLE_RECORD_ERRORS
                        )
                    )
        return rejected

    # -- requests ---------------------------------------------------------------------------

    def _collection(self, method: str, path: str, records: list[dict[str, Any]]) -> list[Any]:
        """Send records in collection requests of at most 200, resending those locked;
        results in record order."""

        def send(indexes: list[int]) -> list[Any]:
            results: list[Any] = []
            for start in range(0, len(indexes), COLLECTION_LIMIT):
                chunk = indexes[start : start + COLLECTION_LIMIT]
                response = self._auth.request(
                    method,
                    self._api(path),
                    json={"allOrNone": False, "records": [records[i] for i in chunk]},
                    headers=self._headers,
                )
                results += _one_each(json_body(response), len(chunk))
            return results

        return _resend_locked(len(records), send)

    def _delete(self, ids: Sequence[str]) -> list[Any]:
        """Delete records by id (at most 200), resending those locked; results in id order."""

        def send(indexes: list[int]) -> list[Any]:
            # Ids are checked alphanumeric: the commas stay literal, as the API documents.
            url = (
                self._api("composite/sobjects")
                + "?ids="
                + ",".join(ids[i] for i in indexes)
                + "&allOrNone=false"
            )
            response = self._auth.request("DELETE", url, headers=self._headers)
            return _one_each(json_body(response), len(indexes))

        return _resend_locked(len(ids), send)

    def _in_chunks(self, values: Iterable[str], prefix: str) -> Iterable[str]:
        """Comma-separated SOQL literals of ``values``, cut so each query's URL stays short."""
        budget = QUERY_URL_BUDGET - len(quote(prefix, safe="")) - 10
        chunk: list[str] = []
        used = 0
        for value in dict.fromkeys(values):
            literal = soql_quote(value)
            cost = len(quote(literal, safe="")) + len(quote(", ", safe=""))
            if chunk and used + cost > budget:
                yield ", ".join(chunk)
                chunk, used = [], 0
            chunk.append(literal)
            used += cost
        if chunk:
            yield ", ".join(chunk)

    def _query(self, soql: str) -> list[dict[str, Any]]:
        """Every record a SOQL query returns, following ``nextRecordsUrl``."""
        return [record for page in self._query_pages(soql) for record in page]

    def _query_pages(self, soql: str) -> Iterator[list[dict[str, Any]]]:
        """The records of a SOQL query a page at a time, following ``nextRecordsUrl``."""
        url = self._api("query") + "?q=" + quote(soql, safe="")
        while url:
            response = self._auth.request("GET", url, headers=self._headers)
            answer = json_body(response)
            if not isinstance(answer, dict):
                break
            yield [r for r in answer.get("records") or [] if isinstance(r, dict)]
            next_url = answer.get("nextRecordsUrl")
            if answer.get("done", True) or not next_url:
                break
            url = self.url(str(next_url), self._instance)

    # -- reading the membership back (audsync verify) ---------------------------------------

    def list_members(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of the campaign's members as (key, CampaignMember id): the members by
        ``nextRecordsUrl`` pages, their Contacts' (or Leads') match field read by id."""
        campaign_id = self._require_campaign()
        person = self._person_field
        soql = (
            f"SELECT Id, {person} FROM CampaignMember WHERE CampaignId = {soql_quote(campaign_id)}"
        )
        field = self._match_field
        for page in self._query_pages(soql):
            members = {str(r[person]): str(r["Id"]) for r in page if r.get(person) and r.get("Id")}
            found: list[tuple[str, str | None]] = []
            prefix = f"SELECT Id, {field} FROM {self._person} WHERE Id IN "
            for values in self._in_chunks(list(members), prefix):
                for record in self._query(f"{prefix}({values})"):
                    key = self._keys.known(record.get(field))
                    if key is not None and str(record.get("Id")) in members:
                        found.append((key, members[str(record["Id"])]))
            if found:
                yield found

    def listed_key_casefold(self) -> bool:
        """Emails are compared lowercased; an external id as it is."""
        return self._keys.email
