"""What one cache node is, apart from its sockets: its store and its own counters."""

from __future__ import annotations

import os
import resource
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

from cachenode import __version__
from cachenode.leases import Leases
from cachenode.readleases import ReadLeases
from cachenode.store import ITEM_OVERHEAD, MIB, Store

StatValue = int | float | str

# The memcached release whose text protocol the node's subset follows. The text
# protocol's version is "<this>-imagecache-<ours>": libmemcached's tools parse
# its leading "major.minor.micro" numbers and refuse the server otherwise.
MEMCACHED_COMPATIBLE_VERSION = "1.6.0"
# memcached files items in slab classes by size; the node has no such classes,
# so its items show as the one class memcached's tools list and dump.
SLAB_CLASS = 1
# How many keys a cache dump takes from the store at a time.
DUMP_BATCH = 1000


# memcached's general statistics that are the store's, in memcached's order:
# each name with the StoreStats field that answers it (a table in one string:
# a line each would be a dozen lines of one shape).
_GENERAL_STORE_STATS = [
    tuple(pair.split("="))
    for pair in (  # noqa: SIM905
        "cmd_get=lookups cmd_set=sets get_hits=hits get_misses=misses delete_hits=deletes "
        "evictions=evictions expired_unfetched=expirations curr_items=items total_items=sets "
        "bytes=bytes limit_maxbytes=capacity"
    ).split()
]


class Node:
    """The store plus the node-level facts that STATS reports."""

    def __init__(
        self,
        store: Store,
        *,
        wall_clock: Callable[[], float] = time.time,
        token: bytes = b"",
        text_protocol: bool | None = None,
    ) -> None:
        self.store = store
        # With a token, binary connections must AUTH with it first, and the
        # text protocol (which has no authentication) is off unless asked for.
        self.token = token
        self.text_protocol = not token if text_protocol is None else text_protocol
        self.leases = Leases(store.clock)
        self.read_leases = ReadLeases(store.clock)
        self.version = __version__  # ours, as the binary protocol reports it
        self.memcached_version = f"{MEMCACHED_COMPATIBLE_VERSION}-imagecache-{__version__}"
        self.wall_clock = wall_clock
        self.current_connections = 0
        self.total_connections = 0
        # A node whose parent changed was left behind by a parent that died
        # (STATS "orphaned"): `imagecache up` stops such nodes on its ports.
        self._parent_at_start = os.getppid()

    def stats(self) -> dict[str, StatValue]:
        """Store statistics and connection counts under this project's names."""
        stats: dict[str, StatValue] = dict(asdict(self.store.stats()))
        stats["capacity_mb"] = self.store.capacity / MIB
        stats["leases_granted"] = self.leases.granted
        stats["lease_waits"] = self.leases.waits
        stats["lease_hits"] = self.leases.found
        stats["read_leases_granted"] = self.read_leases.granted
        stats["current_connections"] = self.current_connections
        stats["total_connections"] = self.total_connections
        stats["boot_id"] = self.store.boot_id
        stats["pid"] = os.getpid()
        stats["orphaned"] = os.getppid() != self._parent_at_start
        stats["version"] = self.version
        return stats

    def memcached_stats(self, group: bytes = b"") -> list[tuple[str, StatValue]] | None:
        """The statistics of ``stats [group]`` under memcached's names, for its tools.

        The groups are memcached's: none (general), ``items`` and ``slabs``;
        None for any other group.
        """
        if group == b"":
            return self._memcached_general_stats()
        if group == b"items":
            return self._memcached_item_stats()
        if group == b"slabs":
            return self._memcached_slab_stats()
        return None

    def _memcached_general_stats(self) -> list[tuple[str, StatValue]]:
        s = self.store.stats()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return [
            ("pid", os.getpid()),
            ("uptime", int(s.uptime)),
            ("time", int(self.wall_clock())),
            ("version", self.memcached_version),
            ("pointer_size", struct.calcsize("P") * 8),
            ("rusage_user", _seconds_and_microseconds(usage.ru_utime)),
            ("rusage_system", _seconds_and_microseconds(usage.ru_stime)),
            ("curr_connections", self.current_connections),
            ("total_connections", self.total_connections),
            *((name, getattr(s, field)) for name, field in _GENERAL_STORE_STATS),
            ("threads", 1),  # one event loop serves every connection
            ("item_size_max", s.max_item_size),
            ("eviction_policy", s.policy),
        ]

    def _memcached_item_stats(self) -> list[tuple[str, StatValue]]:
        # As memcached, only classes that hold items are listed.
        s = self.store.stats()
        if not s.items:
            return []
        prefix = f"items:{SLAB_CLASS}:"
        return [
            (prefix + "number", s.items),
            (prefix + "mem_requested", s.bytes),
            (prefix + "evicted", s.evictions),
            (prefix + "expired_unfetched", s.expirations),
        ]

    def _memcached_slab_stats(self) -> list[tuple[str, StatValue]]:
        # One class whose chunks are the items themselves, each as large as
        # it counts (so nothing is ever free), and as large as an item may be.
        s = self.store.stats()
        if not s.items:
            return [("active_slabs", 0), ("total_malloced", 0)]
        prefix = f"{SLAB_CLASS}:"
        return [
            (prefix + "chunk_size", s.max_item_size),
            (prefix + "chunks_per_page", 1),
            (prefix + "total_pages", s.items),
            (prefix + "total_chunks", s.items),
            (prefix + "used_chunks", s.items),
            (prefix + "free_chunks", 0),
            (prefix + "free_chunks_end", 0),
            (prefix + "mem_requested", s.bytes),
            (prefix + "get_hits", s.hits),
            (prefix + "cmd_set", s.sets),
            (prefix + "delete_hits", s.deletes),
            ("active_slabs", 1),
            ("total_malloced", s.bytes),
        ]

    def cache_dump(self, slab_class: int) -> Iterator[tuple[bytes, int, int]]:
        """(key, value length, expiry) of each live item of ``slab_class``.

        The expiry is a Unix time, or 0 for never, as memcached's
        ``stats cachedump`` reports it. Every item is in ``SLAB_CLASS``; other
        classes are empty. It walks the store's key array as KEYS does
        (``Store.scan``), a batch at a time.
        """
        if slab_class != SLAB_CLASS:
            return
        store = self.store
        cursor: int | None = None
        while cursor != 0:
            batch, cursor = store.scan(cursor, DUMP_BATCH)
            now, wall_now = store.clock(), self.wall_clock()
            for key, counted in batch:
                item = store.inspect(key)
                expires_at = item.expires_at if item is not None else 0.0
                expiry = round(wall_now + expires_at - now) if expires_at else 0
                yield key, counted - len(key) - ITEM_OVERHEAD, expiry

    def expiry_time(self, exptime: int) -> float:
        """A memcached exptime as a time on the store's clock: 0 never, -1 already past.

        As in memcached, up to 30 days it counts seconds from now, beyond that
        it is a Unix time.
        """
        if exptime == 0:
            return 0.0
        now = self.store.clock()
        if exptime < 0:
            return now - 1.0
        if exptime <= 30 * 24 * 3600:
            return now + exptime
        return now + (exptime - self.wall_clock())


def _seconds_and_microseconds(seconds: float) -> str:
    """A CPU time as memcached's rusage stats write it: ``<seconds>.<microseconds>``."""
    whole, micro = divmod(round(seconds * 1_000_000), 1_000_000)
    return f"{whole}.{micro:06d}"
