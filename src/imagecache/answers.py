"""The JSON answers of the gateway's API and of the manager's internal API alike.

Booleans are the strings "true"/"false"; errors are
``{"success": "false", "error": {"code": N, "message": "..."}}`` with status N.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

# RFC 9110: a 401 names the authentication scheme it wants (both APIs take a
# bearer token).
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="imagecache"'}


def success(**fields: Any) -> web.Response:
    return web.json_response({"success": "true", **fields})


def failure(status: int, message: str) -> web.Response:
    return web.json_response(
        {"success": "false", "error": {"code": status, "message": message}},
        status=status,
        headers=CHALLENGE if status == 401 else None,
    )
