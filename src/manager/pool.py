"""The pool controller: the one place that changes the pool's size and settings.

It keeps the size within 1..8, gives a joining node the settings in force
before any gateway routes to it, publishes the membership (with a new epoch)
to the membership store where gateways read it, and records every resize in the
activity history with its cause and how long it took.

Every step of a resize waits until every live gateway has applied the
membership published before it (``MembershipStore.wait_for_gateways``): a
node is invalidated by every gateway before keys are copied to it and
before any gateway reads from it, and no gateway reads from a leaving node
by the time the others stop invalidating it (docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachenode.client import OPEN_ACCESS, NodeAccess
from cachenode.routing import Ring
from imagecache.blobs import BlobStore
from imagecache.cachepool import CachePool
from imagecache.catalog import ImageCatalog
from imagecache.errors import StorageError
from imagecache.invalidation import Invalidator
from imagecache.membership import MembershipFollower
from imagecache.poolmembers import MembershipStore, NodeRecord
from imagecache.service import ImageService
from manager.backends.base import NodeHandle, PoolBackend, PoolError
from manager.migration import MigrationReport, drop_keys_owned_elsewhere, move_keys
from manager.nodecalls import clearing, configuring, pinging, succeeding
from manager.notify import ResizeNotice
from manager.records import FAILED_CAUSE, ManagerRecords
from manager.resizehistory import (
    NO_EVIDENCE,
    Evidence,
    Reconciliation,
    ResizeHistory,
    change_of,
    ids_of,
)
from manager.settings import MAX_NODES, MIN_NODES, CacheSettings

log = logging.getLogger(__name__)


# How long a step waits for the gateways to apply a membership: a live one
# does within a fraction of a second, a dead one's lease ends within 3 s.
GATEWAY_WAIT_SECONDS = 10.0


class ResizeError(ValueError):
    """A resize the pool cannot make (outside 1..8); nothing changed."""


@dataclass(frozen=True, slots=True)
class Resize:
    before: int
    after: int


class PoolController:
    def __init__(
        self,
        backend: PoolBackend,
        catalog: ImageCatalog,
        members: MembershipStore,
        records: ManagerRecords,
        gateway_wait_seconds: float = GATEWAY_WAIT_SECONDS,
        node_access: NodeAccess = OPEN_ACCESS,
        announce: Callable[[ResizeNotice], None] = lambda notice: None,
    ) -> None:
        """``announce``: told of every resize recorded, taken or failed; it must not
        block (manager.notify.Notifier.announce queues it)."""
        self._backend = backend
        self._history = ResizeHistory(records, announce)
        self._node_access = node_access
        self._catalog = catalog
        self._membership = members
        self._records = records
        self._gateway_wait_seconds = gateway_wait_seconds
        self.last_migration: MigrationReport | None = None
        self._members: list[NodeHandle] = []
        self._lock = asyncio.Lock()
        self.last_resize: float | None = None  # monotonic time of the last resize

    @property
    def members(self) -> list[NodeHandle]:
        """The nodes gateways route over, oldest first."""
        return list(self._members)

    @property
    def size(self) -> int:
        return len(self._members)

    async def start(self) -> None:
        """Adopt the backend's nodes that answer, configure them and publish them.

        The pool published before (by a manager that stopped, perhaps in the
        middle of a resize) changes as a resize would: nodes that were not
        active members may have missed invalidations, so they are cleared
        and join; published nodes that are not adopted leave. A node that does
        not answer now (an instance still booting, or hung) is not adopted:
        the manager starts without it, and ``reconcile`` joins it, cleared,
        once it answers.
        """
        async with self._lock:
            nodes = await self._backend.nodes()
            if not nodes:
                nodes = await self._backend.grow(MIN_NODES)
            if len(nodes) > MAX_NODES:
                await self._backend.shrink([n.node_id for n in nodes[MAX_NODES:]])
                nodes = nodes[:MAX_NODES]
            nodes = await self._configured(nodes, await self.settings())
            published = (await self._membership.get_membership()).nodes
            active = {NodeHandle(n.node_id, n.address) for n in published if n.state == "active"}
            adopted = set(nodes)
            joining = [n for n in nodes if n not in active]
            leaving = [
                handle
                for n in published
                if (handle := NodeHandle(n.node_id, n.address)) not in adopted
            ]
            await self._clear_strictly(joining)
            self._members = [n for n in nodes if n in active]
            if joining or leaving:
                await self._publish(joining=joining, leaving=leaving)
            self._members = list(nodes)
            await self._publish()

    async def reconcile(self) -> Reconciliation:
        """Make the membership follow the nodes the backend runs.

        For AWS these are the group's InService, Healthy instances, which AWS
        or an operator may change behind the manager's back: a member that is
        no longer among them leaves (without reading from it: it may be gone),
        and a node that is not a member joins through the grow path (cleared,
        then warmed, then routed to) once it answers; one that does not answer
        yet is tried again at the next call. The membership never exceeds
        MAX_NODES. A change is kept in the activity history, and announced
        when it changed the size. Raises PoolError
        when the backend cannot list its nodes (nothing changes then).
        """
        async with self._lock:
            started = time.monotonic()
            before = len(self._members)
            running = await self._backend.nodes()
            left = await self._drop_vanished(running)
            room = MAX_NODES - len(self._members)
            newcomers = [n for n in running if n not in self._members][: max(room, 0)]
            joined = await self._join_answering(newcomers)
            change = Reconciliation(joined=joined, left=left)
            if change:
                cause = change.cause()
                await self._history.keep(
                    change_of(before, self.size, self.size, cause, None, failed=False),
                    started,
                    announced=self.size != before,  # a replacement keeps the size: history only
                )
                log.info("pool follows its backend, %d -> %d: %s", before, self.size, cause)
            return change

    async def settings(self) -> CacheSettings:
        return CacheSettings.from_strings(await self._records.get_settings())

    async def resize(
        self,
        target: int,
        cause: str,
        miss_rate: float | None = None,
        lookups: int | None = None,
    ) -> Resize:
        """Grow or shrink to ``target`` nodes; raises ResizeError outside 1..8.

        ``miss_rate`` and ``lookups``: the autoscaler's evidence for it (the
        miss rate and the lookups it was measured over), kept in the history.
        Raises PoolError when the backend fails; the pool keeps its nodes then.
        """
        _check_size(target)
        async with self._lock:
            return await self._resize(target, cause, Evidence(miss_rate, lookups))

    async def configure(self, settings: CacheSettings, target: int | None, cause: str) -> None:
        """Store ``settings`` and resize to ``target`` nodes (None: keep the size) as one unit.

        Joining nodes get the new settings, then every member does. When the
        resize fails (PoolError, StorageError) the settings in force before
        are stored and pushed again, and the error is raised: nothing changed.
        """
        if target is not None:
            _check_size(target)
        async with self._lock:
            before = await self.settings()
            # Stored first: the nodes a grow starts read their settings from the store.
            await self._records.put_settings(settings.to_strings())
            try:
                if target is not None:
                    await self._resize(target, cause)
            except (PoolError, StorageError) as error:
                log.warning("%s failed, settings restored: %s", cause, error)
                await self._records.put_settings(before.to_strings())
                await self._configure(self._members, before, strict=False)
                raise
            # A node that is down now gets the settings when it is restarted
            # (node_restarted): its failure here is logged, not an error.
            await self._configure(self._members, settings, strict=False)

    async def _resize(self, target: int, cause: str, evidence: Evidence = NO_EVIDENCE) -> Resize:
        """``resize`` with the lock held."""
        before = len(self._members)
        started = time.monotonic()
        try:
            # Members the backend no longer runs (an instance terminated behind
            # the manager's back) count as gone already: a shrink must never
            # pick one, whose termination would fail after the membership
            # dropped it.
            await self._drop_vanished(await self._backend.nodes())
            current = len(self._members)
            if target > current:
                await self._grow(target - current)
            elif target < current:
                await self._shrink(current - target)
        except PoolError as error:
            # Kept in the activity history (and counted by /metrics) with the size kept.
            failure = f"{FAILED_CAUSE} {cause}: {error}"
            await self._history.keep(
                change_of(before, target, self.size, failure, evidence.miss_rate, failed=True),
                started,
                evidence.lookups,
            )
            raise
        if target != before:
            self.last_resize = time.monotonic()
            await self._history.keep(
                change_of(before, target, target, cause, evidence.miss_rate, failed=False),
                started,
                evidence.lookups,
                must_keep=True,
            )
            log.info(
                "pool resized %d -> %d in %.1f s: %s",
                before,
                target,
                self.last_resize - started,
                cause,
            )
        return Resize(before, target)

    async def _grow(self, count: int) -> None:
        """Start nodes, let every gateway invalidate on them, warm them, then route to them."""
        joining = await self._backend.grow(count)
        try:
            await self._prepare_joining(joining)
        except PoolError:
            await self._backend.shrink([n.node_id for n in joining])
            raise
        await self._warm_and_route(joining)

    async def _prepare_joining(self, joining: Sequence[NodeHandle]) -> None:
        """Configure and clear ``joining``, then publish them as joining: every
        gateway invalidates on them from then on. Raises PoolError when one
        cannot be configured or cleared (none of them is published then)."""
        try:
            await self._configure(joining, await self.settings())
            await self._clear_strictly(joining)  # a reused node may hold anything
            await self._publish(joining=joining)  # every gateway invalidates on them from now on
        except PoolError:
            # Joining nodes serve no reads: they may go without leaving first.
            with contextlib.suppress(PoolError, StorageError):
                await self._publish()
            raise

    async def _warm_and_route(self, joining: Sequence[NodeHandle]) -> None:
        """Copy to the joining nodes the keys they now own, then route to them."""
        old = list(self._members)
        everyone = old + list(joining)
        ring = await self._move_keys(old, everyone)
        self._members = everyone
        await self._publish()  # every gateway routes to them from now on
        # The old owners drop the copies they handed over.
        await drop_keys_owned_elsewhere(old, ring, node_access=self._node_access)

    async def _move_keys(self, sources: Sequence[NodeHandle], owners: Sequence[NodeHandle]) -> Ring:
        """Copy from ``sources`` the keys that ``owners`` own by the ring of the
        owners, which it returns (``last_migration``: what moved)."""
        ring = Ring([n.node_id for n in owners])
        self.last_migration = await move_keys(
            sources,
            ring,
            {n.node_id: n for n in owners},
            self._catalog.versions,
            node_access=self._node_access,
        )
        return ring

    async def _join_answering(self, nodes: Sequence[NodeHandle]) -> list[NodeHandle]:
        """Join those of ``nodes`` that answer, as a grow joins its new nodes;
        the others are left for a later try. Returns the nodes that joined."""
        if not nodes:
            return []
        answering = await self._configured(nodes, await self.settings())
        if not answering:
            return []
        try:
            await self._prepare_joining(answering)
        except PoolError as error:
            log.warning("nodes %s did not join, tried again later: %s", ids_of(answering), error)
            return []
        await self._warm_and_route(answering)
        return answering

    async def _drop_vanished(self, running: Sequence[NodeHandle]) -> list[NodeHandle]:
        """Let the members that are not ``running`` leave; returns them.

        Their keys are not copied (they may be unreachable): the keys they
        owned are later misses. As in a shrink they are published as leaving
        first, so that no gateway reads from them by the time another stops
        invalidating them.
        """
        vanished = [n for n in self._members if n not in running]
        if not vanished:
            return []
        log.warning("members %s are no longer running; they leave the pool", ids_of(vanished))
        self._members = [n for n in self._members if n not in vanished]
        await self._publish(leaving=vanished)
        await self._publish()
        return vanished

    async def _shrink(self, count: int) -> None:
        """Hand the leaving nodes' keys to their new owners, stop routing to them, stop them."""
        # The newest nodes leave: the oldest hold the longest-lived keys.
        staying, leaving = self._members[:-count], self._members[-count:]
        await self._move_keys(leaving, staying)
        self._members = staying
        # Leaving: no gateway reads from them from now on, and all still invalidate them ...
        await self._publish(leaving=leaving)
        # ... until they are gone from every gateway's view.
        await self._publish()
        await self._backend.shrink([n.node_id for n in leaving])

    async def apply_settings(self, settings: CacheSettings) -> None:
        """Store the settings and push capacity and policy to every node at once."""
        await self._records.put_settings(settings.to_strings())
        async with self._lock:
            # A node that is down now gets the settings when it is restarted
            # (node_restarted): its failure here is logged, not an error.
            await self._configure(self._members, settings, strict=False)

    async def node_restarted(self, node: NodeHandle) -> None:
        """A node came back empty after a crash: give it the settings in force."""
        await self._configure([node], await self.settings())

    async def clear(self) -> None:
        """Empty every node, refusing fills of anything not newer than what is stored."""
        async with self._lock:  # not while a resize moves keys around
            floor = await self._catalog.current_version() + 1
            await succeeding(self.members, clearing(floor), self._node_access)

    async def delete_all(self, blobs: BlobStore) -> int:
        """Delete every image as the gateway's ``delete_all`` does (the outbox, every
        member, joining and leaving ones too); returns how many there were."""
        async with self._lock:  # the membership holds still meanwhile
            pool = CachePool(node_access=self._node_access)
            view = MembershipFollower(self._membership, pool, (), registered=False)
            try:
                await view.refresh()
                invalidator = Invalidator(self._catalog, self._membership, view, pool)
                return await ImageService(self._catalog, blobs, pool, invalidator).delete_all()
            finally:
                await pool.close()

    async def ping_all(self) -> dict[str, bool]:
        """Which members answer PING, by node id."""
        answering = await succeeding(self.members, pinging, self._node_access)
        return {n.node_id: n in answering for n in self.members}

    async def _configure(
        self, nodes: Sequence[NodeHandle], settings: CacheSettings, strict: bool = True
    ) -> None:
        configured = await self._configured(nodes, settings)
        if strict:
            _all_of(nodes, configured, "configure")

    async def _configured(
        self, nodes: Sequence[NodeHandle], settings: CacheSettings
    ) -> list[NodeHandle]:
        """Give ``nodes`` the settings; returns those that took them, in order."""
        return await succeeding(nodes, configuring(settings), self._node_access)

    async def _clear_strictly(self, nodes: Sequence[NodeHandle]) -> None:
        """Empty ``nodes``; raises PoolError if one fails.

        A clear also voids every write ticket taken before it, so no write of
        something read before can land after; it sets no version floor, which
        would refuse the copies that warm a joining node.
        """
        if not nodes:
            return
        _all_of(nodes, await succeeding(nodes, clearing(0), self._node_access), "clear")

    async def _publish(
        self, joining: Sequence[NodeHandle] = (), leaving: Sequence[NodeHandle] = ()
    ) -> None:
        """Publish the membership, and return once every live gateway has applied it."""
        records = [NodeRecord(n.node_id, n.address, "active") for n in self._members]
        records += [NodeRecord(n.node_id, n.address, "joining") for n in joining]
        records += [NodeRecord(n.node_id, n.address, "leaving") for n in leaving]
        epoch = await self._membership.set_membership(records)
        try:
            await self._membership.wait_for_gateways(epoch, self._gateway_wait_seconds)
        except StorageError as error:
            raise PoolError(str(error)) from error


def _all_of(nodes: Sequence[NodeHandle], done: Sequence[NodeHandle], action: str) -> None:
    """Raises PoolError naming the ``nodes`` that are not ``done``."""
    failed = [n.address for n in nodes if n not in done]
    if failed:
        raise PoolError(f"could not {action} cache node(s) {', '.join(failed)}")


def _check_size(target: int) -> None:
    """Raises ResizeError for a pool size outside 1..8."""
    if not MIN_NODES <= target <= MAX_NODES:
        raise ResizeError(
            f"the pool must keep {MIN_NODES} to {MAX_NODES} nodes; {target} is outside"
        )
