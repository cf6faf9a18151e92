"""The gateway's aiohttp application: routes, templates and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from imagecache import api, pages, prometheus, webguards
from imagecache.appbase import blobs_ctx, every, metadata_stores, running, use_templates
from imagecache.appkeys import (
    BLOBS,
    CATALOG,
    CONFIG,
    FAST_PATH_COUNTERS,
    FLASH_SECRET,
    KEPT_COPIES,
    KEY_SAMPLER,
    MANAGER,
    MEMBERSHIP,
    MEMBERSHIP_STORE,
    POOL,
    SERVICE,
)
from imagecache.cachepool import CachePool
from imagecache.config import MIB, Config
from imagecache.errors import StorageError
from imagecache.fastpath import FastPath, FastPathCounters, FastPathSite
from imagecache.images import ImageInspector
from imagecache.invalidation import Invalidator
from imagecache.keptcopies import KeptCopies
from imagecache.keysamples import REPORT_SECONDS, SAMPLING_RATE, KeySampler, SampleReporter
from imagecache.manager_link import ManagerLink
from imagecache.membership import RENEW_SECONDS, MembershipFollower
from imagecache.memfiles import MemoryFiles
from imagecache.service import ImageService

log = logging.getLogger(__name__)

# Delivering the invalidation outbox and healing dirty nodes, and trying nodes set aside.
HEAL_SECONDS = 1.0
CLEAN_UP_SECONDS = 600.0


def gateway_site(
    runner: web.AppRunner, host: str, port: int, *, idle_timeout: float = 75.0
) -> FastPathSite:
    """The gateway's listening site: connections start on the fast path for cache hits
    (unless gateway.fast_path is off).

    ``idle_timeout`` closes fast-path connections that send nothing for that
    long, as aiohttp's keep-alive timeout (75 s by default) does for its own.
    """
    app = runner.app

    def fast_path(aiohttp_protocol: Callable[[], asyncio.Protocol]) -> FastPath:
        return FastPath(
            app[KEPT_COPIES],
            app[POOL],
            aiohttp_protocol,
            app[FAST_PATH_COUNTERS],
            load=app[SERVICE].read,
            timeout=app[CONFIG].gateway.node_timeout,
            read_lease_seconds=app[CONFIG].gateway.read_lease_ms / 1000,
            idle_timeout=idle_timeout,
            sampler=app[KEY_SAMPLER],
        )

    return FastPathSite(runner, host, port, fast_path if app[CONFIG].gateway.fast_path else None)


def create_app(config: Config, *, key_sample_rate: float = SAMPLING_RATE) -> web.Application:
    """The gateway for ``config``; resources open when the application starts.

    ``key_sample_rate``: the share of keys whose lookups are sampled for the
    manager's miss curve (keysamples; tests sample every key).
    """
    app = web.Application(
        # api_errors outside: it gives the guards' refusals their shape and log line.
        middlewares=[api.api_errors, webguards.same_site_writes],
        client_max_size=config.gateway.max_upload_bytes + (1 << 20),
    )
    app.on_response_prepare.append(webguards.add_security_headers)
    app[CONFIG] = config
    app[KEY_SAMPLER] = sampler = KeySampler(key_sample_rate)
    app[KEPT_COPIES] = KeptCopies(
        int(config.gateway.kept_copies_mb * MIB),
        MemoryFiles.for_this_process(),
        sample_bucket=sampler.bucket,
    )
    app[FAST_PATH_COUNTERS] = FastPathCounters()
    app[FLASH_SECRET] = config.gateway.secret_key.encode() or secrets.token_bytes(32)
    use_templates(app, "gateway")
    app.router.add_get("/metrics", prometheus.metrics)
    api.add_routes(app)
    pages.add_routes(app)
    app.cleanup_ctx.extend(
        [metadata_ctx, blobs_ctx, pool_ctx, service_ctx, manager_ctx, background_ctx]
    )
    return app


async def metadata_ctx(app: web.Application) -> AsyncIterator[None]:
    async with metadata_stores(app, membership_apart=True):
        yield


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = CachePool(
        timeout=app[CONFIG].gateway.node_timeout, node_access=app[CONFIG].node_access()
    )
    app[POOL] = pool
    follower = MembershipFollower(app[MEMBERSHIP_STORE], pool, app[CONFIG].gateway.nodes)
    app[MEMBERSHIP] = follower
    await follower.refresh()  # route from the first request on
    yield
    try:
        await follower.leave()
    except StorageError as error:  # its lease runs out on its own
        log.warning("could not deregister the gateway: %s", error)
    await pool.close()


async def service_ctx(app: web.Application) -> AsyncIterator[None]:
    invalidator = Invalidator(app[CATALOG], app[MEMBERSHIP_STORE], app[MEMBERSHIP], app[POOL])
    images = ImageInspector(app[CONFIG].gateway.max_image_pixels)
    app[SERVICE] = ImageService(app[CATALOG], app[BLOBS], app[POOL], invalidator, images=images)
    yield


async def manager_ctx(app: web.Application) -> AsyncIterator[None]:
    gateway = app[CONFIG].gateway
    app[MANAGER] = ManagerLink(gateway.manager_url, gateway.manager_token)
    yield
    await app[MANAGER].close()


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """The gateway's loops: follow the membership, deliver invalidations and heal
    nodes, clean up blobs, post the key samples to the manager."""
    service = app[SERVICE]
    reporter = SampleReporter(app[KEY_SAMPLER], app[MANAGER])
    async with running(
        every(RENEW_SECONDS, app[MEMBERSHIP].refresh),
        every(HEAL_SECONDS, service.heal_cache),
        every(CLEAN_UP_SECONDS, service.clean_up),
        every(CLEAN_UP_SECONDS, app[MEMBERSHIP_STORE].expire_gateways),
        every(REPORT_SECONDS, reporter.report),
    ):
        yield
