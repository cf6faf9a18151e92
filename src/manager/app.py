"""The manager's aiohttp application: pages, internal API, and its control loops."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from imagecache.answers import failure
from imagecache.appbase import blobs_ctx, every, metadata_stores, running, use_templates
from imagecache.config import Config
from imagecache.errors import StorageError
from manager import internal_api, prometheus, views, whatif_views
from manager.announcements import Announcements
from manager.appkeys import (
    ANNOUNCEMENTS,
    AUTOSCALER,
    BACKEND,
    CATALOG,
    COLLECTOR,
    CONFIG,
    CONTROLLER,
    CSRF,
    CURVE_RECORDS,
    CURVES,
    LOGIN_THROTTLE,
    MEMBERSHIP_STORE,
    METRICS,
    NOTIFIER,
    PASSWORD,
    RECORDS,
    SESSIONS,
)
from manager.auth import (
    SESSION_COOKIE,
    Handler,
    LoginThrottle,
    Password,
    Sessions,
    is_open,
    token_matches,
)
from manager.autoscaler import Autoscaler
from manager.backends.base import NodeHandle, PoolError
from manager.backends.local import LocalPool
from manager.collector import Collector
from manager.curve_records import CurveRecords, RecordedWindow
from manager.curves import MissCurves
from manager.forms import MalformedForm, read_form
from manager.notify import open_notifier
from manager.pool import PoolController
from manager.records import ManagerRecords
from manager.sqlite_metrics import SqlMetrics

log = logging.getLogger(__name__)

# On every answer of the manager: no content sniffing, no framing by any site
# (clickjacking), no URLs of the dashboard in the Referer sent to other sites.
# The CSP holds no script or style rules: the pages' own inline script and
# the charts' inline styles stay allowed (all of it is served from here).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


NodeResolver = Callable[[str, str], str]
"""``(instance_id, private_ip) -> "host:port"`` of an AWS instance's cache node."""
NODE_RESOLVER: web.AppKey[NodeResolver] = web.AppKey("node_resolver")


def create_app(
    config: Config, *, resolve_node_address: NodeResolver | None = None
) -> web.Application:
    """The manager for ``config``; the pool starts when the application starts.

    ``resolve_node_address``: where the cache node of an AWS instance listens
    (default: its private IP and ``manager.node_port``; tests map instances
    to nodes on loopback).
    """
    app = web.Application(middlewares=[guard])
    app[CONFIG] = config
    if resolve_node_address is not None:
        app[NODE_RESOLVER] = resolve_node_address
    app[PASSWORD] = Password(config.manager.password)
    app[SESSIONS] = Sessions(config.gateway.secret_key.encode() or secrets.token_bytes(32))
    app[LOGIN_THROTTLE] = LoginThrottle()
    app[CURVES] = MissCurves(window_seconds=config.manager.curve_window_seconds)
    app.on_response_prepare.append(add_security_headers)
    app.on_cleanup.append(stop_hashing)
    use_templates(app, "manager")
    app.router.add_get("/metrics", prometheus_metrics)
    views.add_routes(app)
    whatif_views.add_routes(app)
    internal_api.add_routes(app)
    app.cleanup_ctx.extend(
        [
            metadata_ctx,
            blobs_ctx,
            backend_ctx,
            notifier_ctx,
            controller_ctx,
            metrics_ctx,
            loops_ctx,
        ]
    )
    return app


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gateways need the token, operators a session; forms need their CSRF token.

    Every form body is read here, once, before any handler: one that does not
    parse is answered 400 (forms.read_form logs it).
    """
    posting = request.method == "POST"
    if request.path.startswith("/internal/"):
        if not token_matches(request, request.app[CONFIG].gateway.manager_token):
            return failure(401, "a valid gateway token is required")
        try:
            if posting:
                await read_form(request)
            return await handler(request)
        except MalformedForm as error:
            return failure(400, f"the body is not a readable form: {error}")
        except PoolError as error:
            return failure(503, f"the pool could not be changed: {error}")
    if is_open(request.path):
        if posting:
            await _form_or_400(request)
        return await handler(request)
    sessions = request.app[SESSIONS]
    session_id = sessions.session_id(request.cookies.get(SESSION_COOKIE))
    if session_id is None:
        if request.method == "GET":
            login = URL("/login").with_query(next=request.path_qs)
            return web.Response(status=303, headers={"Location": str(login)})
        raise web.HTTPUnauthorized(text="log in first")
    request[CSRF] = sessions.csrf_token(session_id)
    if posting:
        form = await _form_or_400(request)
        # As bytes: compare_digest refuses str with characters beyond ASCII.
        supplied = form.get("csrf", "").encode(errors="surrogatepass")
        if not secrets.compare_digest(supplied, request[CSRF].encode()):
            raise web.HTTPForbidden(
                text="the form's CSRF token is missing or wrong; reload the page"
            )
    return await handler(request)


async def _form_or_400(request: web.Request) -> Mapping[str, str]:
    try:
        return await read_form(request)
    except MalformedForm as error:
        raise web.HTTPBadRequest(text=f"the body is not a readable form: {error}") from None


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def stop_hashing(app: web.Application) -> None:
    app[PASSWORD].close()


async def metadata_ctx(app: web.Application) -> AsyncIterator[None]:
    async with metadata_stores(app) as database:
        app[RECORDS] = await ManagerRecords.open(database)
        app[CURVE_RECORDS] = await CurveRecords.open(database)
        app[ANNOUNCEMENTS] = await Announcements.open(database)
        yield


async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].manager
    if config.pool == "aws":
        from manager.backends.aws import AwsPool

        async with AwsPool(
            config.asg_name,
            config.node_port,
            app[CONFIG].aws,
            resolve_address=app.get(NODE_RESOLVER),
            ready_timeout=config.node_ready_seconds,
            node_access=app[CONFIG].node_access(),
        ) as backend:
            app[BACKEND] = backend
            yield
        return
    local = LocalPool(
        first_port=config.first_port,
        on_restart=_restarted(app),
        node_access=app[CONFIG].node_access(),
        node_environment=app[CONFIG].node_environment(),
    )
    await local.stop_orphans()
    app[BACKEND] = local
    try:
        yield
    finally:
        await local.close()


def _restarted(app: web.Application) -> Callable[[NodeHandle], Awaitable[None]]:
    async def hook(node: NodeHandle) -> None:
        await app[CONTROLLER].node_restarted(node)

    return hook


async def notifier_ctx(app: web.Application) -> AsyncIterator[None]:
    """Announces every resize (manager.notify); stopped after the controller, so
    it hears of every resize. Deliveries not done by then stay pending in the
    database, and the next start takes them up."""
    async with open_notifier(app[CONFIG], app[ANNOUNCEMENTS]) as notifier:
        app[NOTIFIER] = notifier
        yield


async def controller_ctx(app: web.Application) -> AsyncIterator[None]:
    controller = PoolController(
        app[BACKEND],
        app[CATALOG],
        app[MEMBERSHIP_STORE],
        app[RECORDS],
        node_access=app[CONFIG].node_access(),
        announce=app[NOTIFIER].announce,
    )
    app[CONTROLLER] = controller
    settings = await controller.settings()
    if isinstance(app[BACKEND], LocalPool):
        local = app[BACKEND]
        assert isinstance(local, LocalPool)
        local.capacity_mb, local.policy = settings.capacity_mb, settings.policy
    await controller.start()
    yield


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.manager.metrics == "cloudwatch":
        from manager.cloudwatch import open_cloudwatch_metrics

        async with open_cloudwatch_metrics(
            config.manager.cloudwatch_namespace, config.aws
        ) as store:
            app[METRICS] = store
            yield
        return
    async with SqlMetrics.open(config.metadata_url) as sql_store:
        app[METRICS] = sql_store
        yield


async def loops_ctx(app: web.Application) -> AsyncIterator[None]:
    """The collector (every 5 s), the autoscaler (every 60 s), the miss curve's windows."""
    config = app[CONFIG].manager
    controller = app[CONTROLLER]
    collector = Collector(
        app[METRICS],
        window=timedelta(seconds=config.rate_window_seconds),
        node_access=app[CONFIG].node_access(),
    )
    app[COLLECTOR] = collector
    curves = app[CURVES]
    app[AUTOSCALER] = Autoscaler(
        controller,
        collector.last_minute,
        config.settle_seconds,
        last_curve=lambda: curves.latest().evidence,
    )

    async def collect() -> None:
        await collector.collect(controller.members)

    loops = [
        every(config.collect_seconds, collect),
        # The first judgement after one period: a minute of data.
        every(config.autoscale_seconds, app[AUTOSCALER].tick, first_after=config.autoscale_seconds),
        curve_window_loop(app),
    ]
    if config.pool == "aws":
        loops.append(reconcile_loop(app))
    async with running(*loops):
        yield
    await collector.close()


async def reconcile_loop(app: web.Application) -> None:
    """Every ``reconcile_seconds``, make the membership follow the Auto Scaling
    group: instances AWS or an operator added or replaced join (once they
    answer), vanished ones leave (PoolController.reconcile). A pass that fails
    (AWS or the database unreachable) is logged in one line and tried again."""
    controller, seconds = app[CONTROLLER], app[CONFIG].manager.reconcile_seconds
    while True:
        await asyncio.sleep(seconds)
        try:
            await controller.reconcile()
        except (PoolError, StorageError) as error:
            log.warning(
                "following the Auto Scaling group failed; again in %g s: %s", seconds, error
            )
        except Exception:
            log.exception("following the Auto Scaling group failed; going on")


async def curve_window_loop(app: web.Application) -> None:
    """Close the miss curve's window on every wall-clock multiple of its length
    (60 s: on the minute, as the statistics' minutes are) and save it.

    The first window, from the start to the first boundary, is partial and
    saved as such (its ``seconds`` say so). A window that cannot be saved is
    logged in one line and the loop goes on: the curve in memory is unharmed.
    """
    curves, controller = app[CURVES], app[CONTROLLER]
    length = curves.window_seconds
    last_boundary = 0.0
    while True:
        # Boundaries are multiples of the length since the epoch; never the
        # same one twice, should the sleep wake a hair early.
        now = time.time()
        boundary = max((now // length + 1) * length, last_boundary + length)
        await asyncio.sleep(boundary - now)
        last_boundary = boundary
        try:
            curves.follow(await controller.settings())
            window = curves.close_window(datetime.fromtimestamp(boundary, UTC))
            await app[CURVE_RECORDS].add(RecordedWindow.of(window))
        except StorageError as error:
            log.warning("the miss curve's window was not saved: %s", error)
        except Exception:
            log.exception("closing the miss curve's window failed; going on")


async def prometheus_metrics(request: web.Request) -> web.Response:
    """The Prometheus metrics of the pool and its nodes (manager.prometheus)."""
    body = await prometheus.exposition(request.app)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
