"""One-shot messages carried across a redirect in a signed cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from aiohttp import web

COOKIE = "imagecache_flash"
Flash = tuple[str, str]  # (level: "success" | "error", message)


def set_flash(response: web.StreamResponse, secret: bytes, level: str, message: str) -> None:
    payload = base64.urlsafe_b64encode(json.dumps([level, message]).encode()).decode()
    response.set_cookie(
        COOKIE, f"{payload}.{_sign(secret, payload)}", httponly=True, samesite="Lax", path="/"
    )


def take_flash(request: web.Request, secret: bytes) -> Flash | None:
    """The message the previous response left, if its signature holds."""
    cookie = request.cookies.get(COOKIE, "")
    payload, _, signature = cookie.partition(".")
    if not payload or not hmac.compare_digest(signature, _sign(secret, payload)):
        return None
    try:
        level, message = json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:
        return None
    return str(level), str(message)


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
