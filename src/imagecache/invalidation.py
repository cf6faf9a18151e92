"""The invalidation outbox: every committed change reaches every cache node, or is fenced.

An upload (or a delete-all) writes the invalidation it needs into the outbox
in its own commit transaction (``ImageCatalog``). Whoever committed delivers
it at once to every node of a current view (``deliver``); any gateway delivers
what is still pending, every second and at start (``deliver_pending``), so a
crash between commit and delivery, or a commit whose reply was lost, leaves
nothing cached for good. An entry leaves the outbox once every member of the
pool has taken it.

A node that could not be told is marked *dirty* in the membership, for every
gateway, and the change is only acknowledged once every live gateway has
applied that mark (``MembershipStore.wait_for_gateways``): from then on no
gateway reads from the node. A dirty node is healed when it answers again:
the pending entries are delivered to it (or, when there are too many, it is
cleared), and only then is the mark lifted, on the condition that no entry
newer than those has arrived meanwhile (docs/design.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from imagecache.cachepool import CachePool
from imagecache.catalog import EVERY_KEY, ImageCatalog, ImageRecord, Invalidation
from imagecache.errors import StorageError
from imagecache.membership import MembershipFollower
from imagecache.poolmembers import MembershipStore

log = logging.getLogger(__name__)

# A dirty node with more pending entries than this is cleared instead of told each.
HEAL_ONE_BY_ONE_LIMIT = 1000
# How long a change waits for every live gateway to apply a dirty mark; a
# gateway that stopped renewing its view is given up on after its lease.
FENCE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Invalidator:
    """Delivers the catalog's invalidations to the nodes of the gateway's ``view``
    of the pool, marking in the membership store the nodes it could not tell."""

    _catalog: ImageCatalog
    _membership: MembershipStore
    _view: MembershipFollower
    _pool: CachePool
    _fence_timeout: float = field(default=FENCE_TIMEOUT_SECONDS, kw_only=True)

    async def deliver(self, entry: Invalidation) -> None:
        """Make ``entry`` hold on every node of the pool: told, or dirty for every gateway.

        Raises StorageError when neither could be made sure of (then the
        change must not be acknowledged; the outbox keeps the entry).
        """
        # A view older than its lease may lack a node that joined meanwhile.
        await self._view.ensure_current()
        failed = await self._send(entry)
        if failed:
            await self._fence(failed)
        elif entry.id:
            await self._catalog.invalidation_delivered(entry.id)

    async def deliver_pending(self) -> None:
        """Deliver what the outbox still holds, then heal the dirty nodes that answer."""
        await self._view.ensure_current()
        for entry in await self._catalog.pending_invalidations(HEAL_ONE_BY_ONE_LIMIT):
            if await self._send(entry):
                break  # a node is failing: the rest would fail there too
            await self._catalog.invalidation_delivered(entry.id)
        for node_id, mark in self._view.dirty_marks.items():
            await self._heal(node_id, mark)

    async def _send(self, entry: Invalidation) -> list[str]:
        """Ids of the nodes that could not be told."""
        if entry.key == EVERY_KEY:
            return await self._pool.clear(entry.version)
        return await self._pool.invalidate(entry.key, entry.version)

    async def _fence(self, node_ids: list[str]) -> None:
        epoch = await self._membership.mark_dirty(node_ids)
        log.warning(
            "cache node(s) %s missed an invalidation: dirty for every gateway (epoch %d)",
            ", ".join(node_ids),
            epoch,
        )
        await self._view.refresh()
        await self._membership.wait_for_gateways(epoch, self._fence_timeout)

    async def _heal(self, node_id: str, mark: int) -> None:
        newest = await self._catalog.newest_invalidation_id()
        pending = await self._catalog.pending_invalidations(HEAL_ONE_BY_ONE_LIMIT + 1)
        if len(pending) > HEAL_ONE_BY_ONE_LIMIT:
            # Voids the tickets of every write read before, too (cachenode's CLEAR).
            if await self._pool.clear(node_ids=[node_id]):
                return
            log.info("cache node %s cleared: %d changes were pending", node_id, len(pending))
        else:
            for entry in pending:
                if entry.key == EVERY_KEY:
                    failed = await self._pool.clear(entry.version, node_ids=[node_id])
                else:
                    failed = await self._pool.invalidate(entry.key, entry.version, [node_id])
                if failed:
                    return
        caught_up = self._catalog.nothing_pending_after(newest)
        if await self._membership.mark_clean(node_id, mark, caught_up):
            log.info("cache node %s caught up with %d pending changes", node_id, len(pending))
            await self._view.refresh()


async def read_back(
    catalog: ImageCatalog, key: str, blob_name: str
) -> tuple[ImageRecord, Invalidation] | None:
    """After a commit whose outcome is unknown: the row it wrote and the
    invalidation it needs if it did commit (its row points at ``blob_name``),
    else None (also when the row cannot be read either)."""
    try:
        record = await catalog.get_image(key)
    except StorageError:
        return None
    if record is None or record.blob_name != blob_name:
        return None
    return record, Invalidation(0, key, record.version)
