"""Moving cached items between nodes when the pool changes size, so it stays warm.

A copy can never bring back a replaced image (docs/design.md): for each batch
the mover takes a write ticket from the receiving node first, then reads the
items from their old node (with LEASE, which is no lookup in the node's
statistics), then reads the keys' current versions from the
catalog, and copies only the items whose version is still current, with a
versioned ADD carrying that ticket. An upload committed before the catalog
read is seen there; one committed after it invalidates the receiving node
after the ticket was taken (the receiver is a member of every gateway's view
by then), so its tombstone refuses the copy, or deletes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cachenode.client import OPEN_ACCESS, CachedItem, LeaseGranted, NodeAccess, NodeClient
from cachenode.errors import NodeError
from cachenode.routing import Ring
from imagecache.errors import StorageError
from manager.backends.base import NodeHandle

log = logging.getLogger(__name__)

BATCH = 256  # keys listed per KEYS request
IN_FLIGHT = 8  # copies at once per source node: user traffic keeps its latency
# A key read for copying that has gone meanwhile is leased to the mover, which
# releases it at once; should the release be lost, the lease ends this soon.
MIGRATION_LEASE_SECONDS = 0.1

# The current version of each of these keys that has an image (the catalog).
CurrentVersions = Callable[[Sequence[str]], Awaitable[Mapping[str, int]]]


@dataclass
class MigrationReport:
    examined: int = 0  # keys listed on the source nodes
    moved: int = 0  # keys whose owner changed (copied, or tried)
    copied: int = 0  # copies the destination accepted
    outdated: int = 0  # items not copied: replaced or deleted since they were cached
    bytes: int = 0
    seconds: float = 0.0


async def move_keys(
    sources: Iterable[NodeHandle],
    ring: Ring,
    nodes: Mapping[str, NodeHandle],
    current_versions: CurrentVersions,
    *,
    node_access: NodeAccess = OPEN_ACCESS,
) -> MigrationReport:
    """Copy every key of ``sources`` whose owner under ``ring`` is another node to it,
    if the catalog still holds the cached version (``current_versions``).

    The sources keep their copies (they may still serve reads until gateways
    switch). Node failures are logged and skipped: a key that does not move is
    only a later miss.
    """
    report = MigrationReport()
    started = time.monotonic()
    clients: dict[str, NodeClient] = {}

    def client(node: NodeHandle) -> NodeClient:
        if node.node_id not in clients:
            clients[node.node_id] = NodeClient.at(
                node.address, pool_size=2, timeout=5, access=node_access
            )
        return clients[node.node_id]

    try:
        await asyncio.gather(
            *(
                _copy_out(source, ring, nodes, client, current_versions, report)
                for source in sources
            )
        )
    finally:
        for open_client in clients.values():
            await open_client.close()
    report.seconds = time.monotonic() - started
    log.info(
        "migration: %d of %d keys changed owner, %d copied (%.1f MB), %d outdated, in %.2f s",
        report.moved,
        report.examined,
        report.copied,
        report.bytes / (1 << 20),
        report.outdated,
        report.seconds,
    )
    return report


async def drop_keys_owned_elsewhere(
    sources: Iterable[NodeHandle], ring: Ring, *, node_access: NodeAccess = OPEN_ACCESS
) -> int:
    """Delete from each source the keys it no longer owns under ``ring``; returns how many."""
    dropped = 0
    for source in sources:
        async with NodeClient.at(source.address, timeout=5, access=node_access) as origin:
            try:
                foreign = [
                    k async for k, _ in origin.iter_keys(BATCH) if ring.owner(k) != source.node_id
                ]
                for key in foreign:
                    dropped += await origin.delete(key)
            except NodeError as error:
                log.warning("dropping moved keys from %s stopped: %s", source.address, error)
    return dropped


async def _copy_out(
    source: NodeHandle,
    ring: Ring,
    nodes: Mapping[str, NodeHandle],
    client: Callable[[NodeHandle], NodeClient],
    current_versions: CurrentVersions,
    report: MigrationReport,
) -> None:
    origin = client(source)
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def read(key: bytes) -> CachedItem | None:
        """The item, read with LEASE, which the node does not count as a lookup:
        the miss rate the autoscaler judges by counts user lookups only."""
        async with slots:
            try:
                answer = await origin.lease(key, MIGRATION_LEASE_SECONDS)
                if isinstance(answer, LeaseGranted):
                    # Gone meanwhile: hand the fill back to the gateways at once.
                    await origin.release(key)
                return answer if isinstance(answer, CachedItem) else None
            except NodeError as error:
                log.warning("migration of a key from %s failed: %s", source.address, error)
                return None

    async def copy(key: bytes, item: CachedItem, owner: NodeHandle, ticket: int) -> None:
        async with slots:
            try:
                stored = await client(owner).add(
                    key, item.value, flags=item.flags, version=item.version, ticket=ticket
                )
            except NodeError as error:
                log.warning("migration of a key to %s failed: %s", owner.address, error)
                return
            if stored:
                report.copied += 1
                report.bytes += len(item.value)

    try:
        cursor = b""
        while True:
            batch, cursor = await origin.keys(cursor, BATCH)
            moving: dict[bytes, NodeHandle] = {}
            for key, _size in batch:
                report.examined += 1
                owner_id = ring.owner(key)
                if owner_id is not None and owner_id != source.node_id:
                    moving[key] = nodes[owner_id]
            report.moved += len(moving)
            if moving:
                await _copy_batch(moving, client, read, copy, current_versions, report)
            if not cursor:
                return
    except (NodeError, StorageError) as error:
        log.warning("migration from %s stopped: %s", source.address, error)


async def _copy_batch(
    moving: Mapping[bytes, NodeHandle],
    client: Callable[[NodeHandle], NodeClient],
    read: Callable[[bytes], Awaitable[CachedItem | None]],
    copy: Callable[[bytes, CachedItem, NodeHandle, int], Awaitable[None]],
    current_versions: CurrentVersions,
    report: MigrationReport,
) -> None:
    """Ticket from each receiver, then the items, then the catalog, then the copies:
    this order is what makes a copy safe (module docstring)."""
    receivers = {owner.node_id: owner for owner in moving.values()}
    tickets: dict[str, int] = {}
    for node_id, owner in receivers.items():
        try:
            tickets[node_id] = await client(owner).ticket()
        except NodeError as error:
            log.warning("migration to %s skipped: %s", owner.address, error)
    keys = [key for key, owner in moving.items() if owner.node_id in tickets]
    items = await asyncio.gather(*(read(key) for key in keys))
    found = {key: item for key, item in zip(keys, items, strict=True) if item is not None}
    if not found:
        return
    # A key that is not valid UTF-8 was not stored by a gateway: it has no image.
    names = {key.decode("utf-8", "replace"): key for key in found}
    current = await current_versions(list(names))
    copies = []
    for name, key in names.items():
        item = found[key]
        if item.version == 0 or current.get(name) != item.version:
            report.outdated += 1
            continue
        owner = moving[key]
        copies.append(copy(key, item, owner, tickets[owner.node_id]))
    await asyncio.gather(*copies)
