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

from cachenode.client import NodeClient
from cachenode.readleases import MAX_READ_LEASE_SECONDS
from cachenode.server import NodeConfig, NodeServer
from imagecache.app import create_app, gateway_site
from imagecache.appkeys import FAST_PATH_COUNTERS, KEPT_COPIES, POOL
from imagecache.config import Config
from imagecache.fastpath import FastPathCounters, FastPathSite
from imagecache.fastrequests import parse_image_request
from imagecache.keptcopies import etag_matches
from imagecache.memfiles import MIN_FILE_BYTES, MemoryFiles
from imagecache.service import Image
from imagecache.versionchecks import REPORT_SECONDS
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

    async def delete_all(self) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{self.port}/api/delete_all") as reply,
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


# -- read leases and loads -----------------------------------------------------------------


async def node_count(node_server: NodeServer, name: str) -> int:
    """One of the node's counters (STATS): "hits", "lookups", "missing_lookups"."""
    host, port = node_server.address
    async with NodeClient(host, port) as client:
        count = (await client.stats())[name]
    assert isinstance(count, int)
    return count


async def test_a_hot_key_is_checked_once_per_read_lease_not_once_per_read(
    gateway: Gateway,
) -> None:
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    await exchange(gateway.port, get("/image/cat"))  # its CHECK takes a read lease
    checks = gateway.counters.checks
    replies = await exchange(gateway.port, *[get("/image/cat")] * 20)
    assert [reply.body for reply in replies] == [PNG] * 20
    assert gateway.counters.served == 21
    assert gateway.counters.checks - checks <= 1  # at most one renewal in a moment this short


async def test_without_read_leases_every_read_waits_for_a_check(gateway_config: Config) -> None:
    config = replace(gateway_config, gateway=replace(gateway_config.gateway, read_lease_ms=0))
    async with running(config) as gateway:
        await gateway.upload("cat", PNG)
        await exchange(gateway.port, get("/image/cat"))
        for _ in range(5):
            await exchange(gateway.port, get("/image/cat"))
        assert (gateway.counters.served, gateway.counters.checks) == (5, 5)


async def test_reads_served_under_read_leases_count_as_hits_on_the_node(
    gateway: Gateway, node_server: NodeServer
) -> None:
    """The manager sizes the pool by the nodes' hit rates: reads that never
    reached the node must still count there."""
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))  # a hit of the write-through: 1
    before = await node_count(node_server, "hits")
    for _ in range(6):  # across several leases: renewals report, and so does the timer
        await exchange(gateway.port, *[get("/image/cat")] * 5)
        await asyncio.sleep(0.12)
    await asyncio.sleep(REPORT_SECONDS + 0.5)
    assert await node_count(node_server, "hits") - before == 30


async def test_a_new_view_of_the_pool_voids_the_read_leases(
    gateway: Gateway, gateway_config: Config
) -> None:
    """A membership change or a dirty mark may be why an upload did not wait
    for a node's leases (docs/design.md): a lease from before it is not used."""
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    await exchange(gateway.port, get("/image/cat"))
    checks = gateway.counters.checks
    await exchange(gateway.port, get("/image/cat"))
    assert gateway.counters.checks == checks  # under the lease
    pool = gateway.app[POOL]
    await pool.set_members([(node_id, pool.members[0].address) for node_id in pool.node_ids])
    await exchange(gateway.port, get("/image/cat"))
    assert gateway.counters.checks == checks + 1


async def test_an_upload_elsewhere_waits_out_this_gateways_read_lease(
    gateway: Gateway, gateway_config: Config
) -> None:
    """Gray and Cheriton's leases: the writer waits until no holder may still
    serve the old version, so a read begun after the upload's reply sees it."""
    async with running(gateway_config) as other:
        await gateway.upload("cat", PNG)
        for data in (PNG_2, PNG, PNG_2, PNG):
            await exchange(gateway.port, get("/image/cat"))
            await exchange(gateway.port, get("/image/cat"))  # now under a lease
            checks = gateway.counters.checks
            await other.upload("cat", data)
            (reply,) = await exchange(gateway.port, get("/image/cat"))
            assert reply.body == data
            assert gateway.counters.checks > checks  # the lease had ended: it asked


async def test_a_connection_whose_first_image_has_no_copy_stays_on_the_fast_path(
    gateway: Gateway,
) -> None:
    await gateway.upload("cat", PNG)
    await gateway.upload("dog", PNG_2)
    counters = gateway.counters
    handed_over = counters.handed_over  # the uploads' connections
    replies = await exchange(
        gateway.port, get("/image/cat"), get("/image/dog"), get("/image/cat"), get("/image/dog")
    )
    assert [reply.body for reply in replies] == [PNG, PNG_2, PNG, PNG_2]
    assert replies[0].headers["content-type"] == "image/png"
    assert (counters.loaded, counters.served, counters.handed_over) == (2, 2, handed_over)
    assert len(gateway.app[KEPT_COPIES]) == 2


async def test_a_key_with_no_image_gets_404_on_the_fast_path_read_once(
    gateway: Gateway, node_server: NodeServer
) -> None:
    """A 404 is an answer like an image: the connection stays on the fast path,
    and each request is one lookup on the node, not one more after a hand-over."""
    await gateway.upload("cat", PNG)
    counters = gateway.counters
    handed_over = counters.handed_over  # the upload's connection
    missing_before = await node_count(node_server, "missing_lookups")
    replies = await exchange(
        gateway.port, get("/image/ghost"), get("/image/cat"), get("/image/ghost")
    )
    assert [reply.status for reply in replies] == [404, 200, 404]
    assert replies[0].body == b"no image for key 'ghost'"
    assert replies[0].headers["content-type"] == "text/plain; charset=utf-8"
    assert replies[1].body == PNG
    assert await node_count(node_server, "missing_lookups") == missing_before + 2
    assert counters.handed_over == handed_over
    assert counters.not_found == 2


async def test_an_image_deleted_through_another_gateway_gets_404_and_its_copy_goes(
    gateway: Gateway, gateway_config: Config
) -> None:
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))
    assert "cat" in gateway.app[KEPT_COPIES]
    async with running(gateway_config) as other:
        await other.delete_all()
        (missing,) = await exchange(gateway.port, get("/image/cat"))
        assert missing.status == 404
        assert "cat" not in gateway.app[KEPT_COPIES]


async def test_a_404_closes_the_connection_when_asked(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(get("/image/ghost", "Connection: close"))
        reply = await read_reply(reader)
        assert (reply.status, reply.headers["connection"]) == (404, "close")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the gateway
    finally:
        writer.close()


async def test_reads_served_under_a_lease_count_even_when_the_image_changed_since(
    gateway: Gateway, gateway_config: Config, node_server: NodeServer
) -> None:
    """Reads served under a read lease are reported as hits apart from the
    CHECK that follows it, which counts nothing when it finds a newer version."""
    async with running(gateway_config) as other:
        await gateway.upload("cat", PNG)
        await exchange(gateway.port, get("/image/cat"))  # kept
        await exchange(gateway.port, get("/image/cat"))  # its CHECK takes a read lease
        before = await node_count(node_server, "hits")
        served = gateway.counters.served
        await exchange(gateway.port, *[get("/image/cat")] * 5)
        assert gateway.counters.served == served + 5  # under the lease: not reported yet
        await other.upload("cat", PNG_2)  # waits the lease out
        (reply,) = await exchange(gateway.port, get("/image/cat"))
        assert reply.body == PNG_2
        await asyncio.sleep(REPORT_SECONDS + 0.5)
        # The five under the lease, and the last read's LOOKUP: its CHECK, naming
        # the replaced version, counted nothing.
        assert await node_count(node_server, "hits") - before == 6


async def test_a_read_of_a_replaced_copy_is_one_lookup_on_the_node(
    gateway: Gateway, gateway_config: Config, node_server: NodeServer
) -> None:
    """The CHECK that finds a newer version, and the read that follows it, are
    one read: the node's hit rate, which sizes the pool, counts it once."""
    async with running(gateway_config) as other:
        await gateway.upload("cat", PNG)
        await exchange(gateway.port, get("/image/cat"))  # kept
        await other.upload("cat", PNG_2)  # the node now holds version 2
        before = await node_count(node_server, "lookups")
        (reply,) = await exchange(gateway.port, get("/image/cat"))
        assert reply.body == PNG_2
        assert await node_count(node_server, "lookups") - before == 1


async def test_a_copy_its_node_no_longer_confirms_is_read_again_on_the_fast_path(
    gateway: Gateway, gateway_config: Config
) -> None:
    """A replaced or evicted image is a cache miss like a key with no copy:
    loaded and answered here, the connection never handed to aiohttp."""
    await gateway.upload("cat", PNG)
    await exchange(gateway.port, get("/image/cat"))  # the copy is kept
    counters = gateway.counters
    handed_over, loaded = counters.handed_over, counters.loaded
    async with (
        running(gateway_config) as other,
        NodeClient.at(gateway_config.gateway.nodes[0]) as node,
    ):
        await other.upload("cat", PNG_2)  # replaced: the copy's version is old
        (replaced,) = await exchange(gateway.port, get("/image/cat"))
        kept = gateway.app[KEPT_COPIES].get("cat")
        await node.delete(b"cat")  # evicted: the node has no version of it
        # A read lease from the last CHECK still vouches for the (current) copy.
        await asyncio.sleep(gateway_config.gateway.read_lease_ms / 1000 + 0.05)
        (evicted,) = await exchange(gateway.port, get("/image/cat"))
    assert (replaced.body, evicted.body) == (PNG_2, PNG_2)
    assert (counters.loaded, counters.handed_over) == (loaded + 2, handed_over)
    # A copy its node evicted goes too: until the node holds the key again,
    # every read of it would pay a CHECK that fails. The load filled the
    # node, so the next read is a hit, which keeps a copy anew.
    assert kept is not None
    assert "cat" not in gateway.app[KEPT_COPIES]
    (again,) = await exchange(gateway.port, get("/image/cat"))
    assert again.body == PNG_2
    anew = gateway.app[KEPT_COPIES].get("cat")
    assert anew is not None
    assert anew is not kept


async def test_an_image_loaded_from_the_store_is_kept_only_once_its_node_serves_it(
    gateway: Gateway, gateway_config: Config, node_server: NodeServer
) -> None:
    """A read that missed the node does not keep a copy (on a pool smaller than
    the working set the node drops the key again before its next read, and
    each read would pay a CHECK that fails); the next read, a hit, does."""
    await gateway.upload("cat", PNG)
    async with NodeClient.at(gateway_config.gateway.nodes[0]) as node:
        await node.delete(b"cat")  # evicted before its first read
    misses = await node_count(node_server, "misses")
    (loaded,) = await exchange(gateway.port, get("/image/cat"))
    assert (loaded.body, await node_count(node_server, "misses") - misses) == (PNG, 1)
    assert "cat" not in gateway.app[KEPT_COPIES]
    hits = await node_count(node_server, "hits")
    (hit,) = await exchange(gateway.port, get("/image/cat"))
    assert (hit.body, await node_count(node_server, "hits") - hits) == (PNG, 1)
    assert "cat" in gateway.app[KEPT_COPIES]
    served = gateway.counters.served
    (third,) = await exchange(gateway.port, get("/image/cat"))
    assert (third.body, gateway.counters.served - served) == (PNG, 1)  # from the copy


async def test_requests_pipelined_during_a_load_are_all_answered_and_reading_resumes(
    gateway: Gateway,
) -> None:
    """A queue of pipelined requests pauses reading while a miss loads; once
    they are answered the connection reads again (it stalled before)."""
    await gateway.upload("cat", PNG)
    fast = gateway.site.fast
    assert fast is not None
    load = fast.load
    assert load is not None

    async def slow_load(key: str) -> Image:  # a slow database or disk
        await asyncio.sleep(0.3)
        return await load(key)

    fast.load = slow_load
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(get("/image/cat"))  # no copy: a load
        await asyncio.sleep(0.1)
        queued = [get("/image/cat", f"X-Pad-{n}: " + "a" * 1000) for n in range(40)]
        writer.write(b"".join(queued))  # more than reading allows to queue
        for _ in range(1 + len(queued)):
            reply = await asyncio.wait_for(read_reply(reader), 5)
            assert reply.status == 200
        writer.write(get("/image/cat"))  # the idle keep-alive connection reads again
        reply = await asyncio.wait_for(read_reply(reader), 5)
        assert reply.body == PNG
    finally:
        writer.close()


async def test_shutting_down_cancels_loads_still_running(gateway_config: Config) -> None:
    """A load whose client went away must not outlive the stores it reads."""
    started = asyncio.Event()
    loads: list[asyncio.Task[Image]] = []
    async with asyncio.timeout(20), running(gateway_config) as gateway:
        await gateway.upload("cat", PNG)
        fast = gateway.site.fast
        assert fast is not None

        async def endless_load(key: str) -> Image:
            started.set()
            await asyncio.sleep(3600)
            raise AssertionError("never")

        fast.load = endless_load
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(get("/image/dog"))
        await asyncio.wait_for(started.wait(), 5)
        loads = list(fast.loads)
        writer.close()
    assert len(loads) == 1
    assert loads[0].cancelled()


async def test_a_restarted_node_waits_out_the_read_leases_of_its_previous_incarnation(
    gateway_config: Config, node_server: NodeServer
) -> None:
    """The new incarnation never heard of the lease the reader holds; it
    counts every key as leased for the longest lease after it starts."""
    longest = replace(gateway_config.gateway, read_lease_ms=int(MAX_READ_LEASE_SECONDS * 1000))
    config = replace(gateway_config, gateway=longest)
    async with running(config) as reader, running(config) as writer:
        await writer.upload("cat", PNG)
        await exchange(reader.port, get("/image/cat"))
        await exchange(reader.port, get("/image/cat"))  # now under a lease
        _, port = node_server.address
        await node_server.stop()
        async with NodeServer(NodeConfig(port=port, capacity_mb=64)):
            await writer.upload("cat", PNG_2)
            (reply,) = await exchange(reader.port, get("/image/cat"))
            assert reply.body == PNG_2


# -- images sent from in-memory files ------------------------------------------------------


async def test_big_images_go_out_from_in_memory_files_byte_for_byte(gateway: Gateway) -> None:
    images = {"medium": noise_png(90), "big": noise_png(330), "huge": noise_png(900)}
    for key, data in images.items():
        await gateway.upload(key, data)
    await gateway.upload("small", PNG)
    keys = [*images, "small"]
    await exchange(gateway.port, *[get(f"/image/{key}") for key in keys])
    kept = gateway.app[KEPT_COPIES]
    for key in images:
        image = kept.get(key)
        assert image is not None
        assert image.file is not None, key
    small = kept.get("small")
    assert small is not None
    assert small.file is None  # too small to gain from a file
    order = [*keys, *reversed(keys), "huge", "huge", "medium"]
    replies = await exchange(gateway.port, *[get(f"/image/{key}") for key in order])
    expected = {**images, "small": PNG}
    assert [reply.body for reply in replies] == [expected[key] for key in order]
    assert all(int(r.headers["content-length"]) == len(r.body) for r in replies)


async def test_a_connection_answered_from_a_file_closes_when_asked(gateway: Gateway) -> None:
    """The descriptor the fast path sends files with must not keep the socket open."""
    big = noise_png(200)
    await gateway.upload("big", big)
    await exchange(gateway.port, get("/image/big"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(get("/image/big") + get("/image/big", "Connection: close"))
        assert (await read_reply(reader)).body == big
        assert (await read_reply(reader)).body == big
        assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()


async def test_a_connection_handed_to_aiohttp_after_a_file_closes_when_asked(
    gateway: Gateway,
) -> None:
    big = noise_png(200)
    await gateway.upload("big", big)
    await exchange(gateway.port, get("/image/big"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        keys = b"POST /api/list_keys HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
        writer.write(get("/image/big") + keys + b"Connection: close\r\n\r\n")
        assert (await read_reply(reader)).body == big
        assert (await read_reply(reader)).status == 200  # aiohttp's
        assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()


def test_in_memory_files_are_bounded_and_closed_once_unused() -> None:
    files = MemoryFiles(limit=2)
    data = os.urandom(MIN_FILE_BYTES)
    first, second = files.make(data), files.make(data)
    assert first is not None
    assert second is not None
    assert bytes(first.view) == data
    assert files.make(data) is None  # at the limit: the caller keeps plain bytes
    assert files.make(b"x" * (MIN_FILE_BYTES - 1)) is None  # too small to gain
    descriptor = first.fd
    os.fstat(descriptor)
    del first
    assert files.open == 1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(descriptor)
    assert files.make(data) is not None
