"""The gateway's cache pool: a view past its lease, and dirty nodes, serve nothing."""

from __future__ import annotations

from pathlib import Path

from cachenode.client import NodeClient
from cachenode.server import NodeConfig, NodeServer
from imagecache.cachepool import CachePool, WriteTicket
from imagecache.catalog import ImageCatalog, Invalidation
from imagecache.database import Database
from imagecache.invalidation import Invalidator
from imagecache.membership import MembershipFollower
from imagecache.poolmembers import MembershipStore, NodeRecord

PNG_FLAGS = 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def address_of(server: NodeServer) -> str:
    host, port = server.address
    return f"{host}:{port}"


async def filled_pool(server: NodeServer, clock: Clock) -> CachePool:
    pool = CachePool(clock=clock)
    await pool.set_members([("n1", address_of(server))])
    ticket = await pool.ticket("cat")
    assert isinstance(ticket, WriteTicket)
    await pool.fill("cat", b"meow", PNG_FLAGS, 7, ticket)
    return pool


async def test_a_view_past_its_lease_serves_nothing_until_renewed(
    node_server: NodeServer,
) -> None:
    clock = Clock()
    pool = await filled_pool(node_server, clock)
    try:
        pool.hold_view(clock.now + 2.4)
        assert await pool.get("cat") is not None
        assert pool.usable_owner("cat") is not None
        clock.now += 2.4
        assert not pool.view_is_current
        assert await pool.get("cat") is None  # read around: the blob store answers
        assert pool.usable_owner("cat") is None  # nor the fast path
        assert await pool.ticket("cat") is None  # nor any fill
        pool.hold_view(clock.now + 2.4)
        assert await pool.get("cat") is not None
    finally:
        await pool.close()


async def test_a_dirty_node_serves_nothing_but_is_still_invalidated(
    node_server: NodeServer,
) -> None:
    clock = Clock()
    pool = await filled_pool(node_server, clock)
    try:
        await pool.set_members([("n1", address_of(node_server))], dirty=["n1"])
        assert await pool.get("cat") is None
        assert await pool.lease("cat", 1.0) is None
        # Invalidations still reach it: healing delivers to dirty nodes.
        assert await pool.invalidate("cat", 8) == []
        assert b"cat" not in node_server.node.store
    finally:
        await pool.close()


async def test_invalidations_reach_joining_nodes_and_report_the_ones_missed(
    node_server: NodeServer,
) -> None:
    clock = Clock()
    pool = CachePool(clock=clock, timeout=0.2)
    try:
        await pool.set_members([("n1", address_of(node_server))], joining=[("gone", "127.0.0.1:9")])
        assert pool.node_ids == ("n1",)  # the joining node is not routed to
        assert await pool.invalidate("cat", 3) == ["gone"]
        assert await pool.clear(4) == ["gone"]
        assert await pool.invalidate("cat", 5, ["n1"]) == []
    finally:
        await pool.close()


async def test_a_view_past_its_lease_is_renewed_before_an_invalidation_is_delivered(
    node_server: NodeServer, tmp_path: Path
) -> None:
    """A node that joined while the gateway's view was stale gets the invalidation."""
    clock = Clock()
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    async with (
        NodeServer(NodeConfig(port=0, capacity_mb=8)) as joined,
        Database.open(url) as database,
    ):
        catalog = await ImageCatalog.open(database)
        membership = await MembershipStore.open(database)
        first = NodeRecord("n1", address_of(node_server), "active")
        await membership.set_membership([first])
        pool = CachePool(clock=clock)
        view = MembershipFollower(membership, pool, (), clock=clock)
        try:
            await view.refresh()
            second = NodeRecord("n2", address_of(joined), "joining")
            await membership.set_membership([first, second])
            clock.now += 10  # the view's lease ran out before it saw n2
            await Invalidator(catalog, membership, view, pool).deliver(Invalidation(0, "cat", 5))
            # n2 was told: its tombstone refuses a write older than version 5.
            host, port = joined.address
            async with NodeClient(host, port) as client:
                ticket = await client.ticket()
                assert not await client.add(b"cat", b"old", version=4, ticket=ticket)
                assert await client.add(b"cat", b"new", version=5, ticket=ticket)
        finally:
            await view.leave()
            await pool.close()
