"""The gateway following the cache pool's membership, under a lease.

Several times a second the gateway reads the membership (nodes, states,
dirty marks, epoch) and applies it to its pool; at once when the epoch
changed, and every second otherwise, it then renews its entry in the gateway
registry with that epoch (``MembershipStore.renew_gateway``).
Whoever changes the membership waits for that acknowledgement from every
gateway whose lease runs; a gateway that could not renew trusts its view
only until its own lease ends, measured from before it read the view, so
it stops serving from the cache before the others stop waiting for it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable

from imagecache.cachepool import CachePool
from imagecache.poolmembers import Membership, MembershipStore, NodeRecord

log = logging.getLogger(__name__)

# A gateway reads the membership this often, and acknowledges a new epoch at once ...
RENEW_SECONDS = 0.25
# ... and otherwise renews its lease this often (a write: not at every read) ...
LEASE_RENEW_SECONDS = 1.0
# ... a lease of this long on the database's clock, which it trusts locally
# for a share of it only: clocks may run at slightly different rates.
VIEW_LEASE_SECONDS = 3.0
LOCAL_SHARE = 0.8


class MembershipFollower:
    """Keeps the pool routing over the membership in the metadata store.

    Until the manager has published one (epoch 0), the configured nodes are
    published as the first membership, so that dirty marks have somewhere to go.
    """

    def __init__(
        self,
        store: MembershipStore,
        pool: CachePool,
        nodes: tuple[str, ...],
        *,
        lease_seconds: float = VIEW_LEASE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        registered: bool = True,
    ) -> None:
        """``registered`` False: a one-off view for a process that serves no
        reads (the manager's delete-all); it neither renews a lease nor is
        waited for, and trusts the view it read last."""
        self._store = store
        self._pool = pool
        self._configured_nodes = nodes
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._registered = registered
        self.gateway_id = uuid.uuid4().hex
        self._applied: Membership | None = None
        self._acknowledged_epoch = -1
        self._renewed_at = -math.inf  # when the read behind the last renewal began

    @property
    def epoch(self) -> int:
        return 0 if self._applied is None else self._applied.epoch

    @property
    def dirty_marks(self) -> dict[str, int]:
        """The dirty nodes of the view applied, with their marks."""
        nodes = () if self._applied is None else self._applied.nodes
        return {n.node_id: n.dirty_mark for n in nodes if n.dirty_mark}

    async def refresh(self) -> None:
        """Read, apply and acknowledge the membership; raises StorageError
        when the store fails (the view's lease then runs out on its own)."""
        asked_at = self._clock()
        membership = await self._store.get_membership()
        if membership.epoch == 0 and self._configured_nodes:
            configured = [NodeRecord(a, a, "active") for a in self._configured_nodes]
            await self._store.set_membership(configured, only_first=True)
            membership = await self._store.get_membership()
        if membership != self._applied:
            await self._apply(membership)
        if not self._registered:
            return
        if (
            membership.epoch != self._acknowledged_epoch
            or asked_at - self._renewed_at >= LEASE_RENEW_SECONDS
            or not self._pool.view_is_current
        ):
            await self._store.renew_gateway(self.gateway_id, membership.epoch, self._lease_seconds)
            self._acknowledged_epoch, self._renewed_at = membership.epoch, asked_at
            self._pool.hold_view(asked_at + self._lease_seconds * LOCAL_SHARE)

    async def ensure_current(self) -> None:
        """Refresh now unless the view's lease still runs (before an invalidation:
        a view past its lease may lack a node that joined meanwhile)."""
        if not self._pool.view_is_current:
            await self.refresh()

    async def leave(self) -> None:
        """Deregister: a gateway that stops is not waited for."""
        if self._registered:
            await self._store.forget_gateway(self.gateway_id)

    async def _apply(self, membership: Membership) -> None:
        nodes = membership.nodes
        await self._pool.set_members(
            [(n.node_id, n.address) for n in nodes if n.state == "active"],
            joining=[(n.node_id, n.address) for n in nodes if n.state != "active"],
            dirty=[n.node_id for n in nodes if n.dirty_mark],
        )
        self._applied = membership
