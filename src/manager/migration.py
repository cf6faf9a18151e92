"""Moving cached items between nodes when the pool changes size, so it stays warm.

Copies go with ADD at the item's own version, so a copy can never overwrite a
newer value or land after an invalidation of its key: the receiving node is a
member (it gets every invalidation) before any copy starts, and its
tombstones refuse older versions (docs/design.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cachenode.client import NodeClient
from cachenode.errors import NodeError
from imagecache.config import parse_address
from imagecache.ring import Ring
from manager.backends.base import NodeHandle

log = logging.getLogger(__name__)

BATCH = 256  # keys listed per KEYS request
IN_FLIGHT = 8  # copies at once per source node: user traffic keeps its latency


@dataclass
class MigrationReport:
    examined: int = 0  # keys listed on the source nodes
    moved: int = 0  # keys whose owner changed (copied, or tried)
    copied: int = 0  # copies the destination accepted
    bytes: int = 0
    seconds: float = 0.0


async def move_keys(
    sources: Iterable[NodeHandle],
    ring: Ring,
    nodes: Mapping[str, NodeHandle],
) -> MigrationReport:
    """Copy every key of ``sources`` whose owner under ``ring`` is another node to it.

    The sources keep their copies (they may still serve reads until gateways
    switch). Node failures are logged and skipped: a key that does not move is
    only a later miss.
    """
    report = MigrationReport()
    started = time.monotonic()
    clients: dict[str, NodeClient] = {}

    def client(node: NodeHandle) -> NodeClient:
        if node.node_id not in clients:
            host, port = parse_address(node.address)
            clients[node.node_id] = NodeClient(host, port, pool_size=2, timeout=5)
        return clients[node.node_id]

    try:
        await asyncio.gather(
            *(_copy_out(source, ring, nodes, client, report) for source in sources)
        )
    finally:
        for open_client in clients.values():
            await open_client.close()
    report.seconds = time.monotonic() - started
    log.info(
        "migration: %d of %d keys changed owner, %d copied (%.1f MB) in %.2f s",
        report.moved,
        report.examined,
        report.copied,
        report.bytes / (1 << 20),
        report.seconds,
    )
    return report


async def drop_keys_owned_elsewhere(sources: Iterable[NodeHandle], ring: Ring) -> int:
    """Delete from each source the keys it no longer owns under ``ring``; returns how many."""
    dropped = 0
    for source in sources:
        host, port = parse_address(source.address)
        async with NodeClient(host, port, timeout=5) as origin:
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
    report: MigrationReport,
) -> None:
    origin = client(source)
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def copy(key: bytes, owner: NodeHandle) -> None:
        async with slots:
            try:
                item = await origin.get_item(key)
                if item is None:
                    return  # evicted or deleted meanwhile
                if await client(owner).add(key, item.value, flags=item.flags, version=item.version):
                    report.copied += 1
                    report.bytes += len(item.value)
            except NodeError as error:
                log.warning("migration of a key from %s failed: %s", source.address, error)

    try:
        cursor = b""
        while True:
            batch, cursor = await origin.keys(cursor, BATCH)
            tasks = []
            for key, _size in batch:
                report.examined += 1
                owner_id = ring.owner(key)
                if owner_id is not None and owner_id != source.node_id:
                    report.moved += 1
                    tasks.append(copy(key, nodes[owner_id]))
            await asyncio.gather(*tasks)
            if not cursor:
                return
    except NodeError as error:
        log.warning("migration from %s stopped: %s", source.address, error)
