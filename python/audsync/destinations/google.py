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
a normalisation rule or ``default_country`` changed in between. Google's gmail rule is always
applied (:mod:`audsync.identifiers`); ``normalize_gmail: false`` is ignored with a warning.

Credentials (:mod:`audsync.destinations.auth`): a service account's JSON key
(``service_account_file`` or ``service_account_json``: the JWT grant, scope ``datamanager``), an
OAuth refresh token (``client_id``, ``client_secret``, ``refresh_token``), or a static
``access_token`` (it expires within the hour: for a one-off run). Tokens are refreshed before
they expire and once after a 401; ``token_url`` points the exchange elsewhere (a fake in tests).

Ingestion is asynchronous: an accepted request answers a ``requestId``, and members can still
fail in processing (``NO_CONSENT``, ``INVALID_FORMAT``, ...). The connector keeps the ids of
the run's requests and polls ``GET /v1/requestStatus:retrieve``: in the background while
delivery goes on, then, after delivery, until all are done or ``request_status_timeout_s``
has passed (0 to skip): the rows of a request that ``FAILED`` become row
errors with Google's reason (:meth:`GoogleCustomerMatchConnector.late_row_errors`), so that the
next run plans them again. A ``PARTIAL_SUCCESS`` gives counts per reason, not the members:
those counts are logged, and no row can be named. Consent (``adUserData``,
``adPersonalization``) is sent only when set (``ad_user_data_consent``,
``ad_personalization_consent``).

Errors that concern the account, not a member (:data:`FATAL_REASONS`: terms of service not
accepted, an account of the wrong type, a list type the account cannot use) stop the run.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import orjson

from audsync.delivery.http import Verdict, answer_text, json_object_answer
from audsync.destinations.auth import (
    BearerAuth,
    JwtBearerGrant,
    RefreshTokenGrant,
    StaticToken,
    TokenSource,
    load_json_key,
)
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    DestinationError,
    FatalDestinationError,
    RowError,
)
from audsync.destinations.common import (
    ListLifecycle,
    Once,
    json_object,
    default_country,
    flag,
    json_error,
    match_value,
    open_list,
    opened_list,
    required,
    send_hashed,
    upper_choice,
)
from audsync.identifiers import GOOGLE_RULES, InvalidIdentifier, Options, is_blank

logger = logging.getLogger("audsync.destinations.google")

# The ingest and remove answers are JSON objects (``{"requestId": ...}``).
_INGEST_ANSWER = json_object_answer("a Data Manager ingest/remove answer (a JSON object)")

# -- the API ------------------------------------------------------------------------------

DATA_MANAGER_URL = "https://datamanager.googleapis.com"
TOKEN_URL = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/datamanager"
INGEST_PATH = "v1/audienceMembers:ingest"
REMOVE_PATH = "v1/audienceMembers:remove"
MAX_MEMBERS_PER_REQUEST = 10_000
"""The request limit (TOO_MANY_AUDIENCE_MEMBERS); destinations.md marks it unconfirmed, the
API's own error reasons state it."""
MAX_CONCURRENT_REQUESTS = 10
STATUS_PATH = "v1/requestStatus:retrieve"
DEFAULT_STATUS_TIMEOUT_S = 30.0
BACKGROUND_POLL_S = 5.0
"""Seconds between the background poller's rounds while delivery goes on."""
BACKGROUND_AFTER_REQUESTS = 20
"""Requests waiting for their status before the background poller starts."""
STATUS_POLL_S = 0.5
"""First wait between polls of the request status; it doubles up to 8 s."""
MAX_PENDING_REQUESTS = 1000
"""Requests whose status is kept for polling (each holds its rows' keys): beyond it the
oldest are dropped with a warning, so that memory stays bounded on a huge run."""
LIST_PAGE = 100
MAX_LIST_PAGES = 100
"""Pages of user lists read to find one by display name."""

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

# Error reasons that concern the destination, not a member: every batch would fail alike, so
# the run stops (sync status ``error`` with Google's message). Taken from the Data Manager
# API's ``ErrorReason`` enum (google.ads.datamanager_v1 types/error.py): those about the
# account, its terms, its allowlists and the list's type; member-level reasons (INVALID_FORMAT,
# ...) and request-shape reasons stay row errors.
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
        "ADVERTISER_TOS_NOT_ACCEPTED",
        "DESTINATION_ACCOUNT_TYPE_MISMATCH",
        "MISMATCHED_ACCOUNT_TYPE",
        "USER_LIST_TYPE_NOT_SUPPORTED_FOR_ACCOUNT",
        "UNSUPPORTED_ACCOUNT_TYPES_FOR_USER_LIST_TYPE",
        "DIFFERENT_LOGIN_ACCOUNTS_NOT_ALLOWED_FOR_DATA_PARTNER",
        "UNSUPPORTED_OPERATING_ACCOUNT_FOR_DATA_PARTNER",
        "UNSUPPORTED_LINKED_ACCOUNT_FOR_DATA_PARTNER",
        "LINKED_ACCOUNT_ONLY_ALLOWED_WITH_DATA_PARTNER_LOGIN_ACCOUNT",
        "ADVERTISER_NOT_ALLOWLISTED_FOR_UPLOADED_DATA",
        "ADVERTISER_NOT_ALLOWLISTED_FOR_THIRD_PARTY_PARTNER_DATA",
        "DATA_PARTNER_NOT_ALLOWLISTED_FOR_THIRD_PARTY_PARTNER_DATA",
        "CUSTOMER_NOT_ALLOWLISTED_FOR_COMMERCE_AUDIENCE",
        "EU_POLITICAL_ADVERTISING_DECLARATION_REQUIRED",
        "THIRD_PARTY_USER_DATA_NOT_ALLOWED",
        "REQUIRED_PREREQUISITE_LINK_MISSING",
        "USER_LIST_MUTATION_NOT_SUPPORTED",
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
            "service_account_file",
            "path of a service account's JSON key (JWT grant; relative to the dbt project)",
        ),
        ConfigKey(
            "service_account_json", "a service account's JSON key, inline", secret=True
        ),
        ConfigKey("client_id", "OAuth client id (with client_secret and refresh_token)"),
        ConfigKey("client_secret", "OAuth client secret", secret=True),
        ConfigKey("refresh_token", "OAuth refresh token with the datamanager scope", secret=True),
        ConfigKey(
            "access_token",
            "a static OAuth access token with the datamanager scope (expires within an hour)",
            secret=True,
        ),
        ConfigKey("token_url", "the OAuth token endpoint", default=TOKEN_URL),
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
            "ad_user_data_consent",
            "granted or denied: consent for ad user data, sent for every member",
        ),
        ConfigKey(
            "ad_personalization_consent",
            "granted or denied: consent for ad personalization, sent for every member",
        ),
        ConfigKey(
            "request_status_timeout_s",
            "seconds to poll requestStatus:retrieve after delivery for processing errors"
            " (0: do not poll)",
            default=DEFAULT_STATUS_TIMEOUT_S,
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
    cannot_list_reason: ClassVar[str] = (
        "the Data Manager API does not list a Customer Match list's members (it keeps hashes)"
    )

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        self._key_secrets: list[str] = []
        self._auth = BearerAuth(self._token_source(), http)
        self._account = self._account_id("customer_id", required=True)
        self._login = self._account_id("login_customer_id", required=False)
        self._account_type = upper_choice(self, "account_type", ACCOUNT_TYPES, "GOOGLE_ADS")
        key_type = str(self.setting("key_type") or "EMAIL").strip().upper()
        if key_type not in KEY_TYPES:
            raise FatalDestinationError(
                f"destination {name!r}: key 'key_type' must be EMAIL or PHONE, got {key_type!r}"
            )
        self._key_field = KEY_TYPES[key_type]
        gmail = self.setting("normalize_gmail")
        if gmail not in (None, "") and not flag(gmail):
            logger.warning(
                "destination %r: normalize_gmail is ignored: Google's gmail rule is always"
                " applied (without it gmail addresses with dots or a +suffix lose their match)",
                name,
            )
        self._options = Options(
            default_country=default_country(name, self.setting("default_country")), gmail=True
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
        try:
            self._status_timeout_s = float(
                self.setting("request_status_timeout_s", DEFAULT_STATUS_TIMEOUT_S)
                if self.setting("request_status_timeout_s") not in (None, "")
                else DEFAULT_STATUS_TIMEOUT_S
            )
        except (TypeError, ValueError):
            raise FatalDestinationError(
                f"destination {name!r}: request_status_timeout_s must be a number of seconds"
            ) from None
        self._pending: list[tuple[str, list[tuple[str, str]]]] = []
        """(requestId, the request's rows as (key, op)) of accepted requests, to poll."""
        self._pending_lock = threading.Lock()
        self._late: list[RowError] = []
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
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

    def _token_source(self) -> TokenSource:
        """The credentials: a service account, else a refresh token, else a static token."""
        token_url = str(self.setting("token_url") or "").strip()
        inline = self.setting("service_account_json")
        path = self.setting("service_account_file")
        if inline or path:
            if path and not inline:
                base = Path(self.sync.project_dir or ".")
                path = str(base / Path(str(path)).expanduser())
            key = load_json_key(self.name, inline or path, "service account key")
            missing = [k for k in ("client_email", "private_key") if not key.get(k)]
            if missing:
                raise FatalDestinationError(
                    f"destination {self.name!r}: the service account key has no"
                    f" {', '.join(missing)} (download a JSON key of the service account)"
                )
            self._key_secrets.append(str(key["private_key"]))
            url = token_url or str(key.get("token_uri") or TOKEN_URL)
            return JwtBearerGrant(
                self.name,
                url,
                claims={"iss": key["client_email"], "scope": SCOPE, "aud": url},
                private_key=str(key["private_key"]),
                key_id=str(key.get("private_key_id") or "") or None,
            )
        if self.setting("refresh_token"):
            return RefreshTokenGrant(
                self.name,
                token_url or TOKEN_URL,
                client_id=required(self, "client_id", strip=True),
                client_secret=required(self, "client_secret", strip=True),
                refresh_token=str(self.setting("refresh_token")).strip(),
            )
        if self.setting("access_token"):
            return StaticToken(self.name, str(self.setting("access_token")))
        raise FatalDestinationError(
            f"destination {self.name!r}: no credentials; set service_account_file (or"
            " service_account_json), or client_id, client_secret and refresh_token, or"
            " access_token"
        )

    def secret_values(self) -> list[str]:
        """The settings' secrets and a key file's private key."""
        return [*super().secret_values(), *self._key_secrets]

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
        reasons = error_reasons(error)
        fatal = sorted(reasons & FATAL_REASONS)
        if fatal and status < 500:
            # Whatever the status (400, 403, 412): the account, not the batch, is at fault.
            return Verdict.fatal(f"{', '.join(fatal)} ({message})")
        if status == 401:
            return Verdict.fatal(f"the access token is invalid or expired ({message})")
        if status == 403:
            return Verdict.fatal(f"the token may not write to this account or list ({message})")
        if status == 404:
            return Verdict.fatal(f"the account or user list does not exist ({message})")
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
        """Find the user list (:func:`~audsync.destinations.common.open_list`):
        ``user_list_id``, else the one an earlier run created, else one of the display name,
        else a new one (``create_if_missing``). Returns ``{"user_list_id": ...}``."""
        self._user_list, state = open_list(
            self,
            ListLifecycle(
                key="user_list_id",
                what="user list",
                name=str(self.setting("user_list_name") or self.sync.name),
                exists=self._user_list_exists,
                find=self._find_user_list,
                create=self._create_user_list,
                how_to_create="create_if_missing: true to create a Customer Match list",
            ),
        )
        return state

    def _lists_path(self) -> str:
        return f"v1/accountTypes/{self._account_type}/accounts/{self._account}/userLists"

    def _user_list_exists(self, list_id: str) -> bool:
        if not list_id.isdigit():
            raise FatalDestinationError(
                f"destination {self.name!r}: user_list_id must be digits, got {list_id!r}"
            )
        response = self._auth.request(
            "GET",
            self.url(f"{self._lists_path()}/{list_id}", DATA_MANAGER_URL),
            classify=lambda r: Verdict.ok() if r.status_code == 404 else None,
        )
        return response.status_code < 300

    def _find_user_list(self, name: str) -> str | None:
        """The id of the account's user list whose display name is ``name``, if any."""
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        token: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params = {"filter": f'display_name = "{quoted}"', "pageSize": str(LIST_PAGE)}
            if token:
                params["pageToken"] = token
            response = self._auth.request(
                "GET", self.url(self._lists_path(), DATA_MANAGER_URL), params=params
            )
            answer = json_object(response.content) or {}
            for item in answer.get("userLists") or []:
                if isinstance(item, dict) and item.get("displayName") == name:
                    found = item.get("id") or str(item.get("name") or "").rsplit("/", 1)[-1]
                    if found:
                        return str(found)
            token = answer.get("nextPageToken")
            if not token:
                return None
        return None

    def _create_user_list(self, name: str, http: Any) -> str:
        """Create a Customer Match (contact data, first party) user list; return its id.

        destinations.md is silent on creation: this follows the Data Manager API's
        ``UserListService.CreateUserList`` as its client library defines it
        (``POST /v1/{parent=accountTypes/*/accounts/*}/userLists``, body a ``UserList``).
        """
        body: dict[str, Any] = {
            "displayName": name,
            "ingestedUserListInfo": {
                "uploadKeyTypes": ["CONTACT_ID"],
                "contactIdInfo": {"dataSourceType": "DATA_SOURCE_TYPE_FIRST_PARTY"},
            },
        }
        description = self.setting("user_list_description")
        if description:
            body["description"] = str(description)
        # Sent once (``http`` does not retry): a lost answer is followed by a name look-up.
        response = BearerAuth(self._auth.source, http).request(
            "POST", self.url(self._lists_path(), DATA_MANAGER_URL), json=body
        )
        try:
            created = orjson.loads(response.content)
            list_id = str(created.get("id") or str(created["name"]).rsplit("/", 1)[-1])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FatalDestinationError(
                f"destination {self.name!r}: creating the user list gave no id"
            ) from None
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

        def send(op: str, items: list[tuple[Change, dict]]) -> tuple[list[RowError], int]:
            path = INGEST_PATH if op == "add" else REMOVE_PATH
            return self._send(path, op, destination, items), 0

        return send_hashed(batch, self._member, send)

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
            response = self._auth.request(
                "POST",
                self.url(path, DATA_MANAGER_URL),
                json=body,
                classify=self._fast_fail,
            )
            if response.status_code < 300:
                self._remember_request(response, pending)
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

    # -- asynchronous processing --------------------------------------------------------

    def _remember_request(self, response: Any, items: list[tuple[Change, dict]]) -> None:
        if self._status_timeout_s <= 0:
            return
        request_id = (json_object(response.content) or {}).get("requestId")
        if not request_id:
            return
        with self._pending_lock:
            self._pending.append((str(request_id), [(c.key, c.op) for c, _ in items]))
            # Background polling pays on long runs (memory, the wait at the end); a short
            # run's few requests are polled once delivery is over.
            if self._poller is None and len(self._pending) >= BACKGROUND_AFTER_REQUESTS:
                self._poller = threading.Thread(
                    target=self._poll_in_background, name="audsync-google-status", daemon=True
                )
                self._poller.start()
            if len(self._pending) > MAX_PENDING_REQUESTS:
                dropped = self._pending.pop(0)
                if self._dropped == 0:
                    logger.warning(
                        "destination %r: more than %d requests to check; the oldest are not"
                        " checked for processing errors",
                        self.name, MAX_PENDING_REQUESTS,
                    )  # fmt: skip
                self._dropped += len(dropped[1])

    _dropped = 0

    def _poll_in_background(self) -> None:
        """While delivery goes on, poll the requests sent so far every few seconds, so that
        finished ones (and their rows' keys) are dropped early and fewer are left to wait
        for at the end. Failures here are left to :meth:`late_row_errors`."""
        while not self._stop_polling.wait(BACKGROUND_POLL_S):
            with self._pending_lock:
                pending, self._pending = self._pending, []
            try:
                still = self._poll_once(pending)
            except DestinationError as exc:
                # Left to late_row_errors, which polls with the run's retries.
                logger.info("destination %r: polling request status failed (%s)", self.name, exc)
                with self._pending_lock:
                    self._pending[:0] = pending
                return
            with self._pending_lock:
                self._pending[:0] = still

    def _poll_once(self, pending: list[tuple[str, list[tuple[str, str]]]]) -> list:
        """Poll each request once; record the failed ones' rows; return those still processing.

        On an error the caller keeps ``pending`` whole: a request polled twice is harmless
        (its failed rows are recorded once, as it leaves ``pending`` only when done)."""
        still = []
        done: list[RowError] = []
        for request_id, rows in pending:
            status, reasons = self._request_status(request_id)
            if status in ("PROCESSING", "REQUEST_STATUS_UNKNOWN"):
                still.append((request_id, rows))
            elif status == "FAILED":
                reason = max(reasons, key=lambda r: reasons[r]) if reasons else "UNKNOWN"
                code = "google_" + reason.lower().replace("processing_error_reason_", "")
                counts = ", ".join(f"{r} x{c}" for r, c in reasons.items())
                text = f"failed in Google's processing: {reason} (request {request_id}: {counts})"
                done += [RowError(key, op, code, text[:500]) for key, op in rows]
            elif status == "PARTIAL_SUCCESS":
                logger.warning(
                    "destination %r: request %s partly failed in processing (%s); Google"
                    " does not name the members",
                    self.name, request_id, ", ".join(f"{r} x{c}" for r, c in reasons.items()),
                )  # fmt: skip
        with self._pending_lock:
            self._late += done
        return still

    def _stop_poller(self) -> None:
        self._stop_polling.set()
        poller = self._poller
        if poller is not None:
            poller.join(timeout=60)

    def late_row_errors(self) -> list[RowError]:
        """Rows of requests that failed in processing: those the background poller found, then
        the requests left polled until done or ``request_status_timeout_s`` has passed; a
        request still processing at the end is left alone (logged)."""
        self._stop_poller()
        with self._pending_lock:
            pending, self._pending = self._pending, []
        deadline = time.monotonic() + self._status_timeout_s
        wait = STATUS_POLL_S
        while pending:
            pending = self._poll_once(pending)
            if not pending or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
            wait = min(wait * 2, 8.0)
        if pending:
            logger.warning(
                "destination %r: %d request(s) still processing after %gs; their processing"
                " errors are not checked",
                self.name, len(pending), self._status_timeout_s,
            )  # fmt: skip
        with self._pending_lock:
            late, self._late = self._late, []
        return late

    def close(self, succeeded: bool) -> None:
        """Stop the background poller (a failed run does not wait for request statuses)."""
        self._stop_poller()

    def _request_status(self, request_id: str) -> tuple[str, dict[str, int]]:
        """A request's status and its error counts by reason."""
        response = self._auth.request(
            "GET", self.url(STATUS_PATH, DATA_MANAGER_URL), params={"requestId": request_id}
        )
        answer = json_object(response.content) or {}
        status, reasons = "REQUEST_STATUS_UNKNOWN", {}
        for per in answer.get("requestStatusPerDestination") or []:
            if not isinstance(per, dict):
                continue
            status = str(per.get("requestStatus") or status)
            for count in (per.get("errorInfo") or {}).get("errorCounts") or []:
                if isinstance(count, dict) and count.get("reason"):
                    reasons[str(count["reason"])] = int(count.get("recordCount") or 0)
        return status, reasons

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
