"""How much of the key stream the miss curve samples: one rate, set by the manager for all.

SHARDS' error shrinks with the number of distinct keys in the sample, not
with the share of the stream: 1 % of a stream over 200,000 keys (2,000 keys
sampled) predicted within 0.07, 1 % of a 3,700-key working set (37 keys) not
at all (bench/autoscale.py). So the manager aims at TARGET_SAMPLED_KEYS
distinct keys a window, as far as its budget of sampled lookups a second
allows (the simulation costs it about 1.3 µs a sampled lookup, a gateway a
list append and a share of a post), and tells the gateways the rate in its
answer to each of their posts (``manager.internal_api.key_samples``).

Rates are powers of two from MIN_RATE to 1 (the first is
imagecache.sampling.INITIAL_RATE), and a change needs a margin
(OVERSHOOT) either way, so noise in the traffic does not flip the rate: each
change starts the miniature caches over.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

MIN_RATE = 2.0**-10
# About 10,000 distinct keys keep SHARDS' error near 0.01-0.03 (Waldspurger et
# al., FAST'15, fixed-size SHARDS; bench/autoscale.py measured 0.04 at 10,000).
TARGET_SAMPLED_KEYS = 10_000
# Sampled lookups a second the manager simulates at most: about 3 ms of its CPU
# a second, and under a single gateway's MAX_SAMPLES_PER_POST (2,500 a second).
MAX_SAMPLED_PER_SECOND = 2_000
OVERSHOOT = 1.5


def next_rate(rate: float, lookups_per_second: float, distinct_sampled_keys: int) -> float:
    """The rate for the next window, after a window at ``rate`` that saw
    ``lookups_per_second`` (every lookup of the gateways) and
    ``distinct_sampled_keys``: down at once when the sampled lookups overrun
    the budget by OVERSHOOT, up when more keys are wanted and the budget
    allows it with OVERSHOOT to spare; otherwise unchanged."""
    if lookups_per_second <= 0:
        return rate  # an idle window says nothing of the traffic
    affordable = MAX_SAMPLED_PER_SECOND / lookups_per_second
    if rate > affordable * OVERSHOOT:
        return max(MIN_RATE, _power_of_two_at_most(affordable))
    keys = max(distinct_sampled_keys, 1) / rate  # the distinct keys the window referenced
    for_keys = _power_of_two_at_least(min(1.0, TARGET_SAMPLED_KEYS / keys))
    within_budget = _power_of_two_at_most(min(1.0, affordable / OVERSHOOT))
    better = max(MIN_RATE, min(for_keys, within_budget))
    return better if better > rate else rate


def _power_of_two_at_most(value: float) -> float:
    return float(2.0 ** math.floor(math.log2(value)))


def _power_of_two_at_least(value: float) -> float:
    return float(2.0 ** math.ceil(math.log2(value)))
