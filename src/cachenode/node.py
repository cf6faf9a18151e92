"""What one cache node is, apart from its sockets: its store and its own counters."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict

from cachenode import __version__
from cachenode.leases import Leases
from cachenode.readleases import ReadLeases
from cachenode.store import MIB, Store

StatValue = int | float | str


class Node:
    """The store plus the node-level facts that STATS reports."""

    def __init__(
        self,
        store: Store,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.leases = Leases(store.clock)
        self.read_leases = ReadLeases(store.clock)
        self.version = __version__
        self.wall_clock = wall_clock
        self.current_connections = 0
        self.total_connections = 0

    def stats(self) -> dict[str, StatValue]:
        """Store statistics and connection counts under this project's names."""
        stats: dict[str, StatValue] = dict(asdict(self.store.stats()))
        stats["capacity_mb"] = self.store.capacity / MIB
        stats["leases_granted"] = self.leases.granted
        stats["lease_waits"] = self.leases.waits
        stats["read_leases_granted"] = self.read_leases.granted
        stats["current_connections"] = self.current_connections
        stats["total_connections"] = self.total_connections
        stats["boot_id"] = self.store.boot_id
        stats["pid"] = os.getpid()
        stats["version"] = self.version
        return stats

    def memcached_stats(self) -> list[tuple[str, StatValue]]:
        """The same statistics under memcached's names, for memcached's tools."""
        s = self.store.stats()
        return [
            ("pid", os.getpid()),
            ("uptime", int(s.uptime)),
            ("time", int(self.wall_clock())),
            ("version", self.version),
            ("curr_connections", self.current_connections),
            ("total_connections", self.total_connections),
            ("cmd_get", s.lookups),
            ("cmd_set", s.sets),
            ("get_hits", s.hits),
            ("get_misses", s.misses),
            ("delete_hits", s.deletes),
            ("evictions", s.evictions),
            ("expired_unfetched", s.expirations),
            ("curr_items", s.items),
            ("bytes", s.bytes),
            ("limit_maxbytes", s.capacity),
            ("item_size_max", s.max_item_size),
            ("eviction_policy", s.policy),
        ]

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
