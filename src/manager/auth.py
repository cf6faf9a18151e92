"""Who may use the manager: operators with the password, gateways with the shared token.

The password is kept only as a salted scrypt hash. A login gives a signed,
expiring session cookie; every form carries a CSRF token derived from the
session, checked on each POST. Gateways call ``/internal/*`` with
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

SESSION_COOKIE = "imagecache_manager_session"
SESSION_SECONDS = 12 * 3600
# Paths anyone may fetch: the login page itself, the stylesheet, Prometheus.
OPEN_PATHS = ("/login", "/static/", "/metrics")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Password:
    """A password to check against, remembered only as a salted hash."""

    def __init__(self, password: str) -> None:
        self._salt = secrets.token_bytes(16)
        self._hash = self._derive(password)

    def matches(self, candidate: str) -> bool:
        return hmac.compare_digest(self._hash, self._derive(candidate))

    def _derive(self, password: str) -> bytes:
        return hashlib.scrypt(password.encode(), salt=self._salt, n=2**14, r=8, p=1)


class Sessions:
    """Signed session cookies and the CSRF tokens bound to them."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock
        # A separate key for flash-message cookies, derived so that one secret suffices.
        self.flash_secret = hmac.new(secret, b"flash", hashlib.sha256).digest()

    def new_cookie(self) -> str:
        expires = int(self._clock()) + SESSION_SECONDS
        body = f"{expires}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def session_id(self, cookie: str | None) -> str | None:
        """The session's id if the cookie is genuine and not expired, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, signature = cookie.split(".")
        body = f"{expires}.{nonce}"
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        if not expires.isdigit() or int(expires) < self._clock():
            return None
        return nonce

    def csrf_token(self, session_id: str) -> str:
        return self._sign(f"csrf.{session_id}")

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()


def token_matches(request: web.Request, token: str) -> bool:
    """Whether the request carries the gateways' shared token."""
    supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return bool(token) and hmac.compare_digest(supplied.encode(), token.encode())


def is_open(path: str) -> bool:
    return path == "/login" or path.startswith(OPEN_PATHS)
