"""The operator's pages: login, Memory Configuration, Memory Statistics, Activity."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from imagecache.flash import set_flash, take_flash
from manager.appkeys import (
    ANNOUNCEMENTS,
    AUTOSCALER,
    BLOBS,
    CONFIG,
    CONTROLLER,
    CSRF,
    CURVES,
    LOGIN_THROTTLE,
    METRICS,
    NOTIFIER,
    PASSWORD,
    RECORDS,
    SESSIONS,
)
from manager.auth import (
    DEFAULT_NEXT,
    SESSION_COOKIE,
    SESSION_SECONDS,
    HashingBusy,
    client_address,
    local_path,
    retry_after,
)
from manager.backends.base import PoolError
from manager.charts import render_charts
from manager.chartsvg import Chart, MissThresholds
from manager.curvechart import render_curve
from manager.forms import read_form
from manager.nodestats import node_health
from manager.pool import ResizeError
from manager.records import FAILED_CAUSE
from manager.settings import (
    API_NAMES,
    MAX_NODES,
    MIN_NODES,
    CacheSettings,
    SettingsError,
    apply_params,
    policy_label,
)

log = logging.getLogger(__name__)

SPAN_MINUTES = 30
_WHOLE_NUMBER = re.compile("0*[1-9][0-9]{0,3}")  # 1 or more
# Resizes shown as marks on the charts: more than a 30-minute span can hold.
CHART_RESIZES = 100
# The settings form's labels (templates/manager/config.html), by API and by
# internal name: a refusal names the field as the page does.
FIELD_LABELS = {
    "cacheSize": "Capacity per node (MB)",
    "policy": "Replacement policy",
    "mode": "Mode",
    "maxMiss": "Grow when the miss rate is above",
    "minMiss": "Shrink when the miss rate is below",
    "expRatio": "Grow by the ratio",
    "shrinkRatio": "Shrink by the ratio",
    "minLookups": "Judge only minutes with at least this many lookups",
    "scaling": "Resize by",
}
FIELD_LABELS |= {name: FIELD_LABELS[api_name] for api_name, name in API_NAMES.items()}
_FIELD_NAME = re.compile(r"\b(" + "|".join(map(re.escape, FIELD_LABELS)) + r")\b")
# How much of a refused value the page shows back in its field.
ECHO_MAX_CHARS = 100


# Every page and form, declared at its handler.
routes = web.RouteTableDef()


def add_routes(app: web.Application) -> None:
    app.router.add_routes(routes)


@routes.get("/")
async def home(request: web.Request) -> web.Response:
    return _redirect("/config")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _flash_redirect(request: web.Request, location: str, level: str, message: str) -> web.Response:
    response = _redirect(location)
    set_flash(response, request.app[SESSIONS].flash_secret, level, message)
    return response


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    context.setdefault("flash", take_flash(request, request.app[SESSIONS].flash_secret))
    context["csrf"] = request.get(CSRF, "")
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    if context["flash"] is not None:
        response.del_cookie("imagecache_flash", path="/")
    return response


@routes.get("/login")
async def login_page(request: web.Request) -> web.Response:
    target = local_path(request.query.get("next", DEFAULT_NEXT))
    return render(request, "login.html", page="login", next=target)


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    """Log in, or refuse: 401 for a wrong password, 429 (after a short delay)
    while the client must wait after too many, 503 while too many logins wait
    to be checked."""
    form = await read_form(request)
    target = local_path(form.get("next", DEFAULT_NEXT))  # never off-site
    throttle, client = request.app[LOGIN_THROTTLE], client_address(request)
    wait = throttle.attempt(client)
    if wait:
        await asyncio.sleep(min(wait, throttle.refusal_delay))
        wait = throttle.waiting(client)
        return _login_refused(
            request,
            target,
            429,
            wait,
            f"Too many wrong passwords: try again in {retry_after(wait)} s.",
        )
    try:
        matches = await request.app[PASSWORD].matches(form.get("password", ""))
    except HashingBusy:
        return _login_refused(request, target, 503, 1, "Too many logins at once: try again.")
    if not matches:
        shut_for = throttle.waiting(client)
        if shut_for:
            log.warning(
                "wrong manager password from %s, again: its next try waits %s s",
                client,
                retry_after(shut_for),
            )
        return render(
            request,
            "login.html",
            status=401,
            page="login",
            next=target,
            flash=("error", "Wrong password."),
        )
    throttle.succeeded(client)
    response = _redirect(target)
    response.set_cookie(
        SESSION_COOKIE,
        request.app[SESSIONS].new_cookie(),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="Strict",
        path="/",
    )
    return response


def _login_refused(
    request: web.Request, target: str, status: int, wait: float, message: str
) -> web.Response:
    response = render(
        request, "login.html", status=status, page="login", next=target, flash=("error", message)
    )
    response.headers["Retry-After"] = retry_after(wait)
    return response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    request.app[SESSIONS].end(request.cookies.get(SESSION_COOKIE))
    response = _redirect("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


@routes.get("/config")
async def config_page(request: web.Request) -> web.Response:
    return await _render_config(request)


async def _render_config(
    request: web.Request,
    status: int = 200,
    entered: Mapping[str, str] | None = None,
    invalid: frozenset[str] = frozenset(),
    flash: tuple[str, str] | None = None,
) -> web.Response:
    """The Memory Configuration page; ``entered``: the settings form as the user
    filled it in (shown back after a refusal), ``invalid``: its refused fields."""
    controller = request.app[CONTROLLER]
    settings = await controller.settings()
    context: dict[str, Any] = {}
    if flash is not None:
        context["flash"] = flash
    return render(
        request,
        "config.html",
        status=status,
        page="config",
        settings=settings,
        form=_settings_form(settings) | dict(entered or {}),
        invalid=invalid,
        labels=FIELD_LABELS,
        **await _pool_context(request),
        **context,
    )


async def _pool_context(request: web.Request) -> dict[str, Any]:
    controller = request.app[CONTROLLER]
    members = controller.members
    return {
        "members": members,
        "health": await node_health(members, request.app[CONFIG].node_access()),
        "min_nodes": MIN_NODES,
        "max_nodes": MAX_NODES,
    }


@routes.get("/config/pool")
async def pool_fragment(request: web.Request) -> web.Response:
    """The pool's part of Memory Configuration, for the page to refresh itself with."""
    # flash=None: a message waiting for the next page is not taken by this fragment.
    response = render(request, "pool.html", flash=None, **await _pool_context(request))
    response.headers["Cache-Control"] = "no-store"
    return response


def _settings_form(settings: CacheSettings) -> dict[str, str]:
    """The settings form's fields as the page shows ``settings``."""
    return {
        "cacheSize": f"{settings.capacity_mb:g}",
        "policy": policy_label(settings.policy),
        "mode": settings.mode.value,
        "maxMiss": f"{settings.max_miss:g}",
        "minMiss": f"{settings.min_miss:g}",
        "expRatio": f"{settings.exp_ratio:g}",
        "shrinkRatio": f"{settings.shrink_ratio:g}",
        "minLookups": str(settings.min_lookups),
        "scaling": settings.scaling,
    }


def _echo(text: str) -> str:
    """A submitted value as the page may show it back: short, and encodable."""
    return text[:ECHO_MAX_CHARS].encode("utf-8", "replace").decode("utf-8")


@routes.post("/config/settings")
async def save_settings(request: web.Request) -> web.Response:
    """Save the settings, or show the form again as the user filled it in (400),
    naming the refused fields by their labels."""
    form = await read_form(request)
    controller = request.app[CONTROLLER]
    try:
        settings = apply_params(await controller.settings(), form)
    except SettingsError as error:
        log.info("settings refused, nothing changed: %s", error)
        named = {match.group(1) for match in _FIELD_NAME.finditer(str(error))}
        invalid = frozenset(
            api_name for api_name, name in API_NAMES.items() if {api_name, name} & named
        )
        message = _FIELD_NAME.sub(lambda match: f"“{FIELD_LABELS[match.group(1)]}”", str(error))
        entered = {name: _echo(form[name]) for name in API_NAMES if name in form}
        return await _render_config(
            request,
            status=400,
            entered=entered,
            invalid=invalid,
            flash=("error", f"Nothing changed: {message}."),
        )
    await controller.apply_settings(settings)
    return _flash_redirect(
        request, "/config", "success", "Settings saved and pushed to every node."
    )


@routes.post("/config/resize")
async def resize(request: web.Request) -> web.Response:
    form = await read_form(request)
    controller = request.app[CONTROLLER]
    direction, count = form.get("direction", ""), form.get("count", "")
    # ASCII digits only: str.isdigit also takes "²", which int() refuses.
    if direction not in ("expand", "shrink") or not _WHOLE_NUMBER.fullmatch(count):
        return _flash_redirect(
            request, "/config", "error", "Give a whole number of nodes (1 or more)."
        )
    before = controller.size
    target = before + int(count) if direction == "expand" else before - int(count)
    try:
        await controller.resize(target, f"manual {direction} by {count} (dashboard)")
    except ResizeError:
        return _flash_redirect(
            request,
            "/config",
            "error",
            f"Nothing changed: {direction} by {count} would leave {target} nodes; "
            f"the pool keeps {MIN_NODES} to {MAX_NODES}.",
        )
    except PoolError as error:
        return _flash_redirect(request, "/config", "error", f"The pool could not resize: {error}.")
    return _flash_redirect(
        request, "/config", "success", f"The pool went from {before} to {target} nodes."
    )


@routes.post("/config/clear")
async def clear_cache(request: web.Request) -> web.Response:
    await request.app[CONTROLLER].clear()
    return _flash_redirect(request, "/config", "success", "Every cache node was cleared.")


@routes.post("/config/delete_all")
async def delete_all(request: web.Request) -> web.Response:
    form = await read_form(request)
    if form.get("confirm") != "delete":
        return _flash_redirect(
            request, "/config", "error", "Nothing deleted: type delete in the box to confirm."
        )
    app = request.app
    count = await app[CONTROLLER].delete_all(app[BLOBS])
    return _flash_redirect(
        request, "/config", "success", f"Deleted all application data ({count} images)."
    )


@routes.get("/stats")
async def stats_page(request: web.Request) -> web.Response:
    return render(request, "stats.html", page="stats", charts=await _charts(request))


@routes.get("/stats/charts")
async def charts_fragment(request: web.Request) -> web.Response:
    return render(request, "charts.html", charts=await _charts(request))


async def _charts(request: web.Request) -> list[Chart]:
    """The last minutes' charts, then the miss curve of the latest window."""
    # "now" as the end: the current minute is drawn as the partial one it is.
    now = datetime.now(UTC)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    app = request.app
    controller = app[CONTROLLER]
    minutes = await app[METRICS].minutes(end - timedelta(minutes=SPAN_MINUTES), end)
    settings = await controller.settings()
    thresholds = MissThresholds(settings.min_miss, settings.max_miss)
    curves = app[CURVES]
    # As POST /api/miss_curve does: the curve simulates the pool as it is set up now.
    curves.follow(settings)
    return [
        *render_charts(
            minutes,
            now,
            SPAN_MINUTES,
            resizes=await app[RECORDS].list_activity(CHART_RESIZES),
            thresholds=thresholds,
        ),
        render_curve(curves.latest(), curves.sizes, controller.size, thresholds=thresholds),
    ]


@routes.get("/activity")
async def activity_page(request: web.Request) -> web.Response:
    resizes = await request.app[RECORDS].list_activity(200)
    return render(
        request,
        "activity.html",
        page="activity",
        resizes=resizes,
        # How each resize's announcements went, by resize (manager.notify).
        announcements=await request.app[ANNOUNCEMENTS].of_resizes(
            [r.id for r in resizes if r.id is not None]
        ),
        channels=request.app[NOTIFIER].channels,
        failed_cause=FAILED_CAUSE,
        decisions=list(request.app[AUTOSCALER].decisions)[:50],
        mode=(await request.app[CONTROLLER].settings()).mode.value,
        settle=request.app[CONFIG].manager.settle_seconds,
    )
