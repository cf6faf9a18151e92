"""The collector against real nodes over TCP: deltas, restarts, dead nodes, the last minute."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta

import pytest

from cachenode.client import NodeClient
from cachenode.server import NodeConfig, NodeServer
from manager.backends.base import NodeHandle
from manager.collector import Collector
from manager.metrics import MetricsStore, MinuteStats, PoolSample

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class MemoryMetrics:
    """A MetricsStore that keeps what it is given."""

    def __init__(self) -> None:
        self.samples: list[PoolSample] = []

    async def put(self, sample: PoolSample) -> None:
        self.samples.append(sample)

    async def minutes(self, start: datetime, end: datetime) -> list[MinuteStats]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class BrokenMetrics(MemoryMetrics):
    async def put(self, sample: PoolSample) -> None:
        raise OSError("disk full")


def handle(node_id: str, server: NodeServer) -> NodeHandle:
    host, port = server.address
    return NodeHandle(node_id, f"{host}:{port}")


def client_of(server: NodeServer) -> NodeClient:
    host, port = server.address
    return NodeClient(host, port)


async def traffic(
    server: NodeServer, *, sets: int = 0, hits: int = 0, misses: int = 0, deletes: int = 0
) -> None:
    """In this order: ``sets`` sets of key-0, key-1, ..., ``hits`` gets of key-0,
    ``misses`` gets of absent keys, ``deletes`` deletes of key-0, key-1, ...
    """
    async with client_of(server) as client:
        for i in range(sets):
            await client.set(b"key-%d" % i, b"value")
        for _ in range(hits):
            assert await client.get(b"key-0") is not None
        for i in range(misses):
            assert await client.get(b"absent-%d" % i) is None
        for i in range(deletes):
            assert await client.delete(b"key-%d" % i)


async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A TCP peer that reads every request and answers none."""
    await reader.read()
    writer.close()


def lifetime(server: NodeServer) -> tuple[int, int]:
    """The node's own (items, bytes) gauges."""
    stats = server.node.store.stats()
    return stats.items, stats.bytes


async def connections_become(server: NodeServer, count: int) -> None:
    """Wait until the node sees exactly ``count`` client connections."""
    async with asyncio.timeout(5):
        # The node offers no event for this; poll its counter.
        while server.node.current_connections != count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[NodeServer, NodeServer]]:
    async with NodeServer(NodeConfig(port=0)) as a, NodeServer(NodeConfig(port=0)) as b:
        yield a, b


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_collector(clock: Clock) -> AsyncIterator[Callable[..., Collector]]:
    """Makes collectors on the test's clock (memory store unless given); closes them."""
    collectors: list[Collector] = []

    def make(store: MetricsStore | None = None, timeout: float = 1.0) -> Collector:
        collector = Collector(store or MemoryMetrics(), clock=clock, timeout=timeout)
        collectors.append(collector)
        return collector

    yield make
    for collector in collectors:
        await collector.close()


async def test_first_sample_counts_nothing_but_the_gauges(
    two_nodes: tuple[NodeServer, NodeServer], make_collector: Callable[..., Collector]
) -> None:
    a, b = two_nodes
    await traffic(a, hits=3, misses=2, sets=4)
    await traffic(b, misses=5, sets=1)
    store = MemoryMetrics()
    collector = make_collector(store)

    sample = await collector.collect([handle("a", a), handle("b", b)])

    items_a, bytes_a = lifetime(a)
    items_b, bytes_b = lifetime(b)
    assert sample == PoolSample(T0, 2, 0, 0, 0, 0, items_a + items_b, bytes_a + bytes_b)
    assert sample.items == 5
    assert sample.bytes > 0
    assert store.samples == [sample]


async def test_deltas_are_summed_over_the_nodes(
    two_nodes: tuple[NodeServer, NodeServer],
    make_collector: Callable[..., Collector],
    clock: Clock,
) -> None:
    a, b = two_nodes
    await traffic(a, hits=10, misses=10, sets=3)  # before the first reading: not counted
    collector = make_collector()
    members = [handle("a", a), handle("b", b)]
    await collector.collect(members)

    await traffic(a, sets=2, hits=3, misses=1, deletes=1)
    await traffic(b, sets=1, hits=2, misses=4)
    clock.advance(5)
    sample = await collector.collect(members)

    assert (sample.workers, sample.lookups, sample.hits, sample.misses) == (2, 10, 5, 5)
    # requests = lookups + sets + deletes = 10 + (2 + 1) + 1
    assert sample.requests == 14
    assert sample.at == T0 + timedelta(seconds=5)

    # Nothing happened since: all deltas are zero, the gauges stay.
    clock.advance(5)
    quiet = await collector.collect(members)
    assert (quiet.lookups, quiet.hits, quiet.misses, quiet.requests) == (0, 0, 0, 0)
    assert (quiet.items, quiet.bytes) == (sample.items, sample.bytes)


async def test_a_restarted_node_counts_its_new_totals(
    make_collector: Callable[..., Collector],
) -> None:
    collector = make_collector()
    async with NodeServer(NodeConfig(port=0)) as before:
        await collector.collect([handle("n1", before)])
        await traffic(before, hits=20, misses=20, sets=5)
        first = await collector.collect([handle("n1", before)])
        assert first.lookups == 40

    # The same node id comes back on another port with fresh, lower counters.
    async with NodeServer(NodeConfig(port=0)) as after:
        await traffic(after, hits=2, misses=1, sets=1)
        sample = await collector.collect([handle("n1", after)])

    assert (sample.workers, sample.lookups, sample.hits, sample.misses) == (1, 3, 2, 1)
    assert sample.requests == 4
    assert sample.items == 1


async def test_a_restart_is_seen_by_uptime_when_counters_overtake(
    make_collector: Callable[..., Collector],
) -> None:
    collector = make_collector()
    async with NodeServer(NodeConfig(port=0)) as before:
        await traffic(before, misses=1, sets=1)
        await collector.collect([handle("n1", before)])
        await traffic(before, misses=1)
        await asyncio.sleep(0.3)  # the old node has lived longer than the new one will
        await collector.collect([handle("n1", before)])

    async with NodeServer(NodeConfig(port=0)) as after:
        await traffic(after, hits=5, misses=5, sets=1)  # more than the old node ever had
        sample = await collector.collect([handle("n1", after)])

    assert (sample.lookups, sample.hits, sample.misses) == (10, 5, 5)


async def test_a_dead_node_is_left_out_and_logged_once(
    two_nodes: tuple[NodeServer, NodeServer],
    make_collector: Callable[..., Collector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, _ = two_nodes
    async with NodeServer(NodeConfig(port=0)) as doomed:
        members = [handle("a", a), handle("doomed", doomed)]
        collector = make_collector()
        await collector.collect(members)

    await traffic(a, hits=1, misses=1, sets=1)
    with caplog.at_level(logging.WARNING, logger="manager.collector"):
        sample = await collector.collect(members)
        again = await collector.collect(members)

    assert (sample.workers, sample.lookups, sample.requests) == (1, 2, 3)
    assert (sample.items, sample.bytes) == lifetime(a)
    assert again.workers == 1
    warnings = [r for r in caplog.records if "doomed" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_node_that_does_not_answer_times_out(
    node_server: NodeServer, make_collector: Callable[..., Collector]
) -> None:
    mute = await asyncio.start_server(swallow, "127.0.0.1", 0)
    async with mute:
        port = mute.sockets[0].getsockname()[1]
        collector = make_collector(timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sample = await collector.collect(
            [handle("alive", node_server), NodeHandle("mute", f"127.0.0.1:{port}")]
        )
        elapsed = loop.time() - started
        await collector.close()  # before the server, so that its handler ends

    assert sample.workers == 1
    assert elapsed < 1.0


async def test_a_node_that_leaves_loses_its_connection(
    two_nodes: tuple[NodeServer, NodeServer], make_collector: Callable[..., Collector]
) -> None:
    a, b = two_nodes
    collector = make_collector()
    await collector.collect([handle("a", a), handle("b", b)])
    await connections_become(a, 1)
    await connections_become(b, 1)

    sample = await collector.collect([handle("a", a)])
    assert sample.workers == 1
    await connections_become(b, 0)
    await connections_become(a, 1)  # kept open between calls

    await collector.close()
    await connections_become(a, 0)


async def test_a_node_that_rejoins_starts_from_zero(
    two_nodes: tuple[NodeServer, NodeServer], make_collector: Callable[..., Collector]
) -> None:
    a, b = two_nodes
    collector = make_collector()
    await collector.collect([handle("a", a), handle("b", b)])
    await collector.collect([handle("a", a)])
    await traffic(b, hits=4, sets=1)

    sample = await collector.collect([handle("a", a), handle("b", b)])

    # b's reading was dropped when it left: its counters are lifetime totals again.
    assert (sample.workers, sample.lookups) == (2, 0)


async def test_last_minute_is_a_sliding_window(
    node_server: NodeServer,
    make_collector: Callable[..., Collector],
    clock: Clock,
) -> None:
    collector = make_collector()
    members = [handle("n", node_server)]
    assert collector.last_minute() is None

    await collector.collect(members)  # t = 0: the baseline
    await traffic(node_server, hits=1, misses=3, sets=1)
    clock.advance(20)
    await collector.collect(members)  # t = 20: 4 lookups
    await traffic(node_server, hits=2)
    clock.advance(30)
    await collector.collect(members)  # t = 50: 2 lookups

    def figures() -> tuple[int, int, int, float | None, float | None]:
        stats = collector.last_minute()
        assert stats is not None
        return stats.lookups, stats.hits, stats.misses, stats.miss_rate, stats.hit_rate

    assert figures() == (6, 3, 3, 0.5, 0.5)
    stats = collector.last_minute()
    assert stats is not None
    assert stats.minute == T0 + timedelta(seconds=50 - 60)
    assert (stats.workers, stats.items) == (1, 1)

    clock.advance(25)  # t = 75: the window (15, 75] holds the samples of 20 and 50
    assert figures() == (6, 3, 3, 0.5, 0.5)
    clock.advance(5)  # t = 80: (20, 80] no longer holds the sample of 20
    assert figures() == (2, 2, 0, 0.0, 1.0)
    clock.advance(30)  # t = 110: (50, 110] holds nothing
    assert collector.last_minute() is None


async def test_rates_are_none_without_lookups(
    node_server: NodeServer,
    make_collector: Callable[..., Collector],
    clock: Clock,
) -> None:
    collector = make_collector()
    members = [handle("n", node_server)]
    await collector.collect(members)
    await traffic(node_server, sets=3, deletes=2)
    clock.advance(5)
    await collector.collect(members)

    stats = collector.last_minute()
    assert stats is not None
    assert stats.lookups == 0
    assert stats.requests == 3 + 2  # sets and deletes
    assert stats.miss_rate is None
    assert stats.hit_rate is None


async def test_a_failing_store_still_leaves_the_sample_in_memory(
    node_server: NodeServer, make_collector: Callable[..., Collector]
) -> None:
    collector = make_collector(BrokenMetrics())
    with pytest.raises(OSError, match="disk full"):
        await collector.collect([handle("n", node_server)])
    stats = collector.last_minute()
    assert stats is not None
    assert stats.workers == 1


async def test_nodes_are_read_concurrently(make_collector: Callable[..., Collector]) -> None:
    """Eight nodes that never answer cost about one timeout, not eight."""
    async with AsyncExitStack() as stack:
        ports = []
        for _ in range(8):
            server = await stack.enter_async_context(
                await asyncio.start_server(swallow, "127.0.0.1", 0)
            )
            ports.append(server.sockets[0].getsockname()[1])
        collector = make_collector(timeout=0.3)
        members = [NodeHandle(f"n{i}", f"127.0.0.1:{port}") for i, port in enumerate(ports)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        sample = await collector.collect(members)
        elapsed = loop.time() - started
        await collector.close()  # before the servers, so that their handlers end

    assert sample.workers == 0
    assert elapsed < 1.5
