"""``imagecache up``: the whole system on one machine, on the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from aiohttp import web

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
    """Run the gateway alone until SIGINT or SIGTERM."""
    async with serving(create_app(config), config.gateway.host, config.gateway.port, gateway_site):
        print(f"gateway on http://{config.gateway.host}:{config.gateway.port}", flush=True)
        await until_signalled()


async def up(config: Config) -> None:
    """Run the manager (which starts the cache nodes) and the gateway until a signal."""
    config = with_local_secrets(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # The manager is a separate part, imported here only to compose the whole system.
    from manager.app import create_app as create_manager

    gateway_settings, manager_settings = config.gateway, config.manager
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            serving(create_manager(config), manager_settings.host, manager_settings.port)
        )
        await stack.enter_async_context(
            serving(create_app(config), gateway_settings.host, gateway_settings.port, gateway_site)
        )
        print(
            f"imagecache is up, data in {config.data_dir.resolve()}\n"
            f"  images:    http://{gateway_settings.host}:{gateway_settings.port}\n"
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

    Both parts run in this one process, so a token made up here is shared.
    """
    password = config.manager.password or secrets.token_urlsafe(9)
    token = config.gateway.manager_token or secrets.token_urlsafe(24)
    return replace(
        config,
        gateway=replace(config.gateway, manager_token=token),
        manager=replace(config.manager, password=password),
    )
