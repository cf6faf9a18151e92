"""The gateway following the cache pool's membership that the manager publishes."""

from __future__ import annotations

from imagecache.cachepool import CachePool
from imagecache.poolmembers import MembershipStore


class MembershipFollower:
    """Keeps the pool routing over the membership the manager publishes.

    Until the manager has published one (epoch 0), the configured nodes.
    """

    def __init__(self, store: MembershipStore, pool: CachePool, nodes: tuple[str, ...]) -> None:
        self._store = store
        self._pool = pool
        self._configured_nodes = nodes
        self._epoch: int | None = None

    async def refresh(self) -> None:
        membership = await self._store.get_membership()
        if membership.epoch == self._epoch:
            return
        if membership.epoch == 0:
            await self._pool.set_members([(address, address) for address in self._configured_nodes])
        else:
            nodes = membership.nodes
            await self._pool.set_members(
                [(n.node_id, n.address) for n in nodes if n.state != "joining"],
                joining=[(n.node_id, n.address) for n in nodes if n.state == "joining"],
            )
        self._epoch = membership.epoch
