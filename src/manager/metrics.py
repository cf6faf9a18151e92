"""Pool statistics: 5-second samples and the per-minute figures derived from them.

The collector turns each node's lifetime counters into per-interval deltas
(a restarted node's counters start again from zero), sums them over the pool
and stores one ``PoolSample`` every 5 s in a ``MetricsStore``. Rates are
always computed from deltas within the window asked for, never from lifetime
totals; a window without lookups has no miss or hit rate (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PoolSample:
    """The pool over one collection interval ending at ``at``."""

    at: datetime  # timezone-aware UTC
    workers: int  # nodes that answered STATS
    lookups: int  # deltas over the interval, summed over the nodes
    hits: int
    misses: int
    requests: int  # lookups + sets + deletes
    items: int  # gauges at ``at``, summed over the nodes
    bytes: int
    # Reads no pool size can fix, counted apart from lookups and misses: keys
    # with no image, and images over the nodes' maximum item size.
    missing: int = 0
    uncacheable: int = 0


@dataclass(frozen=True, slots=True)
class MinuteStats:
    """One minute of the pool, as the statistics page and the autoscaler see it."""

    minute: datetime  # start of the minute, aware UTC
    workers: int  # nodes at the end of the minute (last sample)
    lookups: int
    hits: int
    misses: int
    requests: int
    items: int  # last sample of the minute
    bytes: int
    missing: int = 0  # not in lookups or misses: reads of keys with no image
    uncacheable: int = 0  # not in lookups or misses: reads of images too large to cache

    @property
    def miss_rate(self) -> float | None:
        return self.misses / self.lookups if self.lookups else None

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None

    @property
    def items_mb(self) -> float:
        return self.bytes / (1 << 20)


def minute_of(samples: Sequence[PoolSample], minute: datetime) -> MinuteStats | None:
    """The figures of ``minute`` from the samples that fall in it; None without samples."""
    if not samples:
        return None
    last = max(samples, key=lambda s: s.at)
    return MinuteStats(
        minute=minute,
        workers=last.workers,
        lookups=sum(s.lookups for s in samples),
        hits=sum(s.hits for s in samples),
        misses=sum(s.misses for s in samples),
        requests=sum(s.requests for s in samples),
        items=last.items,
        bytes=last.bytes,
        missing=sum(s.missing for s in samples),
        uncacheable=sum(s.uncacheable for s in samples),
    )


class MetricsStore(Protocol):
    """Where samples go: a SQLite table (embedded) or CloudWatch custom metrics (aws)."""

    async def put(self, sample: PoolSample) -> None:
        """Record one sample (CloudWatch: buffered and sent in batches)."""
        ...

    async def minutes(self, start: datetime, end: datetime) -> list[MinuteStats]:
        """One entry per minute in [start, end) that has data, oldest first."""
        ...

    async def close(self) -> None: ...
