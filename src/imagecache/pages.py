"""The web pages: add an image, show an image, list the keys; and the image bytes."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from imagecache.api import log_refusal
from imagecache.appkeys import CONFIG, FLASH_SECRET, KEPT_COPIES, KEY_SAMPLER, SERVICE
from imagecache.errors import BadRequest, ImagecacheError, ImageNotFound
from imagecache.flash import set_flash, take_flash
from imagecache.images import KEY_RULE, check_key
from imagecache.keptcopies import (
    etag_matches,
    etag_of,
    image_header_fields,
    not_found_header_fields,
)
from imagecache.uploads import read_upload


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", add_page, name="add")
    app.router.add_post("/", add_image)
    app.router.add_get("/show", show_page, name="show")
    app.router.add_get("/keys", keys_page, name="keys")
    app.router.add_get("/image/{key}", image, name="image")


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    context.setdefault("flash", take_flash(request, request.app[FLASH_SECRET]))
    context["key_rule"] = KEY_RULE
    context["max_upload_mb"] = request.app[CONFIG].gateway.max_upload_bytes / (1 << 20)
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    if context["flash"] is not None:
        response.del_cookie("imagecache_flash", path="/")
    return response


async def add_page(request: web.Request) -> web.Response:
    return render(request, "add.html", page="add")


async def add_image(request: web.Request) -> web.StreamResponse:
    """Store the posted image, then redirect to it (or show the form again with the error)."""
    try:
        form = await read_upload(request, request.app[CONFIG].gateway.max_upload_bytes)
        result = await request.app[SERVICE].upload(form.key, form.data)
    except ImagecacheError as error:
        log_refusal(request, error.http_status, str(error))
        return render(
            request,
            "add.html",
            status=error.http_status,
            page="add",
            flash=("error", f"Nothing was stored: {error}."),
        )
    key = result.record.key
    verb = "Replaced the image of" if result.replaced else "Stored a new image under"
    location = request.app.router["show"].url_for().with_query(key=key)
    # Post/redirect/get: a reload of the result page does not upload again.
    response = web.Response(status=303, headers={"Location": str(location)})
    set_flash(response, request.app[FLASH_SECRET], "success", f"{verb} key '{key}'.")
    return response


async def show_page(request: web.Request) -> web.Response:
    key = request.query.get("key", "").strip()
    if not key:
        return render(request, "show.html", page="show", key="")
    try:
        check_key(key)
        image = await request.app[SERVICE].read(key)
    except (BadRequest, ImageNotFound) as error:
        status = error.http_status
        message = f"No image for key '{key}'." if status == 404 else str(error)
        return render(request, "show.html", status=status, page="show", key=key, missing=message)
    return render(request, "show.html", page="show", key=key, image=image)


async def keys_page(request: web.Request) -> web.Response:
    records = await request.app[SERVICE].list_images()
    return render(request, "keys.html", page="keys", records=records)


async def image(request: web.Request) -> web.StreamResponse:
    """The image bytes, typed by content, with an ETag of its version."""
    try:
        found = await request.app[SERVICE].read(request.match_info["key"])
    except ImageNotFound as error:
        # The same 404 as the fast path's (keptcopies.not_found_header_fields).
        message = str(error).encode()
        return web.Response(status=404, body=message, headers=not_found_header_fields(len(message)))
    except ImagecacheError as error:
        raise _http_error(error) from error
    request.app[KEY_SAMPLER].looked_up(found.key, len(found.data))
    # The fast path serves later hits of this key from this copy (fastpath.py).
    request.app[KEPT_COPIES].keep(
        found.key, found.version, found.content_type, found.data, from_node=found.from_node
    )
    # The same headers as the fast path's (keptcopies.image_header_fields).
    etag = etag_of(found.version)
    if etag_matches(request.headers.get("If-None-Match", "").encode(), etag.encode()):
        return web.Response(status=304, headers=image_header_fields(found.version))
    headers = image_header_fields(found.version, found.content_type, len(found.data))
    return web.Response(body=found.data, headers=headers)


_HTTP_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    503: web.HTTPServiceUnavailable,
}


def _http_error(error: ImagecacheError) -> web.HTTPException:
    return _HTTP_ERRORS.get(error.http_status, web.HTTPInternalServerError)(text=str(error))
