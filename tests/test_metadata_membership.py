"""The pool membership store's contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

import pytest

from imagecache.database import Database
from imagecache.poolmembers import Membership, MembershipStore, NodeRecord
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import database_fixture, metadata_url_fixture  # noqa: F401


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
