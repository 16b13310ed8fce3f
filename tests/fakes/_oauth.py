"""An OAuth 2.0 token endpoint for the fakes: the grants Google and Salesforce document, with
tokens that expire.

:class:`TokenIssuer` is not a server of its own: a fake serves it on one of its paths
(``/token`` for Google, ``/services/oauth2/token`` for Salesforce) and asks it whether a
request's bearer token is valid. It serves

* ``grant_type=refresh_token`` (RFC 6749 section 6) with ``client_id``, ``client_secret`` and
  ``refresh_token``: a wrong one answers 400 ``invalid_grant`` / 401 ``invalid_client``, as
  both vendors do;
* ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` (RFC 7523) with an
  ``assertion``: a JWT checked with the public key of the test's key pair (RS256 signature,
  ``iss``, ``aud`` equal to the token URL, ``exp`` in the future and at most the vendor's
  allowed lifetime after ``iat``, and the vendor's own claims: Google's ``scope``,
  Salesforce's ``sub``).

Issued tokens expire after ``lifetime_s`` seconds or ``max_uses`` requests, whichever comes
first: a sync that runs longer than a token's life must refresh it. Every grant is recorded
in :attr:`TokenIssuer.grants`; a malformed one is a violation of the owning fake.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Callable
from urllib.parse import parse_qs

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ._http import Answer

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def new_key_pair() -> tuple[str, str]:
    """A fresh RSA key pair for a test: (private key PEM, public key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


class TokenIssuer:
    """Grants and checks access tokens; thread-safe.

    Args:
        token_url: the URL clients must post to (a JWT's ``aud``; Salesforce wants the login
            URL there, given as ``audience``).
        record_violation: the owning fake's violation recorder.
        client_id, client_secret, refresh_token: the refresh-token grant's credentials.
        public_key: PEM public key that JWT assertions must verify with (``None``: no JWT grant).
        issuer: the JWT ``iss`` expected (a service account's email, a connected app's key).
        audience: the JWT ``aud`` expected (default: ``token_url``).
        subject: the JWT ``sub`` expected (Salesforce's username), or ``None``.
        scope: a scope the JWT's ``scope`` claim must hold (Google), or ``None``.
        max_assertion_s: the longest ``exp - iat`` accepted.
        key_id: the JWT header's ``kid`` expected, or ``None``.
        lifetime_s: seconds an issued token lives (``expires_in`` of the answer).
        max_uses: requests an issued token serves before it is refused as expired.
        state_expires_in: whether the answer states ``expires_in`` (Salesforce's does not).
        extra: more fields of each answer (Salesforce's ``instance_url``).
    """

    def __init__(
        self,
        token_url: Callable[[], str],
        record_violation: Callable[[str], None],
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret-0123",
        refresh_token: str = "fake-refresh-token-4567",
        public_key: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        subject: str | None = None,
        scope: str | None = None,
        max_assertion_s: int = 3600,
        key_id: str | None = None,
        lifetime_s: float = 3600.0,
        max_uses: int | None = None,
        state_expires_in: bool = True,
        extra: Callable[[], dict[str, Any]] | None = None,
    ):
        self._token_url = token_url
        self._violation = record_violation
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.public_key = public_key
        self.issuer = issuer
        self.audience = audience
        self.subject = subject
        self.scope = scope
        self.max_assertion_s = max_assertion_s
        self.key_id = key_id
        self.lifetime_s = lifetime_s
        self.max_uses = max_uses
        self.state_expires_in = state_expires_in
        self.extra = extra
        self._lock = threading.Lock()
        self._tokens: dict[str, list[float]] = {}  # token -> [expires_at, uses left]
        self.grants: list[str] = []
        """The grant type of every token issued, in order."""
        self.refused: list[str] = []
        """Why each refused grant was refused."""
        self.expired_uses = 0
        """Requests that arrived with an expired token."""

    # -- the endpoint -------------------------------------------------------------------

    def handle(self, method: str, headers: Any, body: bytes) -> Answer:
        """Serve one token request."""
        if method != "POST":
            self._violation(f"{method} on the token endpoint")
            return self._error(405, "invalid_request", "POST only")
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            self._violation(f"token request with Content-Type {content_type!r}")
            return self._error(400, "invalid_request", "the body must be a form")
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        grant = form.get("grant_type")
        if grant == "refresh_token":
            if form.get("client_id") != self.client_id or (
                self.client_secret and form.get("client_secret") != self.client_secret
            ):
                return self._refuse(401, "invalid_client", "The OAuth client was not found.")
            if form.get("refresh_token") != self.refresh_token:
                return self._refuse(400, "invalid_grant", "Bad Request")
        elif grant == JWT_GRANT:
            problem = self._check_assertion(form.get("assertion") or "")
            if problem:
                return self._refuse(400, "invalid_grant", problem)
        else:
            self._violation(f"unknown grant_type {grant!r}")
            return self._error(400, "unsupported_grant_type", f"grant_type {grant!r}")
        token = "fake-at-" + secrets.token_hex(12)
        with self._lock:
            uses = float(self.max_uses) if self.max_uses is not None else float("inf")
            self._tokens[token] = [time.monotonic() + self.lifetime_s, uses]
            self.grants.append(grant)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.state_expires_in:
            answer["expires_in"] = int(self.lifetime_s) if self.lifetime_s >= 1 else 1
        if self.extra is not None:
            answer.update(self.extra())
        return 200, orjson.dumps(answer), {"Content-Type": "application/json"}

    def _check_assertion(self, assertion: str) -> str | None:
        if self.public_key is None:
            return "no JWT grant is configured"
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=self.audience or self._token_url(),
                options={"require": ["iss", "aud", "exp", "iat"]},
            )
        except jwt.PyJWTError as exc:
            return f"invalid JWT: {type(exc).__name__}: {exc}"
        if self.key_id is not None and header.get("kid") != self.key_id:
            return "the JWT's kid is not the key's id"
        if claims.get("iss") != self.issuer:
            return "the JWT's iss is not the expected issuer"
        if self.subject is not None and claims.get("sub") != self.subject:
            return "the JWT's sub is not the expected user"
        if self.scope is not None and self.scope not in str(claims.get("scope", "")).split():
            return f"the JWT's scope lacks {self.scope}"
        if int(claims["exp"]) - int(claims["iat"]) > self.max_assertion_s:
            return f"the JWT lives longer than {self.max_assertion_s} s"
        return None

    def _refuse(self, status: int, error: str, description: str) -> Answer:
        with self._lock:
            self.refused.append(f"{error}: {description}")
        return self._error(status, error, description)

    @staticmethod
    def _error(status: int, error: str, description: str) -> Answer:
        body = orjson.dumps({"error": error, "error_description": description})
        return status, body, {"Content-Type": "application/json"}

    # -- checking API requests -------------------------------------------------------------

    def check(self, token: str) -> str | None:
        """``None`` when ``token`` (one this issuer gave) is valid now, counting one use;
        ``"expired"`` when it was valid once; ``"unknown"`` otherwise."""
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None:
                return "unknown"
            if entry[0] <= time.monotonic() or entry[1] <= 0:
                self.expired_uses += 1
                return "expired"
            entry[1] -= 1
            return None

    def issued(self) -> int:
        """Tokens issued so far."""
        with self._lock:
            return len(self.grants)
