"""The gateway's view of the cache tier: one client per node, keys routed by the ring.

A cache node that fails or times out never fails a user request: the pool
answers a miss, sets the node aside for a few seconds and tries it again
later. A node that may have missed an invalidation is *dirty*: the membership
says so to every gateway (``imagecache.invalidation``), and it serves nothing
until it has been healed, so it can never serve an image older than the last
acknowledged upload.

The view (members, their states, dirty marks) is only trusted while its lease
holds (``hold_view``): a gateway that could not renew it for a while, because
it was paused or cut off from the metadata store, may have missed a
membership change that the manager or another gateway went ahead with, so
it serves nothing from the cache until it has caught up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cachenode.client import (
    OPEN_ACCESS,
    CachedItem,
    LeaseGranted,
    LeaseHeld,
    NodeAccess,
    NodeClient,
)
from cachenode.errors import NodeError, NodeReplyError
from cachenode.protocol import MissKind
from cachenode.routing import Ring
from cachenode.status import Status

log = logging.getLogger(__name__)
T = TypeVar("T")
_OWNERS_KEPT = 10_000
# Read leases (cachenode.readleases) are measured on two machines' clocks:
# the holder trusts a lease for this share of its time, and whoever
# invalidates waits out the time the node reports divided by it. Clock rates
# differ by parts per million; this allows them 25%.
LEASE_CLOCK_SHARE = 0.8


@dataclass
class PoolMember:
    node_id: str
    address: str
    client: NodeClient
    unusable_until: float = 0.0  # set aside after a failure, until then
    dirty: bool = False  # may have missed an invalidation: serves nothing until healed
    failures: int = 0


@dataclass(frozen=True, slots=True)
class WriteTicket:
    """A node's write ticket (cachenode's TICKET), with the node it is valid on."""

    node_id: str
    value: int


@dataclass
class PoolCounters:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # node failures, each answered as a miss


class CachePool:
    """Routes keys to cache nodes and hides node failures behind misses."""

    def __init__(
        self,
        *,
        timeout: float = 0.5,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        node_access: NodeAccess = OPEN_ACCESS,
    ) -> None:
        self._timeout = timeout
        self._node_access = node_access
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._members: dict[str, PoolMember] = {}
        self._retired: list[tuple[float, NodeClient]] = []  # (when, client) of removed nodes
        self._ring = Ring(())
        # Owners of recently asked keys under the ring they were computed for:
        # hashing a key for every member costs more than a hot read's lookup.
        self._owners_ring = self._ring
        self._owners: dict[str, PoolMember] = {}
        self._view_valid_until = math.inf  # a pool not following a membership needs no lease
        # Counts the views applied: a read lease holds only under the view it was taken in.
        self.view_generation = 0
        self.counters = PoolCounters()

    # -- membership ---------------------------------------------------------

    @property
    def node_ids(self) -> tuple[str, ...]:
        return self._ring.node_ids

    @property
    def members(self) -> list[PoolMember]:
        """Every node, routed to or joining: all of them get invalidations."""
        return list(self._members.values())

    async def set_members(
        self,
        members: Sequence[tuple[str, str]],
        joining: Sequence[tuple[str, str]] = (),
        dirty: Collection[str] = (),
    ) -> None:
        """Route over ``members`` (node id, host:port) from now on.

        ``joining`` nodes (joining or leaving the pool) get no reads, but
        every invalidation: they are being warmed, or may still be read by a
        gateway that has not caught up yet. ``dirty`` nodes (ids of either)
        serve nothing. Clients of nodes in neither list close.
        """
        routed = dict(members)
        wanted = {**dict(joining), **routed}
        # Members and ring change together, with no await in between: a read
        # running meanwhile sees either the old pool or the new one.
        gone = [m for m in self._members.values() if wanted.get(m.node_id) != m.address]
        for member in gone:
            del self._members[member.node_id]
        for node_id, address in wanted.items():
            if node_id not in self._members:
                client = NodeClient.at(
                    address,
                    timeout=self._timeout,
                    connect_timeout=self._timeout,
                    access=self._node_access,
                )
                self._members[node_id] = PoolMember(node_id, address, client)
        for member in self._members.values():
            member.dirty = member.node_id in dirty
        self._ring = Ring(sorted(routed))
        self.view_generation += 1
        # Reads already under way on a removed node finish first: its client
        # closes on a later heal, once they have had their timeout.
        self._retired += [(self._clock(), m.client) for m in gone]
        log.info(
            "cache pool: %s%s%s",
            ", ".join(f"{n}={a}" for n, a in sorted(routed.items())),
            f"; joining or leaving: {', '.join(sorted(dict(joining)))}" if joining else "",
            f"; dirty: {', '.join(sorted(dirty))}" if dirty else "",
        )

    def hold_view(self, until: float) -> None:
        """Trust the membership until ``until`` (on the pool's clock); after
        that the cache serves nothing until the next ``hold_view``."""
        self._view_valid_until = until

    @property
    def view_is_current(self) -> bool:
        return self._clock() < self._view_valid_until

    def owner_of(self, key: str) -> PoolMember | None:
        if self._owners_ring is not self._ring:  # the membership changed
            self._owners_ring, self._owners = self._ring, {}
        member = self._owners.get(key)
        if member is None:
            node_id = self._ring.owner(key.encode())
            if node_id is None:
                return None
            member = self._members[node_id]
            if len(self._owners) >= _OWNERS_KEPT:
                self._owners.clear()
            self._owners[key] = member
        return member

    # -- reads and fills ----------------------------------------------------

    async def get(self, key: str) -> CachedItem | None:
        """The cached item of ``key``; None on a miss or when its node cannot serve."""
        member = self.usable_owner(key)
        if member is None:
            self.counters.misses += 1
            return None
        item = await self._attempt(member, member.client.get_item(key.encode()))
        if item is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return item

    async def lookup(self, key: str, seconds: float) -> CachedItem | WriteTicket | LeaseHeld | None:
        """A read of ``key``: ``get`` and, on a miss, ``lease`` in one request
        (the node's LOOKUP). Counted in ``counters`` as ``get`` counts it; on
        a miss, what ``lease`` answers (None when the owner cannot answer)."""
        member = self.usable_owner(key)
        if member is None:
            self.counters.misses += 1
            return None
        answer = await self._attempt(member, member.client.lookup(key.encode(), seconds))
        if isinstance(answer, CachedItem):
            self.counters.hits += 1
            return answer
        self.counters.misses += 1
        return _ticket_of(member, answer)

    async def lease(self, key: str, seconds: float) -> CachedItem | WriteTicket | LeaseHeld | None:
        """Ask ``key``'s owner who loads it: the item if it is cached by now,
        a WriteTicket (the lease is granted: this caller loads and fills with
        it), or LeaseHeld (another gateway is loading it: ask again later).
        None when the owner cannot answer: the caller loads without a lease,
        as a node failure never fails a read.

        Not counted in ``counters``: the ``lookup`` before it already counted
        this read as a miss, and an item found here (another gateway's fill)
        is still that same read; counting it as a hit too would count one
        read twice.
        """
        member = self.usable_owner(key)
        if member is None:
            return None
        return _ticket_of(
            member, await self._attempt(member, member.client.lease(key.encode(), seconds))
        )

    async def release(self, key: str) -> None:
        """Give back a lease on ``key`` without filling it (best effort: an
        unreleased lease still ends after its time)."""
        member = self.usable_owner(key)
        if member is not None:
            await self._attempt(member, member.client.release(key.encode()))

    async def unfixable_miss(self, key: str, kind: MissKind) -> None:
        """Tell ``key``'s owner that the miss its read counted is one no pool
        size can fix, and give back any lease on ``key`` (best effort, like
        ``release``: the node then counts it in ``missing_lookups`` or
        ``uncacheable_lookups`` instead of ``misses``)."""
        member = self.usable_owner(key)
        if member is not None:
            await self._attempt(member, member.client.uncacheable(key.encode(), kind))

    async def ticket(self, key: str) -> WriteTicket | None:
        """A write ticket from ``key``'s owner, taken before reading what will be
        written there; None when the owner cannot answer (then nothing is written)."""
        member = self.usable_owner(key)
        if member is None:
            return None
        ticket = await self._attempt(member, member.client.ticket())
        return None if ticket is None else WriteTicket(member.node_id, ticket)

    async def fill(
        self, key: str, value: bytes, flags: int, version: int, ticket: WriteTicket
    ) -> bool:
        """Cache a value read from the blob store after ``ticket`` was taken,
        unless the node knows a newer version (or the owner changed meanwhile).
        False when the node refused it as over its maximum item size: it can
        never be cached there (the reads that missed it say so with
        ``unfixable_miss``)."""
        member = self.usable_owner(key)
        if member is None or member.node_id != ticket.node_id:
            return True
        add = member.client.add(
            key.encode(), value, flags=flags, version=version, ticket=ticket.value
        )
        try:
            await add
        except NodeReplyError as error:
            # The node is fine, it refused this one request.
            log.debug("cache node %s refused: %s", member.node_id, error)
            return error.status is not Status.TOO_LARGE
        except NodeError as error:
            self._set_aside(member, error)
        return True

    async def store(
        self, key: str, value: bytes, flags: int, version: int, ticket: WriteTicket
    ) -> None:
        """Write a just-uploaded value through to its owner (best effort); the
        ticket was taken before the upload committed."""
        member = self.usable_owner(key)
        if member is not None and member.node_id == ticket.node_id:
            await self._attempt(
                member,
                member.client.set(
                    key.encode(), value, flags=flags, version=version, ticket=ticket.value
                ),
            )

    # -- invalidation -------------------------------------------------------

    async def invalidate(
        self, key: str, version: int, node_ids: Collection[str] | None = None
    ) -> list[str]:
        """Remove every version of ``key`` older than ``version`` from every node
        (or those of ``node_ids``); returns the ids of the nodes that could not be told.

        Every node, not only the owner, routed or not: a node that owned the
        key under an earlier membership may own it again later. Nodes set
        aside after a failure are not waited for: they count as not told.
        Returns once no gateway may still serve an older version under a
        read lease of a node that was told.
        """
        encoded = key.encode()
        return await self._on_every_member(
            lambda m: m.client.invalidate(encoded, version), node_ids
        )

    async def clear(self, version: int = 0, node_ids: Collection[str] | None = None) -> list[str]:
        """Empty every node (or those of ``node_ids``); with ``version``, older
        writes are refused too. Returns the ids of the nodes that could not be
        told, once the read leases on what the others held have ended."""
        return await self._on_every_member(lambda m: m.client.clear(version=version), node_ids)

    async def heal(self) -> None:
        """Close retired clients, and bring back nodes set aside once they answer.

        Dirty nodes are healed by the invalidation outbox (imagecache.invalidation).
        """
        now = self._clock()
        still_busy = [(at, c) for at, c in self._retired if now - at <= self._timeout * 2]
        for at, client in self._retired:
            if now - at > self._timeout * 2:
                await client.close()
        self._retired = still_busy
        for member in self.members:
            if member.unusable_until <= now:
                continue
            try:
                await member.client.ping()
            except NodeError:
                member.unusable_until = self._clock() + self._retry_seconds
                continue
            member.unusable_until = 0.0

    async def close(self) -> None:
        for member in self._members.values():
            await member.client.close()
        for _, client in self._retired:
            await client.close()
        self._retired = []
        self._members.clear()
        self._ring = Ring(())

    def usable_owner(self, key: str) -> PoolMember | None:
        """``key``'s owner, when that node may serve reads now."""
        member = self.owner_of(key)
        return member if member is not None and self.may_read(member, self._clock()) else None

    def may_read(self, member: PoolMember, now: float) -> bool:
        """Whether ``member`` may serve reads at ``now`` (on the pool's clock), as
        the owner ``usable_owner`` returned under the current ``view_generation``."""
        return not member.dirty and member.unusable_until <= now < self._view_valid_until

    # -- internals ----------------------------------------------------------

    async def _attempt(self, member: PoolMember, call: Awaitable[T]) -> T | None:
        try:
            return await call
        except NodeReplyError as error:
            # The node is fine, it refused this one request (e.g. too large).
            log.debug("cache node %s refused: %s", member.node_id, error)
            return None
        except NodeError as error:
            self._set_aside(member, error)
            return None

    async def _on_every_member(
        self,
        invalidation: Callable[[PoolMember], Awaitable[float]],
        node_ids: Collection[str] | None = None,
    ) -> list[str]:
        """Ids of the members that ``invalidation`` failed on (or that were set
        aside), once the read leases the others reported have run out."""
        members = [m for m in self.members if node_ids is None or m.node_id in node_ids]
        now = self._clock()

        async def told(member: PoolMember) -> float | None:
            """Seconds its read leases still run; None when it was not told."""
            if member.unusable_until > now:
                return None
            try:
                return await invalidation(member)
            except NodeError as error:
                self._set_aside(member, error)
                return None

        leases_left = await asyncio.gather(*(told(member) for member in members))
        longest = max((left for left in leases_left if left is not None), default=0.0)
        if longest > 0:
            await asyncio.sleep(longest / LEASE_CLOCK_SHARE)
        return [m.node_id for m, left in zip(members, leases_left, strict=True) if left is None]

    def _set_aside(self, member: PoolMember, error: Exception) -> None:
        self.counters.errors += 1
        member.failures += 1
        if member.unusable_until <= self._clock():
            log.warning(
                "cache node %s (%s) failed, reading around it for %.0f s: %s",
                member.node_id,
                member.address,
                self._retry_seconds,
                error,
            )
        member.unusable_until = self._clock() + self._retry_seconds


def _ticket_of(
    member: PoolMember, answer: CachedItem | LeaseGranted | LeaseHeld | None
) -> CachedItem | WriteTicket | LeaseHeld | None:
    """A node's answer to LEASE or LOOKUP, a granted lease as the fill's WriteTicket."""
    if isinstance(answer, LeaseGranted):
        return WriteTicket(member.node_id, answer.ticket)
    return answer
