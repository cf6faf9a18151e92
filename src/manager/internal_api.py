"""The manager's API for gateways: configure_cache, getNumNodes, getRate.

Gateways forward the public ``/api/...`` admin calls here (shared/DESIGN.md
gives their answers); the shared token guards it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from imagecache.errors import StorageError
from manager.appkeys import COLLECTOR, CONTROLLER
from manager.backends.base import PoolError
from manager.forms import read_form
from manager.pool import ResizeError
from manager.settings import MAX_NODES, MIN_NODES, SettingsError, apply_params, policy_label


def add_routes(app: web.Application) -> None:
    app.router.add_post("/internal/configure_cache", configure_cache)
    app.router.add_post("/internal/getNumNodes", get_num_nodes)
    app.router.add_post("/internal/getRate", get_rate)


def error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"success": "false", "error": {"code": status, "message": message}}, status=status
    )


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


async def configure_cache(request: web.Request) -> web.Response:
    """Apply mode, numNodes, cacheSize, policy and the autoscaler's parameters.

    Everything is validated before anything changes; the answer echoes what
    is in force once it returns (the pool already has numNodes nodes then).
    """
    params: dict[str, str] = dict(await read_form(request))
    controller = request.app[CONTROLLER]
    try:
        settings = apply_params(await controller.settings(), params)
        target: int | None = None
        if params.get("numNodes", "") != "":
            text = params["numNodes"]
            if not text.isdigit() or not MIN_NODES <= int(text) <= MAX_NODES:
                raise SettingsError(f"numNodes must be a whole number from 1 to 8, not {text!r}")
            target = int(text)
    except SettingsError as problem:
        return error(400, str(problem))
    try:
        await controller.configure(settings, target, "configure_cache (API)")
    except ResizeError as problem:
        return error(400, str(problem))
    except (PoolError, StorageError) as problem:
        # Logged by the controller; the settings and the size are as they were.
        return error(503, f"the pool could not be resized, nothing changed: {problem}")
    answer: dict[str, Any] = {
        "success": "true",
        "mode": settings.mode.value,
        "numNodes": controller.size,
        "cacheSize": _number(settings.capacity_mb),
        "policy": policy_label(settings.policy),
    }
    return web.json_response(answer)


async def get_num_nodes(request: web.Request) -> web.Response:
    return web.json_response({"success": "true", "numNodes": request.app[CONTROLLER].size})


async def get_rate(request: web.Request) -> web.Response:
    """The miss or hit rate of the last minute (0 when there were no lookups)."""
    params = {**request.query, **(await read_form(request))}
    rate = params.get("rate", "").lower()
    if rate not in ("miss", "hit"):
        return error(400, "rate must be 'miss' or 'hit'")
    collector, controller = request.app[COLLECTOR], request.app[CONTROLLER]
    await collector.collect(controller.members)  # include the last few seconds
    minute = collector.last_minute()
    value = None if minute is None else (minute.miss_rate if rate == "miss" else minute.hit_rate)
    return web.json_response({"success": "true", "rate": rate, "value": value or 0.0})
