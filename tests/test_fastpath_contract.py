"""What the fast path relies on in aiohttp, pinned down.

The fast path (src/imagecache/fastpath.py, fastconnection.py) is a site of
aiohttp's runner that makes its own listening socket and hands connections
to aiohttp's protocol mid-stream: it leans on aiohttp's private parts, which
may change in any release. setup.cfg bounds aiohttp above at the last minor
version tested; these tests say what to check before raising that bound:
every private attribute and signature used is there as expected, and a
connection handed over as the fast path does is served.
"""

from __future__ import annotations

import asyncio
import configparser
import inspect
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web, web_protocol, web_runner, web_server
from aiohttp.http import SERVER_SOFTWARE

from imagecache.cachepool import CachePool
from imagecache.fastpath import FastPath, FastPathCounters, FastPathSite
from imagecache.keptcopies import KeptCopies

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_installed_aiohttp_is_within_the_tested_bounds() -> None:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    requirements = parser["options"]["install_requires"].splitlines()
    (line,) = [r for r in requirements if re.match(r"\s*aiohttp\s*[<>=]", r)]
    lower = re.search(r">=\s*([\d.]+)", line)
    upper = re.search(r"<\s*([\d.]+)", line)
    assert lower is not None, f"aiohttp must be bounded below: {line}"
    assert upper is not None, f"aiohttp must be bounded above: {line}"
    installed = version_tuple(aiohttp.__version__)
    assert version_tuple(lower.group(1)) <= installed < version_tuple(upper.group(1)), (
        f"aiohttp {aiohttp.__version__} is outside {line.strip()}: check these tests first"
    )


def test_the_base_site_has_what_the_fast_path_site_uses() -> None:
    # FastPathSite sets _server (which BaseSite.stop closes) and reads _runner and _backlog.
    assert {"_runner", "_backlog", "_server"} <= set(web.BaseSite.__slots__)
    parameters = inspect.signature(web.BaseSite.__init__).parameters
    assert list(parameters)[:2] == ["self", "runner"]
    assert parameters["backlog"].kind is inspect.Parameter.KEYWORD_ONLY
    for method in (web.BaseSite.start, web.BaseSite.stop):
        assert inspect.iscoroutinefunction(method)
        assert list(inspect.signature(method).parameters) == ["self"]
    assert "name" in web.BaseSite.__abstractmethods__
    assert "start" in web.BaseSite.__abstractmethods__


def test_the_runners_server_is_a_protocol_factory() -> None:
    # runner.server: called with no arguments, it makes the protocol a connection goes to.
    assert isinstance(inspect.getattr_static(web_runner.BaseRunner, "server"), property)
    assert not [
        p
        for p in inspect.signature(web_server.Server.__call__).parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty
    ]
    handler = web_protocol.RequestHandler
    assert issubclass(handler, asyncio.Protocol)
    assert list(inspect.signature(handler.connection_made).parameters) == ["self", "transport"]
    assert list(inspect.signature(handler.data_received).parameters) == ["self", "data"]
    # The fast path's Date and Server lines copy aiohttp's Server header.
    assert isinstance(SERVER_SOFTWARE, str)
    assert "aiohttp/" in SERVER_SOFTWARE


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.path}")


@pytest.fixture
async def handing_over() -> AsyncIterator[tuple[FastPathSite, FastPathCounters]]:
    """A FastPathSite over a plain aiohttp app, with no kept copies and nothing to
    load: the fast path hands every connection over to aiohttp."""
    app = web.Application()
    app.router.add_get("/{path:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    counters = FastPathCounters()
    pool = CachePool()

    def fast_path(aiohttp_protocol: object) -> FastPath:
        assert isinstance(aiohttp_protocol, web_server.Server)
        return FastPath(KeptCopies(0), pool, aiohttp_protocol, counters)

    site = FastPathSite(runner, "127.0.0.1", 0, fast_path)
    await site.start()
    try:
        yield site, counters
    finally:
        await runner.cleanup()
        await pool.close()


async def test_a_connection_handed_over_mid_stream_is_served_by_aiohttp(
    handing_over: tuple[FastPathSite, FastPathCounters],
) -> None:
    site, counters = handing_over
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    try:
        async with asyncio.timeout(5):  # a hand-over that loses bytes answers nothing
            # Two requests pipelined and a third split across writes: aiohttp
            # gets the unanswered bytes the fast path read, then the socket.
            writer.write(
                b"GET /image/none HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /two HTTP/1.1\r\nHost: t\r\n\r\nGET /th"
            )
            await writer.drain()
            replies = [
                await reader.readuntil(b"hello /image/none"),
                await reader.readuntil(b"/two"),
            ]
            writer.write(b"ree HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            replies.append(await reader.read())
    finally:
        writer.close()
    assert all(reply.startswith(b"HTTP/1.1 200 OK\r\n") for reply in replies)
    assert f"Server: {SERVER_SOFTWARE}\r\n".encode() in replies[0]
    assert replies[2].endswith(b"hello /three")
    assert counters.handed_over == 1


async def test_stopping_the_site_closes_its_listening_socket(
    handing_over: tuple[FastPathSite, FastPathCounters],
) -> None:
    site, _ = handing_over
    await site.stop()  # BaseSite.stop closes the server the fast path made
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", site.port)
