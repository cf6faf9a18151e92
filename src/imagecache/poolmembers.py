"""The cache pool's membership, as the manager publishes it and gateways read it.

The nodes, in order, and their epoch, which grows with every change. The
gateway's ``MembershipFollower`` (``imagecache.membership``) routes by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, Integer, MetaData, String, Table, delete, insert, select, true

from imagecache.database import MYSQL_TABLE, Store, bump, counters_table

NODE_STATES = frozenset({"active", "joining", "leaving"})

_EPOCH = "membership_epoch"

_schema = MetaData()

nodes_table = Table(
    "nodes",
    _schema,
    Column("node_id", String(64), primary_key=True),
    Column("address", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("position", Integer, nullable=False),
    **MYSQL_TABLE,
)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    address: str  # "host:port"
    state: str  # "active" | "joining" | "leaving"


@dataclass(frozen=True, slots=True)
class Membership:
    epoch: int
    nodes: tuple[NodeRecord, ...]


class MembershipStore(Store):
    """The pool's nodes and the membership epoch, in the metadata database.

    Every public method raises StorageError as ``Database`` says.
    """

    schema = _schema
    counters = (_EPOCH,)

    async def get_membership(self) -> Membership:
        """The cache pool's nodes in order and their epoch (0 and no nodes if never set)."""
        # One statement, so the epoch and the nodes always come from the same commit.
        query = (
            select(
                counters_table.c.value,
                nodes_table.c.node_id,
                nodes_table.c.address,
                nodes_table.c.state,
            )
            .select_from(counters_table.outerjoin(nodes_table, true()))
            .where(counters_table.c.name == _EPOCH)
            .order_by(nodes_table.c.position)
        )
        with self._db.failures("read the pool membership"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        if not rows:
            return Membership(0, ())
        members = tuple(
            NodeRecord(node_id, address, state)
            for _, node_id, address, state in rows
            if node_id is not None
        )
        return Membership(int(rows[0][0]), members)

    async def set_membership(self, nodes: Sequence[NodeRecord]) -> int:
        """Replace the pool's nodes (kept in the given order); returns the new epoch.

        Raises ValueError for an unknown node state or a repeated node id.
        """
        for node in nodes:
            if node.state not in NODE_STATES:
                raise ValueError(f"node {node.node_id}: unknown state {node.state!r}")
        if len({node.node_id for node in nodes}) != len(nodes):
            raise ValueError("node ids must be distinct")
        with self._db.failures("set the pool membership"):
            async with self._db.write() as conn:
                epoch = await bump(conn, _EPOCH)
                await conn.execute(delete(nodes_table))
                if nodes:
                    await conn.execute(
                        insert(nodes_table),
                        [
                            {
                                "node_id": node.node_id,
                                "address": node.address,
                                "state": node.state,
                                "position": position,
                            }
                            for position, node in enumerate(nodes)
                        ],
                    )
        return epoch
