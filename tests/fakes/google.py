"""A fake Google Data Manager API (Customer Match) that checks requests as the real one would.

:class:`FakeGoogle` is a real HTTP server on 127.0.0.1 (``ThreadingHTTPServer`` in a daemon
thread) serving:

* ``POST /v1/audienceMembers:ingest`` and ``POST /v1/audienceMembers:remove``, answering
  ``{"requestId": ...}``;
* ``POST /v1/accountTypes/{type}/accounts/{id}/userLists``: create a user list, answering the
  ``UserList`` (``name``, ``id``, ...); a display name already used answers 400
  ``DISPLAY_NAME_ALREADY_USED``, as the API does;
* ``GET /v1/accountTypes/{type}/accounts/{id}/userLists/{list}``: one user list (404 when none);
* ``GET /v1/accountTypes/{type}/accounts/{id}/userLists?filter=display_name="..."&pageSize=n
  &pageToken=t``: user lists, paged with ``nextPageToken``.

Every request is checked: method and path, ``Authorization: Bearer`` with the right token,
``Content-Type: application/json``, the body's fields (unknown names are refused, as Google's
JSON parser refuses them: ``consent`` or ``termsOfService`` on a remove, ``addressInfo`` for
``address``), ``destinations`` (an ``operatingAccount`` with a known ``accountType`` and a
numeric ``accountId``, a ``productDestinationId``), 1 to 10,000 ``audienceMembers`` each with
``userData.userIdentifiers`` of 1 to 10 identifiers of exactly one kind, hashes as 64 lowercase
hex, ``encoding: HEX``, and on ingest ``termsOfService.customerMatchTermsOfServiceStatus:
ACCEPTED``; at most 10 requests in flight. A breach answers Google's error shape
(``google.rpc.Status`` with ``ErrorInfo`` and ``BadRequest`` details) and is listed in
:attr:`FakeGoogle.violations`.

The API fails fast: one bad member fails the whole request and nothing is applied;
:meth:`FakeGoogle.reject_keys` makes requests holding those emails fail so, naming each bad
member (``audience_members.audience_members[3].user_data.user_identifiers``). Failures in
Google's shapes: :meth:`FakeGoogle.fail_next` with ``rate_limit`` (429 ``RESOURCE_EXHAUSTED``
with ``RetryInfo.retryDelay``; option ``retry_delay_s``), ``server_error`` (503
``UNAVAILABLE``), ``expired_token`` (401 ``UNAUTHENTICATED``, ``ACCESS_TOKEN_EXPIRED``),
``permission`` (403 ``PERMISSION_DENIED``), ``timeout`` (answer after ``seconds``; the request
is applied, as when an answer is lost), ``account_error`` (a request-level reason that concerns
the account: option ``reason``, default ``ADVERTISER_TOS_NOT_ACCEPTED``, and ``status``, default
400, as ``google.rpc.Status`` with an ``ErrorInfo``).

Ingestion is asynchronous: an accepted ingest answers ``{"requestId"}`` and
``GET /v1/requestStatus:retrieve?requestId=...`` answers ``requestStatusPerDestination`` (first
``PROCESSING`` for ``processing_polls`` polls, then ``SUCCESS``, ``FAILED`` or
``PARTIAL_SUCCESS`` with ``errorInfo.errorCounts`` of ``recordCount`` and ``reason``).
:meth:`FakeGoogle.fail_processing` makes members with those emails fail in processing
(``PROCESSING_ERROR_REASON_NO_CONSENT`` by default): they are not applied.

OAuth: :meth:`FakeGoogle.use_oauth` serves Google's token endpoint on ``/token``
(:class:`tests.fakes._oauth.TokenIssuer`: the service-account JWT grant with the
``datamanager`` scope, and the refresh-token grant); its tokens expire after a lifetime or a
number of requests, and an expired one is answered 401 ``ACCESS_TOKEN_EXPIRED``.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any, Iterable, Mapping

import orjson

from ._http import Answer, Failure, FakeServer, drop_none, hold, media_type, target
from ._oauth import TokenIssuer

TOKEN = "ya29.fake-google-token-0123456789"
CUSTOMER_ID = "1234567890"
USER_LIST_ID = "5550001111"
MAX_MEMBERS = 10_000
MAX_IDENTIFIERS = 10
MAX_IN_FLIGHT = 10
ACCOUNT_TYPES = {
    "GOOGLE_ADS",
    "DISPLAY_VIDEO_PARTNER",
    "DISPLAY_VIDEO_ADVERTISER",
    "DATA_PARTNER",
    "GOOGLE_ANALYTICS_PROPERTY",
    "GOOGLE_AD_MANAGER_AUDIENCE_LINK",
    "FLOODLIGHT_CONFIG",
    "GOOGLE_AD_MANAGER",
}
CONSENT = {"CONSENT_STATUS_UNSPECIFIED", "CONSENT_GRANTED", "CONSENT_DENIED"}
INGEST_KEYS = {
    "destinations",
    "audienceMembers",
    "consent",
    "validateOnly",
    "encoding",
    "encryptionInfo",
    "termsOfService",
}
REMOVE_KEYS = {"destinations", "audienceMembers", "validateOnly", "encoding", "encryptionInfo"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DOMAIN = "datamanager.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/datamanager"
SERVICE_ACCOUNT = "audsync-test@audsync-test.iam.gserviceaccount.com"


def email_hash(email: str) -> str:
    """The emailAddress value of an address: SHA-256 hex of it trimmed and lowercased."""
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def status_body(
    code: int,
    status: str,
    message: str,
    *,
    reason: str | None = None,
    violations: list[dict[str, str]] | None = None,
    retry_delay: str | None = None,
) -> bytes:
    """A ``google.rpc.Status`` error body with its usual details."""
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason or status,
            "domain": DOMAIN,
        }
    ]
    if violations:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}
        )
    if retry_delay is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
        )
    return orjson.dumps(
        {"error": {"code": code, "message": message, "status": status, "details": details}}
    )


class FakeGoogle(FakeServer):
    """Google's Data Manager API for Customer Match on loopback; thread-safe.

    Args:
        access_token: the token requests must carry.
        customer_id: the operating account.
        user_list_id: a user list that exists from the start.
        latency_s: seconds each request waits before it is handled.
        port: the port (0: any free one).
    """

    content_type = "application/json; charset=UTF-8"
    failure_kinds = (
        "rate_limit",
        "server_error",
        "expired_token",
        "permission",
        "timeout",
        "account_error",
    )

    def __init__(
        self,
        *,
        access_token: str = TOKEN,
        customer_id: str = CUSTOMER_ID,
        user_list_id: str = USER_LIST_ID,
        latency_s: float = 0.0,
        port: int = 0,
    ):
        super().__init__(port=port)
        self.access_token = access_token
        self.customer_id = customer_id
        self.user_list_id = user_list_id
        self.latency_s = latency_s
        self.oauth: TokenIssuer | None = None
        """The token endpoint, once :meth:`use_oauth` is called."""
        self.reset()

    def use_oauth(self, *, public_key: str | None = None, **options: Any) -> TokenIssuer:
        """Serve the token endpoint on ``/token``; tokens it issues are accepted (the static
        ``access_token`` stays accepted too). ``public_key`` enables the service-account JWT
        grant; ``options`` go to :class:`TokenIssuer` (``lifetime_s``, ``max_uses``, ...)."""
        self.oauth = TokenIssuer(
            lambda: self.base_url + "/token",
            self._record_violation,
            public_key=public_key,
            issuer=SERVICE_ACCOUNT,
            scope=SCOPE,
            key_id="fake-key-id-1" if public_key else None,
            **options,
        )
        return self.oauth

    def service_account_key(self, private_key: str) -> dict[str, str]:
        """A service account JSON key as Google's console gives it, for :meth:`use_oauth`."""
        return {
            "type": "service_account",
            "project_id": "audsync-test",
            "private_key_id": "fake-key-id-1",
            "private_key": private_key,
            "client_email": SERVICE_ACCOUNT,
            "client_id": "100000000000000000001",
            "token_uri": self.base_url + "/token",
        }

    def reset(self) -> None:
        """Forget lists, counters, injected failures and violations."""
        super().reset()
        with self._lock:
            self._lists: dict[str, _UserList] = {self.user_list_id: _UserList()}
            self.list_names: dict[str, str] = {self.user_list_id: "audsync fake list"}
            """User list id -> display name."""
            self.created: list[dict[str, Any]] = []
            """Bodies of the user lists created, in order."""
            self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
            """Every request: method, path, headers, body."""
            self._rejected_hashes: set[str] = set()
            self.fast_failed = 0
            """Requests refused whole because of named members."""
            self._processing_failures: dict[str, str] = {}
            self.request_status: dict[str, dict[str, Any]] = {}
            """requestId -> {"status", "errors": {reason: count}, "polls_left", "records"}."""
            self.processing_polls = 1
            self.status_polls = 0

    # -- the common fake surface ----------------------------------------------------------

    def destination_config(self, **overrides: Any) -> dict[str, Any]:
        """A complete ``destinations.yml`` entry for this fake (``key=None`` drops a key)."""
        config: dict[str, Any] = {
            "type": "google_customer_match",
            "access_token": self.access_token,
            "customer_id": self.customer_id,
            "user_list_id": self.user_list_id,
            "base_url": self.base_url,
        }
        return drop_none(config, overrides)

    def field_mapping(self) -> list[dict[str, str]]:
        """email -> email_address, first_name -> given_name (no address without the other
        three parts, so not sent), ltv -> ltv (not an identifier, not sent)."""
        return [
            {"source_column": "email", "destination_field": "email_address"},
            {"source_column": "first_name", "destination_field": "given_name"},
            {"source_column": "ltv", "destination_field": "ltv"},
        ]

    def members(
        self, candidates: Iterable[str] | None = None, *, user_list_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Members of the list: by email for ``candidates`` found in it (only hashes are kept,
        so each is hashed and looked up), else by ``sha256:<hash>``. No fields are kept."""
        with self._lock:
            user_list = self._lists.get(user_list_id or self.user_list_id)
            emails = user_list.emails() if user_list else set()
        if candidates is None:
            return {f"sha256:{h}": {} for h in emails}
        return {c: {} for c in candidates if email_hash(c) in emails}

    def member_identifiers(self, user_list_id: str | None = None) -> list[set[tuple[str, str]]]:
        """Each member's identifiers, as (kind, value) pairs (address parts joined)."""
        with self._lock:
            user_list = self._lists.get(user_list_id or self.user_list_id)
            return [set(m) for m in user_list.members.values()] if user_list else []

    def seed_members(self, emails_to_fields: Mapping[str, Any] | Iterable[str]) -> None:
        """Members the list holds before a test (by email; fields are not kept)."""
        with self._lock:
            for email in emails_to_fields:
                self._lists[self.user_list_id].ingest({("emailAddress", email_hash(email))})

    def reject_keys(self, emails: Iterable[str]) -> None:
        """Requests holding these emails fail fast, naming each of those members."""
        with self._lock:
            self._rejected_hashes = {email_hash(e) for e in emails}

    def fail_processing(
        self, emails: Iterable[str], reason: str = "PROCESSING_ERROR_REASON_NO_CONSENT"
    ) -> None:
        """Members with these emails fail in processing (after the ingest was accepted)."""
        with self._lock:
            self._processing_failures.update({email_hash(e): reason for e in emails})

    def user_list_ids(self) -> list[str]:
        """Every user list that exists."""
        with self._lock:
            return list(self._lists)

    # -- handling -------------------------------------------------------------------------

    def _violation(self, message: str, reason: str = "INVALID_ARGUMENT", field: str = "") -> Answer:
        self._record_violation(message)
        violations = [{"field": field, "description": message, "reason": reason}] if field else None
        return (
            400,
            status_body(400, "INVALID_ARGUMENT", message, reason=reason, violations=violations),
            {},
        )

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes) -> Answer:
        """Check and apply one request; return status, body and extra headers."""
        if path == "/token" and self.oauth is not None:
            return self.oauth.handle(method, headers, body)
        with self._lock:
            self.requests.append((method, target(path, query), dict(headers.items()), body))
        action = self._failures.take(method, path)
        with self._in_flight() as in_flight:
            if in_flight > MAX_IN_FLIGHT:
                self._record_violation(f"more than {MAX_IN_FLIGHT} requests in flight")
                return (
                    429,
                    status_body(
                        429, "RESOURCE_EXHAUSTED", "Too many concurrent requests.", retry_delay="1s"
                    ),
                    {},
                )
            action = hold(action, "seconds", 2.0, self.latency_s)
            return self._handle(method, path, headers, body, action, query)

    def _handle(
        self,
        method: str,
        path: str,
        headers: Any,
        body: bytes,
        action: Failure | None,
        query: str = "",
    ) -> Answer:
        authorization = headers.get("Authorization") or ""
        if not authorization.startswith("Bearer "):
            self._record_violation(f"{method} {path} without a bearer token")
            return (
                401,
                status_body(
                    401,
                    "UNAUTHENTICATED",
                    "Request is missing required authentication credential.",
                    reason="CREDENTIALS_MISSING",
                ),
                {},
            )
        given = authorization[7:]
        verdict = None
        if given != self.access_token:
            verdict = self.oauth.check(given) if self.oauth is not None else "unknown"
        if verdict == "expired":
            return (
                401,
                status_body(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication"
                    " credentials. Expected OAuth 2 access token.",
                    reason="ACCESS_TOKEN_EXPIRED",
                ),
                {},
            )
        if verdict is not None:
            return (
                401,
                status_body(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials.",
                    reason="ACCESS_TOKEN_TYPE_UNSUPPORTED",
                ),
                {},
            )
        if action is not None and action.kind == "expired_token":
            return (
                401,
                status_body(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication"
                    " credentials. Expected OAuth 2 access token.",
                    reason="ACCESS_TOKEN_EXPIRED",
                ),
                {},
            )
        if method == "GET" and path == "/v1/requestStatus:retrieve":
            return self._request_status(query)
        if method == "GET":
            return self._get(path, query, action)
        if method != "POST":
            return self._violation(f"{method} {path}: only GET and POST are served")
        content_type = media_type(headers)
        if content_type != "application/json":
            return self._violation(f"Content-Type is {content_type!r}, not application/json")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._violation("Invalid JSON payload received.")
        if not isinstance(document, dict):
            return self._violation("Invalid JSON payload received: not an object.")
        lists = re.match(r"^/v1/accountTypes/([A-Z_]+)/accounts/(\d+)/userLists$", path)
        if path == "/v1/audienceMembers:ingest":
            return self._members("ingest", document, action)
        if path == "/v1/audienceMembers:remove":
            return self._members("remove", document, action)
        if lists:
            return self._create(lists.group(1), lists.group(2), document, action)
        self._record_violation(f"POST {path}: no such method")
        return 404, status_body(404, "NOT_FOUND", f"The requested URL {path} was not found."), {}

    def _get(self, path: str, query: str, action: Failure | None) -> Answer:
        """One user list, or a page of them (filtered by display name)."""
        from urllib.parse import parse_qs

        if action is not None:
            return self._failure(action)
        one = re.match(r"^/v1/accountTypes/([A-Z_]+)/accounts/(\d+)/userLists/(\d+)$", path)
        many = re.match(r"^/v1/accountTypes/([A-Z_]+)/accounts/(\d+)/userLists$", path)
        if one:
            with self._lock:
                found = one.group(3) in self._lists and one.group(2) == self.customer_id
                name = self.list_names.get(one.group(3), "")
            if not found:
                return 404, status_body(404, "NOT_FOUND", "Requested entity was not found."), {}
            return 200, orjson.dumps(self._list_json(one.group(1), one.group(2), one.group(3), name)), {}
        if many:
            params = {k: v[-1] for k, v in parse_qs(query).items()}
            wanted = None
            text = params.get("filter")
            if text:
                match = re.match(r'^display_name\s*=\s*"((?:[^"\\]|\\.)*)"$', text)
                if match is None:
                    return self._violation(f"unsupported filter {text!r}", "INVALID_FILTER", "filter")
                wanted = re.sub(r"\\(.)", r"\1", match.group(1))
            size = int(params.get("pageSize") or 50)
            start = int(params.get("pageToken") or 0)
            with self._lock:
                rows = sorted(
                    (i, n) for i, n in self.list_names.items() if wanted is None or n == wanted
                )
            page = rows[start : start + size]
            answer: dict[str, Any] = {
                "userLists": [self._list_json(many.group(1), many.group(2), i, n) for i, n in page]
            }
            if start + size < len(rows):
                answer["nextPageToken"] = str(start + size)
            return 200, orjson.dumps(answer), {}
        self._record_violation(f"GET {path}: no such method")
        return 404, status_body(404, "NOT_FOUND", f"The requested URL {path} was not found."), {}

    @staticmethod
    def _list_json(account_type: str, account: str, list_id: str, name: str) -> dict[str, Any]:
        return {
            "name": f"accountTypes/{account_type}/accounts/{account}/userLists/{list_id}",
            "id": list_id,
            "displayName": name,
            "membershipStatus": "OPEN",
        }

    def delete_user_list(self, list_id: str) -> None:
        """Remove a user list (as a user in Google Ads would)."""
        with self._lock:
            self._lists.pop(list_id, None)
            self.list_names.pop(list_id, None)

    def _failure(self, action: Failure) -> Answer:
        kind = action.kind
        if kind == "rate_limit":
            delay = f"{float(action.options.get('retry_delay_s', 0)):g}s"
            return (
                429,
                status_body(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "Quota exceeded for quota metric 'Requests' of service 'datamanager'.",
                    retry_delay=delay,
                ),
                {},
            )
        if kind == "account_error":
            reason = str(action.options.get("reason", "ADVERTISER_TOS_NOT_ACCEPTED"))
            status = int(action.options.get("status", 400))
            state = "PERMISSION_DENIED" if status == 403 else "FAILED_PRECONDITION"
            text = reason.replace("_", " ").capitalize() + "."
            return status, status_body(status, state, text, reason=reason), {}
        if kind == "server_error":
            return 503, status_body(503, "UNAVAILABLE", "The service is currently unavailable."), {}
        if kind == "permission":
            return (
                403,
                status_body(403, "PERMISSION_DENIED", "The caller does not have permission."),
                {},
            )
        raise AssertionError(kind)

    def _create(
        self, account_type: str, account: str, document: dict, action: Failure | None
    ) -> Answer:
        if account_type not in ACCOUNT_TYPES:
            return self._violation(f"unknown account type {account_type}")
        extra = set(document) - {
            "displayName",
            "description",
            "membershipDuration",
            "integrationCode",
            "ingestedUserListInfo",
            "membershipStatus",
        }
        if extra:
            return self._violation(f'Invalid JSON payload received. Unknown name "{min(extra)}"')
        if not isinstance(document.get("displayName"), str) or not document["displayName"]:
            return self._violation(
                "displayName is required", "REQUIRED_FIELD_MISSING", "user_list.display_name"
            )
        info = document.get("ingestedUserListInfo")
        if not isinstance(info, dict) or info.get("uploadKeyTypes") != ["CONTACT_ID"]:
            return self._violation("a Customer Match list has uploadKeyTypes [CONTACT_ID]")
        source = (info.get("contactIdInfo") or {}).get("dataSourceType")
        if source not in (
            None,
            "DATA_SOURCE_TYPE_FIRST_PARTY",
            "DATA_SOURCE_TYPE_THIRD_PARTY_CREDIT_BUREAU",
            "DATA_SOURCE_TYPE_THIRD_PARTY_VOTER_FILE",
            "DATA_SOURCE_TYPE_THIRD_PARTY_PARTNER_DATA",
        ):
            return self._violation(f"unknown dataSourceType {source!r}")
        if account != self.customer_id:
            return (
                403,
                status_body(403, "PERMISSION_DENIED", "The caller does not have permission."),
                {},
            )
        if action is not None:
            return self._failure(action)
        with self._lock:
            if document["displayName"] in self.list_names.values():
                return _bad_request(
                    [
                        {
                            "field": "user_list.display_name",
                            "description": "The display name is already used by another list.",
                            "reason": "DISPLAY_NAME_ALREADY_USED",
                        }
                    ]
                )
            new_id = str(int(self.user_list_id) + 1000 + len(self.created))
            self._lists[new_id] = _UserList()
            self.list_names[new_id] = document["displayName"]
            self.created.append(dict(document))
        answer = {
            "name": f"accountTypes/{account_type}/accounts/{account}/userLists/{new_id}",
            "id": new_id,
            "displayName": document["displayName"],
            "membershipStatus": "OPEN",
            "ingestedUserListInfo": {
                **info,
                "contactIdInfo": {"dataSourceType": source or "DATA_SOURCE_TYPE_FIRST_PARTY"},
            },
        }
        return 200, orjson.dumps(answer), {}

    def _members(self, kind: str, document: dict, action: Failure | None) -> Answer:
        allowed = INGEST_KEYS if kind == "ingest" else REMOVE_KEYS
        extra = set(document) - allowed
        if extra:
            return self._violation(
                f'Invalid JSON payload received. Unknown name "{min(extra)}": Cannot find field.'
            )
        problem = self._check_destinations(document.get("destinations"))
        if problem:
            return self._violation(*problem)
        members = document.get("audienceMembers")
        if not isinstance(members, list) or not members:
            return self._violation(
                "audienceMembers is required", "REQUIRED_FIELD_MISSING", "audience_members"
            )
        if len(members) > MAX_MEMBERS:
            return self._violation(
                f"{len(members)} audience members; at most {MAX_MEMBERS} are allowed in a request",
                "TOO_MANY_AUDIENCE_MEMBERS",
                "audience_members",
            )
        if document.get("encoding") != "HEX":
            return self._violation(
                "encoding must be set for UserData uploads (HEX expected)",
                "INVALID_ENUM_VALUE",
                "encoding",
            )
        if kind == "ingest":
            terms = document.get("termsOfService") or {}
            if set(terms) - {"customerMatchTermsOfServiceStatus"}:
                return self._violation(
                    "Invalid JSON payload received. Unknown name in termsOfService"
                )
            if terms.get("customerMatchTermsOfServiceStatus") != "ACCEPTED":
                return self._violation(
                    "The Customer Match terms of service must be accepted.",
                    "TERMS_AND_CONDITIONS_NOT_SIGNED",
                    "terms_of_service",
                )
            consent = document.get("consent")
            if consent is not None and (
                not isinstance(consent, dict)
                or set(consent) - {"adUserData", "adPersonalization"}
                or any(v not in CONSENT for v in consent.values())
            ):
                return self._violation("consent must hold adUserData / adPersonalization statuses")
        parsed = []
        for index, member in enumerate(members):
            problem, identifiers = _parse_member(member)
            if problem:
                return self._violation(
                    problem, "INVALID_ARGUMENT", f"audience_members.audience_members[{index}]"
                )
            parsed.append(identifiers)
        destination = document["destinations"][0]
        with self._lock:
            user_list = self._lists.get(destination["productDestinationId"])
            owner_ok = destination["operatingAccount"]["accountId"] == self.customer_id
        if not owner_ok:
            return (
                403,
                status_body(403, "PERMISSION_DENIED", "The caller does not have permission."),
                {},
            )
        if user_list is None:
            return _bad_request(
                [
                    {
                        "field": "destinations[0].product_destination_id",
                        "description": "The user list does not exist.",
                        "reason": "INVALID_USER_LIST_ID",
                    }
                ]
            )
        if action is not None:
            return self._failure(action)
        with self._lock:
            rejected = {("emailAddress", h) for h in self._rejected_hashes}
        bad = [i for i, ids in enumerate(parsed) if ids & rejected]
        if bad:
            with self._lock:
                self.fast_failed += 1
            violations = [
                {
                    "field": f"audience_members.audience_members[{i}].user_data.user_identifiers",
                    "description": "The email address is not valid.",
                    "reason": "INVALID_FORMAT",
                }
                for i in bad
            ]
            return _bad_request(violations)
        request_id = str(uuid.uuid4())
        errors: dict[str, int] = {}
        with self._lock:
            for identifiers in parsed:
                failing = [
                    self._processing_failures[v]
                    for k, v in identifiers
                    if k == "emailAddress" and v in self._processing_failures
                ]
                if failing:  # refused in processing: not applied
                    errors[failing[0]] = errors.get(failing[0], 0) + 1
                    continue
                (user_list.ingest if kind == "ingest" else user_list.remove)(identifiers)
            failed = sum(errors.values())
            status = "SUCCESS" if not failed else "FAILED" if failed == len(parsed) else "PARTIAL_SUCCESS"
            self.request_status[request_id] = {
                "status": status, "errors": errors, "polls_left": self.processing_polls,
                "records": len(parsed), "kind": kind, "destination": document["destinations"][0],
            }  # fmt: skip
        return 200, orjson.dumps({"requestId": request_id}), {}

    def _request_status(self, query: str) -> Answer:
        from urllib.parse import parse_qs

        request_id = (parse_qs(query).get("requestId") or [""])[0]
        with self._lock:
            self.status_polls += 1
            entry = self.request_status.get(request_id)
            if entry is None:
                return self._violation(f"unknown requestId {request_id!r}", "INVALID_REQUEST_ID", "request_id")
            status = entry["status"]
            if entry["polls_left"] > 0:
                entry["polls_left"] -= 1
                status = "PROCESSING"
        per: dict[str, Any] = {"destination": entry["destination"], "requestStatus": status}
        counts = {"recordCount": str(entry["records"]), "userIdentifierCount": str(entry["records"])}
        if entry["kind"] == "ingest":
            per["audienceMembersIngestionStatus"] = {"userDataIngestionStatus": counts}
        else:
            per["audienceMembersRemovalStatus"] = {"userDataRemovalStatus": counts}
        if status in ("FAILED", "PARTIAL_SUCCESS"):
            per["errorInfo"] = {
                "errorCounts": [{"recordCount": str(c), "reason": r} for r, c in entry["errors"].items()]
            }
        return 200, orjson.dumps({"requestStatusPerDestination": [per]}), {}

    def _check_destinations(self, destinations: Any) -> tuple[str, str, str] | None:
        if not isinstance(destinations, list) or not 1 <= len(destinations) <= 10:
            return (
                "destinations must hold 1 to 10 destinations",
                "TOO_MANY_DESTINATIONS",
                "destinations",
            )
        for index, destination in enumerate(destinations):
            where = f"destinations[{index}]"
            if not isinstance(destination, dict):
                return (f"{where} is not an object", "INVALID_ARGUMENT", where)
            extra = set(destination) - {
                "reference",
                "loginAccount",
                "linkedAccount",
                "operatingAccount",
                "productDestinationId",
            }
            if extra:
                return (
                    f'Invalid JSON payload received. Unknown name "{min(extra)}"',
                    "INVALID_ARGUMENT",
                    where,
                )
            for account_key in ("operatingAccount", "loginAccount", "linkedAccount"):
                account = destination.get(account_key)
                if account is None and account_key != "operatingAccount":
                    continue
                if not isinstance(account, dict) or set(account) - {
                    "accountType",
                    "accountId",
                    "product",
                }:
                    return (f"{where}.{account_key} is malformed", "INVALID_ARGUMENT", where)
                if account.get("accountType") not in ACCOUNT_TYPES:
                    return (
                        f"{where}.{account_key}.accountType is missing or unknown",
                        "INVALID_ENUM_VALUE",
                        where,
                    )
                if not str(account.get("accountId") or "").isdigit():
                    return (
                        f"{where}.{account_key}.accountId must be digits",
                        "INVALID_ARGUMENT",
                        where,
                    )
            if (
                not isinstance(destination.get("productDestinationId"), str)
                or not destination["productDestinationId"]
            ):
                return (
                    f"{where}.productDestinationId is required",
                    "REQUIRED_FIELD_MISSING",
                    where,
                )
        return None


def _bad_request(violations: list[dict[str, str]]) -> Answer:
    """Google's 400 for a request whose fields ``violations`` name are at fault."""
    status = status_body(
        400, "INVALID_ARGUMENT", "There was a problem with the request.", violations=violations
    )
    return 400, status, {}


def _parse_member(member: Any) -> tuple[str | None, set[tuple[str, str]]]:
    """A member's problem (or ``None``) and its identifiers as (kind, value) pairs."""
    if not isinstance(member, dict) or set(member) - {
        "userData",
        "consent",
        "destinationReferences",
    }:
        return "a member must be {userData: ...}", set()
    user_data = member.get("userData")
    if not isinstance(user_data, dict) or set(user_data) != {"userIdentifiers"}:
        return "userData must hold userIdentifiers only", set()
    identifiers = user_data["userIdentifiers"]
    if not isinstance(identifiers, list) or not 1 <= len(identifiers) <= MAX_IDENTIFIERS:
        return f"a member needs 1 to {MAX_IDENTIFIERS} user identifiers", set()
    found: set[tuple[str, str]] = set()
    for identifier in identifiers:
        if not isinstance(identifier, dict) or len(identifier) != 1:
            return (
                "each user identifier holds exactly one of emailAddress, phoneNumber, address",
                set(),
            )
        ((kind, value),) = identifier.items()
        if kind in ("emailAddress", "phoneNumber"):
            if not isinstance(value, str) or not SHA256.match(value):
                return f"{kind} is not a lowercase hex SHA-256 digest", set()
            found.add((kind, value))
        elif kind == "address":
            if not isinstance(value, dict):
                return "address must be an object", set()
            parts = ("givenName", "familyName", "regionCode", "postalCode")
            extra = set(value) - set(parts) - {"addressLine", "city", "administrativeArea"}
            if extra:
                return f'Unknown name "{min(extra)}" in address', set()
            if any(not isinstance(value.get(p), str) or not value.get(p) for p in parts):
                return "address needs givenName, familyName, regionCode and postalCode", set()
            if not SHA256.match(value["givenName"]) or not SHA256.match(value["familyName"]):
                return "address names must be lowercase hex SHA-256 digests", set()
            if not re.match(r"^[A-Z]{2}$", value["regionCode"]):
                return "address regionCode must be two uppercase letters, not hashed", set()
            if SHA256.match(value["postalCode"]):
                return "address postalCode must not be hashed", set()
            found.add(("address", "|".join(value[p] for p in parts)))
        else:
            return f'Unknown name "{kind}" in user identifier', set()
    return None, found


class _UserList:
    """Members as sets of identifiers, found by any of them (the fake holds its lock)."""

    def __init__(self) -> None:
        self.members: dict[int, set[tuple[str, str]]] = {}
        self._index: dict[tuple[str, str], int] = {}
        self._next = 0

    def _find(self, identifiers: set[tuple[str, str]]) -> set[int]:
        return {self._index[i] for i in identifiers if i in self._index}

    def ingest(self, identifiers: set[tuple[str, str]]) -> None:
        found = self._find(identifiers)
        if found:
            member = min(found)
            for other in found - {member}:  # one person named by two earlier members
                self.members[member] |= self.members.pop(other)
        else:
            member = self._next
            self._next += 1
            self.members[member] = set()
        self.members[member] |= identifiers
        for identifier in self.members[member]:
            self._index[identifier] = member

    def remove(self, identifiers: set[tuple[str, str]]) -> None:
        for member in self._find(identifiers):
            for identifier in self.members.pop(member):
                self._index.pop(identifier, None)

    def emails(self) -> set[str]:
        return {v for m in self.members.values() for k, v in m if k == "emailAddress"}
