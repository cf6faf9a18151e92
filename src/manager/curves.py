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

from imagecache.sampling import INITIAL_RATE, sample_bucket, sampling_threshold
from manager.misscurve import POOL_SIZES, MissCurve
from manager.samplingrate import TARGET_SAMPLED_KEYS, next_rate
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
    rate: float  # the share of keys sampled (manager.samplingrate)
    # The miniature caches ran through a whole window before this one: a
    # window of caches started over (at start, on a new policy or rate) counts
    # cold misses that the pool's warm nodes do not have.
    warm: bool

    @property
    def evidence(self) -> Sequence[float | None] | None:
        """The prediction, if its caches were warm and enough lookups were sampled
        to act on it (``trusted``)."""
        return trusted(self.predicted_miss, self.sampled_lookups) if self.warm else None


class MissCurves:
    """One running miss curve and its last ``kept`` complete windows."""

    def __init__(
        self,
        *,
        window_seconds: float = WINDOW_SECONDS,
        kept: int = WINDOWS_KEPT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rate: float = INITIAL_RATE,
    ) -> None:
        """``rate``: the share of keys sampled until the first window chooses
        one (manager.samplingrate); it then follows the traffic."""
        self.window_seconds = window_seconds
        self.windows: deque[CurveWindow] = deque(maxlen=kept)
        self._clock = clock
        self._wall_clock = wall_clock
        self._opened = clock()
        self._opened_at = wall_clock()
        self._rate = rate
        self._threshold = sampling_threshold(rate)
        self._settings = CacheSettings()
        self._curve = self._new_curve()
        self._warm = False  # see CurveWindow.warm
        # The distinct sampled keys of the window, counted up to what the
        # choice of the rate needs to know.
        self._distinct: set[str] = set()

    def _new_curve(self) -> MissCurve:
        return MissCurve(
            int(self._settings.capacity_mb * MIB), rate=self._rate, policy=self._settings.policy
        )

    @property
    def rate(self) -> float:
        """The share of keys the gateways are to sample (they learn it from the
        manager's answers to their posts)."""
        return self._rate

    def follow(self, settings: CacheSettings) -> None:
        """Simulate the pool as ``settings`` has it: a new policy starts the
        caches over, a new capacity resizes them."""
        if settings.policy != self._settings.policy:
            self._settings = settings
            self._start_over()
        elif settings.capacity_mb != self._settings.capacity_mb:
            self._settings = settings
            self._curve.set_node_capacity(int(settings.capacity_mb * MIB))

    def _start_over(self) -> None:
        self._curve = self._new_curve()
        self._warm = False

    def feed(
        self, lookups: int, samples: Sequence[tuple[str, int]], rate: float | None = None
    ) -> bool:
        """A gateway's post: ``lookups`` counted, ``samples`` (key, image bytes) of
        them, taken at ``rate`` (None: at this one). A sample taken at a higher
        rate is cut down to this one (its keys are a superset); one taken at a
        lower rate cannot be, and is left out whole (False): the gateway had
        not yet heard of the new rate."""
        if rate is not None and rate < self._rate:
            return False
        narrower = rate is not None and rate > self._rate
        self._curve.count_lookups(lookups)
        for key, size in samples:
            encoded = key.encode()
            if narrower and sample_bucket(encoded) >= self._threshold:
                continue
            self._curve.record(encoded, size)
            if len(self._distinct) < TARGET_SAMPLED_KEYS:
                self._distinct.add(key)
        return True

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
        self._warm = True
        rate = next_rate(
            self._rate, window.lookups / max(window.seconds, 1e-3), len(self._distinct)
        )
        self._distinct.clear()
        if rate != self._rate:
            self._rate, self._threshold = rate, sampling_threshold(rate)
            self._start_over()
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
            rate=self._rate,
            warm=self._warm,
            complete=complete,
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return POOL_SIZES
