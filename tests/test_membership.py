"""The gateway following the pool's membership (imagecache.membership) over a real
membership store (SQLite), and the manager publishing a leaving node as such."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imagecache.cachepool import CachePool
from imagecache.database import Database
from imagecache.membership import MembershipFollower
from imagecache.poolmembers import MembershipStore, NodeRecord
from manager.appkeys import CONTROLLER
from tests.test_manager import running_system

NODES = [
    NodeRecord("a", "127.0.0.1:1", "active"),
    NodeRecord("b", "127.0.0.1:2", "active"),
    NodeRecord("c", "127.0.0.1:3", "joining"),
    NodeRecord("d", "127.0.0.1:4", "leaving"),
]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MembershipStore]:
    async with Database.open(f"sqlite+aiosqlite:///{tmp_path / 'metadata.db'}") as database:
        yield await MembershipStore.open(database)


@pytest.fixture
async def pool() -> AsyncIterator[CachePool]:
    pool = CachePool()
    yield pool
    await pool.close()


def member_ids(pool: CachePool) -> set[str]:
    return {member.node_id for member in pool.members}


async def test_the_configured_nodes_become_the_first_membership(
    store: MembershipStore, pool: CachePool
) -> None:
    follower = MembershipFollower(store, pool, ("127.0.0.1:1", "127.0.0.1:2"))
    await follower.refresh()
    published = await store.get_membership()
    assert published.epoch == follower.epoch == 1
    assert [(n.node_id, n.state) for n in published.nodes] == [
        ("127.0.0.1:1", "active"),
        ("127.0.0.1:2", "active"),
    ]
    assert pool.node_ids == ("127.0.0.1:1", "127.0.0.1:2")
    # A second gateway starting later keeps the membership it finds.
    other = MembershipFollower(store, pool, ("127.0.0.1:9",))
    await other.refresh()
    assert (await store.get_membership()).epoch == 1


async def test_only_active_nodes_are_routed_and_every_node_is_told(
    store: MembershipStore, pool: CachePool
) -> None:
    await store.set_membership(NODES)
    await MembershipFollower(store, pool, ("127.0.0.1:9",)).refresh()
    assert pool.node_ids == ("a", "b")
    # Joining and leaving nodes get invalidations: they are members, not routed.
    assert member_ids(pool) == {"a", "b", "c", "d"}


async def test_a_refresh_acknowledges_the_epoch_and_a_leaving_gateway_is_not_waited_for(
    store: MembershipStore, pool: CachePool
) -> None:
    follower = MembershipFollower(store, pool, ())
    await follower.refresh()
    epoch = await store.set_membership(NODES)
    assert await store.lagging_gateways(epoch) == [follower.gateway_id]
    assert pool.view_is_current
    await follower.refresh()
    assert follower.epoch == epoch
    assert await store.lagging_gateways(epoch) == []
    later = await store.set_membership(NODES[:1])
    await follower.leave()
    assert await store.lagging_gateways(later) == []


async def test_an_unregistered_view_is_never_waited_for(
    store: MembershipStore, pool: CachePool
) -> None:
    epoch = await store.set_membership(NODES)
    view = MembershipFollower(store, pool, (), registered=False)
    await view.refresh()
    assert pool.node_ids == ("a", "b")
    assert await store.lagging_gateways(epoch + 1) == []


async def test_dirty_marks_follow_the_store(store: MembershipStore, pool: CachePool) -> None:
    await store.set_membership(NODES)
    follower = MembershipFollower(store, pool, ())
    await follower.refresh()
    assert follower.dirty_marks == {}
    mark = await store.mark_dirty(["b"])
    await follower.refresh()
    assert follower.dirty_marks == {"b": mark}
    assert [m.node_id for m in pool.members if m.dirty] == ["b"]


async def test_a_shrink_publishes_the_leaving_node_as_leaving_until_every_gateway_saw_it(
    tmp_path: Path,
) -> None:
    """A gateway that has not applied the membership with the leaving node
    holds the shrink there: the node is published ``leaving`` (told of
    invalidations, routed by no one) before it is dropped and stopped."""
    async with running_system(tmp_path) as system:
        controller = system.manager.app[CONTROLLER]
        await controller.resize(2, "test: two nodes")
        staying, leaving = (n.node_id for n in controller.members)
        async with Database.open(system.config.metadata_url) as database:
            store = await MembershipStore.open(database)
            pool = CachePool()
            gateway = MembershipFollower(store, pool, ())
            try:
                await gateway.refresh()  # registered: the manager waits for it now
                seen = gateway.epoch
                shrinking = asyncio.create_task(controller.resize(1, "test: one node"))
                deadline = asyncio.get_running_loop().time() + 20
                while not any(n.state == "leaving" for n in (await store.get_membership()).nodes):
                    assert asyncio.get_running_loop().time() < deadline, "never published leaving"
                    assert not shrinking.done(), "the shrink ended without publishing leaving"
                    # Alive, but still at the epoch it had: the manager must wait for it.
                    await store.renew_gateway(gateway.gateway_id, seen, 3.0)
                    await asyncio.sleep(0.02)
                published = await store.get_membership()
                assert [(n.node_id, n.state) for n in published.nodes] == [
                    (staying, "active"),
                    (leaving, "leaving"),
                ]
                assert not shrinking.done()
                await gateway.refresh()
                assert pool.node_ids == (staying,)
                assert member_ids(pool) == {staying, leaving}
                while not shrinking.done():
                    await gateway.refresh()
                    await asyncio.sleep(0.05)
                await shrinking
                await gateway.refresh()
                assert member_ids(pool) == {staying}
                assert [n.node_id for n in (await store.get_membership()).nodes] == [staying]
            finally:
                await gateway.leave()
                await pool.close()
