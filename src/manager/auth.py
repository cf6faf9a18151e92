"""Who may use the manager: operators with the password, gateways with the shared token.

The password is kept only as a salted scrypt hash, and candidates are hashed
on a thread of their own, one at a time, so a flood of logins neither stalls
the event loop (which ``imagecache up`` shares with the gateway) nor takes
more than one core. A login gives a signed, expiring session cookie that the
manager also remembers until logout; every form carries a CSRF token derived
from the session, checked on each POST. Wrong passwords are throttled per
client address. Gateways call ``/internal/*`` with
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

SESSION_COOKIE = "imagecache_manager_session"
SESSION_SECONDS = 12 * 3600
# Live sessions kept at most; past it, the oldest login ends (each needs the password).
MAX_SESSIONS = 1000
# Paths anyone may fetch: the login page itself, the stylesheet, Prometheus.
OPEN_PATHS = ("/login", "/static/", "/metrics")
# Where a login goes when its "next" is missing or not a path of the manager.
DEFAULT_NEXT = "/config"
NEXT_MAX_LENGTH = 2000

# One hash at a time (about 50 ms of one core each): an operator waits at most
# MAX_WAITING_HASHES of them, and a flood leaves the other cores to the gateway.
HASH_THREADS = 1
MAX_WAITING_HASHES = 16

# Wrong passwords: FREE_FAILURES in a row cost nothing, then each one shuts the
# client out for twice as long as the one before (1 s, 2 s, 4 s ... 5 min).
FREE_FAILURES = 5
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 300.0
# A try from a client that must wait is answered (429) only after this long
# (or its wait, if shorter): one that retries at once then sends two tries a
# second per connection, not thousands, on the loop the gateway may share.
REFUSAL_DELAY_SECONDS = 0.5
# A client quiet this long starts again from nothing.
FORGET_SECONDS = 3600.0
MAX_TRACKED_CLIENTS = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HashingBusy(Exception):
    """Too many password checks are already waiting for the hashing thread."""


class Password:
    """A password to check against, remembered only as a salted hash.

    ``matches`` hashes on a dedicated pool of ``threads`` threads and raises
    HashingBusy rather than queue more than ``max_waiting`` checks; ``close``
    stops the pool.
    """

    def __init__(
        self, password: str, threads: int = HASH_THREADS, max_waiting: int = MAX_WAITING_HASHES
    ) -> None:
        self._salt = secrets.token_bytes(16)
        self._hash = self._derive(password)
        self._hashing = ThreadPoolExecutor(threads, thread_name_prefix="manager-password")
        self._max_waiting = max_waiting
        self._waiting = 0

    async def matches(self, candidate: str) -> bool:
        if self._waiting >= self._max_waiting:
            raise HashingBusy
        self._waiting += 1
        try:
            # hashlib.scrypt releases the GIL: the event loop runs on meanwhile.
            derived = await asyncio.get_running_loop().run_in_executor(
                self._hashing, self._derive, candidate
            )
        finally:
            self._waiting -= 1
        return hmac.compare_digest(self._hash, derived)

    def close(self) -> None:
        self._hashing.shutdown(wait=False, cancel_futures=True)

    def _derive(self, password: str) -> bytes:
        return hashlib.scrypt(
            password.encode(errors="surrogatepass"), salt=self._salt, n=2**14, r=8, p=1
        )


class Sessions:
    """Signed session cookies, the live sessions, and the CSRF tokens bound to them.

    A cookie holds only while its session is live here: ``end`` (logout) makes
    it worthless at once, though it is still genuine and unexpired. The record
    is in memory because the manager runs as one process (``imagecache up``
    and ``imagecache manager`` alike); a restart ends every session. Managers
    in several processes would have to keep it in the shared database.
    """

    def __init__(
        self,
        secret: bytes,
        clock: Callable[[], float] = time.time,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        # A separate key for flash-message cookies, derived so that one secret suffices.
        self.flash_secret = hmac.new(secret, b"flash", hashlib.sha256).digest()
        self._secret = secret
        self._clock = clock
        self._max_sessions = max_sessions
        # session id -> when it expires, in order of login (so of expiry too).
        self._live: dict[str, int] = {}

    def new_cookie(self) -> str:
        now = self._clock()
        while self._live and (
            next(iter(self._live.values())) < now or len(self._live) >= self._max_sessions
        ):
            del self._live[next(iter(self._live))]
        expires = int(now) + SESSION_SECONDS
        nonce = secrets.token_hex(16)
        self._live[nonce] = expires
        body = f"{expires}.{nonce}"
        return f"{body}.{self._sign(body)}"

    def session_id(self, cookie: str | None) -> str | None:
        """The session's id if the cookie is genuine, live and not expired, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, signature = cookie.split(".")
        body = f"{expires}.{nonce}"
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        if not expires.isdigit() or int(expires) < self._clock() or nonce not in self._live:
            return None
        return nonce

    def end(self, cookie: str | None) -> None:
        """Log out: the session of ``cookie`` (if any) is no longer live."""
        session_id = self.session_id(cookie)
        if session_id is not None:
            del self._live[session_id]

    def csrf_token(self, session_id: str) -> str:
        return self._sign(f"csrf.{session_id}")

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()


@dataclass
class _Failures:
    count: int = 0
    shut_until: float = 0.0
    last_seen: float = 0.0


class LoginThrottle:
    """Wrong passwords per client: FREE_FAILURES, then a doubling wait before each try.

    ``attempt`` counts a try as failed before the password is even checked,
    so concurrent tries from one client are counted too; ``succeeded`` forgets
    the client. At most ``max_clients`` are tracked; the one unseen longest
    goes first.
    """

    def __init__(
        self,
        free_failures: int = FREE_FAILURES,
        first_delay: float = FIRST_DELAY_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        max_clients: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        refusal_delay: float = REFUSAL_DELAY_SECONDS,
    ) -> None:
        self.refusal_delay = refusal_delay  # how long a refused try waits for its 429
        self._free_failures = free_failures
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._max_clients = max_clients
        self._clock = clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()

    def attempt(self, client: str) -> float:
        """0 if ``client`` may try a password now (the try counted as failed), else
        the seconds it must wait."""
        now = self._clock()
        failures = self._clients.pop(client, None)
        if failures is None or now - failures.last_seen > FORGET_SECONDS:
            failures = _Failures()
        failures.last_seen = now
        self._clients[client] = failures  # the most recently seen last
        while len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)
        if now < failures.shut_until:
            return failures.shut_until - now
        failures.count += 1
        beyond = failures.count - self._free_failures
        if beyond >= 0:
            delay = self._first_delay * 2 ** min(beyond, 62)
            failures.shut_until = now + min(delay, self._max_delay)
        return 0.0

    def waiting(self, client: str) -> float:
        """The seconds ``client`` must still wait before its next try (0: none)."""
        failures = self._clients.get(client)
        return 0.0 if failures is None else max(0.0, failures.shut_until - self._clock())

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)

    def __len__(self) -> int:
        return len(self._clients)


def client_address(request: web.Request) -> str:
    """Whom to throttle: the peer's address (an IPv6 client by its /64 network).

    X-Forwarded-For is not trusted: anyone can send it. Behind a load balancer
    every client shares the balancer's address, so the throttle then holds
    for all of them together.
    """
    peer = request.remote or ""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        # One host commonly holds a whole /64: counting its addresses apart would
        # give it 2**64 fresh starts.
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, rounded up."""
    return str(max(1, math.ceil(seconds)))


def local_path(target: str) -> str:
    """``target`` if it is a path of this site that a browser reads as one, else DEFAULT_NEXT.

    Strict on purpose: one leading "/" and no "//" anywhere, no backslash
    (browsers read it as "/"), no whitespace or control characters (browsers
    drop tabs and newlines, so "/\\t/evil.example" becomes "//evil.example").
    """
    if (
        0 < len(target) <= NEXT_MAX_LENGTH
        and target.startswith("/")
        and "//" not in target
        and "\\" not in target
        and all(ch.isprintable() and not ch.isspace() for ch in target)
    ):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return DEFAULT_NEXT


def token_matches(request: web.Request, token: str) -> bool:
    """Whether the request carries the gateways' shared token."""
    supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return bool(token) and hmac.compare_digest(supplied.encode(), token.encode())


def is_open(path: str) -> bool:
    return path == "/login" or path.startswith(OPEN_PATHS)
