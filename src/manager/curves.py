"""The pool's miss-rate curve: what 1..8 nodes would miss, minute by minute.

Gateways post samples of their lookups (imagecache.keysamples) to the
internal API; ``MissCurves`` feeds them to one ``MissCurve`` that runs the
pool's current policy at its current node capacity, and closes a window of
counts every minute, keeping the last hour's predictions. The manager closes
windows on wall-clock boundaries (manager.app, ``curve_window_loop``), so a
60-second window is one minute of the statistics, and saves each one
(manager.curve_records) for what-if to replay. The miniature
caches stay warm across windows; a change of policy (or of the gateways'
sampling rate) starts them over, a change of capacity shrinks or grows them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from imagecache.keysamples import SAMPLING_RATE
from manager.misscurve import POOL_SIZES, MissCurve
from manager.settings import CacheSettings

MIB = 1 << 20
WINDOW_SECONDS = 60.0
WINDOWS_KEPT = 60  # an hour of minutes
# A prediction from fewer sampled lookups is noise, not evidence: a miss
# ratio's standard error over n samples is up to 0.5 / sqrt(n), 0.05 at 100,
# the accuracy the curve is held to. Predictive scaling then falls back to the
# ratio rule (autoscaler.decide_predictive); the chart still draws the curve.
MIN_SAMPLED_LOOKUPS = 100


def trusted(
    predicted: Sequence[float | None], sampled_lookups: int
) -> Sequence[float | None] | None:
    """``predicted`` when it rests on at least MIN_SAMPLED_LOOKUPS sampled lookups, else None."""
    return predicted if sampled_lookups >= MIN_SAMPLED_LOOKUPS else None


@dataclass(frozen=True, slots=True)
class CurveWindow:
    """The prediction over one window of lookups."""

    predicted_miss: list[float | None]  # for POOL_SIZES; None: no sampled lookup
    capacity_mb: float  # per node, as simulated
    policy: str  # as simulated: "lru" or "random"
    started: datetime  # when the window opened, aware UTC
    seconds: float  # how long the window lasted (so far, for an open one)
    sampled_lookups: int
    lookups: int  # every lookup the gateways counted
    complete: bool

    @property
    def evidence(self) -> Sequence[float | None] | None:
        """The prediction, if enough lookups were sampled to act on it (``trusted``)."""
        return trusted(self.predicted_miss, self.sampled_lookups)


class MissCurves:
    """One running miss curve and its last ``kept`` complete windows."""

    def __init__(
        self,
        *,
        window_seconds: float = WINDOW_SECONDS,
        kept: int = WINDOWS_KEPT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.window_seconds = window_seconds
        self.windows: deque[CurveWindow] = deque(maxlen=kept)
        self._clock = clock
        self._wall_clock = wall_clock
        self._opened = clock()
        self._opened_at = wall_clock()
        self._rate = SAMPLING_RATE
        self._settings = CacheSettings()
        self._curve = self._new_curve()

    def _new_curve(self) -> MissCurve:
        return MissCurve(
            int(self._settings.capacity_mb * MIB), rate=self._rate, policy=self._settings.policy
        )

    def follow(self, settings: CacheSettings, rate: float | None = None) -> None:
        """Simulate the pool as ``settings`` has it, sampled at ``rate`` (None:
        as before): a new policy or rate starts the caches over, a new capacity
        resizes them."""
        rate = self._rate if rate is None else rate
        if settings.policy != self._settings.policy or rate != self._rate:
            self._settings, self._rate = settings, rate
            self._curve = self._new_curve()
        elif settings.capacity_mb != self._settings.capacity_mb:
            self._settings = settings
            self._curve.set_node_capacity(int(settings.capacity_mb * MIB))

    def feed(self, lookups: int, samples: Sequence[tuple[str, int]]) -> None:
        """A gateway's post: ``lookups`` counted, ``samples`` (key, image bytes) of them."""
        self._curve.count_lookups(lookups)
        for key, size in samples:
            self._curve.record(key.encode(), size)

    def close_window(self, boundary: datetime | None = None) -> CurveWindow:
        """End the current window (kept among ``windows``) and open the next.

        ``boundary``: the wall-clock moment the window was due to close. The
        window is recorded as ending there, and the next as starting there,
        so that a close that runs a little late shifts no window off the
        minute (default: now, as the monotonic clock measures the window).
        """
        window = self._current(complete=True)
        if boundary is not None:
            window = replace(window, seconds=(boundary - window.started).total_seconds())
        self.windows.append(window)
        self._curve.reset_counts()
        self._opened = self._clock()
        self._opened_at = self._wall_clock() if boundary is None else boundary
        return window

    def latest(self) -> CurveWindow:
        """The last complete window, or the open one while none is complete
        (the first minute after the manager starts): a partial prediction
        beats none, and ``complete`` says which it is."""
        if self.windows:
            return self.windows[-1]
        return self._current(complete=False)

    def _current(self, *, complete: bool) -> CurveWindow:
        curve = self._curve
        return CurveWindow(
            predicted_miss=curve.predicted(),
            capacity_mb=self._settings.capacity_mb,
            policy=self._settings.policy,
            started=self._opened_at,
            seconds=self._clock() - self._opened,
            sampled_lookups=curve.sampled_lookups,
            lookups=curve.lookups,
            complete=complete,
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return POOL_SIZES
