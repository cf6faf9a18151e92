"""The automatic resizing policy (docs/design.md, "Autoscaler evidence").

``decide`` is a pure function of the pool size, the last minute's figures,
the settings and the time since the last resize; the loop that calls it every
60 s lives in the manager's application. Every decision is recorded with its
inputs, whether it resizes or not.

It acts only on evidence (docs/design.md, "Autoscaler evidence"): a minute
with fewer than ``minLookups`` lookups resizes nothing; a shrink needs the
smaller pool to hold the bytes in use and must have been recommended for the
whole stabilization window, while growth is immediate; a resize that failed
is tried again only after a back-off that doubles with each failure.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from imagecache.errors import ImagecacheError
from manager.backends.base import PoolError
from manager.metrics import MinuteStats
from manager.pool import PoolController
from manager.settings import MAX_NODES, MIN_NODES, CacheSettings, Mode

log = logging.getLogger(__name__)

DEFAULT_SETTLE_SECONDS = 120.0
# A shrink happens only if it was recommended by each of the last this many
# judgements (the highest size recommended over them wins, as the Kubernetes
# HPA's scale-down stabilization window does): 5 minutes at the default
# period of 60 s. A working set near a size boundary then no longer flips the
# pool every few minutes. Counted in judgements, not seconds, so that a
# shorter period (tests, bench) shortens it alike.
STABILIZATION_JUDGEMENTS = 5
# A failed resize is tried again after 2 minutes, then 4, 8, ... at most 32.
RETRY_FIRST_SECONDS = 120.0
RETRY_MAX_SECONDS = 32 * 60.0
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class Decision:
    size: int  # the pool size now
    target: int  # the size to resize to (== size: no change)
    reason: str  # why, with the figures it looked at
    miss_rate: float | None
    # The lookups ``miss_rate`` was measured over (None with no miss rate).
    lookups: int | None = None

    @property
    def resizes(self) -> bool:
        return self.target != self.size


def decide(
    size: int,
    minute: MinuteStats | None,
    settings: CacheSettings,
    seconds_since_resize: float | None,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
) -> Decision:
    """What the autoscaler recommends for a pool of ``size`` given the last minute.

    A shrink is not stabilized here (``stabilized`` does that over the last
    judgements), but it never goes below the nodes that hold the bytes in use.
    A decision with a miss rate carries the lookups it was measured over.
    """
    judged = _judge(size, minute, settings, seconds_since_resize, settle_seconds)
    if minute is not None and judged.miss_rate is not None:
        return replace(judged, lookups=minute.lookups)
    return judged


def _judge(
    size: int,
    minute: MinuteStats | None,
    settings: CacheSettings,
    seconds_since_resize: float | None,
    settle_seconds: float,
) -> Decision:
    """``decide`` without the lookups."""
    if seconds_since_resize is not None and seconds_since_resize < settle_seconds:
        return Decision(
            size,
            size,
            f"settling: last resize {seconds_since_resize:.0f} s ago (< {settle_seconds:.0f} s)",
            None,
        )
    rate = minute.miss_rate if minute is not None else None
    if minute is None or rate is None:
        return Decision(size, size, "no lookups in the last minute: no evidence", None)
    if minute.lookups < settings.min_lookups:
        return Decision(
            size,
            size,
            f"{minute.lookups} lookups in the last minute (< minLookups "
            f"{settings.min_lookups}): no evidence",
            rate,
        )
    if rate > settings.max_miss:
        target = min(MAX_NODES, max(size + 1, math.ceil(size * settings.exp_ratio)))
        if target == size:
            return Decision(
                size, size, f"miss rate {rate:.1%} above max, already {MAX_NODES} nodes", rate
            )
        return Decision(
            size,
            target,
            f"miss rate {rate:.1%} > maxMiss {settings.max_miss:.1%}: grow x{settings.exp_ratio:g}",
            rate,
        )
    if rate < settings.min_miss:
        return _shrink(size, minute, settings, rate)
    return Decision(
        size,
        size,
        f"miss rate {rate:.1%} within [{settings.min_miss:.1%}, {settings.max_miss:.1%}]",
        rate,
    )


def _shrink(size: int, minute: MinuteStats, settings: CacheSettings, rate: float) -> Decision:
    """The shrink a low miss rate asks for, to no fewer nodes than hold the bytes in use."""
    target = max(MIN_NODES, min(size - 1, math.floor(size * settings.shrink_ratio)))
    if target == size:
        return Decision(
            size, size, f"miss rate {rate:.1%} below min, already {MIN_NODES} node", rate
        )
    if minute.workers < size:
        # The bytes of the nodes that did not answer are unknown.
        return Decision(
            size,
            size,
            f"miss rate {rate:.1%} below min, but only {minute.workers} of {size} nodes "
            "reported their bytes in use: no shrink",
            rate,
        )
    capacity = settings.capacity_mb * MIB
    needed = max(MIN_NODES, math.ceil(minute.bytes / capacity))
    if needed >= size:
        return Decision(
            size,
            size,
            f"miss rate {rate:.1%} below min, but {minute.bytes / MIB:.1f} MB in use "
            f"need all {size} nodes of {settings.capacity_mb:g} MB: no shrink",
            rate,
        )
    reason = (
        f"miss rate {rate:.1%} < minMiss {settings.min_miss:.1%}: shrink x{settings.shrink_ratio:g}"
    )
    if needed > target:
        reason += f", to {needed} nodes, which hold the {minute.bytes / MIB:.1f} MB in use"
    return Decision(size, max(target, needed), reason, rate)


def decide_predictive(
    size: int,
    minute: MinuteStats | None,
    curve: Sequence[float | None] | None,
    settings: CacheSettings,
    seconds_since_resize: float | None,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
) -> Decision:
    """Predictive scaling: at once to the smallest pool whose predicted miss rate
    (``curve``, for pools of 1..8 nodes) is at most maxMiss, all 8 when none is;
    never below the nodes that hold the bytes in use. The evidence rules of
    ``decide`` apply unchanged: it answers whenever it would not resize. Without
    a curve (None, or no size known), ``decide``'s ratio rule answers."""
    judged = decide(size, minute, settings, seconds_since_resize, settle_seconds)
    if minute is None or judged.miss_rate is None or "no evidence" in judged.reason:
        return judged
    if judged.reason.startswith("settling"):
        return judged
    known = [(n, p) for n, p in enumerate(curve or (), start=MIN_NODES) if p is not None]
    if not known:
        # A curve too thin to trust (curves.trusted) or none yet: the ratio rule decides.
        return replace(judged, reason=f"no trusted miss curve, by the ratio rule: {judged.reason}")
    fitting = [n for n, predicted in known if predicted <= settings.max_miss]
    target = min(fitting) if fitting else MAX_NODES
    if judged.miss_rate > settings.max_miss and target <= size:
        # The measured rate is the truth at this size: a curve that calls it
        # good enough is wrong here (a thin or shifted sample), and trusting it
        # would keep the pool below demand for good. The ratio rule grows.
        here = dict(known).get(size)
        said_here = "nothing" if here is None else f"{here:.1%}"
        return replace(
            judged,
            reason=f"the curve predicts {said_here} at {size} nodes but "
            f"{judged.miss_rate:.1%} was measured: by the ratio rule: {judged.reason}",
        )
    capacity = settings.capacity_mb * MIB
    if target < size:
        if minute.workers < size:
            return replace(
                judged, target=size, reason="the nodes' bytes in use are not all known: no shrink"
            )
        target = max(target, MIN_NODES, math.ceil(minute.bytes / capacity))
        target = min(target, size)
    predicted = dict(known).get(target)
    said = "unknown" if predicted is None else f"{predicted:.1%}"
    reason = (
        f"predicted miss rate at {target} nodes {said} (maxMiss {settings.max_miss:.1%}); "
        f"measured {judged.miss_rate:.1%} at {size}"
    )
    return replace(judged, target=target, reason=reason)


def stabilized(decision: Decision, recent_targets: Sequence[int]) -> Decision:
    """``decision`` with a shrink held back to the highest size recommended by
    ``recent_targets`` (the judgements before it in the stabilization window);
    growth and staying put go through unchanged."""
    if decision.target >= decision.size or not recent_targets:
        return decision
    highest = max(recent_targets)
    if highest <= decision.target:
        return decision
    target = min(decision.size, highest)
    return replace(
        decision,
        target=target,
        reason=f"{decision.reason}; held at {target} nodes: a larger pool was recommended "
        f"within the last {STABILIZATION_JUDGEMENTS} judgements",
    )


class Autoscaler:
    """Calls ``decide`` on the pool in auto mode and carries out its resizes."""

    def __init__(
        self,
        controller: PoolController,
        last_minute: Callable[[], MinuteStats | None],
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        last_curve: Callable[[], Sequence[float | None] | None] = lambda: None,
    ) -> None:
        """``last_curve``: the predicted miss rate of pools of 1..8 nodes over the
        last minute, for predictive scaling (None: not known)."""
        self._controller = controller
        self._last_minute = last_minute
        self._last_curve = last_curve
        self._settle_seconds = settle_seconds
        self._clock = clock
        self.decisions: deque[tuple[datetime, Decision]] = deque(maxlen=200)
        # The sizes ``decide`` recommended at the last judgements, newest last.
        self._recommended: deque[int] = deque(maxlen=STABILIZATION_JUDGEMENTS - 1)
        self._failures = 0  # resizes that failed in a row
        self._retry_at: float | None = None  # on the clock: no resize before then

    async def tick(self) -> Decision | None:
        """One judgement (None in manual mode); settings are re-read every time."""
        settings = await self._controller.settings()
        if settings.mode is not Mode.AUTO:
            self._recommended.clear()
            return None
        last = self._controller.last_resize
        since = None if last is None else self._clock() - last
        if settings.scaling == "predictive":
            recommended = decide_predictive(
                self._controller.size,
                self._last_minute(),
                self._last_curve(),
                settings,
                since,
                self._settle_seconds,
            )
        else:
            recommended = decide(
                self._controller.size, self._last_minute(), settings, since, self._settle_seconds
            )
        decision = stabilized(recommended, self._recommended)
        self._recommended.append(recommended.target)
        now = self._clock()
        if decision.resizes and self._retry_at is not None and now < self._retry_at:
            decision = replace(
                decision,
                target=decision.size,
                reason=f"{decision.reason}; backing off after {self._failures} failed "
                f"resize(s): next try in {self._retry_at - now:.0f} s",
            )
        self.decisions.appendleft((datetime.now(UTC), decision))
        log.info("autoscaler: %s -> %s (%s)", decision.size, decision.target, decision.reason)
        if decision.resizes:
            await self._resize(decision, now)
        return decision

    async def _resize(self, decision: Decision, now: float) -> None:
        """Carry out ``decision``; a failure is logged once and backs off, doubling."""
        try:
            await self._controller.resize(
                decision.target,
                f"autoscaler: {decision.reason}",
                decision.miss_rate,
                decision.lookups,
            )
        except (PoolError, ImagecacheError, ValueError) as error:
            self._failures += 1
            pause = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self._failures - 1))
            self._retry_at = now + pause
            log.warning(
                "autoscaler: resize %d -> %d failed (attempt %d), next try in %.0f s: %s",
                decision.size,
                decision.target,
                self._failures,
                pause,
                error,
            )
            return
        self._failures = 0
        self._retry_at = None
