"""Sign-in for the dashboard: server-side sessions in an HMAC-signed cookie, and CSRF tokens.

Signing in with an API token makes a session in this process's memory (the token's SHA-256,
never the token, and when it ends); the browser gets only a cookie
``<session id>.<HMAC-SHA256 of it>``, HTTP-only and ``SameSite=Lax`` (``Secure`` when the
request came over HTTPS). Every request looks the session up and checks its token digest
against the workspaces again, so a token removed from the workspaces file stops working at
once, and signing out deletes the session on the server, not only the cookie.

Cross-site requests: every form carries a CSRF token, the HMAC of the session id under a
separate label, compared in constant time; the sign-in form, which has no session yet, is
bound the same way to a short-lived pre-session cookie. ``SameSite=Lax`` keeps the cookies
off cross-site POSTs as well, and a POST whose ``Origin`` names another host is refused.

The signing key is random per process unless ``AUDSYNC_DASHBOARD_SECRET`` is set. Sessions
live in the process's memory: a restart of the service signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass

SECRET_ENV = "AUDSYNC_DASHBOARD_SECRET"
SESSION_COOKIE = "audsync_session"
PRE_COOKIE = "audsync_presession"
SESSION_TTL_S = 12 * 3600
PRE_TTL_S = 3600
# Bounded memory: past this many live sessions the oldest are dropped.
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """A signed-in browser: the digest of the token it signed in with, and its expiry."""

    id: str
    token_digest: str
    expires_at: float


class Sessions:
    """The dashboard's sessions, cookie signatures and CSRF tokens (thread-safe)."""

    def __init__(self, secret: bytes | None = None, ttl_s: float = SESSION_TTL_S):
        configured = os.environ.get(SECRET_ENV)
        self._key = secret or (configured.encode() if configured else secrets.token_bytes(32))
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -- signing ------------------------------------------------------------------------------

    def _mac(self, label: str, value: str) -> str:
        return hmac.new(self._key, f"{label}:{value}".encode(), hashlib.sha256).hexdigest()

    def sign(self, value: str) -> str:
        """``value.<signature>``: the form of every cookie the dashboard sets."""
        return f"{value}.{self._mac('cookie', value)}"

    def unsign(self, signed: str | None) -> str | None:
        """The value of a signed cookie, or ``None`` when missing or tampered with."""
        if not signed or "." not in signed or len(signed) > 300:
            return None
        value, _, mac = signed.rpartition(".")
        return value if hmac.compare_digest(mac, self._mac("cookie", value)) else None

    # -- sessions -----------------------------------------------------------------------------

    def create(self, token_digest: str) -> Session:
        """A new session for a token (by its digest)."""
        now = time.time()
        session = Session(secrets.token_urlsafe(24), token_digest, now + self.ttl_s)
        with self._lock:
            for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
                del self._sessions[sid]
            while len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions.values(), key=lambda s: s.expires_at)
                del self._sessions[oldest.id]
            self._sessions[session.id] = session
        return session

    def get(self, cookie: str | None) -> Session | None:
        """The live session of a session cookie, or ``None``."""
        sid = self.unsign(cookie)
        if sid is None:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and session.expires_at <= time.time():
                del self._sessions[sid]
                session = None
        return session

    def end(self, cookie: str | None) -> None:
        """Forget the session of this cookie (sign-out)."""
        sid = self.unsign(cookie)
        if sid is not None:
            with self._lock:
                self._sessions.pop(sid, None)

    # -- CSRF ---------------------------------------------------------------------------------

    def csrf_for(self, bound_to: str) -> str:
        """The CSRF token of a session id (or of a pre-session nonce)."""
        return self._mac("csrf", bound_to)

    def csrf_ok(self, bound_to: str | None, presented: str | None) -> bool:
        """Whether ``presented`` is the CSRF token of ``bound_to``, in constant time."""
        if not bound_to or not presented:
            return False
        return hmac.compare_digest(self.csrf_for(bound_to), presented)


def new_nonce() -> str:
    """A random pre-session nonce (the sign-in form's CSRF binding)."""
    return secrets.token_urlsafe(18)
