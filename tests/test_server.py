"""The node over real TCP: the project's client, pymemcache, raw sockets, signals."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import Iterator

import pytest
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.exceptions import MemcacheServerError, MemcacheUnexpectedCloseError

from cachenode.client import CachedItem, LeaseGranted, LeaseHeld, NodeClient
from cachenode.errors import NodeReplyError, NodeTimeout, NodeUnavailable
from cachenode.protocol import (
    MAGIC_RESPONSE,
    Frame,
    FrameDecoder,
    Opcode,
    encode_request,
)
from cachenode.server import NodeConfig, NodeServer
from cachenode.status import Status
from cachenode.store import ITEM_OVERHEAD, MIB
from tests.conftest import NodeProcess, start_node_process

FIVE_MB = 5 * MIB


def client_for(server: NodeServer, **options: float) -> NodeClient:
    host, port = server.address
    return NodeClient(host, port, **options)  # type: ignore[arg-type]


async def test_set_get_delete_stats(node_server: NodeServer) -> None:
    async with client_for(node_server) as client:
        assert await client.get(b"cat") is None
        await client.set(b"cat", b"meow", flags=7, version=3, ticket=await client.ticket())
        item = await client.get_item(b"cat")
        assert item is not None
        assert (item.value, item.flags, item.version) == (b"meow", 7, 3)
        assert await client.add(b"cat", b"purr") is False
        assert await client.get(b"cat") == b"meow"
        assert await client.add(b"dog", b"woof") is True
        assert await client.delete(b"cat") is True
        assert await client.delete(b"cat") is False
        stats = await client.stats()
        assert stats["items"] == 1
        assert stats["bytes"] == len(b"dog") + len(b"woof") + ITEM_OVERHEAD
        assert stats["lookups"] == 3
        assert (stats["hits"], stats["misses"]) == (2, 1)
        assert stats["deletes"] == 1
        await client.clear()
        assert (await client.stats())["items"] == 0
        assert await client.ping() == node_server.node.version


async def test_versioned_invalidation_refuses_older_fills(node_server: NodeServer) -> None:
    async with client_for(node_server) as client:
        ticket = await client.ticket()
        assert await client.set(b"img", b"v1", version=1, ticket=ticket) is True
        assert await client.delete(b"img", version=2) is True
        assert await client.add(b"img", b"v1", version=1, ticket=ticket) is False
        assert await client.set(b"img", b"v1", version=1, ticket=ticket) is False
        assert await client.set(b"img", b"v2", version=2, ticket=ticket) is True
        item = await client.get_item(b"img")
        assert item is not None
        assert (item.value, item.version) == (b"v2", 2)
        assert (await client.stats())["tombstones"] == 1


async def test_pipelined_multi_get_returns_each_value(node_server: NodeServer) -> None:
    async with client_for(node_server, pool_size=2) as client:
        keys = [f"key-{i}".encode() for i in range(500)]
        await asyncio.gather(*(client.set(key, key[::-1]) for key in keys))
        values = await asyncio.gather(*(client.get(key) for key in [*keys, b"absent"]))
        assert values == [key[::-1] for key in keys] + [None]


async def test_five_megabyte_value_round_trips(node_server: NodeServer) -> None:
    value = bytes(range(256)) * (FIVE_MB // 256)
    async with client_for(node_server) as client:
        await client.set(b"photo", value)
        assert await client.get(b"photo") == value


async def test_oversized_value_is_refused_and_connection_goes_on(node_server: NodeServer) -> None:
    async with client_for(node_server, pool_size=1, timeout=10) as client:
        await client.set(b"keep", b"me")
        with pytest.raises(NodeReplyError) as refused:
            await client.set(b"huge", b"x" * (17 * MIB))
        assert refused.value.status is Status.TOO_LARGE
        assert "maximum item size" in refused.value.message
        assert await client.get(b"huge") is None
        assert await client.get(b"keep") == b"me"
        assert (await client.stats())["total_connections"] == 1


async def test_value_larger_than_capacity_is_refused_without_evicting() -> None:
    server = NodeServer(NodeConfig(port=0, capacity_mb=2))
    async with server, client_for(server) as client:
        await client.set(b"small", b"s")
        with pytest.raises(NodeReplyError) as refused:
            await client.set(b"big", b"b" * (3 * MIB))
        assert refused.value.status is Status.TOO_LARGE
        assert await client.get(b"small") == b"s"


async def test_config_changes_capacity_and_policy_live(node_server: NodeServer) -> None:
    async with client_for(node_server) as client:
        for i in range(40):
            await client.set(f"k{i}".encode(), b"v" * 100_000)
        config = await client.config(capacity_mb=1, policy="random")
        assert config == {"capacity_mb": 1.0, "policy": "random", "max_item_mb": 16.0}
        stats = await client.stats()
        assert stats["bytes"] <= MIB
        assert stats["evictions"] >= 30
        with pytest.raises(NodeReplyError) as bad:
            await client.config(policy="fifo")
        assert bad.value.status is Status.INVALID_ARGUMENT
        assert (await client.config())["policy"] == "random"


async def test_keys_listing_pages_through_every_key(node_server: NodeServer) -> None:
    async with client_for(node_server) as client:
        keys = {f"img-{i}".encode() for i in range(250)}
        await asyncio.gather(*(client.set(key, b"0123456789") for key in keys))
        first, cursor = await client.keys(count=100)
        assert len(first) == 100
        assert cursor
        listed = [entry async for entry in client.iter_keys(count=64)]
        assert {key for key, _ in listed} == keys
        assert {size for _, size in listed} == {len(b"img-0") + 10 + ITEM_OVERHEAD} | {
            len(b"img-10") + 10 + ITEM_OVERHEAD,
            len(b"img-100") + 10 + ITEM_OVERHEAD,
        }


async def test_pipelined_raw_requests_are_answered_in_order(node_server: NodeServer) -> None:
    host, port = node_server.address
    reader, writer = await asyncio.open_connection(host, port)
    requests = [encode_request(Opcode.SET, 1, b"a", b"1")]
    requests += [encode_request(Opcode.GET, 100 + i, b"a" if i % 2 else b"b") for i in range(50)]
    writer.write(b"".join(requests))
    decoder = FrameDecoder(MAGIC_RESPONSE)
    frames: list[Frame] = []
    while len(frames) < len(requests):
        decoder.feed(await reader.read(65536))
        while (frame := decoder.next_frame()) is not None:
            assert isinstance(frame, Frame)
            frames.append(frame)
    assert [f.request_id for f in frames] == [1] + [100 + i for i in range(50)]
    assert [f.status for f in frames[1:]] == [
        Status.OK if i % 2 else Status.NOT_FOUND for i in range(50)
    ]
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize(
    ("garbage", "closing_reply"),
    [
        (b"\xca" + b"\xff" * 40, b""),  # binary magic, then nonsense
        (b"x" * 5000, b"CLIENT_ERROR line too long"),
        (b"set k 0 0 3\r\nabcXY", b"CLIENT_ERROR bad data chunk"),
    ],
)
async def test_garbage_on_one_connection_leaves_the_others_working(
    node_server: NodeServer, garbage: bytes, closing_reply: bytes
) -> None:
    host, port = node_server.address
    async with client_for(node_server) as client:
        await client.set(b"survivor", b"still here")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(garbage)
        reply = await asyncio.wait_for(reader.read(), timeout=5)  # read() waits for EOF
        if garbage.startswith(b"\xca"):
            decoder = FrameDecoder(MAGIC_RESPONSE)
            decoder.feed(reply)
            frame = decoder.next_frame()
            assert isinstance(frame, Frame)
            assert frame.status == Status.MALFORMED
        else:
            assert reply.startswith(closing_reply)
        writer.close()
        assert await client.get(b"survivor") == b"still here"
        assert (await client.stats())["items"] == 1


async def test_unknown_text_command_gets_error_and_connection_stays(
    node_server: NodeServer,
) -> None:
    host, port = node_server.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x00\x01garbage\r\nversion\r\n")
    assert await reader.readline() == b"ERROR\r\n"
    assert (
        await reader.readline()
        == b"VERSION " + node_server.node.memcached_version.encode() + b"\r\n"
    )
    writer.close()
    await writer.wait_closed()


async def test_client_times_out_on_a_silent_node() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    async with NodeClient("127.0.0.1", port, timeout=0.3) as client:
        with pytest.raises(NodeTimeout):
            await client.get(b"anything")
    silent.close()
    await silent.wait_closed()


async def test_client_reports_an_unreachable_node() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with NodeClient("127.0.0.1", port, timeout=2) as client:
        with pytest.raises(NodeUnavailable):
            await client.ping()


async def test_client_fails_pending_requests_when_the_node_goes_away() -> None:
    node = start_node_process()
    async with NodeClient(node.host, node.port, timeout=5) as client:
        await client.set(b"k", b"v")
        node.process.kill()
        node.stop()
        with pytest.raises(NodeUnavailable):
            await client.get(b"k")


# -- a stock memcached client against a node process ---------------------------


@pytest.fixture
def memcache(node_process: NodeProcess) -> Iterator[MemcacheClient]:
    client = MemcacheClient((node_process.host, node_process.port), timeout=10)
    yield client
    client.close()


def test_pymemcache_set_get_delete_stats(memcache: MemcacheClient) -> None:
    client = memcache
    assert client.set("greeting", b"hello", noreply=False) is True
    assert client.get("greeting") == b"hello"
    assert client.add("greeting", b"other", noreply=False) is False
    assert client.get_many(["greeting", "missing"]) == {"greeting": b"hello"}
    assert client.delete("greeting", noreply=False) is True
    assert client.get("greeting") is None
    stats = client.stats()
    assert stats[b"curr_items"] == 0
    assert stats[b"get_hits"] == 2  # get, then get_many
    assert client.version() == b"1.6.0-imagecache-0.1.0"


def test_pymemcache_multi_get_and_large_values(memcache: MemcacheClient) -> None:
    client = memcache
    values = {f"k{i}": bytes([i]) * (i * 1000 + 1) for i in range(20)}
    assert client.set_many(values, noreply=False) == []
    assert client.get_many(list(values)) == values
    photo = bytes(range(256)) * (FIVE_MB // 256)
    assert client.set("photo", photo, noreply=False) is True
    assert client.get("photo") == photo


def test_pymemcache_oversized_value_is_refused(memcache: MemcacheClient) -> None:
    client = memcache
    client.set("before", b"1", noreply=False)
    with pytest.raises(MemcacheServerError, match="too large"):
        client.set("huge", b"x" * (17 * MIB), noreply=False)
    assert client.get("huge") is None
    assert client.get("before") == b"1"


def test_pymemcache_works_while_another_connection_sends_garbage(
    node_process: NodeProcess, memcache: MemcacheClient
) -> None:
    client = memcache
    client.set("k", b"v", noreply=False)
    with socket.create_connection((node_process.host, node_process.port), timeout=5) as raw:
        raw.sendall(b"\xca" + bytes(range(64)))
        assert raw.recv(1024)  # the MALFORMED reply
        assert raw.recv(1024) == b""  # then the node closed the connection
    assert client.get("k") == b"v"
    client.flush_all(noreply=False)
    assert client.get("k") is None


def test_sigterm_stops_the_node_cleanly_with_clients_connected() -> None:
    node = start_node_process()
    client = MemcacheClient((node.host, node.port), timeout=5)
    try:
        client.set("k", b"v", noreply=False)
        assert node.stop(timeout=10) == 0
        with pytest.raises((MemcacheUnexpectedCloseError, ConnectionError)):
            client.get("k")
    finally:
        client.close()


async def test_lease_check_and_release_through_the_client(node_server: NodeServer) -> None:
    async with client_for(node_server) as first, client_for(node_server) as second:
        assert isinstance(await first.lease(b"photo", 2.0), LeaseGranted)
        held = await second.lease(b"photo", 2.0)
        assert isinstance(held, LeaseHeld)
        assert 1.5 < held.seconds_left <= 2.0
        await first.release(b"photo")
        granted = await second.lease(b"photo", 2.0)
        assert isinstance(granted, LeaseGranted)
        assert await second.add(b"photo", b"jpeg", flags=1, version=4, ticket=granted.ticket)
        assert await first.lease(b"photo", 2.0) == CachedItem(b"jpeg", 1, 4)
        assert await first.check(b"photo") == 4
        assert await first.check(b"other") is None


async def test_lookup_through_the_client_reads_or_leases_in_one_request(
    node_server: NodeServer,
) -> None:
    async with client_for(node_server) as first, client_for(node_server) as second:
        granted = await first.lookup(b"photo", 2.0)
        assert isinstance(granted, LeaseGranted)
        assert isinstance(await second.lookup(b"photo", 2.0), LeaseHeld)
        assert await first.add(b"photo", b"jpeg", flags=1, version=4, ticket=granted.ticket)
        assert await second.lookup(b"photo", 2.0) == CachedItem(b"jpeg", 1, 4)
        stats = await first.stats()
        assert (stats["lookups"], stats["misses"], stats["hits"]) == (3, 2, 1)


# -- large values received in place -----------------------------------------------------------

BIG = bytes(range(256)) * 4096  # 1 MiB: spans many reads


def _binary_stream() -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """Two large SETs, reads between and after them; the replies expected."""
    requests = [
        encode_request(Opcode.SET, 1, b"big", BIG),
        encode_request(Opcode.GET, 2, b"big"),
        encode_request(Opcode.SET, 3, b"big2", BIG[::-1]),
        encode_request(Opcode.GET, 4, b"big2"),
        encode_request(Opcode.GET, 5, b"missing"),
    ]
    expected: list[tuple[int, int, bytes]] = [
        (1, Status.OK, b""),
        (2, Status.OK, BIG),
        (3, Status.OK, b""),
        (4, Status.OK, BIG[::-1]),
        (5, Status.NOT_FOUND, b""),
    ]
    return b"".join(requests), expected


async def _send_in_pieces(writer: asyncio.StreamWriter, data: bytes, piece: int) -> None:
    # Small pieces with pauses between: the node sees values start and stop
    # anywhere in a read, and waits for their rest in between.
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
        await writer.drain()
        await asyncio.sleep(0)


async def _binary_exchange(host: str, port: int, piece: int) -> None:
    stream, expected = _binary_stream()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _send_in_pieces(writer, stream, piece)
        decoder = FrameDecoder(MAGIC_RESPONSE)
        frames: list[Frame] = []
        async with asyncio.timeout(10):
            while len(frames) < len(expected):
                decoder.feed(await reader.read(1 << 20))
                while (frame := decoder.next_frame()) is not None:
                    assert isinstance(frame, Frame)
                    frames.append(frame)
        assert [(f.request_id, f.status, bytes(f.value)) for f in frames] == expected
    finally:
        writer.close()


async def _text_exchange(host: str, port: int, piece: int) -> None:
    stream = (
        b"set big 5 0 %d\r\n" % len(BIG) + BIG + b"\r\nget big\r\n"
        b"set big2 0 0 %d noreply\r\n" % len(BIG) + BIG[::-1] + b"\r\nget big2 nothing\r\n"
    )
    expected = (
        b"STORED\r\nVALUE big 5 %d\r\n" % len(BIG) + BIG + b"\r\nEND\r\n"
        b"VALUE big2 0 %d\r\n" % len(BIG) + BIG[::-1] + b"\r\nEND\r\n"
    )
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _send_in_pieces(writer, stream, piece)
        async with asyncio.timeout(10):
            assert await reader.readexactly(len(expected)) == expected
    finally:
        writer.close()


@pytest.mark.parametrize("piece", [1 << 20, 100_003, 7_001])
async def test_large_values_in_pieces_with_requests_behind_them(
    node_server: NodeServer, piece: int
) -> None:
    host, port = node_server.address
    await _binary_exchange(host, port, piece)
    await _text_exchange(host, port, piece)


@pytest.mark.parametrize("piece", [1 << 20, 7_001])
async def test_large_values_in_pieces_on_a_node_process(
    node_process: NodeProcess, piece: int
) -> None:
    # The node's own event loop (uvloop), where the in-place reads matter.
    await _binary_exchange(node_process.host, node_process.port, piece)
    await _text_exchange(node_process.host, node_process.port, piece)


@pytest.mark.parametrize("text", [False, True])
async def test_client_gone_in_the_middle_of_a_large_value(
    node_process: NodeProcess, text: bool
) -> None:
    if text:
        request = b"set big 0 0 %d\r\n" % len(BIG) + BIG + b"\r\n"
    else:
        request = encode_request(Opcode.SET, 1, b"big", BIG)
    _, writer = await asyncio.open_connection(node_process.host, node_process.port)
    writer.write(request[: len(request) // 2])
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    async with NodeClient(node_process.host, node_process.port) as client:
        async with asyncio.timeout(5):
            while (await client.stats())["current_connections"] != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await client.get(b"big") is None  # half a value is never stored
        assert await client.set(b"big", BIG)
        assert await client.get(b"big") == BIG


async def test_a_connection_gone_mid_value_is_freed_at_once(node_server: NodeServer) -> None:
    # Freed by reference counting, without waiting for the cyclic collector:
    # a connection that lived long sits in its oldest generation, collected
    # rarely, and it would keep a buffer of up to the maximum item size.
    host, port = node_server.address
    request = encode_request(Opcode.SET, 1, b"big", BIG * 4)
    gc.disable()
    try:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(request[: len(request) // 2])
        await writer.drain()
        async with asyncio.timeout(5):
            while not node_server._connections:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        (connection,) = node_server._connections
        gone = weakref.ref(connection)
        del connection
        await asyncio.sleep(0.1)  # the node receives the first half in place
        writer.close()
        async with asyncio.timeout(5):
            while node_server.node.current_connections:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the transport lets go of its protocol
        assert gone() is None
    finally:
        gc.enable()
