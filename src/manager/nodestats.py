"""Reading a cache node's STATS for the manager: its pages, its metrics and its statistics.

``read_stats`` asks one node once, within a time limit of the caller's (the
page and a Prometheus scrape must not be held up by a node that does not
answer); ``NodeFigures`` are its figures, as the collector and the scrape
read them, and ``node_health`` is the Memory Configuration page's view of each node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachenode.client import NodeAccess, NodeClient
from cachenode.errors import NodeError
from manager.backends.base import NodeHandle

# How long the Memory Configuration page waits for a node's STATS: a node
# that is slower than this is shown as not answering, and the page is not held up.
HEALTH_TIMEOUT_SECONDS = 0.5


async def read_stats(node: NodeHandle, access: NodeAccess, seconds: float) -> dict[str, Any]:
    """The node's STATS, connecting included, within ``seconds`` in all.

    Raises NodeError, TimeoutError or OSError when they do not come, and
    AddressError (a ValueError) for a node without a ``host:port`` address.
    """
    async with asyncio.timeout(seconds):
        async with NodeClient.at(
            node.address, pool_size=1, timeout=seconds, connect_timeout=seconds, access=access
        ) as client:
            return await client.stats()


def uptime_of(stats: Mapping[str, Any]) -> float | None:
    """The seconds the node has run, from its STATS; None from a node that does not say."""
    uptime = stats.get("uptime")
    return float(uptime) if isinstance(uptime, int | float) else None


# The figures every node's STATS carries, as integers, under the same names.
_COUNTED = (
    "lookups",
    "hits",
    "misses",
    "sets",
    "deletes",
    "items",
    "bytes",
    "capacity",
    "evictions",
)


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """One node's STATS: lifetime counters and gauges, as the collector and the
    Prometheus scrape read them."""

    lookups: int
    hits: int
    misses: int  # the misses a bigger pool may fix (the node moves the others out)
    sets: int
    deletes: int
    items: int
    bytes: int
    capacity: int
    evictions: int
    uptime: float | None
    missing: int = 0  # 0 from a node that does not count them apart
    uncacheable: int = 0

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> NodeFigures:
        """Raises KeyError, TypeError or ValueError for a STATS reply without the figures."""
        return cls(
            **{name: int(stats[name]) for name in _COUNTED},
            uptime=uptime_of(stats),
            missing=int(stats.get("missing_lookups", 0)),
            uncacheable=int(stats.get("uncacheable_lookups", 0)),
        )

    @property
    def unfixable(self) -> int:
        """Misses moved out of lookups and misses: no pool size could fix them."""
        return self.missing + self.uncacheable

    def restarted_since(self, before: NodeFigures) -> bool:
        """Whether the node was restarted between ``before`` and these figures."""
        if self.uptime is not None and before.uptime is not None and self.uptime < before.uptime:
            return True
        # Lifetime counters only grow while the node lives. Lookups and misses
        # shrink when a miss is moved out of them (UNCACHEABLE), so they count
        # with the misses moved.
        return (
            self.lookups + self.unfixable < before.lookups + before.unfixable
            or self.hits < before.hits
            or self.misses + self.unfixable < before.misses + before.unfixable
            or self.missing < before.missing
            or self.uncacheable < before.uncacheable
            or self.sets < before.sets
            or self.deletes < before.deletes
        )


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One node as its STATS showed it just now (``answers`` False: no figures)."""

    answers: bool
    items: int = 0
    megabytes: float = 0.0
    hit_rate: float | None = None  # over the node's lifetime; None before any lookup
    uptime_seconds: float | None = None

    @property
    def uptime(self) -> str:
        """The uptime as a person reads it: 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
        if self.uptime_seconds is None:
            return "\N{EN DASH}"
        seconds = int(self.uptime_seconds)
        if seconds < 60:
            return f"{seconds} s"
        if seconds < 3600:
            return f"{seconds // 60} min"
        if seconds < 86400:
            return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


async def node_health(nodes: Sequence[NodeHandle], access: NodeAccess) -> dict[str, NodeHealth]:
    """Every node's STATS, read concurrently, each within HEALTH_TIMEOUT_SECONDS."""
    answers = await asyncio.gather(*(_health_of(node, access) for node in nodes))
    return {node.node_id: health for node, health in zip(nodes, answers, strict=True)}


async def _health_of(node: NodeHandle, access: NodeAccess) -> NodeHealth:
    try:
        stats = await read_stats(node, access, HEALTH_TIMEOUT_SECONDS)
        lookups, hits = int(stats["lookups"]), int(stats["hits"])
        return NodeHealth(
            answers=True,
            items=int(stats["items"]),
            megabytes=int(stats["bytes"]) / (1 << 20),
            hit_rate=hits / lookups if lookups else None,
            uptime_seconds=uptime_of(stats),
        )
    except (NodeError, OSError, TimeoutError, KeyError, TypeError, ValueError):
        # Not logged: the page asks every few seconds, and the collector
        # already logs a node that stops answering (once per failure streak).
        return NodeHealth(answers=False)
