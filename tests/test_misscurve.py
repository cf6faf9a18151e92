"""The miniature simulations behind the predicted miss curve (src/manager/misscurve.py)."""

from __future__ import annotations

import itertools
import random

import pytest

from imagecache.sampling import is_sampled, sampling_threshold
from manager.misscurve import ITEM_OVERHEAD, POOL_SIZES, MiniatureCache, MissCurve

NODE = 100_000  # bytes of one node in these tests


def exact_lru_misses(trace: list[tuple[bytes, int]], capacity: int) -> int:
    """A plain list-based LRU with the node's accounting: the reference."""
    cached: list[tuple[bytes, int]] = []  # most recent last
    misses = 0
    for key, value_size in trace:
        size = len(key) + value_size + ITEM_OVERHEAD
        found = next((entry for entry in cached if entry[0] == key), None)
        if found is not None:
            cached.remove(found)
            cached.append(found)
            continue
        misses += 1
        if size > capacity:
            continue
        while sum(s for _, s in cached) + size > capacity:
            cached.pop(0)
        cached.append((key, size))
    return misses


def zipf_trace(
    keys: int, length: int, skew: float, seed: int, sizes: tuple[int, int]
) -> list[tuple[bytes, int]]:
    rng = random.Random(seed)
    weights = [1 / (rank**skew) for rank in range(1, keys + 1)]
    value_size = {n: rng.randint(*sizes) for n in range(keys)}
    picks = rng.choices(range(keys), weights=weights, k=length)
    return [(b"img%06d" % n, value_size[n]) for n in picks]


@pytest.mark.parametrize("seed", range(6))
def test_unsampled_lru_simulation_equals_an_exact_lru(seed: int) -> None:
    trace = zipf_trace(keys=60, length=1500, skew=0.8, seed=seed, sizes=(500, 30_000))
    curve = MissCurve(NODE, rate=1.0, policy="lru")
    for key, size in trace:
        curve.record(key, size)
    for nodes, counts in zip(POOL_SIZES, curve.counts, strict=True):
        assert counts.hits + counts.misses == len(trace)
        assert counts.misses == exact_lru_misses(trace, NODE * nodes), nodes


@pytest.mark.parametrize(("skew", "seed"), [(0.6, 7), (0.9, 7), (0.9, 8)])
def test_a_sample_predicts_the_whole_streams_miss_ratio_at_every_size(
    skew: float, seed: int
) -> None:
    """SHARDS: a tenth of the keys, caches a tenth the size, the same miss ratios."""
    trace = zipf_trace(keys=8000, length=60_000, skew=skew, seed=seed, sizes=(2_000, 20_000))
    whole = MissCurve(2_000_000, rate=1.0, policy="lru")
    sample = MissCurve(2_000_000, rate=0.1, policy="lru")
    for key, size in trace:
        whole.record(key, size)
        sample.count_lookups(1)
        if is_sampled(key, sample.threshold):
            sample.record(key, size)
    assert 0.05 < sample.sampled_lookups / len(trace) < 0.2
    for exact, predicted in zip(whole.predicted(), sample.predicted(), strict=True):
        assert exact is not None
        assert predicted is not None
        assert abs(exact - predicted) <= 0.05, (exact, predicted)


def test_random_eviction_keeps_within_capacity_and_a_fixed_seed_repeats() -> None:
    trace = zipf_trace(keys=300, length=5000, skew=0.7, seed=3, sizes=(1_000, 40_000))
    runs = []
    for _ in range(2):
        curve = MissCurve(NODE, rate=1.0, policy="random", seed=11)
        for key, size in trace:
            curve.record(key, size)
            for cache, nodes in zip(curve._caches, POOL_SIZES, strict=True):
                assert cache.used <= NODE * nodes
        runs.append(curve.predicted())
    assert runs[0] == runs[1]
    ratios = [ratio for ratio in runs[0] if ratio is not None]
    assert ratios[0] > ratios[-1]  # eight nodes miss less than one


def test_an_item_that_can_never_fit_is_always_a_miss_and_evicts_nothing() -> None:
    cache = MiniatureCache(10_000, "lru", random.Random(0))
    assert not cache.access(b"small", 1_000)
    assert not cache.access(b"huge", 20_000)
    assert not cache.access(b"huge", 20_000)
    assert cache.access(b"small", 1_000)
    assert len(cache) == 1


def test_sampling_depends_on_the_key_alone_and_takes_its_share() -> None:
    threshold = sampling_threshold(0.05)
    keys = [b"key-%d" % n for n in range(40_000)]
    taken = [key for key in keys if is_sampled(key, threshold)]
    assert 0.04 < len(taken) / len(keys) < 0.06
    assert all(is_sampled(key, threshold) for key in taken)  # every process agrees
    assert all(is_sampled(key, sampling_threshold(1.0)) for key in keys[:100])
    with pytest.raises(ValueError, match="sampling rate"):
        sampling_threshold(0)


def test_a_smaller_node_capacity_evicts_down_and_counts_start_anew() -> None:
    curve = MissCurve(NODE, rate=1.0)
    for key, size in itertools.islice(
        zipf_trace(keys=50, length=400, skew=0.5, seed=1, sizes=(5_000, 5_000)), 400
    ):
        curve.record(key, size)
    curve.set_node_capacity(NODE // 4)
    for cache, nodes in zip(curve._caches, POOL_SIZES, strict=True):
        assert cache.used <= NODE // 4 * nodes
    curve.reset_counts()
    assert curve.predicted() == [None] * len(POOL_SIZES)
    assert curve.sampled_lookups == 0


def test_lookups_counted_with_none_sampled_predict_nothing() -> None:
    # Lookups of keys outside the sample say nothing of any size's misses: a
    # prediction of 0% would send predictive scaling down to one node.
    curve = MissCurve(NODE, rate=0.01)
    curve.count_lookups(400)
    assert curve.predicted() == [None] * len(POOL_SIZES)
    curve.record(b"a sampled key", 1_000)
    assert curve.predicted()[0] == pytest.approx(1 / 4)  # 1 miss of 4 expected samples
