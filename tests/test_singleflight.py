"""What a gateway's read may return: a load's answer only if it was asked for
after the read arrived, and only items that a gateway stored.

The single flight (imagecache.singleflight) as pure unit tests, with loads the
test steps through; then across processes: a gateway process takes the
uploads while a gateway in the test's process holds its load, and a gateway
process reads items that someone else put on its node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from cachenode.client import CachedItem, LeaseGranted, LeaseHeld, NodeClient
from imagecache.blobs import FolderBlobStore
from imagecache.cachepool import CachePool, WriteTicket
from imagecache.images import flags_for
from imagecache.singleflight import Flight, SingleFlight
from tests.conftest import NodeProcess, image_bytes
from tests.processes import embedded_gateway, gateway_on_nodes, read_image, upload_image

# Every wait of these tests ends this soon when the code is right, and fails then otherwise.
WAIT_SECONDS = 10.0


async def within(awaitable: Awaitable[object]) -> object:
    return await asyncio.wait_for(awaitable, WAIT_SECONDS)


async def settle() -> None:
    """Let every task that can run go as far as it can without waiting on I/O."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- the single flight ---------------------------------------------------------------------------


class LoadFailed(Exception):
    pass


@dataclass
class Load:
    """One load the test steps through: it waits for ``ask`` before each probe
    and for ``answer`` before it returns (or raises)."""

    number: int
    probes: int
    fails: bool
    ask: list[asyncio.Event] = field(default_factory=list)
    asked: list[asyncio.Event] = field(default_factory=list)
    answer: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.ask = [asyncio.Event() for _ in range(self.probes)]
        self.asked = [asyncio.Event() for _ in range(self.probes)]

    async def run(self, flight: Flight) -> str:
        try:
            for ask, asked in zip(self.ask, self.asked, strict=True):
                await ask.wait()
                flight.probe()
                asked.set()
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fails:
            raise LoadFailed(f"load {self.number}")
        return f"answer of load {self.number}"

    async def probe(self, index: int = 0) -> None:
        """Let the load ask its ``index``-th question, and wait until it did."""
        self.ask[index].set()
        await within(self.asked[index].wait())


class Loads:
    """The loads started, in order; each probes ``probes`` times, and the
    numbers in ``failing`` fail."""

    def __init__(self, probes: int = 1, failing: frozenset[int] = frozenset()) -> None:
        self.probes = probes
        self.failing = failing
        self.started: list[Load] = []
        self._started = asyncio.Condition()

    async def load(self, flight: Flight) -> str:
        number = len(self.started) + 1
        load = Load(number, self.probes, number in self.failing)
        self.started.append(load)
        async with self._started:
            self._started.notify_all()
        return await load.run(flight)

    async def nth(self, number: int) -> Load:
        """The ``number``-th load, once it has started."""
        async with self._started:
            await within(self._started.wait_for(lambda: len(self.started) >= number))
        return self.started[number - 1]


def read(flights: SingleFlight[str], loads: Loads, key: str = "k") -> asyncio.Task[str]:
    return asyncio.create_task(flights.run(key, loads.load))


def assert_loads(loads: Loads, count: int) -> None:
    started = len(loads.started)
    assert started == count, f"{started} loads started, not {count}: a reader did not join"


def outcome(reader: asyncio.Task[str]) -> str:
    """What a finished reader got, for a message."""
    error = reader.exception()
    return repr(reader.result()) if error is None else f"the error {error!r}"


async def test_readers_that_arrive_before_the_probe_share_its_answer() -> None:
    flights: SingleFlight[str] = SingleFlight()
    loads = Loads()
    first = read(flights, loads)
    load = await loads.nth(1)
    others = [read(flights, loads) for _ in range(3)]
    await settle()
    assert_loads(loads, 1)  # they joined the load, which has asked nothing yet
    await load.probe()
    load.answer.set()
    assert await within(asyncio.gather(first, *others)) == ["answer of load 1"] * 4
    assert len(loads.started) == 1


async def test_a_reader_that_arrives_between_probes_shares_the_answer_of_the_later_one() -> None:
    flights: SingleFlight[str] = SingleFlight()
    loads = Loads(probes=2)  # as a load that polls a lease, then reads the row
    first = read(flights, loads)
    load = await loads.nth(1)
    await load.probe(0)
    second = read(flights, loads)
    await settle()
    assert_loads(loads, 1)
    await load.probe(1)  # asked after the second reader arrived: its answer fits both
    load.answer.set()
    assert await within(asyncio.gather(first, second)) == ["answer of load 1"] * 2
    assert len(loads.started) == 1


async def test_a_reader_that_arrives_after_the_probe_gets_the_next_load() -> None:
    flights: SingleFlight[str] = SingleFlight()
    loads = Loads()
    first = read(flights, loads)
    load = await loads.nth(1)
    await load.probe()
    late = read(flights, loads)  # e.g. after an upload acknowledged elsewhere
    await settle()
    load.answer.set()
    assert await within(first) == "answer of load 1"
    await settle()
    # The late reader does not take that answer: it starts the next load ...
    assert not late.done(), f"the late reader took {outcome(late)}"
    second = await loads.nth(2)
    # ... which readers arriving before its probe join.
    joined = read(flights, loads)
    await settle()
    assert_loads(loads, 2)
    await second.probe()
    second.answer.set()
    assert await within(asyncio.gather(late, joined)) == ["answer of load 2"] * 2
    assert len(loads.started) == 2


async def test_errors_follow_the_same_rule_as_answers() -> None:
    flights: SingleFlight[str] = SingleFlight()
    loads = Loads(failing=frozenset({1}))
    first = read(flights, loads)
    load = await loads.nth(1)
    early = read(flights, loads)
    await settle()
    assert_loads(loads, 1)
    await load.probe()
    late = read(flights, loads)
    await settle()
    load.answer.set()
    for reader in (first, early):  # the error answers the readers it was asked for
        with pytest.raises(LoadFailed, match="load 1"):
            await within(reader)
    await settle()
    assert not late.done(), f"the late reader took {outcome(late)}"
    second = await loads.nth(2)  # it loads again
    await second.probe()
    second.answer.set()
    assert await within(late) == "answer of load 2"
    assert len(loads.started) == 2


async def test_a_cancelled_reader_does_not_cancel_the_load_of_the_others() -> None:
    flights: SingleFlight[str] = SingleFlight()
    loads = Loads()
    starter = read(flights, loads)  # the reader whose call started the load
    load = await loads.nth(1)
    other = read(flights, loads)
    await settle()
    assert_loads(loads, 1)
    starter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(starter)
    await settle()
    assert not load.cancelled, "cancelling the reader that started the load cancelled it"
    await load.probe()
    load.answer.set()
    assert await within(other) == "answer of load 1"
    assert len(loads.started) == 1


# -- across processes ----------------------------------------------------------------------------

OLD = image_bytes("PNG", (8, 8), "red")
NEW = image_bytes("PNG", (8, 8), "blue")
REAL = image_bytes("PNG", (8, 8), "green")
FOREIGN = image_bytes("PNG", (8, 8), "black")  # a valid PNG, under the PNG flags
KEY = "cat"


def which(data: bytes) -> str:
    """Which of the test's images ``data`` is, for a message."""
    names = {OLD: "OLD", NEW: "NEW", REAL: "the stored image", FOREIGN: "the unversioned item"}
    return names.get(data, f"{len(data)} other bytes")


# A read after an upload through another gateway joins no load that read the row before it.


class HeldBlobStore(FolderBlobStore):
    """The real folder store; while ``gate`` is set, a read that got its bytes
    waits there before returning them: its load has read the row and the blob."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def get(self, name: str) -> bytes:
        data = await super().get(name)
        if self.gate is not None:
            self.holding.set()
            await self.gate.wait()
        return data


class WatchedPool(CachePool):
    """The real pool; ``missed`` is set by a cache read that found nothing. The
    read goes on to the single flight without waiting in between, so once the
    test sees it, the read has joined (or started) a load."""

    def __init__(self) -> None:
        super().__init__()
        self.missed = asyncio.Event()

    async def lookup(self, key: str, seconds: float) -> CachedItem | WriteTicket | LeaseHeld | None:
        answer = await super().lookup(key, seconds)
        if not isinstance(answer, CachedItem):
            self.missed.set()
        return answer


async def test_a_read_after_an_upload_through_another_gateway_does_not_join_an_older_load(
    tmp_path: Path, node_process: NodeProcess
) -> None:
    node = f"{node_process.host}:{node_process.port}"
    writer = gateway_on_nodes(tmp_path, "gateway-a", [node])
    try:
        await writer.start()
        blobs = HeldBlobStore(tmp_path / "data" / "blobs")
        pool = WatchedPool()
        async with (
            embedded_gateway(tmp_path / "data", [node], blobs=blobs, pool=pool) as reader,
            aiohttp.ClientSession() as http,
            NodeClient(node_process.host, node_process.port) as node_client,
        ):
            assert await upload_image(http, writer.url, KEY, OLD) == 200
            # Evicted from the node (as memory pressure may), so the reader misses and loads.
            await node_client.delete(KEY.encode())
            blobs.gate = asyncio.Event()
            held = asyncio.create_task(reader.service.read(KEY))
            await within(blobs.holding.wait())  # its load has OLD's row and bytes
            assert await upload_image(http, writer.url, KEY, NEW) == 200
            # Acknowledged. The write-through is evicted too: a read starting now
            # misses, and finds the held load in flight.
            await node_client.delete(KEY.encode())
            pool.missed.clear()
            fresh = asyncio.create_task(reader.service.read(KEY))
            await within(pool.missed.wait())
            blobs.gate.set()
            image = await asyncio.wait_for(fresh, WAIT_SECONDS)
            assert image.data == NEW, f"a read begun after the upload got {which(image.data)}"
            # The held read began before the upload: either image is allowed.
            assert (await asyncio.wait_for(held, WAIT_SECONDS)).data in (OLD, NEW)
            # Its stale fill was refused: nothing older than the upload is cached.
            cached = await node_client.get_item(KEY.encode())
            assert cached is None or cached.value == NEW, f"{which(cached.value)} is cached"
            assert which((await reader.service.read(KEY)).data) == which(NEW)
            status, body = await read_image(http, writer.url, KEY)
            assert (status, which(body)) == (200, which(NEW))
    finally:
        await writer.kill()


class PollWatchedPool(CachePool):
    """The real pool; ``polled`` is set each time a waiting load's LEASE returns."""

    def __init__(self) -> None:
        super().__init__()
        self.polled = asyncio.Event()
        self.polls = 0

    async def lease(self, key: str, seconds: float) -> CachedItem | WriteTicket | LeaseHeld | None:
        answer = await super().lease(key, seconds)
        self.polls += 1
        self.polled.set()
        return answer


async def test_a_read_that_joins_a_waiting_load_gives_back_the_lease_it_was_granted(
    tmp_path: Path, node_process: NodeProcess
) -> None:
    """A read whose LOOKUP is granted the lease while this gateway's load of the
    key waits for another gateway's fill joins that load: the lease must go
    back at once, or the load would wait out its time for a fill no one makes."""
    node = f"{node_process.host}:{node_process.port}"
    writer = gateway_on_nodes(tmp_path, "gateway-a", [node])
    try:
        await writer.start()
        pool = PollWatchedPool()
        async with (
            embedded_gateway(tmp_path / "data", [node], pool=pool) as reader,
            aiohttp.ClientSession() as http,
            NodeClient(node_process.host, node_process.port) as other_gateway,
        ):
            assert await upload_image(http, writer.url, KEY, OLD) == 200
            await other_gateway.delete(KEY.encode())  # evicted: reads miss
            assert isinstance(await other_gateway.lease(KEY.encode(), 5.0), LeaseGranted)
            waiting = asyncio.create_task(reader.service.read(KEY))
            while pool.polls < 3:  # the load waits, asking again at growing intervals
                pool.polled.clear()
                await within(pool.polled.wait())
            # Right after a poll: the load sleeps a while before its next one.
            await other_gateway.release(KEY.encode())
            started = asyncio.get_running_loop().time()
            joining = asyncio.create_task(reader.service.read(KEY))
            images = await asyncio.wait_for(asyncio.gather(waiting, joining), WAIT_SECONDS)
            took = asyncio.get_running_loop().time() - started
            assert [which(image.data) for image in images] == [which(OLD)] * 2
            # The fill lease is 2 s: a lease kept would hold both reads that long.
            assert took < 1.0, f"the reads took {took:.2f} s after the lease was free"
            assert reader.service.blob_reads == 1  # one load answered both
    finally:
        await writer.kill()


# A gateway serves only the items that gateways stored (versioned), never others.

PNG_FLAGS = flags_for("image/png")


async def text_set(host: str, port: int, key: str, flags: int, value: bytes) -> None:
    """``set`` over the memcached text protocol, as any memcached client may."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"set %s %d 0 %d\r\n%s\r\n" % (key.encode(), flags, len(value), value))
        await writer.drain()
        assert await within(reader.readline()) == b"STORED\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_gateway_never_serves_an_item_it_did_not_store(
    tmp_path: Path, node_process: NodeProcess
) -> None:
    host, port = node_process.host, node_process.port
    gateway = gateway_on_nodes(tmp_path, "gateway", [f"{host}:{port}"])
    try:
        await gateway.start()
        async with aiohttp.ClientSession() as http, NodeClient(host, port) as node_client:
            for key in ("text-stored", "binary-stored"):
                assert await upload_image(http, gateway.url, key, REAL) == 200
            # Unversioned items under image flags, over a cached image or where there is none.
            for key in ("text-stored", "text-missing"):
                await text_set(host, port, key, PNG_FLAGS, FOREIGN)
            for key in ("binary-stored", "binary-missing"):
                assert await node_client.set(key.encode(), FOREIGN, flags=PNG_FLAGS)
            for _ in range(2):
                for key in ("text-stored", "binary-stored"):
                    status, body = await read_image(http, gateway.url, key)
                    assert (status, which(body)) == (200, which(REAL)), (
                        f"{key}: served {which(body)}"
                    )
                for key in ("text-missing", "binary-missing"):
                    status, body = await read_image(http, gateway.url, key)
                    assert status == 404, f"{key}: {status}, served {which(body)}"
    finally:
        await gateway.kill()
