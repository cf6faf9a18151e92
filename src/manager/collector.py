"""The collector: turns the nodes' lifetime counters into pool samples.

Every call of ``Collector.collect`` (the manager's loop makes one every 5 s)
reads STATS from every member at once, subtracts each node's previous
reading, sums the deltas over the pool into one ``PoolSample``, stores it and
keeps the last few minutes of samples in memory. ``last_minute`` answers
getRate and the autoscaler from that memory, so neither waits for, nor
depends on, the metrics store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cachenode.client import OPEN_ACCESS, NodeAccess, NodeClient
from cachenode.errors import NodeError
from manager.backends.base import NodeHandle
from manager.metrics import MetricsStore, MinuteStats, PoolSample, minute_of
from manager.nodestats import NodeFigures

log = logging.getLogger(__name__)

WINDOW = timedelta(minutes=1)
# last_minute needs one minute; the rest is slack for a late or stepped clock.
KEEP = timedelta(minutes=3)


def now_utc() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


_ZERO = NodeFigures(0, 0, 0, 0, 0, 0, 0, 0, 0, None)


@dataclass(frozen=True, slots=True)
class _Delta:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    requests: int = 0
    missing: int = 0
    uncacheable: int = 0


def _delta(before: NodeFigures | None, now: NodeFigures) -> _Delta:
    if before is None:
        # The node's lifetime totals are not this interval's: count from here.
        return _Delta()
    # After a restart, everything the new incarnation counted is new since the last reading.
    base = _ZERO if now.restarted_since(before) else before
    lookups = now.lookups - base.lookups
    return _Delta(
        lookups=lookups,
        hits=now.hits - base.hits,
        misses=now.misses - base.misses,
        # A lookup moved out of lookups is still a request the node answered.
        requests=lookups
        + (now.unfixable - base.unfixable)
        + (now.sets - base.sets)
        + (now.deletes - base.deletes),
        missing=now.missing - base.missing,
        uncacheable=now.uncacheable - base.uncacheable,
    )


class Collector:
    """Samples the pool's statistics and remembers the last few minutes of them.

    One ``NodeClient`` per node id stays open between calls; it is closed when
    the node leaves the members (or its address changes) and on ``close``.
    """

    def __init__(
        self,
        store: MetricsStore,
        *,
        timeout: float = 1.0,
        clock: Callable[[], datetime] = now_utc,
        window: timedelta = WINDOW,
        node_access: NodeAccess = OPEN_ACCESS,
    ) -> None:
        self._store = store
        self._node_access = node_access
        self._window = window  # what "the last minute" spans (shorter in tests)
        self._timeout = timeout
        self._clock = clock
        self._clients: dict[str, tuple[str, NodeClient]] = {}  # node id -> (address, client)
        self._readings: dict[str, NodeFigures] = {}
        self._failing: set[str] = set()
        self._samples: list[PoolSample] = []
        # Two overlapping collections would both subtract the same previous reading.
        self._lock = asyncio.Lock()

    async def collect(self, members: Sequence[NodeHandle]) -> PoolSample:
        """Read every member's STATS and return the pool's sample of this interval.

        A node that fails or does not answer within the timeout is left out of
        this sample (``workers`` counts the nodes that answered); its counters
        are caught up at its next answer. The sample is stored with
        ``store.put`` and kept in memory; raises whatever ``store.put`` raises,
        and then ``last_minute`` has the sample all the same.
        """
        async with self._lock:
            nodes: dict[str, NodeHandle] = {}
            for node in members:
                nodes.setdefault(node.node_id, node)
            await self._forget_except(nodes)
            readings = await asyncio.gather(*(self._read(node) for node in nodes.values()))
            at = self._clock()
            workers = lookups = hits = misses = requests = items = size = 0
            missing = uncacheable = 0
            for node_id, reading in zip(nodes, readings, strict=True):
                if reading is None:
                    continue
                delta = _delta(self._readings.get(node_id), reading)
                self._readings[node_id] = reading
                workers += 1
                lookups += delta.lookups
                hits += delta.hits
                misses += delta.misses
                requests += delta.requests
                missing += delta.missing
                uncacheable += delta.uncacheable
                items += reading.items
                size += reading.bytes
            sample = PoolSample(
                at, workers, lookups, hits, misses, requests, items, size, missing, uncacheable
            )
            self._samples = [s for s in self._samples if s.at > at - max(KEEP, self._window)]
            self._samples.append(sample)
        await self._store.put(sample)
        return sample

    def last_minute(self) -> MinuteStats | None:
        """The pool over the samples of the last 60 s up to now, or None without any.

        ``minute`` of the result is the start of that sliding window.
        """
        now = self._clock()
        start = now - self._window
        return minute_of([s for s in self._samples if start < s.at <= now], start)

    async def close(self) -> None:
        """Close every node client; the collector may still be used afterwards."""
        async with self._lock:
            await self._forget_except({})

    async def _read(self, node: NodeHandle) -> NodeFigures | None:
        """The node's reading, or None (logged once per failure streak) when it fails."""
        try:
            client = self._client(node)
            reading = NodeFigures.from_stats(await client.stats())
        except (NodeError, KeyError, TypeError, ValueError) as error:
            if node.node_id not in self._failing:
                self._failing.add(node.node_id)
                log.warning(
                    "node %s (%s) left out of the statistics: %s", node.node_id, node.address, error
                )
            return None
        if node.node_id in self._failing:
            self._failing.discard(node.node_id)
            log.info("node %s (%s) answers STATS again", node.node_id, node.address)
        return reading

    def _client(self, node: NodeHandle) -> NodeClient:
        known = self._clients.get(node.node_id)
        if known is not None:
            return known[1]
        client = NodeClient.at(
            node.address,
            pool_size=1,
            timeout=self._timeout,
            connect_timeout=self._timeout,
            access=self._node_access,
        )
        self._clients[node.node_id] = (node.address, client)
        return client

    async def _forget_except(self, nodes: dict[str, NodeHandle]) -> None:
        """Close the clients of nodes not in ``nodes`` (or now at another address)."""
        stale = [
            node_id
            for node_id, (address, _) in self._clients.items()
            if node_id not in nodes or address != nodes[node_id].address
        ]
        closing = [self._clients.pop(node_id)[1] for node_id in stale]
        for node_id in list(self._readings):
            if node_id not in nodes:
                # A node that comes back later starts a new history.
                del self._readings[node_id]
                self._failing.discard(node_id)
        if closing:
            await asyncio.gather(*(client.close() for client in closing))
