"""Unit and property tests of the cache node's item store (cachenode.store)."""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cachenode.errors import InvalidConfig, InvalidKey, ItemTooLarge, StaleWrite
from cachenode.store import (
    ITEM_OVERHEAD,
    MAX_KEY_LENGTH,
    MIB,
    Policy,
    Store,
    StoreStats,
    counted_size,
)
from cachenode.streaminput import Value

# -- helpers -----------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def value_for(key: bytes, size: int) -> bytes:
    """A value that makes the item of ``key`` count exactly ``size`` bytes."""
    length = size - len(key) - ITEM_OVERHEAD
    assert length >= 0
    return b"v" * length


def lru_order(store: Store) -> list[bytes]:
    """The store's keys from least to most recently used.

    The recency order is not observable through the public API without
    changing it, so this one helper reads the store's item map directly.
    """
    return list(store._items)


def snapshot(store: Store) -> list[tuple[bytes, Value]]:
    """(key, value) of every item in recency order, without touching recency."""
    return [(key, item.value) for key, item in store._items.items()]


def scan_all(store: Store, count: int = 1000) -> list[tuple[bytes, int]]:
    """Every (key, counted size) a full scan returns."""
    entries: list[tuple[bytes, int]] = []
    cursor: int | None = None
    while True:
        batch, cursor = store.scan(cursor, count)
        entries += batch
        if cursor == 0:
            return entries


def state(store: Store) -> tuple[list[tuple[bytes, Value]], int, StoreStats]:
    """What must not change when an operation is refused (uptime aside)."""
    return snapshot(store), store.used, dataclasses.replace(store.stats(), uptime=0.0)


# -- sizes and keys ----------------------------------------------------------


def test_counted_size_is_key_plus_value_plus_overhead() -> None:
    assert counted_size(b"abc", b"12345") == 3 + 5 + ITEM_OVERHEAD
    assert counted_size(b"k", b"") == 1 + ITEM_OVERHEAD


def test_used_counts_key_value_and_overhead_of_every_item() -> None:
    store = Store(MIB)
    store.set(b"a", b"x" * 10)
    store.set(b"bb", b"y" * 100)
    assert store.used == (1 + 10 + ITEM_OVERHEAD) + (2 + 100 + ITEM_OVERHEAD)
    item = store.get(b"bb")
    assert item is not None
    assert item.size == 2 + 100 + ITEM_OVERHEAD
    assert sorted(scan_all(store)) == [(b"a", 11 + ITEM_OVERHEAD), (b"bb", 102 + ITEM_OVERHEAD)]


def test_overwrite_replaces_the_counted_bytes_of_the_old_value() -> None:
    store = Store(MIB)
    store.set(b"k", b"x" * 100)
    store.set(b"k", b"x" * 10)
    assert store.used == 1 + 10 + ITEM_OVERHEAD
    assert len(store) == 1
    item = store.get(b"k")
    assert item is not None
    assert item.value == b"x" * 10


def test_item_that_exactly_fills_the_capacity_is_stored() -> None:
    store = Store(1000)
    store.set(b"k", value_for(b"k", 1000))
    assert store.used == 1000
    assert b"k" in store


@pytest.mark.parametrize("key", [b"", b"k" * (MAX_KEY_LENGTH + 1)])
def test_invalid_key_is_refused_and_changes_nothing(key: bytes) -> None:
    store = Store(MIB)
    store.set(b"present", b"value")
    before = state(store)
    with pytest.raises(InvalidKey):
        store.set(key, b"value")
    with pytest.raises(InvalidKey):
        store.add(key, b"value")
    with pytest.raises(InvalidKey):
        store.delete(key)
    assert state(store) == before


def test_key_of_maximum_length_is_accepted() -> None:
    store = Store(MIB)
    key = b"k" * MAX_KEY_LENGTH
    store.set(key, b"value")
    item = store.get(key)
    assert item is not None
    assert item.value == b"value"
    assert store.delete(key)


# -- refusing items that are too large ----------------------------------------


def test_item_larger_than_capacity_is_refused_and_evicts_nothing() -> None:
    store = Store(2000)
    for index in range(5):
        store.set(b"k%d" % index, b"x" * 100)
    before = state(store)
    with pytest.raises(ItemTooLarge):
        store.set(b"big", value_for(b"big", 2001))
    with pytest.raises(ItemTooLarge):
        store.add(b"big", value_for(b"big", 2001))
    assert state(store) == before
    assert store.evictions == 0
    assert b"big" not in store


def test_item_larger_than_max_item_size_is_refused_and_evicts_nothing() -> None:
    store = Store(MIB, max_item_size=1000)
    store.set(b"a", b"x" * 1000)  # exactly the maximum is fine
    store.set(b"b", b"y")
    before = state(store)
    with pytest.raises(ItemTooLarge):
        store.set(b"c", b"z" * 1001)
    assert state(store) == before


def test_too_large_overwrite_keeps_the_old_value() -> None:
    store = Store(2000, max_item_size=500)
    store.set(b"k", b"old")
    store.set(b"other", b"x")
    before = state(store)
    with pytest.raises(ItemTooLarge):
        store.set(b"k", b"n" * 501)
    with pytest.raises(ItemTooLarge):
        store.set(b"k", b"n" * 5000)
    assert state(store) == before
    item = store.get(b"k")
    assert item is not None
    assert item.value == b"old"


@pytest.mark.parametrize("policy", list(Policy))
def test_too_large_item_evicts_nothing_under_either_policy(policy: Policy) -> None:
    store = Store(1500, policy, rng=random.Random(3))
    for index in range(4):
        store.set(b"k%d" % index, value_for(b"k%d" % index, 300))
    before = state(store)
    with pytest.raises(ItemTooLarge):
        store.set(b"huge", value_for(b"huge", 1501))
    assert state(store) == before


# -- LRU eviction ----------------------------------------------------------------


def test_lru_evicts_least_recently_set_first() -> None:
    store = Store(1000)  # room for three items of 300 counted bytes
    for key in (b"a", b"b", b"c"):
        store.set(key, value_for(key, 300))
    assert store.evictions == 0
    store.set(b"d", value_for(b"d", 300))
    assert lru_order(store) == [b"b", b"c", b"d"]
    assert b"a" not in store
    assert store.evictions == 1


def test_lru_get_refreshes_recency() -> None:
    store = Store(1000)
    for key in (b"a", b"b", b"c"):
        store.set(key, value_for(key, 300))
    assert store.get(b"a") is not None
    store.set(b"d", value_for(b"d", 300))
    assert b"a" in store
    assert b"b" not in store
    assert lru_order(store) == [b"c", b"a", b"d"]


def test_lru_overwrite_refreshes_recency() -> None:
    store = Store(1000)
    for key in (b"a", b"b", b"c"):
        store.set(key, value_for(key, 300))
    store.set(b"a", value_for(b"a", 300))
    store.set(b"d", value_for(b"d", 300))
    assert lru_order(store) == [b"c", b"a", b"d"]


def test_lru_contains_and_failed_add_do_not_refresh_recency() -> None:
    store = Store(1000)
    for key in (b"a", b"b", b"c"):
        store.set(key, value_for(key, 300))
    assert b"a" in store
    assert store.add(b"a", b"other") is None
    store.set(b"d", value_for(b"d", 300))
    assert b"a" not in store


def test_lru_large_item_evicts_as_many_as_needed_and_no_more() -> None:
    store = Store(1200)
    for key in (b"a", b"b", b"c", b"e"):
        store.set(key, value_for(key, 300))
    store.set(b"big", value_for(b"big", 800))
    # 1200 - 800 leaves room for one item of 300: the three oldest go.
    assert lru_order(store) == [b"e", b"big"]
    assert store.evictions == 3
    assert store.used == 1100


# -- Random eviction ----------------------------------------------------------------


def test_random_evicts_nothing_while_items_fit() -> None:
    store = Store(1200, Policy.RANDOM, rng=random.Random(7))
    for index in range(4):
        store.set(b"k%d" % index, value_for(b"k%d" % index, 300))
    assert len(store) == 4
    assert store.used == 1200
    assert store.evictions == 0


@pytest.mark.parametrize("seed", range(10))
def test_random_evicts_only_while_over_capacity(seed: int) -> None:
    store = Store(1200, Policy.RANDOM, rng=random.Random(seed))
    keys = [b"k%d" % index for index in range(4)]
    for key in keys:
        store.set(key, value_for(key, 300))
    store.set(b"new", value_for(b"new", 300))
    # Exactly one item of the same size had to go, and never the new one.
    assert store.evictions == 1
    assert len(store) == 4
    assert b"new" in store
    remaining = {key for key, _ in scan_all(store)}
    assert remaining - {b"new"} < set(keys)
    assert store.used == 1200


@pytest.mark.parametrize("seed", range(10))
def test_random_stops_evicting_as_soon_as_the_item_fits(seed: int) -> None:
    store = Store(2000, Policy.RANDOM, rng=random.Random(seed))
    sizes = {b"s1": 260, b"s2": 260, b"s3": 260, b"m1": 500, b"m2": 700}
    for key, size in sizes.items():
        store.set(key, value_for(key, size))
    assert store.used == 1980
    store.set(b"big", value_for(b"big", 900))
    evicted = [key for key in sizes if key not in store]
    assert evicted
    assert store.evictions == len(evicted)
    assert store.used <= 2000
    # The last eviction was needed: putting back any one evicted item would overflow
    # for at least one of them (the last one evicted).
    assert any(store.used + sizes[key] > 2000 for key in evicted)
    assert b"big" in store


def test_random_with_seeded_rng_is_deterministic() -> None:
    def run(seed: int) -> list[bytes]:
        store = Store(1000, Policy.RANDOM, rng=random.Random(seed))
        for index in range(20):
            key = b"k%02d" % index
            store.set(key, value_for(key, 300))
        return sorted(key for key, _ in scan_all(store))

    assert run(5) == run(5)


# -- add, delete, clear --------------------------------------------------------------


def test_add_stores_only_when_absent() -> None:
    store = Store(MIB)
    item = store.add(b"k", b"first", flags=3, version=9)
    assert item is not None
    assert (item.value, item.flags, item.version) == (b"first", 3, 9)
    assert store.add(b"k", b"second") is None
    stored = store.get(b"k")
    assert stored is not None
    assert stored.value == b"first"
    assert store.sets == 1


def test_add_after_delete_stores_again() -> None:
    store = Store(MIB)
    store.set(b"k", b"one")
    assert store.delete(b"k")
    assert store.add(b"k", b"two") is not None
    item = store.get(b"k")
    assert item is not None
    assert item.value == b"two"


def test_delete_removes_and_reports_presence() -> None:
    store = Store(MIB)
    store.set(b"a", b"1")
    store.set(b"b", b"22")
    assert store.delete(b"a") is True
    assert store.delete(b"a") is False
    assert store.delete(b"never") is False
    assert b"a" not in store
    assert store.get(b"a") is None
    assert len(store) == 1
    assert store.used == counted_size(b"b", b"22")
    assert [key for key, _ in scan_all(store)] == [b"b"]


def test_set_keeps_flags_and_version() -> None:
    store = Store(MIB)
    store.set(b"k", b"v", flags=0xFFFFFFFF, version=(1 << 64) - 1)
    item = store.get(b"k")
    assert item is not None
    assert item.flags == 0xFFFFFFFF
    assert item.version == (1 << 64) - 1


def test_clear_removes_everything_but_keeps_counters() -> None:
    store = Store(MIB)
    for index in range(10):
        store.set(b"k%d" % index, b"v")
    store.get(b"k1")
    store.clear()
    assert len(store) == 0
    assert store.used == 0
    assert store.get(b"k1") is None
    assert scan_all(store) == []
    stats = store.stats()
    assert (stats.sets, stats.items, stats.bytes) == (10, 0, 0)
    assert (stats.lookups, stats.hits, stats.misses) == (2, 1, 1)
    # The store works normally afterwards.
    store.set(b"again", b"v")
    assert [key for key, _ in scan_all(store)] == [b"again"]
    assert store.used == counted_size(b"again", b"v")


# -- configure -----------------------------------------------------------------------


def test_shrinking_capacity_evicts_down_to_it_at_once_in_lru_order() -> None:
    store = Store(3000)
    for key in (b"a", b"b", b"c", b"d", b"e"):
        store.set(key, value_for(key, 500))
    store.get(b"a")
    store.configure(capacity=1600)
    assert store.capacity == 1600
    assert store.used == 1500
    assert lru_order(store) == [b"d", b"e", b"a"]
    assert store.evictions == 2


@pytest.mark.parametrize("seed", range(5))
def test_shrinking_capacity_under_random_evicts_down_to_it(seed: int) -> None:
    store = Store(3000, Policy.RANDOM, rng=random.Random(seed))
    for index in range(6):
        store.set(b"k%d" % index, value_for(b"k%d" % index, 500))
    store.configure(capacity=1200)
    assert store.used == 1000
    assert len(store) == 2
    assert store.evictions == 4


def test_growing_capacity_evicts_nothing() -> None:
    store = Store(1000)
    store.set(b"a", value_for(b"a", 500))
    store.configure(capacity=5000)
    assert store.capacity == 5000
    assert lru_order(store) == [b"a"]
    assert store.evictions == 0
    for key in (b"b", b"c", b"d"):
        store.set(key, value_for(key, 500))
    assert store.evictions == 0


def test_switching_policy_at_run_time() -> None:
    store = Store(1200, Policy.LRU, rng=random.Random(11))
    store.configure(policy=Policy.RANDOM)
    assert store.policy is Policy.RANDOM
    for index in range(30):
        store.set(b"k%02d" % index, value_for(b"k%02d" % index, 300))
    assert store.used == 1200
    assert store.stats().policy == "random"
    store.configure(policy=Policy.LRU)
    assert store.stats().policy == "lru"
    order = lru_order(store)
    store.set(b"x", value_for(b"x", 300))
    # Back under LRU, the least recently used survivor is the one evicted.
    assert order[0] not in store
    assert lru_order(store) == [*order[1:], b"x"]


def test_configure_max_item_size() -> None:
    store = Store(MIB, max_item_size=100)
    with pytest.raises(ItemTooLarge):
        store.set(b"k", b"x" * 101)
    store.configure(max_item_size=200)
    assert store.max_item_size == 200
    store.set(b"k", b"x" * 200)
    assert b"k" in store


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"capacity": 0}, id="zero-capacity"),
        pytest.param({"capacity": -1}, id="negative-capacity"),
        pytest.param({"max_item_size": 0}, id="zero-max-item"),
        pytest.param({"max_item_size": -100}, id="negative-max-item"),
        pytest.param({"capacity": 100, "max_item_size": 0}, id="good-capacity-bad-max-item"),
        pytest.param({"capacity": 0, "policy": Policy.RANDOM}, id="bad-capacity-good-policy"),
        pytest.param({"capacity": 0, "max_item_size": 10}, id="bad-capacity-good-max-item"),
        pytest.param({"capacity": 100, "policy": cast(Policy, "bogus")}, id="unknown-policy"),
        pytest.param({"policy": cast(Policy, "lfu")}, id="unknown-policy-alone"),
    ],
)
def test_invalid_configuration_raises_and_changes_nothing(changes: dict[str, object]) -> None:
    store = Store(5000, Policy.LRU, max_item_size=1000)
    for index in range(8):
        store.set(b"k%d" % index, value_for(b"k%d" % index, 500))
    before = state(store)
    with pytest.raises(InvalidConfig):
        store.configure(**changes)  # type: ignore[arg-type]
    assert state(store) == before
    assert (store.capacity, store.policy, store.max_item_size) == (5000, Policy.LRU, 1000)


@pytest.mark.parametrize(("capacity", "max_item_size"), [(0, 10), (-5, 10), (10, 0)])
def test_invalid_construction_raises(capacity: int, max_item_size: int) -> None:
    with pytest.raises(InvalidConfig):
        Store(capacity, max_item_size=max_item_size)


# -- expiry ------------------------------------------------------------------------------


def test_item_expires_at_its_time_on_the_injected_clock() -> None:
    clock = FakeClock()
    store = Store(MIB, clock=clock)
    store.set(b"k", b"v", expires_at=clock.now + 10)
    clock.advance(9.5)
    assert b"k" in store
    assert store.get(b"k") is not None
    clock.advance(0.5)  # exactly at the expiry time: gone
    assert b"k" not in store
    assert store.get(b"k") is None
    assert len(store) == 0
    assert store.used == 0
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.expirations) == (1, 1, 1)


def test_expires_at_zero_means_never() -> None:
    clock = FakeClock()
    store = Store(MIB, clock=clock)
    store.set(b"k", b"v", expires_at=0)
    clock.advance(1e9)
    assert store.get(b"k") is not None


def test_delete_of_expired_item_reports_absent() -> None:
    clock = FakeClock()
    store = Store(MIB, clock=clock)
    store.set(b"k", b"v", expires_at=clock.now + 1)
    clock.advance(2)
    assert store.delete(b"k") is False
    assert store.used == 0
    assert store.deletes == 0
    assert store.expirations == 1


def test_add_over_expired_item_stores() -> None:
    clock = FakeClock()
    store = Store(MIB, clock=clock)
    store.set(b"k", b"old", expires_at=clock.now + 1)
    clock.advance(1)
    assert store.add(b"k", b"new") is not None
    item = store.get(b"k")
    assert item is not None
    assert item.value == b"new"
    assert store.used == counted_size(b"k", b"new")


def test_scan_skips_expired_items() -> None:
    clock = FakeClock()
    store = Store(MIB, clock=clock)
    store.set(b"short", b"v", expires_at=clock.now + 1)
    store.set(b"long", b"v", expires_at=clock.now + 100)
    store.set(b"forever", b"v")
    clock.advance(5)
    assert sorted(key for key, _ in scan_all(store, count=1)) == [b"forever", b"long"]


def test_uptime_is_measured_on_the_injected_clock() -> None:
    clock = FakeClock(50.0)
    store = Store(MIB, clock=clock)
    clock.advance(12.5)
    assert store.stats().uptime == 12.5
    assert store.clock is clock


# -- statistics -----------------------------------------------------------------------------


def test_statistics_counters() -> None:
    clock = FakeClock()
    store = Store(1000, clock=clock)
    store.set(b"a", value_for(b"a", 300))
    store.set(b"b", value_for(b"b", 300))
    store.add(b"a", b"ignored")  # refused: not a set
    store.add(b"c", value_for(b"c", 300))
    store.get(b"a")  # hit
    store.get(b"zz")  # miss
    store.set(b"d", value_for(b"d", 300))  # evicts b
    store.get(b"b")  # miss
    store.delete(b"c")
    store.delete(b"c")  # not found: not counted
    clock.advance(3)
    assert store.stats() == StoreStats(
        lookups=3,
        hits=1,
        misses=2,
        sets=4,
        deletes=1,
        evictions=1,
        expirations=0,
        tombstones=0,
        items=2,
        bytes=600,
        capacity=1000,
        max_item_size=store.max_item_size,
        policy="lru",
        uptime=3.0,
    )


def test_refused_operations_do_not_count() -> None:
    store = Store(1000, max_item_size=100)
    with pytest.raises(ItemTooLarge):
        store.set(b"k", b"x" * 101)
    with pytest.raises(InvalidKey):
        store.set(b"", b"x")
    stats = store.stats()
    assert (stats.sets, stats.evictions, stats.items, stats.bytes) == (0, 0, 0, 0)


# -- scan ---------------------------------------------------------------------------------------


def test_scan_of_empty_store_is_done_at_once() -> None:
    assert Store(MIB).scan(None, 10) == ([], 0)


def test_scan_returns_every_key_once_in_batches() -> None:
    store = Store(MIB)
    keys = {b"k%03d" % index for index in range(95)}
    for key in keys:
        store.set(key, b"v" * 3)
    seen: list[bytes] = []
    cursor: int | None = None
    batches = 0
    while True:
        batch, cursor = store.scan(cursor, 10)
        batches += 1
        assert len(batch) <= 10
        assert all(size == counted_size(key, b"vvv") for key, size in batch)
        seen += [key for key, _ in batch]
        if cursor == 0:
            break
    assert batches == 10
    assert sorted(seen) == sorted(keys)


def test_scan_count_must_be_positive() -> None:
    with pytest.raises(InvalidKey):
        Store(MIB).scan(None, 0)


def test_scan_returns_key_overwritten_during_scan() -> None:
    store = Store(MIB)
    keys = [b"k%d" % index for index in range(10)]
    for key in keys:
        store.set(key, b"v")
    batch, cursor = store.scan(None, 3)
    seen = {key for key, _ in batch}
    assert cursor != 0
    # b"k0" is present for the whole scan: it is only given a new value.
    store.set(b"k0", b"new value")
    while cursor:
        batch, cursor = store.scan(cursor, 3)
        seen |= {key for key, _ in batch}
    assert seen == set(keys)


@settings(max_examples=150, deadline=None)
@given(
    initial=st.integers(0, 60),
    count=st.integers(1, 12),
    data=st.data(),
)
def test_scan_returns_every_key_present_for_the_whole_scan(
    initial: int, count: int, data: st.DataObject
) -> None:
    store = Store(MIB)
    values: dict[bytes, bytes] = {}
    for index in range(initial):
        key = b"init%d" % index
        values[key] = b"v" * (index % 7)
        store.set(key, values[key])
    live = list(values)
    throughout = set(live)
    seen: set[bytes] = set()
    cursor: int | None = None
    fresh = 0
    operations = st.lists(
        st.tuples(st.sampled_from(["delete", "add", "get"]), st.integers(0, 10_000)),
        max_size=8,
    )
    while True:
        batch, next_cursor = store.scan(cursor, count)
        assert len(batch) <= count
        for key, size in batch:
            assert key in store
            assert size == counted_size(key, values[key])
        seen |= {key for key, _ in batch}
        if next_cursor == 0:
            break
        assert cursor is None or next_cursor < cursor
        cursor = next_cursor
        for operation, number in data.draw(operations):
            if operation == "add":
                key = b"new%d" % fresh
                fresh += 1
                values[key] = b"n" * (number % 5)
                store.set(key, values[key])
                live.append(key)
            elif live:
                key = live[number % len(live)]
                if operation == "delete":
                    assert store.delete(key)
                    live.remove(key)
                    throughout.discard(key)
                else:
                    assert store.get(key) is not None
    assert throughout <= seen


# -- stateful test against a reference model ----------------------------------------------------

KEY_POOL = [b"key%d" % index for index in range(10)]
MAX_ITEM_SIZE = 600


# Value sizes spread up to past the maximum item size, with its boundary often drawn.
VALUE_SIZES = st.sampled_from([0, 1, MAX_ITEM_SIZE - 1, MAX_ITEM_SIZE, MAX_ITEM_SIZE + 1]) | (
    st.integers(0, MAX_ITEM_SIZE + 50)
)
VALUES = VALUE_SIZES.flatmap(lambda size: st.binary(min_size=size, max_size=size))


def model_used(model: OrderedDict[bytes, bytes]) -> int:
    return sum(counted_size(key, value) for key, value in model.items())


class StoreMachine(RuleBasedStateMachine):
    """The store against an LRU-ordered dict of key -> value.

    Under LRU the model predicts evictions exactly. Under Random it cannot
    know the victims, so after each operation it checks that the store only
    evicted model keys, and only while over capacity, then drops the victims.
    The recency order of the survivors must match the model under both
    policies, since the store keeps it whatever the policy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(4096, max_item_size=MAX_ITEM_SIZE)
        self.model: OrderedDict[bytes, bytes] = OrderedDict()

    @initialize(
        capacity=st.integers(300, 5000),
        policy=st.sampled_from(Policy),
        seed=st.integers(0, 2**32 - 1),
    )
    def start(self, capacity: int, policy: Policy, seed: int) -> None:
        self.store = Store(capacity, policy, max_item_size=MAX_ITEM_SIZE, rng=random.Random(seed))

    def _follow_eviction(self, incoming: int) -> None:
        """Drop from the model what the store evicted to make room for ``incoming`` bytes."""
        capacity = self.store.capacity
        if self.store.policy is Policy.LRU:
            while model_used(self.model) + incoming > capacity:
                self.model.popitem(last=False)
            return
        present = {key for key, _ in scan_all(self.store)}
        evicted = [key for key in self.model if key not in present]
        needed = model_used(self.model) + incoming
        if needed <= capacity:
            assert evicted == [], "evicted although everything fitted"
        else:
            assert evicted, "over capacity without evicting"
            remaining = needed - sum(counted_size(key, self.model[key]) for key in evicted)
            assert remaining <= capacity
            # The last victim was needed: without it the store was over capacity.
            assert any(
                remaining + counted_size(key, self.model[key]) > capacity for key in evicted
            ), "evicted more than needed"
        for key in evicted:
            del self.model[key]

    def _store(self, key: bytes, value: bytes, only_if_absent: bool) -> None:
        operation = self.store.add if only_if_absent else self.store.set
        size = counted_size(key, value)
        if len(value) > self.store.max_item_size or size > self.store.capacity:
            before = state(self.store)
            with pytest.raises(ItemTooLarge):
                operation(key, value)
            assert state(self.store) == before
            return
        if only_if_absent and key in self.model:
            before = state(self.store)
            assert self.store.add(key, value) is None
            assert state(self.store) == before
            return
        item = operation(key, value)
        assert item is not None
        assert item.value == value
        assert item.size == size
        self.model.pop(key, None)
        self._follow_eviction(size)
        self.model[key] = value

    @rule(key=st.sampled_from(KEY_POOL), value=VALUES)
    def set(self, key: bytes, value: bytes) -> None:
        self._store(key, value, only_if_absent=False)

    @rule(key=st.sampled_from(KEY_POOL), value=VALUES)
    def add(self, key: bytes, value: bytes) -> None:
        self._store(key, value, only_if_absent=True)

    @rule(key=st.sampled_from(KEY_POOL))
    def get(self, key: bytes) -> None:
        item = self.store.get(key)
        if key in self.model:
            assert item is not None
            assert item.value == self.model[key]
            self.model.move_to_end(key)
        else:
            assert item is None

    @rule(key=st.sampled_from(KEY_POOL))
    def delete(self, key: bytes) -> None:
        assert self.store.delete(key) is (key in self.model)
        self.model.pop(key, None)

    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.model.clear()

    @rule(capacity=st.integers(1, 5000))
    def configure_capacity(self, capacity: int) -> None:
        self.store.configure(capacity=capacity)
        assert self.store.capacity == capacity
        self._follow_eviction(0)

    @rule(capacity=st.integers(-10, 0))
    def configure_invalid_capacity(self, capacity: int) -> None:
        before = (state(self.store), self.store.capacity, self.store.policy)
        with pytest.raises(InvalidConfig):
            self.store.configure(capacity=capacity, policy=Policy.RANDOM)
        assert (state(self.store), self.store.capacity, self.store.policy) == before

    @rule(policy=st.sampled_from(Policy))
    def switch_policy(self, policy: Policy) -> None:
        before = snapshot(self.store), self.store.used, self.store.evictions
        self.store.configure(policy=policy)
        assert self.store.policy is policy
        assert (snapshot(self.store), self.store.used, self.store.evictions) == before

    @invariant()
    def bytes_are_counted_exactly_and_within_capacity(self) -> None:
        entries = scan_all(self.store, count=3)
        assert sorted(entries) == sorted(
            (key, counted_size(key, value)) for key, value in self.model.items()
        )
        assert self.store.used == sum(size for _, size in entries)
        assert self.store.used == model_used(self.model)
        assert self.store.used <= self.store.capacity
        stats = self.store.stats()
        assert (stats.items, stats.bytes) == (len(self.model), self.store.used)

    @invariant()
    def items_and_recency_order_match_the_model(self) -> None:
        assert snapshot(self.store) == list(self.model.items())
        assert len(self.store) == len(self.model)


StoreMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestStoreMachine = StoreMachine.TestCase


# -- versions and tombstones ---------------------------------------------------


def test_versioned_write_older_than_the_item_is_refused() -> None:
    store = Store(10_000)
    store.set(b"k", b"new", version=5)
    with pytest.raises(StaleWrite):
        store.set(b"k", b"old", version=4)
    assert store.add(b"k", b"old", version=4) is None
    item = store.get(b"k")
    assert item is not None
    assert (item.value, item.version) == (b"new", 5)
    store.set(b"k", b"same", version=5)  # the same version may be written again
    store.set(b"k", b"unversioned")  # version 0 is never refused
    assert store.get(b"k") is not None


def test_versioned_delete_leaves_a_tombstone_that_refuses_older_fills() -> None:
    clock = FakeClock()
    store = Store(10_000, clock=clock, tombstone_seconds=30)
    store.set(b"k", b"v1", version=1)
    assert store.delete(b"k", version=2) is True
    assert store.get(b"k") is None
    # A reader that fetched version 1 before the update must not put it back.
    assert store.add(b"k", b"v1", version=1) is None
    with pytest.raises(StaleWrite):
        store.set(b"k", b"v1", version=1)
    assert store.add(b"k", b"v2", version=2) is not None
    assert store.stats().tombstones == 1
    clock.advance(31)
    store.delete(b"other", version=1)  # purges expired tombstones on the way
    assert store.stats().tombstones == 1
    store.delete(b"k")
    assert store.add(b"k", b"v1", version=1) is not None  # the tombstone has expired


def test_versioned_delete_keeps_an_item_of_that_version_or_newer() -> None:
    store = Store(10_000)
    store.set(b"k", b"v3", version=3)
    assert store.delete(b"k", version=3) is False
    assert store.delete(b"k", version=2) is False
    assert store.get(b"k") is not None
    assert store.delete(b"k", version=4) is True


def test_tombstones_keep_the_highest_version() -> None:
    store = Store(10_000)
    store.delete(b"k", version=7)
    store.delete(b"k", version=3)  # a late, older invalidation
    assert store.add(b"k", b"v5", version=5) is None
    assert store.add(b"k", b"v7", version=7) is not None


def test_versioned_clear_refuses_older_writes_of_every_key() -> None:
    clock = FakeClock()
    store = Store(10_000, clock=clock, tombstone_seconds=30)
    store.set(b"a", b"1", version=1)
    store.delete(b"b", version=9)
    store.clear(version=5)
    assert len(store) == 0
    assert store.add(b"a", b"1", version=1) is None
    assert store.add(b"c", b"4", version=4) is None
    assert store.add(b"b", b"6", version=6) is None  # its own tombstone is higher
    assert store.add(b"c", b"5", version=5) is not None
    clock.advance(31)
    assert store.add(b"a", b"1", version=1) is not None
