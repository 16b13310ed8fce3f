"""Credentials that refresh: OAuth access tokens obtained, renewed before they expire, and
renewed once after a 401, for the connectors whose tokens are short-lived (Google, Salesforce).

A scheduled sync cannot depend on a pasted token: Google's access tokens live an hour,
Salesforce sessions end by org policy (destinations.md, "Corrections"). A connector builds a
:class:`TokenSource` from its settings with one of the grants below and sends its requests
through :class:`BearerAuth`, which

* puts ``Authorization: Bearer <token>`` on each request, the token read when the request
  is sent, so that a refreshed token is used at once;
* refreshes ahead of the token's expiry (:data:`REFRESH_MARGIN_S`, or a quarter of a short
  lifetime);
* on a 401 refreshes once and sends the same request again, so that the batch is not lost;
  a second 401 goes to the connector's policy (fatal);
* lets the ``max_concurrency`` sender threads share one refresh: the token is behind a lock,
  and a 401 answered to a token that another thread already replaced does not refresh again;
* masks every token it obtains (:meth:`HttpClient.add_secrets` and :mod:`audsync.redact`), as
  every secret of ``destinations.yml`` is masked.

Grants: :class:`StaticToken` (a pasted ``access_token``: nothing to refresh),
:class:`RefreshTokenGrant` (OAuth ``grant_type=refresh_token``, Google and Salesforce) and
:class:`JwtBearerGrant` (RFC 7523 ``urn:ietf:params:oauth:grant-type:jwt-bearer``: a Google
service account, or Salesforce's JWT bearer flow). The JWT is signed with PyJWT (RS256 through
``cryptography``): a small, well-kept library rather than hand-rolled signing. The token
endpoint is a setting (``token_url``) so that tests point it at a fake.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from audsync import redact as _redact
from audsync.delivery.http import Verdict, answer_text
from audsync.destinations.base import FatalDestinationError
from audsync.destinations.common import json_object

logger = logging.getLogger("audsync.destinations.auth")

REFRESH_MARGIN_S = 300.0
"""Refresh this long before a token's stated expiry (Google's own libraries use a few minutes):
a request sent just before the expiry must not arrive just after it."""
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_LIFETIME_S = 3600.0
"""A token whose answer states no ``expires_in`` (Salesforce's) is kept until a 401, or for
``token_lifetime_s`` when the destination sets it."""


class TokenSource:
    """An access token, refreshed when due; thread-safe.

    Subclasses implement :meth:`_fetch`, returning ``(token, lifetime_s or None, extra)``.

    Args:
        name: the destination (for messages).
        lifetime_s: how long a token lives when its answer does not say (``None``: until a 401).
    """

    refreshable = True

    def __init__(self, name: str, *, lifetime_s: float | None = None):
        self.name = name
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at: float | None = None
        self.extra: dict[str, Any] = {}
        """What the last token answer carried beside the token (Salesforce's ``instance_url``)."""
        self.refreshes = 0
        """Tokens obtained so far (a test counts them)."""
        self.http: Any = None
        """The run's HttpClient, set by :class:`BearerAuth`."""

    def token(self) -> str:
        """The current token, obtained or refreshed first when it is missing or due."""
        with self._lock:
            if self._token is None or self._due():
                self._refresh()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """``token`` was refused (401): refresh on the next :meth:`token`, unless another thread
        replaced it already (so that concurrent 401s share one refresh)."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _due(self) -> bool:
        if self._expires_at is None:
            return False
        return time.monotonic() >= self._expires_at

    def _refresh(self) -> None:
        token, lifetime, extra = self._fetch()
        if not token:
            raise FatalDestinationError(
                f"destination {self.name!r}: the token endpoint's answer has no access_token"
            )
        # Masked before it is used anywhere, so that no message can carry it unmasked.
        _redact.register_secret(token)
        if self.http is not None:
            self.http.add_secrets([token])
        lifetime = lifetime if lifetime is not None else self.lifetime_s
        if lifetime is None:
            self._expires_at = None
        else:
            margin = min(REFRESH_MARGIN_S, lifetime / 4)
            self._expires_at = time.monotonic() + max(0.0, lifetime - margin)
        self._token = token
        self.extra = dict(extra)
        self.refreshes += 1
        logger.debug("destination %r: obtained an access token", self.name)

    def _fetch(self) -> tuple[str, float | None, Mapping[str, Any]]:
        raise NotImplementedError


class StaticToken(TokenSource):
    """A token given in the settings: used as is, never refreshed (a 401 stays fatal)."""

    refreshable = False

    def __init__(self, name: str, token: str):
        super().__init__(name)
        self.value = token

    def _fetch(self) -> tuple[str, float | None, Mapping[str, Any]]:
        return self.value, None, {}


class _EndpointGrant(TokenSource):
    """A grant exchanged at an OAuth token endpoint (a form POST answered with JSON)."""

    def __init__(self, name: str, token_url: str, *, lifetime_s: float | None = None):
        super().__init__(name, lifetime_s=lifetime_s)
        self.token_url = token_url

    def _form(self) -> dict[str, str]:
        raise NotImplementedError

    def _fetch(self) -> tuple[str, float | None, Mapping[str, Any]]:
        if self.http is None:
            raise FatalDestinationError(f"destination {self.name!r}: no HTTP client for the token")
        response = self.http.request(
            "POST",
            self.token_url,
            data=self._form(),
            headers={"Accept": "application/json"},
            classify=self._classify,
        )
        answer = json_object(response.content) or {}
        lifetime = answer.get("expires_in")
        try:
            seconds = float(lifetime) if lifetime is not None else None
        except (TypeError, ValueError):
            seconds = None
        extra = {k: v for k, v in answer.items() if k not in ("access_token", "id_token")}
        return str(answer.get("access_token") or ""), seconds, extra

    def _classify(self, response: Any) -> Verdict | None:
        """The token endpoint's refusal (``invalid_grant``, ``invalid_client``) is fatal:
        credentials do not heal by waiting. 429 and 5xx are left to the default policy."""
        status = response.status_code
        if status < 300:
            return Verdict.ok()
        if status in (400, 401, 403):
            answer = json_object(response.content) or {}
            error = str(answer.get("error") or status)
            text = str(answer.get("error_description") or "") or answer_text(response)
            return Verdict.fatal(
                f"the token endpoint refused the credentials ({error}: {text[:200]}); check"
                " the destination's client id, secret, refresh token or key"
            )
        return None


class RefreshTokenGrant(_EndpointGrant):
    """OAuth 2.0 ``grant_type=refresh_token`` (RFC 6749 section 6)."""

    def __init__(
        self,
        name: str,
        token_url: str,
        *,
        client_id: str,
        client_secret: str | None,
        refresh_token: str,
        lifetime_s: float | None = None,
    ):
        super().__init__(name, token_url, lifetime_s=lifetime_s)
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token

    def _form(self) -> dict[str, str]:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self.refresh_token,
            "client_id": self.client_id,
        }
        if self.client_secret:
            form["client_secret"] = self.client_secret
        return form


class JwtBearerGrant(_EndpointGrant):
    """RFC 7523's JWT bearer grant: a JWT signed with a private key (RS256) is the assertion.

    Args:
        claims: the JWT's claims beside ``iat`` and ``exp`` (``iss``, ``aud``, ``scope`` or
            ``sub``).
        private_key: the PEM private key.
        key_id: the key's id, put in the JWT header as ``kid`` (a Google service account's
            ``private_key_id``), or ``None``.
        assertion_lifetime_s: the JWT's own lifetime (Google allows an hour, Salesforce three
            minutes).
    """

    def __init__(
        self,
        name: str,
        token_url: str,
        *,
        claims: Mapping[str, Any],
        private_key: str,
        key_id: str | None = None,
        assertion_lifetime_s: int = 3600,
        lifetime_s: float | None = None,
    ):
        super().__init__(name, token_url, lifetime_s=lifetime_s)
        self.claims = dict(claims)
        self.private_key = private_key
        self.key_id = key_id
        self.assertion_lifetime_s = assertion_lifetime_s

    def assertion(self) -> str:
        """A freshly signed JWT."""
        import jwt  # PyJWT: imported when a JWT grant is used, not with every connector

        now = int(time.time())
        claims = {**self.claims, "iat": now, "exp": now + self.assertion_lifetime_s}
        headers = {"kid": self.key_id} if self.key_id else None
        try:
            return jwt.encode(claims, self.private_key, algorithm="RS256", headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            # The key itself is never quoted; the message names what is wrong with it.
            raise FatalDestinationError(
                f"destination {self.name!r}: the private key cannot sign a JWT"
                f" ({type(exc).__name__}); it must be an RSA private key in PEM form"
            ) from None

    def _form(self) -> dict[str, str]:
        return {"grant_type": JWT_GRANT, "assertion": self.assertion()}


class BearerAuth:
    """Send a connector's requests with a bearer token from ``source``, refreshing as needed.

    Args:
        source: where tokens come from.
        http: the run's :class:`~audsync.delivery.http.HttpClient`.
        header: the header that carries the token, and ``prefix`` its scheme word.
    """

    def __init__(
        self,
        source: TokenSource,
        http: Any,
        *,
        header: str = "Authorization",
        prefix: str = "Bearer ",
    ):
        self.source = source
        self.http = http
        if source.http is None:
            source.http = http
        self.header = header
        self.prefix = prefix

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        classify: Callable[[Any], Verdict | None] | None = None,
        url_of: Callable[[], str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``http.request`` with the token added; one refresh and resend after a 401.

        ``url_of``, when given, builds the URL after the token is known (Salesforce's
        ``instance_url`` comes with the token); otherwise ``url`` is used.
        """
        for attempt in (1, 2):
            token = self.source.token()
            sent = {**(headers or {}), self.header: self.prefix + token}
            retry_401 = attempt == 1 and self.source.refreshable

            def policy(response: Any, retry_401: bool = retry_401) -> Verdict | None:
                if retry_401 and response.status_code == 401:
                    return Verdict.ok()  # back to us: refresh and send once more
                return classify(response) if classify is not None else None

            response = self.http.request(
                method, url_of() if url_of else url, headers=sent, classify=policy, **kwargs
            )
            if retry_401 and response.status_code == 401:
                logger.info(
                    "destination %r: the access token was refused (401); refreshing it",
                    self.source.name,
                )
                self.source.invalidate(token)
                continue
            return response
        raise AssertionError("unreachable: the second attempt returns or raises")


def load_json_key(name: str, value: Any, what: str) -> dict[str, Any]:
    """A JSON key given inline (text or a mapping) or as the path of a file holding it."""
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value or "").strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise FatalDestinationError(
                f"destination {name!r}: cannot read the {what} file {str(path)!r}"
                f" ({exc.strerror or exc})"
            ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        raise FatalDestinationError(f"destination {name!r}: the {what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise FatalDestinationError(f"destination {name!r}: the {what} is not a JSON object")
    return document
