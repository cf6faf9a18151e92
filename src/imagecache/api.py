"""The JSON API (the README's "Using it"): every call is a POST under /api answering JSON
(imagecache.answers gives its shape, which the manager's internal API shares).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from aiohttp import web

from imagecache.answers import CHALLENGE, failure, success
from imagecache.appkeys import CONFIG, KEPT_COPIES, KEY_SAMPLER, MANAGER, SERVICE
from imagecache.errors import ImagecacheError, Unauthorized
from imagecache.uploads import read_fields, read_upload
from imagecache.webguards import require_api_token

log = logging.getLogger(__name__)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/delete_all", delete_all)
    app.router.add_post("/api/list_keys", list_keys)
    app.router.add_post("/api/upload", upload)
    app.router.add_post("/api/key/{key}", read_key)
    for name in ("configure_cache", "getNumNodes", "getRate", "miss_curve"):
        app.router.add_post(f"/api/{name}", forward_to_manager)


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure under /api in the error shape, with the same HTTP status; a
    refusal elsewhere (webguards) as plain text. A refused request is logged
    in one line, without a traceback: the client's mistake is not the gateway's."""
    is_api = request.path.startswith("/api/") or request.path == "/api"
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ImagecacheError as error:
        log_refusal(request, error.http_status, str(error))
        if not is_api:
            headers = CHALLENGE if isinstance(error, Unauthorized) else None
            return web.Response(status=error.http_status, text=str(error), headers=headers)
        return failure(error.http_status, str(error))
    except web.HTTPException as error:
        if not is_api or error.status < 400:
            raise
        log_refusal(request, error.status, error.reason)
        return failure(error.status, error.reason)
    except Exception:
        if not is_api:
            raise
        log.exception("unexpected error in %s %s", request.method, request.path)
        return failure(500, "internal error; the gateway's log has the details")


def log_refusal(request: web.Request, status: int, message: str) -> None:
    """One line for a request refused as the client's mistake (4xx); a missing
    image (404) is an ordinary answer and goes unlogged."""
    if status >= 500 or status == 404:
        return
    level = logging.WARNING if status in (401, 403) else logging.INFO
    log.log(level, "refused %s %s (%d): %s", request.method, request.path[:200], status, message)


async def delete_all(request: web.Request) -> web.Response:
    require_api_token(request, request.app[CONFIG].gateway.api_token)
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
    request.app[KEY_SAMPLER].looked_up(key, len(image.data))
    return success(key=key, content=base64.b64encode(image.data).decode("ascii"))


async def forward_to_manager(request: web.Request) -> web.Response:
    """configure_cache, getNumNodes, getRate and miss_curve are the manager's: pass them on."""
    name = request.path.rsplit("/", 1)[1]
    if name == "configure_cache":
        require_api_token(request, request.app[CONFIG].gateway.api_token)
    params = dict(request.query)
    params.update(await read_fields(request))
    return web.json_response(await request.app[MANAGER].call(name, params))
