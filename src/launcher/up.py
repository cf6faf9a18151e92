"""The parts the ``imagecache`` command runs: ``up`` (the whole system on one
machine, on the embedded default), the gateway alone (or one of its worker
processes) and the manager alone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from aiohttp import web

from imagecache import workers
from imagecache.app import create_app, gateway_site
from imagecache.config import Config, ConfigError

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def serving(
    app: web.Application,
    host: str,
    port: int,
    site: Callable[[web.AppRunner, str, int], web.BaseSite] = web.TCPSite,
) -> AsyncIterator[None]:
    """``app`` listening on host:port for the duration of the block."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await site(runner, host, port).start()
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error
        # What start-up made (modules, the AWS SDK's models, templates: about
        # 100,000 objects) lives as long as the process. Frozen, the cyclic
        # collector stops scanning it at every full collection: each paused
        # the loop for about 35 ms, the tail of a cache miss's latency.
        # Start-up's garbage goes first: frozen, it would never be freed.
        gc.collect()
        gc.freeze()
        yield
    finally:
        await runner.cleanup()


async def until_signalled() -> None:
    """Return at the first SIGINT or SIGTERM."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()


async def gateway(config: Config) -> None:
    """Run the gateway alone until SIGINT or SIGTERM, in gateway.workers processes (default 1)."""
    settings = config.gateway
    count = settings.workers or 1
    if count == 1:
        async with serving(create_app(config), settings.host, settings.port, gateway_site):
            print(f"gateway on http://{settings.host}:{settings.port}", flush=True)
            await until_signalled()
        return
    async with workers.running(config, count):
        print(f"gateway on http://{settings.host}:{settings.port} ({count} workers)", flush=True)
        await until_signalled()


async def gateway_worker(config: Config, parent: workers.ParentLink) -> None:
    """Serve as one of several gateway processes on one port (workers.py), silently.

    Runs until SIGINT, SIGTERM or the end of the supervising parent.
    """
    settings = config.gateway
    async with (
        parent.stop_requests() as stopping,
        serving(create_app(config), settings.host, settings.port, _shared_port_site),
    ):
        await parent.say_listening()
        await stopping.wait()


def _shared_port_site(runner: web.AppRunner, host: str, port: int) -> web.BaseSite:
    site = gateway_site(runner, host, port)
    site.reuse_port = True
    return site


async def up(config: Config) -> None:
    """Run the manager (which starts the cache nodes) and the gateway until a signal.

    The gateway runs in gateway.workers processes, by default one per core (at
    most workers.MAX_DEFAULT_WORKERS); the manager stays in this one.
    """
    config = with_local_secrets(config)
    count = config.gateway.workers or workers.default_workers()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # Imported where the manager runs only: gateway workers do not load it.
    from manager.app import create_app as create_manager

    gateway_settings, manager_settings = config.gateway, config.manager
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            serving(create_manager(config), manager_settings.host, manager_settings.port)
        )
        if count == 1:
            gateway_app = create_app(config)
            await stack.enter_async_context(
                serving(gateway_app, gateway_settings.host, gateway_settings.port, gateway_site)
            )
        else:
            await stack.enter_async_context(workers.running(config, count))
        print(
            f"imagecache is up, data in {config.data_dir.resolve()}\n"
            f"  images:    http://{gateway_settings.host}:{gateway_settings.port}"
            f"  ({count} gateway worker{'s' if count > 1 else ''})\n"
            f"  dashboard: http://{manager_settings.host}:{manager_settings.port}"
            f"  (password: {config.manager.password})\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        await until_signalled()
        print("imagecache: stopping", flush=True)


async def manager(config: Config) -> None:
    """Run the manager alone until SIGINT or SIGTERM."""
    from manager.app import create_app as create_manager

    if not config.manager.password:
        raise ConfigError("set IMAGECACHE_MANAGER_PASSWORD (the dashboard's password)")
    settings = config.manager
    async with serving(create_manager(config), settings.host, settings.port):
        print(f"manager on http://{settings.host}:{settings.port}", flush=True)
        await until_signalled()


def with_local_secrets(config: Config) -> Config:
    """``config`` with a made-up dashboard password and gateway token where none is set.

    The manager runs in this process and the gateway here or in workers that
    are sent this configuration, so a token made up here is shared.
    """
    password = config.manager.password or secrets.token_urlsafe(9)
    token = config.gateway.manager_token or secrets.token_urlsafe(24)
    return replace(
        config,
        gateway=replace(config.gateway, manager_token=token),
        manager=replace(config.manager, password=password),
    )
