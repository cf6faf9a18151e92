"""The cache pool's membership, as the manager publishes it and gateways read it.

The nodes, in order, their dirty marks, and their epoch, which grows with
every change of either. The gateway's ``MembershipFollower``
(``imagecache.membership``) routes by it.

The gateway registry makes a change of the membership a protocol rather
than a matter of timing: every gateway renews its entry several times a
second with the epoch it has applied, and a lease; whoever changes the
membership waits until every gateway whose lease runs has applied the new
epoch (``wait_for_gateways``). A gateway whose lease ran out serves nothing
from the cache until it has renewed it (``CachePool.hold_view``), so it is
safe to stop waiting for it. Lease times are kept on the database's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    MetaData,
    String,
    delete,
    insert,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from imagecache.database import Store, bump, counters_table, key, lock_counter, required, table
from imagecache.errors import StorageError

NODE_STATES = frozenset({"active", "joining", "leaving"})

_EPOCH = "membership_epoch"

_schema = MetaData()
_ID = String(64)  # of a node, of a gateway

nodes_table = table(
    "nodes",
    _schema,
    key("node_id", _ID),
    *required(address=String(255), state=String(16), position=Integer),
)

# Nodes that may have missed an invalidation; ``mark`` is the epoch that marked
# them, so that lifting a mark cannot lift a newer one.
dirty_table = table("dirty_nodes", _schema, key("node_id", _ID), *required(mark=BigInteger))

# A gateway's ``epoch`` is the membership epoch it has applied; ``expires_us``,
# its lease, on the database's clock.
gateways_table = table(
    "gateways", _schema, key("gateway_id", _ID), *required(epoch=BigInteger, expires_us=BigInteger)
)

# How often ``wait_for_gateways`` looks again.
_WAIT_POLL_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    address: str  # "host:port"
    state: str  # "active" | "joining" | "leaving"
    dirty_mark: int = 0  # 0: clean; else the epoch that marked it dirty


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
                dirty_table.c.mark,
            )
            .select_from(
                counters_table.outerjoin(nodes_table, true()).outerjoin(
                    dirty_table, dirty_table.c.node_id == nodes_table.c.node_id
                )
            )
            .where(counters_table.c.name == _EPOCH)
            .order_by(nodes_table.c.position)
        )
        with self._db.failures("read the pool membership"):
            async with self._db.read() as conn:
                rows = (await conn.execute(query)).all()
        if not rows:
            return Membership(0, ())
        members = tuple(
            NodeRecord(node_id, address, state, int(mark or 0))
            for _, node_id, address, state, mark in rows
            if node_id is not None
        )
        return Membership(int(rows[0][0]), members)

    async def set_membership(self, nodes: Sequence[NodeRecord], *, only_first: bool = False) -> int:
        """Replace the pool's nodes (kept in the given order); returns the new epoch.

        Dirty marks stay with the nodes that stay (``dirty_mark`` is not read
        here). With ``only_first``, nothing changes if a membership was ever
        published, and the epoch returned is the one in force.
        Raises ValueError for an unknown node state or a repeated node id.
        """
        for node in nodes:
            if node.state not in NODE_STATES:
                raise ValueError(f"node {node.node_id}: unknown state {node.state!r}")
        if len({node.node_id for node in nodes}) != len(nodes):
            raise ValueError("node ids must be distinct")
        with self._db.failures("set the pool membership"):
            async with self._db.write() as conn:
                if only_first and (current := await lock_counter(conn, _EPOCH)):
                    return current
                epoch = await bump(conn, _EPOCH)
                await conn.execute(delete(nodes_table))
                staying = [node.node_id for node in nodes]
                await conn.execute(delete(dirty_table).where(dirty_table.c.node_id.not_in(staying)))
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

    # -- dirty marks ----------------------------------------------------------

    async def mark_dirty(self, node_ids: Collection[str]) -> int:
        """Mark the nodes dirty for every gateway; returns the epoch that every
        live gateway must have applied before the caller relies on it.

        Nodes already dirty keep their mark (a heal that lists the changes
        first cannot lift it without delivering the caller's change too: see
        ``mark_clean``); nodes no longer members are skipped.
        """
        with self._db.failures("mark cache nodes dirty"):
            async with self._db.write() as conn:
                epoch = await lock_counter(conn, _EPOCH)
                members = set(
                    (
                        await conn.execute(
                            select(nodes_table.c.node_id).where(
                                nodes_table.c.node_id.in_(list(node_ids))
                            )
                        )
                    ).scalars()
                )
                rows = await conn.execute(
                    select(dirty_table.c.node_id, dirty_table.c.mark).where(
                        dirty_table.c.node_id.in_(list(members))
                    )
                )
                marks = {node_id: int(mark) for node_id, mark in rows}
                new = members - set(marks)
                if not new:
                    return max(marks.values(), default=epoch)
                epoch = await bump(conn, _EPOCH)
                await conn.execute(
                    insert(dirty_table), [{"node_id": n, "mark": epoch} for n in sorted(new)]
                )
                return epoch

    async def mark_clean(
        self,
        node_id: str,
        mark: int,
        caught_up: Callable[[AsyncConnection], Awaitable[bool]],
    ) -> bool:
        """Lift the dirty mark ``mark`` of ``node_id``, if it is still that one and
        ``caught_up`` (checked in the same transaction) holds; returns whether it did."""
        with self._db.failures("mark a cache node clean"):
            async with self._db.write() as conn:
                await lock_counter(conn, _EPOCH)  # orders this with mark_dirty (MySQL)
                current = (
                    await conn.execute(
                        select(dirty_table.c.mark).where(dirty_table.c.node_id == node_id)
                    )
                ).scalar_one_or_none()
                if current != mark or not await caught_up(conn):
                    return False
                await conn.execute(delete(dirty_table).where(dirty_table.c.node_id == node_id))
                await bump(conn, _EPOCH)
                return True

    # -- the gateway registry -------------------------------------------------

    async def renew_gateway(self, gateway_id: str, epoch: int, lease_seconds: float) -> None:
        """Record that ``gateway_id`` has applied ``epoch``, leased for ``lease_seconds``."""
        with self._db.failures("renew the gateway's lease"):
            async with self._db.write() as conn:
                expires = _database_now_us(conn) + int(lease_seconds * 1_000_000)
                renewed = await conn.execute(
                    update(gateways_table)
                    .where(gateways_table.c.gateway_id == gateway_id)
                    .values(epoch=epoch, expires_us=expires)
                )
                if not renewed.rowcount:
                    await conn.execute(
                        insert(gateways_table).values(
                            gateway_id=gateway_id, epoch=epoch, expires_us=expires
                        )
                    )

    async def forget_gateway(self, gateway_id: str) -> None:
        """The gateway stops: nobody waits for it any more."""
        with self._db.failures("deregister the gateway"):
            async with self._db.write() as conn:
                await conn.execute(
                    delete(gateways_table).where(gateways_table.c.gateway_id == gateway_id)
                )

    async def lagging_gateways(self, epoch: int) -> list[str]:
        """Gateways whose lease runs and that have not applied ``epoch`` yet."""
        with self._db.failures("read the gateway registry"):
            async with self._db.read() as conn:
                query = select(gateways_table.c.gateway_id).where(
                    (gateways_table.c.epoch < epoch)
                    & (gateways_table.c.expires_us > _database_now_us(conn))
                )
                return list((await conn.execute(query)).scalars())

    async def wait_for_gateways(self, epoch: int, give_up_after: float) -> None:
        """Return once every gateway whose lease runs has applied ``epoch``.

        Raises StorageError after ``give_up_after`` seconds (a gateway that renews its
        lease applies the epoch as it does, so this means the database is failing).
        """
        give_up_at = time.monotonic() + give_up_after
        while lagging := await self.lagging_gateways(epoch):
            if time.monotonic() >= give_up_at:
                raise StorageError(
                    f"gateways {', '.join(lagging)} did not apply membership epoch {epoch} "
                    f"within {give_up_after:.0f} s"
                )
            await asyncio.sleep(_WAIT_POLL_SECONDS)

    async def expire_gateways(self) -> int:
        """Forget the gateways whose lease ran out; returns how many."""
        with self._db.failures("clean the gateway registry"):
            async with self._db.write() as conn:
                result = await conn.execute(
                    delete(gateways_table).where(
                        gateways_table.c.expires_us <= _database_now_us(conn)
                    )
                )
                return int(result.rowcount)


def _database_now_us(conn: AsyncConnection) -> ColumnElement[int]:
    """Now in microseconds since the epoch, on the database server's clock
    (SQLite runs in this process: its clock is this machine's)."""
    if conn.dialect.name == "sqlite":
        return literal_column("CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)")
    return literal_column("CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)")
