"""The automatic resizing policy (shared/DESIGN.md, "Autoscaler semantics").

``decide`` is a pure function of the pool size, the last minute's figures,
the settings and the time since the last resize; the loop that calls it every
60 s lives in the manager's application. Every decision is recorded with its
inputs, whether it resizes or not.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from manager.metrics import MinuteStats
from manager.pool import PoolController
from manager.settings import MAX_NODES, MIN_NODES, CacheSettings, Mode

log = logging.getLogger(__name__)

DEFAULT_SETTLE_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class Decision:
    size: int  # the pool size now
    target: int  # the size to resize to (== size: no change)
    reason: str  # why, with the figures it looked at
    miss_rate: float | None

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
    """What the autoscaler does about a pool of ``size`` given the last minute."""
    if seconds_since_resize is not None and seconds_since_resize < settle_seconds:
        return Decision(
            size,
            size,
            f"settling: last resize {seconds_since_resize:.0f} s ago (< {settle_seconds:.0f} s)",
            None,
        )
    rate = minute.miss_rate if minute is not None else None
    if rate is None:
        return Decision(size, size, "no lookups in the last minute: no evidence", None)
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
        target = max(MIN_NODES, min(size - 1, math.floor(size * settings.shrink_ratio)))
        if target == size:
            return Decision(
                size, size, f"miss rate {rate:.1%} below min, already {MIN_NODES} node", rate
            )
        return Decision(
            size,
            target,
            f"miss rate {rate:.1%} < minMiss {settings.min_miss:.1%}: "
            f"shrink x{settings.shrink_ratio:g}",
            rate,
        )
    return Decision(
        size,
        size,
        f"miss rate {rate:.1%} within [{settings.min_miss:.1%}, {settings.max_miss:.1%}]",
        rate,
    )


class Autoscaler:
    """Calls ``decide`` on the pool in auto mode and carries out its resizes."""

    def __init__(
        self,
        controller: PoolController,
        last_minute: Callable[[], MinuteStats | None],
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._controller = controller
        self._last_minute = last_minute
        self._settle_seconds = settle_seconds
        self._clock = clock
        self.decisions: deque[tuple[datetime, Decision]] = deque(maxlen=200)

    async def tick(self) -> Decision | None:
        """One judgement (None in manual mode); settings are re-read every time."""
        settings = await self._controller.settings()
        if settings.mode is not Mode.AUTO:
            return None
        last = self._controller.last_resize
        decision = decide(
            self._controller.size,
            self._last_minute(),
            settings,
            None if last is None else self._clock() - last,
            self._settle_seconds,
        )
        self.decisions.appendleft((datetime.now(UTC), decision))
        log.info("autoscaler: %s -> %s (%s)", decision.size, decision.target, decision.reason)
        if decision.resizes:
            await self._controller.resize(
                decision.target, f"autoscaler: {decision.reason}", decision.miss_rate
            )
        return decision
