"""The miss curve's sampling rate: chosen by the manager from the traffic and the keys."""

from __future__ import annotations

import pytest

from imagecache.sampling import is_sampled, sampling_threshold
from manager.curves import MissCurves
from manager.samplingrate import (
    MAX_SAMPLED_PER_SECOND,
    MIN_RATE,
    TARGET_SAMPLED_KEYS,
    next_rate,
)
from manager.settings import CacheSettings


@pytest.mark.parametrize(
    ("rate", "lookups_per_second", "distinct_sampled", "expected"),
    [
        # A quiet pool over few keys: every key, every lookup.
        (2**-7, 200, 30, 1.0),
        # Many keys: as many as the target wants, rounded up to a power of two
        # (500,000 keys: 1/50 wanted, 1/32 taken).
        (2**-7, 200, 500_000 // 128, 2**-5),
        # Enough keys sampled already: unchanged, never down for keys alone.
        (2**-3, 200, 2 * TARGET_SAMPLED_KEYS, 2**-3),
        # Busy: the budget caps the rate, with room to spare (25,000 lookups a
        # second afford 0.08, 0.053 with the margin: 1/32).
        (2**-7, 25_000, 30, 2**-5),
        # Over the budget by more than the margin: down at once, to what it affords.
        (1.0, 25_000, 3_000, 2**-4),
        # Over the budget, but within the margin: no change (no flip on noise).
        (2**-4, MAX_SAMPLED_PER_SECOND * 16 * 1.4, 100, 2**-4),
        # ... and not up either while the margin is not there.
        (2**-4, MAX_SAMPLED_PER_SECOND * 16 / 1.4, 100, 2**-4),
        # An idle window says nothing.
        (2**-7, 0, 0, 2**-7),
        # No key sampled in a busy window: up, within the budget.
        (2**-10, 1_000, 0, 1.0),
        # Never below the floor, whatever the traffic.
        (2**-7, 1e9, 0, MIN_RATE),
    ],
)
def test_the_rate_follows_the_keys_within_the_budget(
    rate: float, lookups_per_second: float, distinct_sampled: int, expected: float
) -> None:
    assert next_rate(rate, lookups_per_second, distinct_sampled) == expected


def sampled_keys(rate: float, count: int) -> list[str]:
    threshold = sampling_threshold(rate)
    keys = (f"key-{n}" for n in range(1_000_000))
    return [key for key in keys if is_sampled(key.encode(), threshold)][:count]


def test_a_window_chooses_the_next_rate_and_the_caches_start_over_cold() -> None:
    now = [0.0]
    curves = MissCurves(rate=2**-7, clock=lambda: now[0])
    curves.follow(CacheSettings(capacity_mb=1.0))
    keys = sampled_keys(2**-7, 20)
    curves.feed(200, [(key, 1_000) for key in keys * 10], rate=2**-7)
    now[0] = 60.0
    first = curves.close_window()
    assert (first.rate, first.warm) == (2**-7, False)  # the caches started with it
    # 20 distinct keys at 1/128: about 2,560 keys, at 200 lookups a minute: every key.
    assert curves.rate == 1.0
    # A post sampled at the old, lower rate cannot be made a 1-in-1 sample: left out.
    assert not curves.feed(100, [(keys[0], 1_000)], rate=2**-7)
    assert curves.feed(3, [("a", 1), ("b", 1), ("a", 1)], rate=1.0)
    now[0] = 120.0
    second = curves.close_window()
    assert (second.rate, second.warm, second.sampled_lookups, second.lookups) == (1.0, False, 3, 3)
    assert second.evidence is None  # cold caches: no evidence, however many samples
    now[0] = 180.0
    assert curves.close_window().warm  # a whole window at the new rate has passed


def test_a_post_sampled_at_a_higher_rate_is_cut_down_to_the_managers() -> None:
    curves = MissCurves(rate=2**-4)
    inside = sampled_keys(2**-4, 3)
    narrower = set(sampled_keys(2**-4, 400))
    outside = [key for key in sampled_keys(1.0, 400) if key not in narrower][:5]
    assert curves.feed(8, [(key, 1_000) for key in inside + outside], rate=1.0)
    assert curves.latest().sampled_lookups == 3
