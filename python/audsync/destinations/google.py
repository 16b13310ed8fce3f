"""Google Customer Match through the Data Manager API: hashed contact data into a user list.

Since 2026-04-01 the Google Ads API takes no new Customer Match adopters; the Data Manager API
is the way in (destinations.md). Each batch becomes at most two calls:
``POST /v1/audienceMembers:ingest`` for adds and updates (ingesting a member again is
idempotent, so an update is a re-add) and ``POST /v1/audienceMembers:remove``::

    {"destinations": [{"operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "123"},
                       "productDestinationId": "<user list id>"}],
     "audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": "<sha256 hex>"},
                                                           {"phoneNumber": "<sha256 hex>"}]}}],
     "encoding": "HEX",
     "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
     "consent": {"adUserData": "CONSENT_GRANTED", ...}}

(``termsOfService`` and ``consent`` are fields of the ingest request only; the remove request
has neither and would be refused with them.)

Field mapping: the sync's identifier is an email (``key_type: EMAIL``, the default) or a phone
(``PHONE``). Mapped ``destination_field`` names add identifiers, matched without regard to case
and underscores: ``email_address`` (or ``email``), ``phone_number`` (or ``phone``), and, for an
address, all four of ``given_name``, ``family_name``, ``region_code``, ``postal_code`` (the
API requires the four together). Other fields are ignored with one warning (a user list keeps
no attributes).

The API fails fast: one bad member fails the whole request, which applies nothing, and names
the members at fault (``audience_members[3]``). Those rows are rejected and the rest sent again.

The id kept for each member is the key's hash: a removal sends exactly what was added even if
``normalize_gmail`` or ``default_country`` changed in between.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Mapping, Sequence

import orjson

from audsync.delivery.http import Verdict, answer_text, json_object_answer
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
from audsync.destinations.common import (
    Once,
    default_country,
    flag,
    json_error,
    match_value,
    open_list,
    opened_list,
    request_failed,
    required,
    split_by_op,
    upper_choice,
)
from audsync.identifiers import GOOGLE_RULES, InvalidIdentifier, Options, is_blank

logger = logging.getLogger("audsync.destinations.google")

# The ingest and remove answers are JSON objects (``{"requestId": ...}``).
_INGEST_ANSWER = json_object_answer("a Data Manager ingest/remove answer (a JSON object)")

# -- the API ------------------------------------------------------------------------------

DATA_MANAGER_URL = "https://datamanager.googleapis.com"
INGEST_PATH = "v1/audienceMembers:ingest"
REMOVE_PATH = "v1/audienceMembers:remove"
MAX_MEMBERS_PER_REQUEST = 10_000
"""The request limit (TOO_MANY_AUDIENCE_MEMBERS); destinations.md marks it unconfirmed, the
API's own error reasons state it."""
MAX_CONCURRENT_REQUESTS = 10

ACCOUNT_TYPES = ("GOOGLE_ADS", "DISPLAY_VIDEO_ADVERTISER", "DISPLAY_VIDEO_PARTNER", "DATA_PARTNER")
KEY_TYPES = {"EMAIL": "email_address", "PHONE": "phone_number"}
ADDRESS_PARTS = ("given_name", "family_name", "region_code", "postal_code")
JSON_NAMES = {
    "email_address": "emailAddress",
    "phone_number": "phoneNumber",
    "given_name": "givenName",
    "family_name": "familyName",
    "region_code": "regionCode",
    "postal_code": "postalCode",
}
# Mapped field names, compared lowercased without '_', '-' or spaces. ``hashedEmail`` and
# ``hashedPhoneNumber`` are the Ads API's names (the contract's example uses the first).
FIELD_NAMES = {
    "emailaddress": "email_address",
    "email": "email_address",
    "hashedemail": "email_address",
    "phonenumber": "phone_number",
    "phone": "phone_number",
    "hashedphonenumber": "phone_number",
    "givenname": "given_name",
    "firstname": "given_name",
    "familyname": "family_name",
    "lastname": "family_name",
    "regioncode": "region_code",
    "countrycode": "region_code",
    "country": "region_code",
    "postalcode": "postal_code",
    "zipcode": "postal_code",
    "zip": "postal_code",
}
CONSENT_VALUES = {"granted": "CONSENT_GRANTED", "denied": "CONSENT_DENIED"}

# Error reasons that concern the destination, not a member: every batch would fail alike.
FATAL_REASONS = frozenset(
    {
        "INVALID_DESTINATION",
        "INVALID_USER_LIST_ID",
        "INVALID_USER_LIST_TYPE",
        "TERMS_AND_CONDITIONS_NOT_SIGNED",
        "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH",
        "NOT_ALLOWLISTED",
        "DATA_PARTNER_USER_LIST_MUTATE_NOT_ALLOWED",
        "PERMISSION_DENIED",
    }
)
MEMBER_FIELD = re.compile(r"audience_?members\[(\d+)\]", re.IGNORECASE)
# A request whose bad members are taken out is sent again; each round drops at least one
# member, and a few rounds cover an API that reports only the first violations it finds.
MAX_FAST_FAIL_ROUNDS = 5


google_error = json_error
"""The ``error`` object (``google.rpc.Status``) of an answer, or ``None``."""


def _details(error: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The error's details of one type (``BadRequest``, ``RetryInfo``, ``ErrorInfo``)."""
    found = []
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("." + kind):
            found.append(detail)
    return found


def field_violations(error: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every ``fieldViolations`` entry of the error's ``BadRequest`` details."""
    violations = []
    for detail in _details(error, "BadRequest"):
        violations.extend(v for v in detail.get("fieldViolations") or [] if isinstance(v, dict))
    return violations


def error_reasons(error: Mapping[str, Any]) -> set[str]:
    """Reasons named by ``ErrorInfo`` details and field violations."""
    reasons = {str(d.get("reason")) for d in _details(error, "ErrorInfo") if d.get("reason")}
    reasons |= {str(v.get("reason")) for v in field_violations(error) if v.get("reason")}
    return reasons


def retry_delay_seconds(error: Mapping[str, Any]) -> float | None:
    """``RetryInfo.retryDelay`` (a JSON Duration such as ``"30s"`` or ``"1.5s"``) in seconds."""
    for detail in _details(error, "RetryInfo"):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                continue
        if isinstance(delay, dict):  # the proto3 object form, should a proxy re-encode it
            try:
                return max(0.0, float(delay.get("seconds", 0)) + float(delay.get("nanos", 0)) / 1e9)
            except (TypeError, ValueError):
                continue
    return None


def member_violations(error: Mapping[str, Any]) -> dict[int, tuple[str, str]]:
    """Violations that name an audience member: index -> (reason, description).

    Empty when any violation names something else (the request itself is at fault).
    """
    found: dict[int, tuple[str, str]] = {}
    violations = field_violations(error)
    for violation in violations:
        match = MEMBER_FIELD.search(str(violation.get("field") or ""))
        if match is None:
            return {}
        reason = str(violation.get("reason") or "INVALID_ARGUMENT")
        text = str(violation.get("description") or reason.replace("_", " ").lower())
        found.setdefault(int(match.group(1)), (reason, text))
    return found


class GoogleCustomerMatchConnector(Connector):
    """Add members to and remove them from a Google Customer Match user list."""

    type: ClassVar[str] = "google_customer_match"
    description: ClassVar[str] = (
        "Google Customer Match user list through the Data Manager API"
        " (audienceMembers:ingest and :remove), hashed emails, phones and addresses"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey(
            "access_token",
            "an OAuth access token with the datamanager scope",
            required=True,
            secret=True,
        ),
        ConfigKey(
            "customer_id",
            "the account that owns the user list (a Google Ads customer id)",
            required=True,
        ),
        ConfigKey("user_list_id", "the user list's id (or let create_if_missing make one)"),
        ConfigKey(
            "account_type", "type of customer_id: " + ", ".join(ACCOUNT_TYPES), default="GOOGLE_ADS"
        ),
        ConfigKey("login_customer_id", "the manager account used to reach customer_id, if any"),
        ConfigKey(
            "create_if_missing", "create a Customer Match user list on the first run", default=False
        ),
        ConfigKey("user_list_name", "name of a created user list (default: the sync's name)"),
        ConfigKey("user_list_description", "description of a created user list"),
        ConfigKey("key_type", "what the sync's identifier is: EMAIL or PHONE", default="EMAIL"),
        ConfigKey("default_country", "ISO country of phone numbers written without a country code"),
        ConfigKey(
            "normalize_gmail",
            "drop dots and +suffix in gmail.com / googlemail.com addresses before hashing",
            default=False,
        ),
        ConfigKey(
            "ad_user_data_consent",
            "granted or denied: consent for ad user data, sent for every member",
        ),
        ConfigKey(
            "ad_personalization_consent",
            "granted or denied: consent for ad personalization, sent for every member",
        ),
        ConfigKey(
            "developer_token",
            "Google Ads API developer token; the Data Manager API does not use it (accepted so"
            " that an Ads API configuration loads)",
            secret=True,
        ),
    )
    max_batch_size: ClassVar[int] = MAX_MEMBERS_PER_REQUEST
    default_batch_size: ClassVar[int | None] = MAX_MEMBERS_PER_REQUEST
    max_concurrency: ClassVar[int] = MAX_CONCURRENT_REQUESTS
    default_concurrency: ClassVar[int] = 4
    returns_destination_ids: ClassVar[bool] = True

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        self._token = required(self, "access_token")
        self._account = self._account_id("customer_id", required=True)
        self._login = self._account_id("login_customer_id", required=False)
        self._account_type = upper_choice(self, "account_type", ACCOUNT_TYPES, "GOOGLE_ADS")
        key_type = str(self.setting("key_type") or "EMAIL").strip().upper()
        if key_type not in KEY_TYPES:
            raise FatalDestinationError(
                f"destination {name!r}: key 'key_type' must be EMAIL or PHONE, got {key_type!r}"
            )
        self._key_field = KEY_TYPES[key_type]
        self._options = Options(
            default_country=default_country(name, self.setting("default_country")),
            gmail=flag(self.setting("normalize_gmail")),
        )
        self._consent = self._consent_setting()
        # Mapped fields -> identifier kinds; the key's own kind comes from the key.
        self._fields: dict[str, str] = {}
        ignored = []
        for field_name in sync.fields:
            kind = FIELD_NAMES.get(re.sub(r"[\s_\-]", "", str(field_name)).lower())
            if kind is None:
                ignored.append(field_name)
            elif kind != self._key_field and kind not in self._fields.values():
                self._fields[field_name] = kind
        if ignored:
            logger.warning(
                "destination %r: fields %s are not Customer Match identifiers and are not sent;"
                " identifiers: email_address, phone_number, given_name, family_name,"
                " region_code, postal_code",
                name, ", ".join(map(repr, ignored)),
            )  # fmt: skip
        parts = [k for k in self._fields.values() if k in ADDRESS_PARTS]
        if parts and len(parts) < len(ADDRESS_PARTS):
            missing = [p for p in ADDRESS_PARTS if p not in parts]
            logger.warning(
                "destination %r: an address needs %s; %s not mapped, so no address is sent",
                name, ", ".join(ADDRESS_PARTS), ", ".join(missing),
            )  # fmt: skip
        self._address = len(parts) == len(ADDRESS_PARTS)
        self._user_list: str | None = None
        self._skipped = Once()

    # -- configuration --------------------------------------------------------------------

    def _account_id(self, key: str, *, required: bool) -> str | None:
        """An account id as the API wants it: digits only (the Ads UI shows 123-456-7890)."""
        raw = str(self.setting(key) or "").strip()
        digits = raw.replace("-", "")
        if not raw and not required:
            return None
        if not digits.isdigit():
            raise FatalDestinationError(
                f"destination {self.name!r}: key {key!r} must be an account id (digits),"
                f" got {raw!r}"
            )
        return digits

    def _consent_setting(self) -> dict[str, str] | None:
        """The request-level consent, only from settings: audsync never asserts consent itself."""
        consent = {}
        for key, field_name in (
            ("ad_user_data_consent", "adUserData"),
            ("ad_personalization_consent", "adPersonalization"),
        ):
            value = self.setting(key)
            if value in (None, ""):
                continue
            text = str(value).strip().lower().replace("consent_", "")
            if text not in CONSENT_VALUES:
                raise FatalDestinationError(
                    f"destination {self.name!r}: key {key!r} must be granted or denied,"
                    f" got {value!r}"
                )
            consent[field_name] = CONSENT_VALUES[text]
        return consent or None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _destination(self) -> dict[str, Any]:
        destination: dict[str, Any] = {
            "operatingAccount": {"accountType": self._account_type, "accountId": self._account},
            "productDestinationId": self._list_id(),
        }
        if self._login:
            destination["loginAccount"] = {
                "accountType": self._account_type,
                "accountId": self._login,
            }
        return destination

    # -- the answer policy ----------------------------------------------------------------

    def classify(self, response: Any) -> Verdict | None:
        """Sort a Data Manager error: 429 waits ``retryDelay``; auth, permission, a missing
        list or a destination-level reason stop the run; other 4xx fail the batch's rows."""
        status = response.status_code
        if status < 400:
            return None
        error = google_error(response) or {}
        state = str(error.get("status") or status)
        text = str(error.get("message") or "").strip() or answer_text(response)
        message = f"{state}: {text}" if text else state
        if status == 429:
            return Verdict.retry(
                retry_delay_seconds(error), code="google_resource_exhausted", message=message
            )
        if status == 401:
            return Verdict.fatal(f"the access token is invalid or expired ({message})")
        if status == 403:
            return Verdict.fatal(f"the token may not write to this account or list ({message})")
        if status == 404:
            return Verdict.fatal(f"the account or user list does not exist ({message})")
        reasons = error_reasons(error)
        fatal = sorted(reasons & FATAL_REASONS)
        if status == 400 and fatal:
            return Verdict.fatal(f"{', '.join(fatal)} ({message})")
        if status in (408, 409) or status >= 500:
            return Verdict.retry(code=f"google_{state.lower()}", message=message)
        reason = sorted(reasons - {"INVALID_ARGUMENT"}) or [state]
        return Verdict.reject(f"google_{reason[0].lower()}", message)

    @staticmethod
    def _fast_fail(response: Any) -> Verdict | None:
        """For ingest and remove: a 400 that names bad members is returned to the connector,
        which rejects those rows and sends the others again (nothing was applied)."""
        if response.status_code != 400:
            # Issue 10: a 2xx that is not the API's JSON answer is retried, never a success.
            return _INGEST_ANSWER(response)
        error = google_error(response)
        if error is not None and member_violations(error):
            return Verdict.ok()
        return None

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Find the user list: ``user_list_id``, else the one created on an earlier run, else
        create it (``create_if_missing``). Returns ``{"user_list_id": ...}`` once created."""
        self._user_list, state = open_list(
            self,
            "user_list_id",
            self._create_user_list,
            "create_if_missing: true to create a Customer Match list",
        )
        return state

    def _create_user_list(self) -> str:
        """Create a Customer Match (contact data, first party) user list; return its id.

        destinations.md is silent on creation: this follows the Data Manager API's
        ``UserListService.CreateUserList`` as its client library defines it
        (``POST /v1/{parent=accountTypes/*/accounts/*}/userLists``, body a ``UserList``).
        """
        body: dict[str, Any] = {
            "displayName": str(self.setting("user_list_name") or self.sync.name),
            "ingestedUserListInfo": {
                "uploadKeyTypes": ["CONTACT_ID"],
                "contactIdInfo": {"dataSourceType": "DATA_SOURCE_TYPE_FIRST_PARTY"},
            },
        }
        description = self.setting("user_list_description")
        if description:
            body["description"] = str(description)
        path = f"v1/accountTypes/{self._account_type}/accounts/{self._account}/userLists"
        response = self.http.request(
            "POST", self.url(path, DATA_MANAGER_URL), json=body, headers=self._headers()
        )
        try:
            created = orjson.loads(response.content)
            list_id = str(created.get("id") or str(created["name"]).rsplit("/", 1)[-1])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FatalDestinationError(
                f"destination {self.name!r}: creating the user list gave no id"
            ) from None
        logger.info("destination %r: created user list %s", self.name, list_id)
        return list_id

    def _list_id(self) -> str:
        if self._user_list is None:
            self._user_list = opened_list(self, "user_list_id", "user list")
        return self._user_list

    # -- sending --------------------------------------------------------------------------

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Ingest adds and updates, remove removals; bad identifiers and the members the API
        names fail alone."""
        destination = self._destination()
        rejected, ids, groups = split_by_op(batch, self._member)
        for op, path in (("add", INGEST_PATH), ("remove", REMOVE_PATH)):
            items = groups[op]
            if not items:
                continue
            try:
                failed = self._send(path, op, destination, items)
            except (RequestRejected, RetriesExhausted) as exc:
                failed = request_failed(items, exc)
            rejected.extend(failed)
            for row in failed:
                ids.pop(row.key, None)
        return BatchResult(rejected=rejected, destination_ids=ids)

    def _body(self, op: str, destination: dict[str, Any], members: list[dict[str, Any]]) -> dict:
        body: dict[str, Any] = {
            "destinations": [destination],
            "audienceMembers": members,
            "encoding": "HEX",
        }
        if op == "add":
            # The API refuses Customer Match data without the terms accepted; configuring a
            # Customer Match destination is taken as the advertiser's acceptance of them.
            body["termsOfService"] = {"customerMatchTermsOfServiceStatus": "ACCEPTED"}
            if self._consent:
                body["consent"] = dict(self._consent)
        return body

    def _send(
        self, path: str, op: str, destination: dict[str, Any], items: list[tuple[Change, dict]]
    ) -> list[RowError]:
        """Send ``items``; drop the members a fast-fail answer names and send the rest again."""
        rejected: list[RowError] = []
        pending = items
        for _ in range(MAX_FAST_FAIL_ROUNDS):
            body = self._body(op, destination, [member for _, member in pending])
            response = self.http.request(
                "POST",
                self.url(path, DATA_MANAGER_URL),
                json=body,
                headers=self._headers(),
                classify=self._fast_fail,
            )
            if response.status_code < 300:
                return rejected
            bad = member_violations(google_error(response) or {})
            for index, (reason, text) in sorted(bad.items()):
                if index < len(pending):
                    change = pending[index][0]
                    rejected.append(
                        RowError(change.key, change.op, f"google_{reason.lower()}", text[:500])
                    )
            pending = [item for index, item in enumerate(pending) if index not in bad]
            if not pending:
                return rejected
        # Still refused after several rounds: the rest may be fine; the next run tries again.
        message = "the API kept refusing the request after its named members were taken out"
        rejected.extend(
            RowError(c.key, c.op, "google_fast_fail", message, True) for c, _ in pending
        )
        return rejected

    def _member(self, change: Change) -> tuple[dict[str, Any], str]:
        """The member's ``AudienceMember`` JSON, and the key's hash (the member's id)."""
        # The key is an email or a phone number: hashed, so a removal sends the stored hash.
        match = match_value(change, GOOGLE_RULES[self._key_field], self._options)
        identifiers = [{JSON_NAMES[self._key_field]: match}]
        fields = change.fields or {}
        address: dict[str, str] = {}
        for field_name, kind in self._fields.items():
            raw = fields.get(field_name)
            if is_blank(raw):
                continue
            try:
                value = GOOGLE_RULES[kind].apply(raw, self._options)
            except InvalidIdentifier as exc:
                self._note_skipped(field_name, exc)
                continue
            if kind in ADDRESS_PARTS:
                address[JSON_NAMES[kind]] = value
            else:
                identifiers.append({JSON_NAMES[kind]: value})
        if self._address and len(address) == len(ADDRESS_PARTS):
            # ``address`` is the field's JSON name in the API (UserIdentifier.address, an
            # AddressInfo message); destinations.md writes ``addressInfo``, which the API's
            # parser refuses as an unknown field (checked in the tests with its own types).
            identifiers.append({"address": address})
        return {"userData": {"userIdentifiers": identifiers}}, match

    def _note_skipped(self, field_name: str, exc: InvalidIdentifier) -> None:
        if not self._skipped.first(field_name):
            return
        logger.warning(
            "destination %r: field %r has values that cannot be used (%s: %s); those members"
            " are sent without it (this is said once a run)",
            self.name, field_name, exc.code, exc.message,
        )  # fmt: skip
