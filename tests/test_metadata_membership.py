"""The pool membership store's contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from imagecache.catalog import ImageCatalog
from imagecache.database import Database
from imagecache.errors import StorageError
from imagecache.poolmembers import Membership, MembershipStore, NodeRecord
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture, upload  # noqa: F401


@pytest.fixture
async def members(database: Database) -> MembershipStore:
    return await MembershipStore.open(database)


async def test_membership_round_trip_bumps_the_epoch(members: MembershipStore) -> None:
    assert await members.get_membership() == Membership(0, ())
    first = (
        NodeRecord("node-2", "127.0.0.1:11312", "active"),
        NodeRecord("node-1", "127.0.0.1:11311", "joining"),
    )
    assert await members.set_membership(first) == 1
    assert await members.get_membership() == Membership(1, first)  # order kept
    second = (NodeRecord("node-1", "127.0.0.1:11311", "leaving"),)
    assert await members.set_membership(list(second)) == 2
    assert await members.get_membership() == Membership(2, second)
    assert await members.set_membership([]) == 3
    assert await members.get_membership() == Membership(3, ())


async def test_membership_rejects_bad_nodes(members: MembershipStore) -> None:
    with pytest.raises(ValueError, match="state"):
        await members.set_membership([NodeRecord("n", "127.0.0.1:1", "sleeping")])
    node = NodeRecord("n", "127.0.0.1:1", "active")
    with pytest.raises(ValueError, match="distinct"):
        await members.set_membership([node, node])
    assert await members.get_membership() == Membership(0, ())


# -- dirty marks ----------------------------------------------------------------------------------

NODES = [NodeRecord("a", "127.0.0.1:1", "active"), NodeRecord("b", "127.0.0.1:2", "joining")]


async def caught_up(_conn: AsyncConnection) -> bool:
    return True


async def not_caught_up(_conn: AsyncConnection) -> bool:
    return False


def marks(membership: Membership) -> dict[str, int]:
    return {node.node_id: node.dirty_mark for node in membership.nodes}


async def test_a_dirty_mark_is_a_new_epoch_that_every_reader_sees(members: MembershipStore) -> None:
    await members.set_membership(NODES)
    epoch = await members.mark_dirty(["b", "not-a-member"])
    assert epoch == 2
    view = await members.get_membership()
    assert (view.epoch, marks(view)) == (2, {"a": 0, "b": 2})
    # Already dirty: no new epoch, and the caller waits for the mark in force.
    assert await members.mark_dirty(["b"]) == 2
    assert (await members.get_membership()).epoch == 2
    # A membership change keeps the marks of the nodes that stay, drops the others'.
    await members.set_membership([NodeRecord("b", "127.0.0.1:2", "active")])
    assert marks(await members.get_membership()) == {"b": 2}
    await members.set_membership([NodeRecord("a", "127.0.0.1:1", "active")])
    await members.set_membership(NODES)
    assert marks(await members.get_membership()) == {"a": 0, "b": 0}


async def test_a_mark_is_lifted_only_if_unchanged_and_caught_up(members: MembershipStore) -> None:
    await members.set_membership(NODES)
    mark = await members.mark_dirty(["a"])
    assert not await members.mark_clean("a", mark, not_caught_up)
    assert not await members.mark_clean("a", mark + 1, caught_up)  # another mark
    assert marks(await members.get_membership())["a"] == mark
    assert await members.mark_clean("a", mark, caught_up)
    view = await members.get_membership()
    assert (view.epoch, marks(view)["a"]) == (mark + 1, 0)
    assert not await members.mark_clean("a", mark, caught_up)  # nothing left to lift


async def test_only_the_first_membership_is_published_with_only_first(
    members: MembershipStore,
) -> None:
    assert await members.set_membership(NODES, only_first=True) == 1
    assert await members.set_membership([], only_first=True) == 1
    assert (await members.get_membership()).nodes == tuple(NODES)


# -- the gateway registry -----------------------------------------------------------------------


async def test_waiting_for_gateways_waits_for_each_live_one(members: MembershipStore) -> None:
    await members.renew_gateway("g1", 1, lease_seconds=30)
    await members.renew_gateway("g2", 2, lease_seconds=30)
    assert await members.lagging_gateways(2) == ["g1"]
    waiting = asyncio.create_task(members.wait_for_gateways(2, give_up_after=10))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await members.renew_gateway("g1", 2, lease_seconds=30)  # g1 applied epoch 2
    async with asyncio.timeout(5):
        await waiting
    with pytest.raises(StorageError, match="g1"):
        await members.wait_for_gateways(3, give_up_after=0.1)


async def test_a_gateway_whose_lease_ended_or_that_left_is_not_waited_for(
    members: MembershipStore,
) -> None:
    await members.renew_gateway("paused", 1, lease_seconds=0.2)
    await members.renew_gateway("stopping", 1, lease_seconds=30)
    await members.forget_gateway("stopping")
    assert await members.lagging_gateways(2) == ["paused"]
    async with asyncio.timeout(5):
        await members.wait_for_gateways(2, give_up_after=5)  # until its lease ends
    assert await members.expire_gateways() == 1
    assert await members.expire_gateways() == 0


async def test_a_mark_stays_while_the_outbox_holds_a_change_newer_than_the_heal_delivered(
    database: Database, members: MembershipStore
) -> None:
    """The heal's condition, with the catalog's outbox on the same database."""
    catalog = await ImageCatalog.open(database)
    await members.set_membership(NODES)
    mark = await members.mark_dirty(["a"])
    await upload(catalog, "cat")
    delivered_up_to = await catalog.newest_invalidation_id()
    await upload(catalog, "dog")  # committed while the heal delivered: not to the node
    assert not await members.mark_clean("a", mark, catalog.nothing_pending_after(delivered_up_to))
    for entry in await catalog.pending_invalidations(10):
        await catalog.invalidation_delivered(entry.id)  # every member took them
    assert await members.mark_clean("a", mark, catalog.nothing_pending_after(delivered_up_to))
