"""Replaying recorded minutes under other parameters and policies (src/manager/whatif.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from manager.autoscaler import decide_predictive
from manager.metrics import MinuteStats
from manager.settings import CacheSettings, Mode
from manager.whatif import RecordedMinute, replay

START = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
# The miss rate pools of 1..8 nodes would have on this workload.
CURVE = (0.9, 0.7, 0.5, 0.35, 0.25, 0.2, 0.18, 0.17)
SETTINGS = CacheSettings(
    capacity_mb=64, mode=Mode.AUTO, max_miss=0.3, min_miss=0.1, exp_ratio=2, shrink_ratio=0.5
)


def steady_run(
    minutes: int, *, size: int = 1, lookups: int = 1000, mb: int = 10
) -> list[RecordedMinute]:
    recorded = []
    for n in range(minutes):
        misses = round(lookups * CURVE[size - 1])
        stats = MinuteStats(
            minute=START + timedelta(minutes=n),
            workers=size,
            lookups=lookups,
            hits=lookups - misses,
            misses=misses,
            requests=lookups,
            items=100,
            bytes=mb << 20,
        )
        recorded.append(RecordedMinute(stats, CURVE))
    return recorded


def test_the_ratio_rule_climbs_in_steps_and_the_predictive_one_jumps() -> None:
    recorded = steady_run(15)
    ratio = replay(recorded, SETTINGS, policy="ratio")
    predictive = replay(recorded, SETTINGS, policy="predictive")
    assert [m.size for m in ratio.minutes[:8]] == [1, 2, 2, 4, 4, 8, 8, 8]
    assert ratio.resizes == 3
    assert [m.size for m in predictive.minutes[:3]] == [1, 5, 5]  # 0.25 <= maxMiss 0.3
    assert predictive.resizes == 1
    assert predictive.node_minutes < ratio.node_minutes
    assert predictive.minutes[-1].miss_rate == pytest.approx(0.25)
    assert ratio.minutes[-1].miss_rate == pytest.approx(0.17)


def test_a_steady_workload_does_not_flap_under_either_policy() -> None:
    recorded = steady_run(40, size=8)
    for policy in ("ratio", "predictive"):
        sizes = [m.size for m in replay(recorded, SETTINGS, policy=policy).minutes]
        settled = sizes[10:]
        assert len(set(settled)) == 1, (policy, sizes)


def test_minutes_without_evidence_resize_nothing() -> None:
    quiet = [
        replace(m, stats=replace(m.stats, lookups=40, misses=36, hits=4)) for m in steady_run(10)
    ]
    for policy in ("ratio", "predictive"):
        run = replay(quiet, SETTINGS, policy=policy)
        assert run.resizes == 0
        assert "no evidence" in run.minutes[0].decision


def test_the_predictive_jump_down_keeps_the_bytes_in_use() -> None:
    (minute,) = steady_run(1, size=8, mb=300)  # 300 MB need 5 nodes of 64 MB
    generous = replace(SETTINGS, max_miss=0.95)  # the curve alone would allow 1 node
    decision = decide_predictive(8, minute.stats, minute.curve, generous, None)
    assert decision.target == 5


def test_a_size_the_curve_does_not_cover_is_no_evidence() -> None:
    unknown = [replace(m, curve=None) for m in steady_run(6, size=2)]
    ratio = replay(unknown, SETTINGS, policy="ratio")
    # The first minute is at the recorded size: its own miss rate is known (0.7 > 0.3).
    assert ratio.minutes[1].size == 4
    assert ratio.minutes[1].miss_rate is None  # never seen at 4 nodes
    assert "the miss rate at 4 nodes is unknown" in ratio.minutes[1].decision
    assert ratio.resizes == 1
    with pytest.raises(ValueError, match="policy"):
        replay(unknown, SETTINGS, policy="magic")


def with_curve(recorded: list[RecordedMinute], curve: tuple[float, ...]) -> list[RecordedMinute]:
    """The minutes as a pool of their size would have seen them under ``curve``."""
    changed = []
    for minute in recorded:
        stats = minute.stats
        misses = round(stats.lookups * curve[stats.workers - 1])
        stats = replace(stats, misses=misses, hits=stats.lookups - misses)
        changed.append(RecordedMinute(stats, curve))
    return changed


def test_a_shrink_waits_until_the_whole_window_recommended_it() -> None:
    busy = (0.9, 0.7, 0.5, 0.35, 0.3, 0.25, 0.22, 0.2)  # 8 nodes: within [0.1, 0.3]
    quiet = (0.6, 0.2, 0.12, 0.08, 0.07, 0.06, 0.05, 0.05)  # 8 nodes: below minMiss
    recorded = with_curve(steady_run(5, size=8), busy) + with_curve(steady_run(10, size=8), quiet)
    sizes = [m.size for m in replay(recorded, SETTINGS, policy="ratio").minutes]
    # Shrinks are recommended from minute 5 on; the window of 5 judgements holds
    # the pool at 8 until minute 9's judgement, so it has 4 nodes from minute 10.
    assert sizes == [8] * 10 + [4] * 5


def test_no_judgement_while_a_resize_settles_under_either_policy() -> None:
    light = (0.5, 0.28, 0.2, 0.15, 0.1, 0.09, 0.08, 0.08)  # 2 nodes suffice
    heavy = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # only 8 nodes do
    recorded = with_curve(steady_run(1, size=1), light) + with_curve(steady_run(6, size=1), heavy)
    sizes = [m.size for m in replay(recorded, SETTINGS, policy="predictive").minutes]
    # Resized to 2 at minute 0's judgement; minute 1 settles (60 s < 120 s); minute 2 jumps.
    assert sizes[:4] == [1, 2, 2, 8]
