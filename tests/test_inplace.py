"""Tests of receiving large values in place (cachenode.inplace) and of the value
buffers it fills, which are allocated without zeroing (cachenode.streaminput):
real sockets on 127.0.0.1, a real node in the test's event loop."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from cachenode import streaminput
from cachenode.inplace import receive_in_place
from cachenode.protocol import (
    HEADER_SIZE,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    Frame,
    FrameDecoder,
    Opcode,
    encode_request,
)
from cachenode.server import NodeConfig, NodeServer
from cachenode.status import Status
from cachenode.streaminput import COLLECT_THRESHOLD, ReceiveBudget

MIB = 1 << 20
BIG = 4 * MIB + 3
POISON = 0xAA


def pattern(size: int, seed: int) -> bytes:
    """``size`` bytes that never contain POISON, different for each seed."""
    cycle = bytes(range(seed % POISON, POISON)) + bytes(range(seed % POISON))
    return (cycle * (size // POISON + 1))[:size]


# -- receive_in_place against a plain owner ----------------------------------


@dataclass(eq=False)
class Owner(asyncio.Protocol):
    """A connection that decodes request frames and receives large values in place."""

    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(MAGIC_REQUEST))
    transport: asyncio.Transport | None = None
    frames: list[Frame] = field(default_factory=list)
    owner_bytes: int = 0  # bytes that came through data_received
    events: list[str] = field(default_factory=list)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reply: bytes = b""  # written back on the first read, while receiving in place

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.owner_bytes += len(data)
        self.decoder.feed(data)
        self.decode()
        receive_in_place(self.transport, self, self.decoder.buffer, self.decode)
        if self.reply:
            self.transport.write(self.reply)
            self.reply = b""

    def decode(self) -> None:
        while (frame := self.decoder.next_frame()) is not None:
            assert isinstance(frame, Frame)
            self.frames.append(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.decoder.buffer.discard()
        self.lost.set()

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


@asynccontextmanager
async def owner_and_socket(owner: Owner) -> AsyncIterator[socket.socket]:
    """A listening ``owner`` on a free loopback port and a client socket connected to it."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: owner, "127.0.0.1", 0)
    client = socket.socket()
    client.setblocking(False)
    try:
        await loop.sock_connect(client, server.sockets[0].getsockname())
        yield client
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def send(client: socket.socket, data: bytes, piece: int = 1 << 16) -> None:
    loop = asyncio.get_running_loop()
    for start in range(0, len(data), piece):
        await loop.sock_sendall(client, data[start : start + piece])
        await asyncio.sleep(0.001)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_a_large_value_is_received_in_place_and_the_owner_gets_the_rest() -> None:
    owner = Owner()
    value = pattern(BIG, 1)
    stream = encode_request(Opcode.SET, 1, b"big", value) + encode_request(Opcode.GET, 2, b"k")
    async with owner_and_socket(owner) as client:
        await send(client, stream)
        await until(lambda: len(owner.frames) == 2)
        assert owner.transport is not None
        assert owner.transport.get_protocol() is owner  # given back
    assert [(frame.request_id, bytes(frame.value)) for frame in owner.frames] == [
        (1, value),
        (2, b""),
    ]
    # Only the first read and the GET behind the value went through the owner.
    assert owner.owner_bytes < 2 * (1 << 16) + HEADER_SIZE + 1


async def test_a_value_fed_whole_is_not_received_in_place() -> None:
    owner = Owner()
    value = pattern(COLLECT_THRESHOLD - 1, 2)
    async with owner_and_socket(owner) as client:
        await send(client, encode_request(Opcode.SET, 1, b"k", value), piece=1000)
        await until(lambda: len(owner.frames) == 1)
        assert owner.transport is not None
        assert owner.transport.get_protocol() is owner
    assert bytes(owner.frames[0].value) == value
    assert owner.owner_bytes == HEADER_SIZE + 1 + len(value)


async def test_a_connection_lost_while_receiving_in_place_reaches_the_owner() -> None:
    owner = Owner()
    owner.decoder.buffer.budget = budget = ReceiveBudget(lambda: 64 * MIB)
    request = encode_request(Opcode.SET, 1, b"big", pattern(BIG, 3))
    async with owner_and_socket(owner) as client:
        await send(client, request[: len(request) // 2])
        await until(lambda: budget.reserved == BIG)
        # Reset rather than closed: the owner hears of no end of stream first.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await asyncio.wait_for(owner.lost.wait(), 5)
    assert owner.events == ["lost"]
    assert budget.reserved == 0  # the owner's discard gave the reservation back
    assert owner.frames == []


async def test_an_end_of_stream_while_receiving_in_place_reaches_the_owner() -> None:
    owner = Owner()
    request = encode_request(Opcode.SET, 1, b"big", pattern(BIG, 4))
    async with owner_and_socket(owner) as client:
        await send(client, request[: len(request) // 2])
        await until(lambda: owner.decoder.buffer.missing > 0)
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(owner.lost.wait(), 5)
    assert owner.events == ["eof", "lost"]


async def test_write_pressure_while_receiving_in_place_reaches_the_owner() -> None:
    owner = Owner(reply=b"x" * (8 * MIB))  # more than the socket takes unread
    request = encode_request(Opcode.SET, 1, b"big", pattern(BIG, 5))
    loop = asyncio.get_running_loop()
    async with owner_and_socket(owner) as client:
        await send(client, request[: 1 << 16])
        await until(lambda: "pause" in owner.events)
        assert owner.transport is not None
        assert owner.transport.get_protocol() is not owner  # still in place
        received = 0
        while received < 8 * MIB:
            received += len(await loop.sock_recv(client, 1 << 20))
        await until(lambda: "resume" in owner.events)
        await send(client, request[1 << 16 :])
        await until(lambda: len(owner.frames) == 1)
    assert owner.events[:2] == ["pause", "resume"]
    assert bytes(owner.frames[0].value) == pattern(BIG, 5)


async def test_nothing_missing_or_a_closing_transport_leaves_the_owner_in_place() -> None:
    owner = Owner()
    async with owner_and_socket(owner) as client:
        await send(client, encode_request(Opcode.GET, 1, b"k"))
        await until(lambda: len(owner.frames) == 1)
        assert owner.transport is not None
        buffer = owner.decoder.buffer
        receive_in_place(owner.transport, owner, buffer, owner.decode)  # nothing missing
        assert owner.transport.get_protocol() is owner
        await send(client, encode_request(Opcode.SET, 2, b"big", pattern(BIG, 6))[:1000])
        await until(lambda: buffer.missing > 0)
        owner.transport.set_protocol(owner)  # as if not yet handed over
        owner.transport.close()
        receive_in_place(owner.transport, owner, buffer, owner.decode)
        assert owner.transport.get_protocol() is owner


# -- value buffers allocated without zeroing: no unwritten byte gets out -------


def poison(size: int) -> None:
    """Leave freed memory full of POISON where the next buffer of ``size`` may come from."""
    for _ in range(4):
        garbage = bytearray([POISON]) * size
        del garbage


@dataclass
class Speaker:
    """One protocol's store and read requests and replies, over one connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    text: bool
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(MAGIC_RESPONSE))

    def store_request(self, key: bytes, value: bytes) -> bytes:
        if self.text:
            return b"set %s 0 0 %d\r\n" % (key, len(value)) + value + b"\r\n"
        return encode_request(Opcode.SET, 1, key, value)

    def head_length(self, key: bytes, value: bytes) -> int:
        """Bytes of a store request before its value."""
        return len(self.store_request(key, value)) - len(value) - (2 if self.text else 0)

    async def send(self, data: bytes, cuts: list[int]) -> None:
        """``data`` in pieces cut at ``cuts``, each read by the node on its own."""
        last = 0
        for cut in [*cuts, len(data)]:
            self.writer.write(data[last:cut])
            await self.writer.drain()
            await asyncio.sleep(0.002)
            last = cut

    async def store(self, key: bytes, value: bytes, cuts: list[int]) -> bytes:
        """Store ``value`` sent cut at ``cuts``; the reply (b"OK" when stored)."""
        await self.send(self.store_request(key, value), cuts)
        return await self.store_reply()

    async def store_reply(self) -> bytes:
        async with asyncio.timeout(10):
            if self.text:
                line = await self.reader.readline()
                return b"OK" if line == b"STORED\r\n" else line
            frame = await self._frame()
            return b"OK" if frame.status == Status.OK else bytes(frame.value)

    async def get(self, key: bytes) -> bytes | None:
        async with asyncio.timeout(10):
            if self.text:
                self.writer.write(b"get %s\r\n" % key)
                header = await self.reader.readline()
                if header == b"END\r\n":
                    return None
                value = await self.reader.readexactly(int(header.split()[3]))
                assert await self.reader.readexactly(7) == b"\r\nEND\r\n"
                return value
            self.writer.write(encode_request(Opcode.GET, 2, key))
            frame = await self._frame()
            return bytes(frame.value) if frame.status == Status.OK else None

    async def _frame(self) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            self.decoder.feed(await self.reader.read(1 << 20))
        assert isinstance(frame, Frame)
        return frame


@asynccontextmanager
async def speaker(server: NodeServer, text: bool) -> AsyncIterator[Speaker]:
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        yield Speaker(reader, writer, text)
    finally:
        writer.close()


def cuts_of(head: int, size: int) -> list[list[int]]:
    """Where to cut a store request: in its head, at every boundary around
    where its value starts and ends, in its middle, and in many small reads."""
    end = head + size
    around_start = [[cut] for cut in range(max(1, head - 3), head + 4)]
    around_end = [[cut] for cut in range(end - 3, end + 2)]
    return [[1], *around_start, [head + size // 2], *around_end, list(range(head, end, 8191))]


@pytest.fixture
def uninitialized(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch on, whatever the build chose: value buffers are not zeroed."""
    monkeypatch.setattr(streaminput, "new_value_buffer", streaminput.uninitialized_bytearray())


@pytest.mark.usefixtures("uninitialized")
@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_no_unwritten_byte_of_a_value_buffer_is_stored_or_sent(text: bool) -> None:
    config = NodeConfig(port=0, capacity_mb=16, max_item_mb=2)  # receives 4 MiB at once
    async with NodeServer(config) as server, speaker(server, text) as client:
        store = server.node.store
        seed = 0

        async def round_trip(key: bytes, size: int, cuts: list[int]) -> None:
            nonlocal seed
            seed += 1
            value = pattern(size, seed)
            poison(size)
            assert await client.store(key, value, cuts) == b"OK"
            assert await client.get(key) == value
            item = store.get(key)
            assert item is not None
            assert bytes(item.value) == value

        # Values that span reads, cut everywhere that matters.
        for size in (COLLECT_THRESHOLD, 100_003, MIB + 7):
            head = client.head_length(b"k", bytes(size))
            for cuts in cuts_of(head, size):
                await round_trip(b"k", size, cuts)

        # A connection gone mid-value: nothing of it is stored, and the next
        # value, likely in the memory its buffer had, is exact.
        half = MIB // 2
        async with speaker(server, text) as gone:
            request = gone.store_request(b"gone", pattern(MIB, 99))
            await gone.send(request[: len(request) - half], [])
        await until(lambda: server.node.current_connections == 1)
        assert store.get(b"gone") is None
        assert await client.get(b"gone") is None
        await round_trip(b"after-gone", MIB, list(range(100, MIB, 65_537)))

        # Refused values: too large (skipped), and no room in the receive
        # budget while two slow senders hold it all (4 MiB).
        oversized = pattern(3 * MIB, 100)
        reply = await client.store(b"oversized", oversized, list(range(1, 3 * MIB, 65_536)))
        assert reply != b"OK"
        assert await client.get(b"oversized") is None
        size = 2 * MIB - 1024
        slow = {b"slow-1": pattern(size, 101), b"slow-2": pattern(size, 102)}
        async with speaker(server, text) as first, speaker(server, text) as second:
            senders = dict(zip(slow, (first, second), strict=True))
            requests = {key: senders[key].store_request(key, value) for key, value in slow.items()}
            for key, sender in senders.items():
                await sender.send(requests[key][: HEADER_SIZE + 100], [])
            await until(lambda: server.receiving.reserved == 2 * size)
            refused = await client.store(b"refused", pattern(100_000, 103), [50])
            assert refused != b"OK"
            assert await client.get(b"refused") is None
            for key, sender in senders.items():
                await sender.send(requests[key][HEADER_SIZE + 100 :], [])
                assert await sender.store_reply() == b"OK"
        for key, value in slow.items():
            assert await client.get(key) == value
        await round_trip(b"after-refused", 100_000, [50])
        assert server.receiving.reserved == 0
