"""No old write lands after its invalidation, with real node processes (issue 9).

Each test plays one way an older fill, copy or write-through could outlive
the invalidation of its key: the node restarted and forgot its tombstones, a
request timed out and stayed queued, a copy or a fill paused for longer than
a tombstone lives.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cachenode.client import LeaseGranted, NodeClient
from cachenode.errors import NodeTimeout
from cachenode.node import Node
from cachenode.routing import Ring
from cachenode.server import NodeConfig, NodeServer
from cachenode.store import DEFAULT_TOMBSTONE_SECONDS, MIB, Store
from manager.backends.base import NodeHandle
from manager.migration import move_keys
from tests.conftest import NodeProcess, start_node_process

# A ticket counts microseconds on the node's clock (cachenode.store.Store.ticket):
# a ticket this much smaller was taken that many seconds earlier.
MICROSECONDS = 1_000_000
TIMEOUT = 0.5  # of the clients that time out against a stopped node
BIG = bytes(range(256)) * (12 * MIB // 256)  # more than the kernel buffers of a stopped node


def client_of(node: NodeProcess, **options: Any) -> NodeClient:
    return NodeClient(node.host, node.port, **options)


def start_node_on(port: int) -> NodeProcess:
    """A node on ``port``, as the local pool restarts a dead one at its address."""
    # The last --port wins over start_node_process's "--port 0". The port may
    # be taken for a moment (an outgoing connection's), as for the local pool.
    for _ in range(20):
        try:
            return start_node_process("--port", str(port))
        except RuntimeError:
            time.sleep(0.1)
    raise RuntimeError(f"no node could start on port {port}")


def kill(node: NodeProcess) -> None:
    node.process.kill()
    node.stop()


def process_state(process: subprocess.Popen[str]) -> str:
    stat = Path(f"/proc/{process.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


async def pause(node: NodeProcess) -> None:
    """SIGSTOP the node and wait until it is stopped: from now on only its
    kernel takes what clients send (into the socket buffers), up to a limit."""
    node.process.send_signal(signal.SIGSTOP)
    async with asyncio.timeout(5):
        while process_state(node.process) != "T":  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def resume(node: NodeProcess) -> None:
    node.process.send_signal(signal.SIGCONT)


async def settled_stats(client: NodeClient) -> dict[str, Any]:
    """The node's statistics once it holds this client's one connection only:
    it has then read all the bytes any connection before it sent, or will never."""
    async with asyncio.timeout(10):
        while (stats := await client.stats())["current_connections"] != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return stats


# -- 1. a restarted node forgets its tombstones ----------------------------------------------


async def test_writes_read_before_a_restart_are_refused_by_the_new_incarnation(
    node_process: NodeProcess,
) -> None:
    """A fill, a copy and a write-through read version 1, then version 2 is
    uploaded and invalidated on the node, which dies and is started again on
    its address without that tombstone: their writes, arriving now, must not
    put version 1 back."""
    first = node_process
    async with client_of(first) as client:
        first_boot = await client.boot_id()
        assert (await client.stats())["boot_id"] == first_boot
        lease = await client.lease(b"fill", 30)
        assert isinstance(lease, LeaseGranted)
        ticket = await client.ticket()
        # ... each reads version 1; the upload of version 2 invalidates the node.
        for key in (b"fill", b"copy", b"write"):
            await client.delete(key, version=2)
        assert await client.add(b"fill", b"v1", version=1, ticket=lease.ticket) is False
        assert (await client.stats())["tombstones"] == 3
    kill(first)

    second = start_node_on(first.port)
    try:
        async with client_of(second) as client:
            second_boot = await client.boot_id()
            assert second_boot != first_boot
            stats = await client.stats()
            assert stats["boot_id"] == second_boot
            assert stats["tombstones"] == 0  # the invalidation went to the first incarnation
            assert await client.add(b"fill", b"v1", version=1, ticket=lease.ticket) is False
            assert await client.add(b"copy", b"v1", version=1, ticket=ticket) is False
            assert await client.set(b"write", b"v1", version=1, ticket=ticket) is False
            for key in (b"fill", b"copy", b"write"):
                assert await client.get_item(key) is None
            # A write read after the restart carries a ticket of this incarnation.
            fresh = await client.ticket()
            assert await client.set(b"write", b"v2", version=2, ticket=fresh) is True
    finally:
        kill(second)


# -- 2a. safety on timeouts -------------------------------------------------------------------


async def test_a_write_that_timed_out_is_not_sent_on_when_the_node_wakes(
    node_process: NodeProcess,
) -> None:
    """A write that times out while most of it is still in the client is cut
    off: the node, woken, never stores it."""
    async with client_of(node_process, pool_size=1, timeout=TIMEOUT) as client:
        await client.ping()  # the connection is open before the node stops
        await pause(node_process)
        try:
            with pytest.raises(NodeTimeout):
                await client.set(b"big", BIG)
        finally:
            resume(node_process)
        await settled_stats(client)
        assert await client.get(b"big") is None


async def test_the_next_call_after_a_timeout_takes_a_new_connection(
    node_process: NodeProcess,
) -> None:
    async with client_of(node_process, pool_size=1, timeout=TIMEOUT) as client:
        await client.ping()
        await pause(node_process)
        try:
            with pytest.raises(NodeTimeout):
                await client.set(b"k", b"late")
        finally:
            resume(node_process)
        assert await client.set(b"after", b"ok") is True
        stats = await settled_stats(client)
        assert stats["total_connections"] == 2  # the timed-out one was not used again


async def test_a_call_cancelled_while_waiting_for_its_reply_gives_up_its_connection(
    node_process: NodeProcess,
) -> None:
    """Cancelled, a call may have left its request on the connection: the
    connection is not used again (its next call opens another)."""
    async with client_of(node_process, pool_size=1, timeout=30) as client:
        await client.ping()
        await pause(node_process)
        try:
            call = asyncio.ensure_future(client.set(b"k", b"late"))
            await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            resume(node_process)
        assert await client.set(b"after", b"ok") is True
        stats = await settled_stats(client)
        assert stats["total_connections"] == 2


@pytest.mark.parametrize("write", ["fill", "write-through"])
@pytest.mark.parametrize("seconds_left", [None, 0.2], ids=["fresh-ticket", "ticket-expiring"])
async def test_a_timed_out_write_that_lands_late_is_refused_once_its_ticket_expired(
    node_process: NodeProcess, write: str, seconds_left: float | None
) -> None:
    """Aborting the connection cannot recall a small write that the node's
    kernel has already taken: the node reads it when it wakes. Its ticket
    bounds how late it may land (no tombstone of an invalidation made after
    the ticket has expired by then); past that, it is refused."""
    async with client_of(node_process, pool_size=1, timeout=TIMEOUT) as client:
        if write == "fill":
            lease = await client.lease(b"k", 30)
            assert isinstance(lease, LeaseGranted)
            ticket = lease.ticket
        else:
            ticket = await client.ticket()
        if seconds_left is not None:  # as if taken just under a tombstone's time ago
            ticket -= int((DEFAULT_TOMBSTONE_SECONDS - seconds_left) * MICROSECONDS)
        store = client.add if write == "fill" else client.set
        await pause(node_process)
        try:
            with pytest.raises(NodeTimeout):  # TIMEOUT > seconds_left
                await store(b"k", b"v1", version=1, ticket=ticket)
        finally:
            resume(node_process)
        await settled_stats(client)
        item = await client.get_item(b"k")
        if seconds_left is None:
            assert item is not None  # it did land, late
            assert item.version == 1
        else:
            assert item is None


# -- 2b. copies have a deadline and are checked against the catalog ---------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys_owned_by(ring: Ring, node_id: str, count: int) -> list[bytes]:
    keys = (f"img-{i}".encode() for i in range(10_000))
    return [key for key in keys if ring.owner(key) == node_id][:count]


def handle(node_id: str, host: str, port: int) -> NodeHandle:
    return NodeHandle(node_id, f"{host}:{port}")


@pytest.mark.parametrize(
    ("invalidated", "paused", "copied"),
    [
        (False, 0.0, True),
        (True, 0.0, False),  # the tombstone refuses it
        (True, DEFAULT_TOMBSTONE_SECONDS - 0.001, False),  # still the tombstone
        (True, DEFAULT_TOMBSTONE_SECONDS, False),  # the tombstone is gone: the ticket
        (True, 10 * DEFAULT_TOMBSTONE_SECONDS, False),
    ],
)
async def test_a_copy_held_up_after_an_invalidation_is_refused_however_long(
    node_process: NodeProcess, invalidated: bool, paused: float, copied: bool
) -> None:
    """The mover reads version 1 from the old node and sees it current in the
    catalog; then version 2 is committed and invalidated on both nodes; then
    the mover pauses before its copy lands. The receiver runs in this process
    on a clock the test moves; the source is a node process."""
    clock = Clock()
    receiver = NodeServer(NodeConfig(port=0), Node(Store(16 * MIB, clock=clock)))
    async with receiver, client_of(node_process) as source:
        nodes = {
            "source": handle("source", node_process.host, node_process.port),
            "receiver": handle("receiver", *receiver.address),
        }
        ring = Ring(list(nodes))
        (key,) = keys_owned_by(ring, "receiver", 1)
        assert await source.set(key, b"v1", flags=1, version=1, ticket=await source.ticket())

        async def current_versions(names: Sequence[str]) -> Mapping[str, int]:
            assert names == [key.decode()]
            answer = {key.decode(): 1}  # read before version 2 committed
            if invalidated:
                async with NodeClient(*receiver.address) as client:
                    await client.delete(key, version=2)
                await source.delete(key, version=2)
            clock.now += paused
            return answer

        report = await move_keys([nodes["source"]], ring, nodes, current_versions)
        assert (report.moved, report.outdated) == (1, 0)
        assert report.copied == int(copied)
        async with NodeClient(*receiver.address) as client:
            item = await client.get_item(key)
        assert (item is not None) == copied


@pytest.fixture
def two_nodes() -> Iterator[tuple[NodeProcess, NodeProcess]]:
    first = start_node_process("--capacity-mb", "16")
    try:
        second = start_node_process("--capacity-mb", "16")
        try:
            yield first, second
        finally:
            kill(second)
    finally:
        kill(first)


async def test_a_resize_copies_only_items_the_catalog_still_holds(
    two_nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    source_node, receiver_node = two_nodes
    nodes = {
        "source": handle("source", source_node.host, source_node.port),
        "receiver": handle("receiver", receiver_node.host, receiver_node.port),
    }
    ring = Ring(list(nodes))
    current, replaced, deleted, unversioned = keys_owned_by(ring, "receiver", 4)
    (staying,) = keys_owned_by(ring, "source", 1)
    catalog = {current.decode(): 3, replaced.decode(): 4, staying.decode(): 3}
    asked: list[str] = []

    async def current_versions(names: Sequence[str]) -> Mapping[str, int]:
        asked.extend(names)
        return {name: catalog[name] for name in names if name in catalog}

    async with client_of(source_node) as source, client_of(receiver_node) as receiver:
        ticket = await source.ticket()
        for key in (current, replaced, deleted, staying):
            assert await source.set(key, b"v3 of " + key, flags=1, version=3, ticket=ticket)
        assert await source.set(unversioned, b"no version")

        report = await move_keys([nodes["source"]], ring, nodes, current_versions)

        assert sorted(asked) == sorted(
            k.decode() for k in (current, replaced, deleted, unversioned)
        )
        assert (report.examined, report.moved, report.copied, report.outdated) == (5, 4, 1, 3)
        assert [key async for key, _ in receiver.iter_keys()] == [current]
        item = await receiver.get_item(current)
        assert item is not None
        assert (item.value, item.flags, item.version) == (b"v3 of " + current, 1, 3)
