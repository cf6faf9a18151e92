"""What the gateway's web app guards: writes from other sites' pages, the optional
API token, and the security headers of every response.

The API's contract has its calls made without credentials by clients that are
not browsers (they send no ``Origin``), so a write is refused only when a
browser says it comes from another site's page: any page could otherwise
post a form to ``/api/delete_all`` of a gateway its visitor can reach.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from imagecache.errors import Forbidden, Unauthorized

# Sent with every response, aiohttp's and the fast path's (keptcopies.prepared):
# no content sniffing (an upload is served as the type its bytes are), and no
# page of ours framed by another site (clickjacking the add form).
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def same_site_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (Forbidden, 403) every unsafe method a browser sends from another site's page."""
    if request.method not in SAFE_METHODS:
        reason = cross_site_reason(request)
        if reason is not None:
            raise Forbidden(
                f"{request.method} {request.path} from another site is refused: {reason}"
            )
    return await handler(request)


def cross_site_reason(request: web.BaseRequest) -> str | None:
    """Why the browser that sent ``request`` did so from another site's page; None when
    it did not, or when no browser sent it (no Origin, no Sec-Fetch-Site).

    The Origin must name the gateway's own host and port as the Host header does.
    The scheme is not compared, so that pages served through a proxy ending
    TLS (Origin https://..., the gateway seeing http) can still post.
    ``Origin: null`` (sandboxed frames, some redirects) is another site.
    """
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return "Sec-Fetch-Site is cross-site"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    own = _host_and_port(request.scheme, request.host)
    if own is None or _origin_host_and_port(origin) != own:
        return f"Origin {origin[:200]!r} is not this gateway ({request.host[:200]})"
    return None


def _origin_host_and_port(origin: str) -> tuple[str, int | None] | None:
    try:
        url = URL(origin.strip())
    except ValueError:
        return None
    if url.scheme not in _DEFAULT_PORTS or url.path not in ("", "/"):
        return None
    return _host_and_port(url.scheme, url.raw_authority)


def _host_and_port(scheme: str, authority: str) -> tuple[str, int | None] | None:
    """The host (lower case) and port of ``authority``, the port None when it is the
    scheme's default or absent; None when it does not parse."""
    try:
        url = URL.build(scheme=scheme, authority=authority)
    except (ValueError, TypeError):
        return None
    if not url.host or url.user is not None:
        return None
    port = url.explicit_port
    return url.host.lower(), None if port == _DEFAULT_PORTS.get(scheme) else port


def require_api_token(request: web.Request, token: str) -> None:
    """Raise Unauthorized unless the request carries ``token`` (``gateway.api_token``)
    as a Bearer token; nothing is required while it is empty."""
    if not token:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant time: how long the comparison takes tells nothing about the token.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode()
    ):
        raise Unauthorized(
            "this call needs the gateway's API token: send 'Authorization: Bearer <token>'"
        )


async def add_security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: SECURITY_HEADERS on every response aiohttp sends."""
    for name, value in SECURITY_HEADERS:
        response.headers.setdefault(name, value)
