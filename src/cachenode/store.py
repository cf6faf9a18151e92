"""The item store of one cache node: byte-accurate capacity, LRU or Random eviction.

Pure: no I/O and no clock of its own (expiry times are on the caller's clock).

Every item counts ``len(key) + len(value) + ITEM_OVERHEAD`` bytes, and the sum
over all items never exceeds the capacity. Both eviction policies are O(1):
the items live in an insertion-ordered map (touched items move to its end, so
its head is the least recently used) and their keys also sit in a dense array
(for picking a uniformly random victim without copying the key list). Both
structures are always kept, so the policy can change at any time.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cachenode.errors import InvalidConfig, InvalidKey, ItemTooLarge, StaleWrite
from cachenode.streaminput import Value

MIB = 1 << 20
# Bytes counted per item beside its key and value. It approximates what an
# item really costs in this process (item record, map entry, order link, array
# slot, object headers) so that capacity tracks memory use; see docs/protocol.md.
ITEM_OVERHEAD = 256
MAX_KEY_LENGTH = 250
DEFAULT_MAX_ITEM_SIZE = 16 * MIB
# How long a versioned delete keeps refusing older writes of its key. A write
# ticket lives exactly as long (below), so no write can outlive a tombstone
# created after its ticket, however long its client paused.
DEFAULT_TOMBSTONE_SECONDS = 30.0
_MICROSECONDS = 1_000_000


class Policy(StrEnum):
    LRU = "lru"
    RANDOM = "random"


class Item:
    """One stored value with what the protocols carry beside it."""

    __slots__ = ("expires_at", "flags", "size", "slot", "value", "version")

    def __init__(
        self, value: Value, flags: int, version: int, expires_at: float, size: int, slot: int
    ) -> None:
        self.value = value
        self.flags = flags
        self.version = version
        self.expires_at = expires_at  # 0 means never
        self.size = size  # counted bytes
        self.slot = slot  # index of the key in Store._keys


@dataclass(frozen=True, slots=True)
class StoreStats:
    lookups: int  # hits + misses: misses no pool size can fix are counted apart
    hits: int
    misses: int
    sets: int
    deletes: int
    evictions: int
    expirations: int
    tombstones: int
    items: int
    bytes: int
    capacity: int
    max_item_size: int
    policy: str
    uptime: float
    # Misses moved out of lookups and misses by UNCACHEABLE (no pool size fixes them):
    missing_lookups: int = 0  # the key turned out to have no image
    uncacheable_lookups: int = 0  # the item is over the maximum item size


def counted_size(key: bytes, value: Value) -> int:
    """The bytes an item of this key and value counts against the capacity."""
    return len(key) + len(value) + ITEM_OVERHEAD


class Store:
    """Items by key within a capacity in bytes.

    Raises ``ItemTooLarge``, ``InvalidKey`` or ``InvalidConfig`` for refused
    operations, which leave the store as it was.
    """

    def __init__(
        self,
        capacity: int,
        policy: Policy = Policy.LRU,
        *,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        tombstone_seconds: float = DEFAULT_TOMBSTONE_SECONDS,
    ) -> None:
        _check_capacity(capacity)
        _check_max_item_size(max_item_size)
        # The settings, read-only: ``configure`` changes them and keeps the
        # items within them.
        self.capacity = capacity
        self.max_item_size = max_item_size
        self.policy = policy
        self.clock = clock  # what expiry times are measured on
        self._rng = rng or random.Random()
        self._started = clock()
        self._items: OrderedDict[bytes, Item] = OrderedDict()
        self._keys: list[bytes] = []
        self.used = 0  # counted bytes of all items (read-only)
        # key -> (version, expires_at) of recent versioned deletes, oldest first.
        self._tombstones: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self._tombstone_seconds = tombstone_seconds
        # (version, expires_at) of the last versioned clear: a tombstone for every key.
        self._floor: tuple[int, float] = (0, 0.0)
        # Tickets count microseconds on the clock from a random origin, so a
        # ticket of another incarnation of the node is, but for a chance of
        # about 2^-42, too old or from the future here (docs/protocol.md).
        self._ticket_origin = random.SystemRandom().randrange(1 << 40, 1 << 62)
        self._tickets_after = 0  # a clear ends every ticket taken before it
        self.boot_id = random.SystemRandom().getrandbits(63) + 1
        self.lookups = self.hits = self.misses = 0
        self.missing_lookups = self.uncacheable_lookups = 0
        self.sets = self.deletes = self.evictions = self.expirations = 0

    # -- reading ------------------------------------------------------------

    def get(self, key: bytes) -> Item | None:
        """The live item of ``key`` (marking it recently used), or None."""
        self.lookups += 1
        item = self._items.get(key)
        if item is not None and item.expires_at and item.expires_at <= self.clock():
            self._remove(key, item)
            self.expirations += 1
            item = None
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def count_hits(self, count: int) -> None:
        """Count ``count`` lookups that hit, answered without ``get`` (CHECK)."""
        self.lookups += count
        self.hits += count

    def count_unfixable_miss(self, *, too_large: bool) -> bool:
        """Move one counted miss out of ``lookups`` and ``misses``, into
        ``uncacheable_lookups`` (``too_large``) or ``missing_lookups``: a miss
        that no capacity could have turned into a hit. False, counting
        nothing, when there is no miss left to move (the counters never go
        below zero, whatever a client reports)."""
        if self.misses <= 0:
            return False
        self.lookups -= 1
        self.misses -= 1
        if too_large:
            self.uncacheable_lookups += 1
        else:
            self.missing_lookups += 1
        return True

    def peek(self, key: bytes) -> Item | None:
        """Like ``get``, but not counted as a lookup (a client asking again)."""
        item = self._items.get(key)
        if item is not None and item.expires_at and item.expires_at <= self.clock():
            self._remove(key, item)
            self.expirations += 1
            return None
        if item is not None:
            self._items.move_to_end(key)
        return item

    def inspect(self, key: bytes) -> Item | None:
        """The item of ``key``, expired or not, neither counted nor marked used: for listings."""
        return self._items.get(key)

    def __contains__(self, key: bytes) -> bool:
        item = self._items.get(key)
        return item is not None and not (item.expires_at and item.expires_at <= self.clock())

    def __len__(self) -> int:
        return len(self._items)

    def scan(self, cursor: int | None, count: int) -> tuple[list[tuple[bytes, int]], int]:
        """Up to ``count`` (key, counted size) pairs and the cursor that resumes.

        Start with ``cursor=None``; a returned cursor of 0 means done. Every key
        present for the whole scan is returned at least once, whatever else
        changes meanwhile: the scan walks the key array from the top down, and
        a removal only ever moves the array's last key into the hole, that is
        from the visited part into either part, or within the unvisited part.
        """
        if count < 1:
            raise InvalidKey("scan count must be at least 1")
        top = len(self._keys) if cursor is None else min(cursor, len(self._keys))
        bottom = max(0, top - count)
        now = self.clock()
        batch = []
        for index in range(top - 1, bottom - 1, -1):
            key = self._keys[index]
            item = self._items[key]
            if not (item.expires_at and item.expires_at <= now):
                batch.append((key, item.size))
        return batch, bottom

    # -- write tickets ------------------------------------------------------

    def ticket(self) -> int:
        """A write ticket: versioned writes must carry one younger than a tombstone.

        A client takes it before reading what it will write (a fill's row, a
        copy's source): every tombstone created since then is still live when
        a write carrying it is accepted, so a write of a version that an
        invalidation replaced in the meantime is always refused.
        """
        return self._ticket_origin + int(self.clock() * _MICROSECONDS)

    def ticket_is_valid(self, ticket: int) -> bool:
        """Whether ``ticket`` is this incarnation's, younger than a tombstone, and
        taken after the last clear."""
        age = self.ticket() - ticket
        return 0 <= age < self._tombstone_seconds * _MICROSECONDS and ticket > self._tickets_after

    # -- writing ------------------------------------------------------------

    def set(
        self, key: bytes, value: Value, *, flags: int = 0, version: int = 0, expires_at: float = 0
    ) -> Item:
        """Store ``value`` under ``key``, evicting others as needed; returns the item.

        Raises StaleWrite for a ``version`` older than the key's known version.
        """
        size = self._check_item(key, value)
        if version and self._is_stale(key, version):
            raise StaleWrite(f"version {version} is older than the version the node knows")
        old = self._items.get(key)
        if old is not None:
            # Replace in place: the key keeps its slot in _keys, so that a scan
            # under way still returns it, and becomes the most recently used.
            self.used -= old.size
            self._items.move_to_end(key)
            self._make_room(size, keep=key)
            item = Item(value, flags, version, expires_at, size, old.slot)
            self._items[key] = item
        else:
            self._make_room(size)
            item = Item(value, flags, version, expires_at, size, len(self._keys))
            self._items[key] = item
            self._keys.append(key)
        self.used += size
        self.sets += 1
        return item

    def add(
        self, key: bytes, value: Value, *, flags: int = 0, version: int = 0, expires_at: float = 0
    ) -> Item | None:
        """Store only if ``key`` holds no live item and ``version`` is not stale; else None."""
        self._check_item(key, value)
        if key in self or (version and self._is_stale(key, version)):
            return None
        return self.set(key, value, flags=flags, version=version, expires_at=expires_at)

    def delete(self, key: bytes, version: int = 0) -> bool:
        """Remove ``key``; False when it held no live item.

        With a ``version``, the key also gets a tombstone that refuses writes
        of older versions for a while, and an item of that version or newer
        stays: invalidating version N never removes N itself.
        """
        _check_key(key)
        if version:
            self._bury(key, version)
        item = self._items.get(key)
        if item is None or (version and item.version >= version):
            return False
        self._remove(key, item)
        if item.expires_at and item.expires_at <= self.clock():
            self.expirations += 1
            return False
        self.deletes += 1
        return True

    def clear(self, version: int = 0) -> None:
        """Remove every item (counters are kept: they are lifetime totals).

        Every write ticket taken before is void: a node cleared because it may
        have missed invalidations takes no write that was read before. With a
        ``version``, writes older than it are refused for a while too, as if
        every key had a tombstone of that version.
        """
        self._tickets_after = self.ticket()
        if version:
            self._floor = (
                max(version, self._floor[0]) if self._floor[1] > self.clock() else version,
                self.clock() + self._tombstone_seconds,
            )
        self._items.clear()
        self._keys.clear()
        self.used = 0

    def configure(
        self,
        *,
        capacity: int | None = None,
        policy: Policy | None = None,
        max_item_size: int | None = None,
    ) -> None:
        """Change settings at run time; a smaller capacity evicts down to it at once."""
        if capacity is not None:
            _check_capacity(capacity)
        if max_item_size is not None:
            _check_max_item_size(max_item_size)
        if policy is not None:
            try:
                policy = Policy(policy)
            except ValueError:
                raise InvalidConfig(f"policy must be 'lru' or 'random', not {policy!r}") from None
            self.policy = policy
        if max_item_size is not None:
            self.max_item_size = max_item_size
        if capacity is not None:
            self.capacity = capacity
            self._make_room(0)

    def stats(self) -> StoreStats:
        return StoreStats(
            lookups=self.lookups,
            hits=self.hits,
            misses=self.misses,
            sets=self.sets,
            deletes=self.deletes,
            evictions=self.evictions,
            expirations=self.expirations,
            tombstones=len(self._tombstones),
            items=len(self._items),
            bytes=self.used,
            capacity=self.capacity,
            max_item_size=self.max_item_size,
            policy=self.policy.value,
            uptime=self.clock() - self._started,
            missing_lookups=self.missing_lookups,
            uncacheable_lookups=self.uncacheable_lookups,
        )

    # -- internals ----------------------------------------------------------

    def _is_stale(self, key: bytes, version: int) -> bool:
        item = self._items.get(key)
        if item is not None and item.version > version:
            return True
        now = self.clock()
        tombstone = self._tombstones.get(key)
        if tombstone is not None and tombstone[0] > version and tombstone[1] > now:
            return True
        return self._floor[0] > version and self._floor[1] > now

    def _bury(self, key: bytes, version: int) -> None:
        now = self.clock()
        tombstones = self._tombstones
        while tombstones:  # all live equally long, so the oldest expire first
            oldest = next(iter(tombstones))
            if tombstones[oldest][1] > now:
                break
            del tombstones[oldest]
        previous = tombstones.pop(key, None)
        if previous is not None and previous[1] > now:
            version = max(version, previous[0])
        tombstones[key] = (version, now + self._tombstone_seconds)

    def _check_item(self, key: bytes, value: Value) -> int:
        _check_key(key)
        size = counted_size(key, value)
        if len(value) > self.max_item_size:
            raise ItemTooLarge(
                f"value of {len(value)} bytes exceeds the maximum item size of "
                f"{self.max_item_size} bytes"
            )
        if size > self.capacity:
            raise ItemTooLarge(
                f"item of {size} counted bytes exceeds the capacity of {self.capacity} bytes"
            )
        return size

    def _make_room(self, size: int, keep: bytes | None = None) -> None:
        # ``keep`` (an item being replaced, its bytes already uncounted) is never
        # the victim: under LRU it is the most recent, and it is skipped under Random.
        while self.used + size > self.capacity:
            if self.policy is Policy.LRU:
                key = next(iter(self._items))
            else:
                key = self._keys[self._rng.randrange(len(self._keys))]
                if key == keep:
                    continue
            self._remove(key, self._items[key])
            self.evictions += 1

    def _remove(self, key: bytes, item: Item) -> None:
        del self._items[key]
        last = self._keys.pop()
        if item.slot < len(self._keys):
            self._keys[item.slot] = last
            self._items[last].slot = item.slot
        self.used -= item.size


def _check_key(key: bytes) -> None:
    if not key:
        raise InvalidKey("key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"key of {len(key)} bytes exceeds {MAX_KEY_LENGTH} bytes")


def _check_capacity(capacity: int) -> None:
    if capacity < 1:
        raise InvalidConfig(f"capacity must be positive, not {capacity}")


def _check_max_item_size(max_item_size: int) -> None:
    if max_item_size < 1:
        raise InvalidConfig(f"maximum item size must be positive, not {max_item_size}")
