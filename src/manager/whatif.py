"""What-if: the recorded minutes replayed under other autoscaler parameters or policies.

Each recorded minute holds what the pool saw (its lookups, misses and bytes in
use, at the size it had) and, when the miss curve was known, the miss rate
every size 1..8 would have had that minute (``manager.misscurve``). A replay
walks the minutes with another configuration, one judgement a minute as the
autoscaler makes them (``autoscaler.decide`` and ``stabilized``, the very
functions it runs), and estimates each minute's miss rate at the size the
replay had then: from the curve, or, at the recorded size, the recorded rate
itself. It reports the sizes over time, the resizes and the node-minutes
beside what happened.

Two policies, the autoscaler's own: ``ratio`` (grow by expRatio above
maxMiss, shrink by shrinkRatio below minMiss) and ``predictive``
(``autoscaler.decide_predictive``: in one step to the smallest size whose
predicted miss rate is at most maxMiss).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from manager.autoscaler import STABILIZATION_JUDGEMENTS, decide, decide_predictive, stabilized
from manager.metrics import MinuteStats
from manager.settings import CacheSettings

POLICIES = ("ratio", "predictive")
MINUTE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class RecordedMinute:
    stats: MinuteStats  # what the pool saw, at the size it had (``stats.workers``)
    # Predicted miss rate of pools of 1..8 nodes over that minute; None where unknown.
    curve: tuple[float | None, ...] | None = None

    def miss_rate_at(self, size: int) -> float | None:
        """The minute's miss rate had the pool had ``size`` nodes, if known."""
        if self.curve is not None and 0 < size <= len(self.curve):
            predicted = self.curve[size - 1]
            if predicted is not None:
                return predicted
        return self.stats.miss_rate if size == self.stats.workers else None


@dataclass(frozen=True, slots=True)
class ReplayedMinute:
    at: datetime
    size: int  # the pool's size during the minute
    miss_rate: float | None  # estimated at that size (None: not known)
    decision: str  # the judgement at the minute's end


@dataclass(frozen=True, slots=True)
class Replay:
    minutes: tuple[ReplayedMinute, ...]

    @property
    def resizes(self) -> int:
        sizes = [minute.size for minute in self.minutes]
        return sum(1 for before, after in itertools.pairwise(sizes) if before != after)

    @property
    def node_minutes(self) -> int:
        return sum(minute.size for minute in self.minutes)

    @property
    def mean_miss_rate(self) -> float | None:
        known = [m.miss_rate for m in self.minutes if m.miss_rate is not None]
        return sum(known) / len(known) if known else None


def replay(
    recorded: Sequence[RecordedMinute],
    settings: CacheSettings,
    *,
    policy: str = "ratio",
    settle_seconds: float = 120.0,
) -> Replay:
    """The pool's sizes over ``recorded`` had it run with ``settings`` and ``policy``,
    starting at the size the first minute had."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if not recorded:
        return Replay(())
    size = recorded[0].stats.workers
    since_resize: float | None = None
    recent: deque[int] = deque(maxlen=STABILIZATION_JUDGEMENTS - 1)
    replayed = []
    for minute in recorded:
        if since_resize is not None:  # one judgement a minute, at the minute's end
            since_resize += MINUTE_SECONDS
        rate = minute.miss_rate_at(size)
        seen = _as_seen_at(minute, size, rate)
        if policy == "ratio":
            recommended = decide(size, seen, settings, since_resize, settle_seconds)
        else:
            recommended = decide_predictive(
                size, seen, minute.curve, settings, since_resize, settle_seconds
            )
        decision = stabilized(recommended, recent)
        recent.append(recommended.target)
        reason = decision.reason
        if rate is None and size != minute.stats.workers:  # lookups there were; no curve
            reason = f"no miss curve for the minute: the miss rate at {size} nodes is unknown"
        replayed.append(ReplayedMinute(minute.stats.minute, size, rate, reason))
        if decision.resizes:
            size, since_resize = decision.target, 0.0
    return Replay(tuple(replayed))


def _as_seen_at(minute: RecordedMinute, size: int, rate: float | None) -> MinuteStats:
    """The minute's figures as a pool of ``size`` would have reported them."""
    stats = minute.stats
    if size == stats.workers:
        return stats
    lookups = stats.lookups if rate is not None else 0
    misses = round(lookups * rate) if rate is not None else 0
    return replace(stats, workers=size, misses=misses, hits=lookups - misses, lookups=lookups)
