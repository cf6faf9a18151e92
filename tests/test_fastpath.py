"""The gateway's fast path (src/imagecache/fastpath.py) over real sockets.

Each test runs the gateway's own listening site on a free port, in front of a
real node, and talks raw HTTP/1.1 to it, so that it decides which requests the
fast path answers and which go to aiohttp.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import aiohttp
import pytest
from aiohttp import web
from PIL import Image as PILImage

from cachenode.server import NodeServer
from imagecache.app import create_app, gateway_site
from imagecache.appkeys import FAST_PATH_COUNTERS, KEPT_COPIES
from imagecache.config import Config
from imagecache.fastpath import FastPathCounters, FastPathSite, parse_image_request
from imagecache.keptcopies import etag_matches
from tests.conftest import image_bytes


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Gateway:
    app: web.Application
    port: int
    site: FastPathSite

    @property
    def counters(self) -> FastPathCounters:
        return self.app[FAST_PATH_COUNTERS]

    async def upload(self, key: str, data: bytes) -> None:
        form = aiohttp.FormData()
        form.add_field("key", key)
        form.add_field("file", io.BytesIO(data), filename="x.png")
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{self.port}/api/upload", data=form) as reply,
        ):
            assert reply.status == 200, await reply.text()


@asynccontextmanager
async def running(config: Config, idle_timeout: float = 75.0) -> AsyncIterator[Gateway]:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = gateway_site(runner, "127.0.0.1", 0, idle_timeout=idle_timeout)
    await site.start()
    try:
        yield Gateway(app, site.port, site)
    finally:
        await runner.cleanup()


@pytest.fixture
async def gateway(gateway_config: Config) -> AsyncIterator[Gateway]:
    async with running(gateway_config) as started:
        yield started


async def read_reply(reader: asyncio.StreamReader, head_only: bool = False) -> Reply:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = b"" if head_only or status == 304 else await reader.readexactly(length)
    return Reply(status, headers, body)


async def exchange(port: int, *requests: bytes) -> list[Reply]:
    """Send ``requests`` on one new connection, all at once (pipelined); read their replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(requests))
        return [await read_reply(reader) for _ in requests]
    finally:
        writer.close()


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PNG = image_bytes("PNG", color="red")
PNG_2 = image_bytes("PNG", color="blue")


async def test_a_kept_copy_answers_later_requests_after_a_version_check(gateway: Gateway) -> None:
    await gateway.upload("cat", PNG)
    (first,) = await exchange(gateway.port, get("/image/cat"))  # aiohttp: keeps a copy
    assert gateway.counters.served == 0
    replies = await exchange(gateway.port, get("/image/cat"), get("/image/cat"))
    assert gateway.counters.served == 2
    for reply in replies:
        assert reply.status == 200
        assert reply.body == PNG
        # The same response as aiohttp's, header for header.
        for name in ("content-type", "etag", "cache-control", "server", "content-length"):
            assert reply.headers[name] == first.headers[name], name
        assert "date" in reply.headers
    assert gateway.counters.checks >= 1


async def test_if_none_match_gets_304_from_the_fast_path(gateway: Gateway) -> None:
    await gateway.upload("cat", PNG)
    (first,) = await exchange(gateway.port, get("/image/cat"))
    etag = first.headers["etag"]
    (reply,) = await exchange(gateway.port, get("/image/cat", f"If-None-Match: {etag}"))
    assert (reply.status, reply.body, reply.headers["etag"]) == (304, b"", etag)
    assert gateway.counters.served == 1
    (other,) = await exchange(gateway.port, get("/image/cat", 'If-None-Match: "v0"'))
    assert (other.status, other.body) == (200, PNG)


async def test_a_replaced_image_is_never_served_from_the_old_copy(gateway: Gateway) -> None:
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    await exchange(gateway.port, get("/image/cat"))
    assert gateway.counters.served == 1
    await gateway.upload("cat", PNG_2)
    (reply,) = await exchange(gateway.port, get("/image/cat"))
    assert reply.body == PNG_2
    (again,) = await exchange(gateway.port, get("/image/cat"))
    assert again.body == PNG_2
    assert gateway.counters.served == 2  # the new version's copy serves again


async def test_an_upload_through_another_gateway_is_seen_at_once(
    gateway: Gateway, gateway_config: Config
) -> None:
    """The copies are per gateway; the node's version decides, whoever uploaded."""
    async with running(gateway_config) as other:
        await gateway.upload("cat", PNG)
        await exchange(gateway.port, get("/image/cat"))
        for data in (PNG_2, PNG, PNG_2):
            await other.upload("cat", data)
            (reply,) = await exchange(gateway.port, get("/image/cat"))
            assert reply.body == data
            (again,) = await exchange(gateway.port, get("/image/cat"))
            assert again.body == data
        assert gateway.counters.served >= 3


async def test_concurrent_readers_never_see_an_older_image_than_the_last_upload(
    gateway: Gateway, gateway_config: Config
) -> None:
    async with running(gateway_config) as other:
        images = [image_bytes("PNG", color=(n, 0, 0)) for n in range(12)]
        await gateway.upload("hot", images[0])
        acknowledged = 0
        stop = False

        async def reader() -> None:
            # A bounded number of connections: each leaves a TIME-WAIT socket behind.
            for _ in range(40):
                if stop:
                    return
                floor = acknowledged  # the last upload acknowledged before this read
                replies = await exchange(gateway.port, get("/image/hot"), get("/image/hot"))
                for reply in replies:
                    assert images.index(reply.body) >= floor
                await asyncio.sleep(0.02)

        readers = [asyncio.create_task(reader()) for _ in range(6)]
        for number in range(1, len(images)):
            await other.upload("hot", images[number])
            acknowledged = number
            await asyncio.sleep(0.05)
        stop = True
        await asyncio.gather(*readers)
        assert gateway.counters.served > 0


async def test_other_requests_go_to_aiohttp_also_pipelined(gateway: Gateway) -> None:
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    served = gateway.counters.served
    image, keys, missing = await exchange(
        gateway.port,
        get("/image/cat"),
        b"POST /api/list_keys HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
        get("/image/nothing-here"),
    )
    assert image.body == PNG
    assert keys.status == 200
    assert b'"cat"' in keys.body
    assert missing.status == 404
    assert gateway.counters.served == served + 1
    (bad,) = await exchange(gateway.port, get("/image/..%2Fetc"))
    assert bad.status in (400, 404)


async def test_connection_close_is_honoured(gateway: Gateway) -> None:
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(get("/image/cat", "Connection: close"))
    reply = await read_reply(reader)
    assert reply.body == PNG
    assert reply.headers["connection"] == "close"
    assert await reader.read() == b""  # closed by the gateway
    writer.close()


async def test_a_failed_node_is_read_around(gateway: Gateway, node_server: NodeServer) -> None:
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    await node_server.stop()
    for _ in range(3):
        (reply,) = await exchange(gateway.port, get("/image/cat"))
        assert (reply.status, reply.body) == (200, PNG)


async def test_without_kept_copies_everything_goes_to_aiohttp(gateway_config: Config) -> None:
    config = replace(gateway_config, gateway=replace(gateway_config.gateway, kept_copies_mb=0))
    async with running(config) as gateway:
        await gateway.upload("cat", PNG)
        for _ in range(3):
            (reply,) = await exchange(gateway.port, get("/image/cat"))
            assert reply.body == PNG
        assert gateway.counters.served == 0
        assert len(gateway.app[KEPT_COPIES]) == 0


@pytest.mark.parametrize(
    ("head", "parsed"),
    [
        (b"GET /image/cat HTTP/1.1\r\nHost: x", ("cat", b"", False)),
        (
            b'GET /image/a.b-c_d HTTP/1.1\r\nIf-None-Match: "v3"\r\nHost: x',
            ("a.b-c_d", b'"v3"', False),
        ),
        (
            b"GET /image/cat HTTP/1.1\r\nHOST: x\r\nConnection: keep-alive, Close",
            ("cat", b"", True),
        ),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nContent-Length: 0", ("cat", b"", False)),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nUser-Agent: a\tb", ("cat", b"", False)),
        (b"GET /image/cat HTTP/1.1", None),  # no Host
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nhost: y", None),
        (b"GET /image/cat HTTP/1.0\r\nHost: x", None),
        (b"HEAD /image/cat HTTP/1.1\r\nHost: x", None),
        (b"GET /image/cat?x=1 HTTP/1.1\r\nHost: x", None),
        (b"GET /image/.hidden HTTP/1.1\r\nHost: x", None),
        (b"GET /image/a%2Fb HTTP/1.1\r\nHost: x", None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nContent-Length: 5", None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade", None),
        (
            b"GET /image/cat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: keep-alive",
            None,
        ),
        (b'GET /image/cat HTTP/1.1\r\nHost: x\r\nIf-None-Match: "a"\r\nIf-None-Match: "b"', None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nX-A: 1\x00", None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded", None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nno colon", None),
        (b"GET /image/cat HTTP/1.1\r\nHost: x\r\nBad Name: 1", None),
    ],
)
def test_only_plain_image_gets_take_the_fast_path(
    head: bytes, parsed: tuple[str, bytes, bool] | None
) -> None:
    request = parse_image_request(head)
    if parsed is None:
        assert request is None
    else:
        assert request is not None
        assert (request.key, request.if_none_match, request.close) == parsed


def test_etag_matching() -> None:
    assert etag_matches(b'"v1", "v2"', b'"v2"')
    assert etag_matches(b"*", b'"v2"')
    assert etag_matches(b'W/"v2"', b'"v2"')
    assert not etag_matches(b'"v12"', b'"v1"')
    assert not etag_matches(b"", b'"v1"')


def noise_png(side: int) -> bytes:
    """A PNG of random pixels: it does not compress, so it is about 3 x side^2 bytes."""
    buffer = io.BytesIO()
    PILImage.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_a_client_that_does_not_read_does_not_make_the_gateway_buffer(
    gateway: Gateway,
) -> None:
    big = noise_png(600)  # about 1 MB
    await gateway.upload("big", big)
    await exchange(gateway.port, get("/image/big"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(get("/image/big") * 40)  # 40 MB of responses asked for, none read
        await asyncio.sleep(1.0)
        assert gateway.site.fast is not None
        buffered = sum(
            connection._transport.get_write_buffer_size()
            for connection in gateway.site.fast.connections
            if connection._transport is not None
        )
        assert buffered < 8 * len(big)
        for _ in range(40):  # nothing is lost: every response arrives whole, in order
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, big)
    finally:
        writer.close()


async def test_a_hand_over_behind_a_big_pipelined_response_keeps_the_connection_working(
    gateway: Gateway,
) -> None:
    big = noise_png(1500)  # about 6.5 MB: the transport pushes back while it goes out
    await gateway.upload("big", big)
    await exchange(gateway.port, get("/image/big"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        keys = b"POST /api/list_keys HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
        writer.write(get("/image/big") + keys)
        await asyncio.sleep(0.3)  # let the gateway fill its buffer before reading
        first, second = await read_reply(reader), await read_reply(reader)
        assert (first.body, second.status) == (big, 200)
        writer.write(get("/image/big"))  # the connection is aiohttp's now, and alive
        third = await asyncio.wait_for(read_reply(reader), 5)
        assert third.body == big
    finally:
        writer.close()


async def test_idle_fast_path_connections_are_closed(gateway_config: Config) -> None:
    async with running(gateway_config, idle_timeout=0.3) as gateway:
        await gateway.upload("cat", PNG)
        await exchange(gateway.port, get("/image/cat"))
        silent = await asyncio.open_connection("127.0.0.1", gateway.port)
        served = await asyncio.open_connection("127.0.0.1", gateway.port)
        half = await asyncio.open_connection("127.0.0.1", gateway.port)
        served[1].write(get("/image/cat"))
        assert (await read_reply(served[0])).body == PNG
        half[1].write(b"GET /image/cat HTTP/1.1\r\nHo")
        for reader, writer in (silent, served, half):
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the gateway
            writer.close()


async def test_a_connection_alternating_between_images_gets_each_right(gateway: Gateway) -> None:
    await gateway.upload("cat", PNG)
    await gateway.upload("dog", PNG_2)
    await exchange(gateway.port, get("/image/cat"))
    await exchange(gateway.port, get("/image/dog"))
    heads = [get("/image/cat"), get("/image/cat"), get("/image/dog"), get("/image/cat")]
    replies = await exchange(gateway.port, *heads)
    assert [reply.body for reply in replies] == [PNG, PNG, PNG_2, PNG]
    etag = replies[0].headers["etag"]
    tagged = get("/image/cat", f"If-None-Match: {etag}")
    statuses = await exchange(gateway.port, get("/image/cat"), tagged, tagged, get("/image/cat"))
    assert [reply.status for reply in statuses] == [200, 304, 304, 200]
    assert gateway.counters.served == 8
