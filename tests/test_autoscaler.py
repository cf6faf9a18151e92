"""The autoscaler's decision function and the settings it reads, as pure functions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from manager.autoscaler import decide, decide_predictive
from manager.metrics import MinuteStats
from manager.settings import CacheSettings, Mode, SettingsError, apply_params

SETTINGS = CacheSettings(
    mode=Mode.AUTO, max_miss=0.5, min_miss=0.2, exp_ratio=2.0, shrink_ratio=0.5
)
MINUTE = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def minute(lookups: int, misses: int) -> MinuteStats:
    return MinuteStats(MINUTE, 8, lookups, lookups - misses, misses, lookups, 0, 0)


@pytest.mark.parametrize(
    ("size", "lookups", "misses", "settings", "since", "target"),
    [
        # growth: ceil(n * expRatio), clamped to 8
        (1, 100, 90, replace(SETTINGS, exp_ratio=1.5), None, 2),  # not ceil(1.5)=2 -> 2, never 1
        (2, 100, 90, replace(SETTINGS, exp_ratio=1.5), None, 3),
        (3, 100, 90, SETTINGS, None, 6),
        (5, 100, 90, SETTINGS, None, 8),
        (8, 100, 90, SETTINGS, None, 8),
        (1, 100, 90, replace(SETTINGS, exp_ratio=1.01), None, 2),  # always at least one more
        # shrinking: floor(n * shrinkRatio), clamped to 1
        (4, 100, 10, SETTINGS, None, 2),  # a ratio of 0.5 halves
        (8, 100, 10, SETTINGS, None, 4),
        (3, 100, 10, SETTINGS, None, 1),
        (1, 100, 10, SETTINGS, None, 1),
        (4, 100, 10, replace(SETTINGS, shrink_ratio=0.9), None, 3),  # always at least one fewer
        # thresholds are strict: equality does nothing
        (2, 100, 50, SETTINGS, None, 2),
        (2, 100, 20, SETTINGS, None, 2),
        (2, 100, 35, SETTINGS, None, 2),
        # no lookups: no evidence
        (2, 0, 0, SETTINGS, None, 2),
        # settle period after a resize
        (2, 100, 90, SETTINGS, 60.0, 2),
        (2, 100, 90, SETTINGS, 119.0, 2),
        (2, 100, 90, SETTINGS, 120.0, 4),
    ],
)
def test_decide(
    size: int,
    lookups: int,
    misses: int,
    settings: CacheSettings,
    since: float | None,
    target: int,
) -> None:
    decision = decide(size, minute(lookups, misses), settings, since, settle_seconds=120)
    assert decision.target == target
    assert decision.resizes == (target != size)
    assert decision.reason


def test_no_minute_at_all_is_no_evidence() -> None:
    decision = decide(3, None, SETTINGS, None)
    assert decision.target == 3
    assert "no lookups" in decision.reason


def test_the_reason_gives_the_miss_rate() -> None:
    decision = decide(2, minute(200, 150), SETTINGS, None)
    assert decision.miss_rate == pytest.approx(0.75)
    assert "75.0%" in decision.reason


@pytest.mark.parametrize(
    ("lookups", "misses", "since", "expected"),
    [
        (1234, 900, None, 1234),  # a grow: the lookups its miss rate was measured over
        (1234, 300, None, 1234),  # within the band: judged all the same
        (40, 40, None, 40),  # too few to be evidence, but what was judged
        (0, 0, None, None),  # no lookups: no miss rate
        (1234, 900, 30.0, None),  # settling: nothing judged
    ],
)
def test_a_decision_carries_the_lookups_behind_its_rate(
    lookups: int, misses: int, since: float | None, expected: int | None
) -> None:
    decision = decide(2, minute(lookups, misses), SETTINGS, since, settle_seconds=120)
    assert decision.lookups == expected
    assert (decision.miss_rate is None) == (expected is None)


@pytest.mark.parametrize(
    ("curve", "target"),
    [((0.9, 0.45, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1), 2), (None, 2)],  # None: the ratio rule
)
def test_a_predictive_decision_carries_the_lookups_too(
    curve: tuple[float, ...] | None, target: int
) -> None:
    settings = replace(SETTINGS, scaling="predictive")
    decision = decide_predictive(1, minute(1234, 900), curve, settings, None)
    assert (decision.target, decision.lookups) == (target, 1234)


def test_api_parameters_map_onto_settings() -> None:
    settings = apply_params(
        CacheSettings(),
        {
            "mode": "auto",
            "cacheSize": "3",
            "policy": "RR",
            "expRatio": "1.5",
            "shrinkRatio": "0.25",
            "maxMiss": "0.6",
            "minMiss": "0.05",
        },
    )
    assert settings == CacheSettings(3.0, "random", Mode.AUTO, 0.6, 0.05, 1.5, 0.25)
    assert apply_params(settings, {"policy": "lru"}).policy == "lru"
    assert apply_params(settings, {}) == settings


@pytest.mark.parametrize(
    "params",
    [
        {"policy": "FIFO"},
        {"mode": "sometimes"},
        {"cacheSize": "-1"},
        {"cacheSize": "lots"},
        {"cacheSize": "nan"},
        {"maxMiss": "1.5"},
        {"minMiss": "0.9", "maxMiss": "0.5"},
        {"expRatio": "0.5"},
        {"shrinkRatio": "1"},
    ],
)
def test_bad_settings_are_refused_whole(params: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        apply_params(CacheSettings(), params)


def test_stored_settings_round_trip_and_ignore_junk() -> None:
    settings = CacheSettings(12.5, "random", Mode.AUTO, 0.7, 0.1, 3.0, 0.25)
    assert CacheSettings.from_strings(settings.to_strings()) == settings
    assert CacheSettings.from_strings({"capacity_mb": "junk", "unknown": "1"}) == CacheSettings()
