"""``imagecache up``: the whole system on one machine, on the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from imagecache.app import create_app
from imagecache.config import Config, parse_address

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def node_process(address: str, capacity_mb: float) -> AsyncIterator[None]:
    """A cache node as a child process, stopped (SIGTERM) on the way out."""
    host, port = parse_address(address)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagecache",
        "node",
        "--host",
        host,
        "--port",
        str(port),
        "--capacity-mb",
        str(capacity_mb),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=15)
        if b"listening" not in line:
            raise RuntimeError(f"the cache node on {address} did not start (is the port free?)")
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[None]:
    """``app`` listening on host:port for the duration of the block."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
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
    async with serving(create_app(config), config.gateway.host, config.gateway.port):
        print(f"gateway on http://{config.gateway.host}:{config.gateway.port}", flush=True)
        await until_signalled()


async def up(config: Config, capacity_mb: float = 64) -> None:
    """Run the cache node(s) and the gateway until SIGINT or SIGTERM."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        for address in config.gateway.nodes:
            await stack.enter_async_context(node_process(address, capacity_mb))
        settings = config.gateway
        await stack.enter_async_context(serving(create_app(config), settings.host, settings.port))
        print(
            f"imagecache is up, data in {config.data_dir.resolve()}\n"
            f"  open http://{settings.host}:{settings.port}\n"
            f"  cache node(s): {', '.join(settings.nodes)}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        await until_signalled()
        print("imagecache: stopping", flush=True)
