"""Every change of the pool's size kept in the activity history, and announced.

The pool controller tells this module of each resize it made or failed and
of each change it followed (nodes that joined or left behind its back); the
row it keeps carries the cause, the evidence and how long the change took,
and the notifier announces it with that row's id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from imagecache.errors import StorageError
from manager.backends.base import NodeHandle
from manager.notify import ResizeNotice
from manager.records import ManagerRecords


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the autoscaler measured before a resize: the miss rate, and the
    lookups it was measured over (None for a resize without evidence)."""

    miss_rate: float | None = None
    lookups: int | None = None


NO_EVIDENCE = Evidence()


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What ``PoolController.reconcile`` changed: the nodes that joined and left."""

    joined: list[NodeHandle]
    left: list[NodeHandle]

    def __bool__(self) -> bool:
        return bool(self.joined or self.left)

    def cause(self) -> str:
        """The change as the activity history's cause."""
        parts = []
        if self.left:
            parts.append(f"{ids_of(self.left)} left (no longer running)")
        if self.joined:
            parts.append(f"{ids_of(self.joined)} joined")
        return f"{FOLLOWED_CAUSE} {', '.join(parts)}"


# The cause of a membership change the backend made (reconcile), not the manager.
FOLLOWED_CAUSE = "pool follows its nodes:"


def ids_of(nodes: Sequence[NodeHandle]) -> str:
    """The nodes' ids, for a log line or a cause."""
    return ", ".join(n.node_id for n in nodes)


class ResizeHistory:
    """Keeps and announces the pool's changes of size."""

    def __init__(self, records: ManagerRecords, announce: Callable[[ResizeNotice], None]) -> None:
        """``announce`` must not block (manager.notify.Notifier.announce queues it)."""
        self._records = records
        self._announce = announce

    async def keep(
        self,
        change: ResizeNotice,
        started: float,
        lookups: int | None = None,
        *,
        announced: bool = True,
        must_keep: bool = False,
    ) -> None:
        """Keep ``change`` (begun at monotonic time ``started``) in the history
        and, when ``announced``, announce it. A history that cannot be written
        leaves the change unrecorded (``activity_id`` None) unless ``must_keep``:
        then the StorageError is raised, before anything is announced."""
        fields = (change.size_before, change.size_kept, change.cause, change.miss_rate)
        activity_id: int | None = None
        with contextlib.suppress(*(() if must_keep else (StorageError,))):
            activity_id = await self._records.add_activity(
                *fields, duration_seconds=time.monotonic() - started, lookups=lookups
            )
        if announced:
            self._announce(dataclasses.replace(change, activity_id=activity_id))


def change_of(
    before: int, target: int, after: int, cause: str, miss_rate: float | None, *, failed: bool
) -> ResizeNotice:
    """A change of the pool from ``before`` nodes to ``after`` (aiming at ``target``)."""
    return ResizeNotice(
        None, before, target, after, cause, miss_rate, failed=failed, at=datetime.now(UTC)
    )
