"""The JSON API (shared/DESIGN.md): every call is a POST under /api answering JSON.

Booleans are the strings "true"/"false"; errors are
``{"success": "false", "error": {"code": N, "message": "..."}}`` with status N.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from aiohttp import web

from imagecache.appkeys import CONFIG, KEPT_COPIES, MANAGER, SERVICE
from imagecache.errors import ImagecacheError
from imagecache.uploads import read_upload

log = logging.getLogger(__name__)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/delete_all", delete_all)
    app.router.add_post("/api/list_keys", list_keys)
    app.router.add_post("/api/upload", upload)
    app.router.add_post("/api/key/{key}", read_key)
    for name in ("configure_cache", "getNumNodes", "getRate"):
        app.router.add_post(f"/api/{name}", forward_to_manager)


def success(**fields: Any) -> web.Response:
    return web.json_response({"success": "true", **fields})


def failure(status: int, message: str) -> web.Response:
    return web.json_response(
        {"success": "false", "error": {"code": status, "message": message}}, status=status
    )


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure under /api in the error shape, with the same HTTP status."""
    if not request.path.startswith("/api/") and request.path != "/api":
        response: web.StreamResponse = await handler(request)
        return response
    try:
        response = await handler(request)
        return response
    except ImagecacheError as error:
        return failure(error.http_status, str(error))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return failure(error.status, error.reason)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return failure(500, "internal error; the gateway's log has the details")


async def delete_all(request: web.Request) -> web.Response:
    await request.app[SERVICE].delete_all()
    request.app[KEPT_COPIES].clear()  # never served again anyway; free the memory now
    return success()


async def list_keys(request: web.Request) -> web.Response:
    return success(keys=await request.app[SERVICE].list_keys())


async def upload(request: web.Request) -> web.Response:
    form = await read_upload(request, request.app[CONFIG].gateway.max_upload_bytes)
    await request.app[SERVICE].upload(form.key, form.data)
    return success(key=form.key)


async def read_key(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    image = await request.app[SERVICE].read(key)
    return success(key=key, content=base64.b64encode(image.data).decode("ascii"))


async def forward_to_manager(request: web.Request) -> web.Response:
    """configure_cache, getNumNodes and getRate are the manager's: pass them on."""
    params = dict(request.query)
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        params.update({k: str(v) for k, v in (await request.post()).items()})
    name = request.path.rsplit("/", 1)[1]
    return web.json_response(await request.app[MANAGER].call(name, params))
