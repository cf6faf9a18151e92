"""Fill leases: which client may load a missing key, so a stampede costs one load.

Facebook's memcache answers a miss with a lease that entitles one client to
fill the key; the others that miss meanwhile are told to wait and ask again.
Here the lease is only about who loads: whether a fill may land is still
decided by the key's version and the fill's write ticket (docs/design.md), so
a lease identifies no holder. It
ends when any write or delete of the key arrives, when its holder releases
it, or after its time, whichever comes first.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_LEASE_SECONDS = 2.0
MAX_LEASE_SECONDS = 60.0
# Expired leases are swept once this many are outstanding, and then each time
# their number has doubled since the last sweep (amortised O(1) per lease);
# until then an expired lease is only replaced when its key is asked for again.
_FIRST_SWEEP = 1024


class Leases:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[bytes, float] = {}  # key -> end of its lease on the clock
        self._sweep_at = _FIRST_SWEEP
        self.granted = 0
        self.waits = 0  # times a client was told that another one is loading
        self.found = 0  # LEASEs answered with the item (a fill landed first, or a mover's read)

    def acquire(self, key: bytes, seconds: float) -> float:
        """Grant ``key``'s lease for ``seconds`` and return 0.0, or, when someone
        else holds it, return the seconds left on their lease."""
        now = self._clock()
        until = self._until.get(key)
        if until is not None and until > now:
            self.waits += 1
            return until - now
        if len(self._until) >= self._sweep_at:
            self._until = {k: t for k, t in self._until.items() if t > now}
            self._sweep_at = max(_FIRST_SWEEP, 2 * len(self._until))
        self._until[key] = now + seconds
        self.granted += 1
        return 0.0

    def release(self, key: bytes) -> None:
        if self._until:
            self._until.pop(key, None)

    def clear(self) -> None:
        self._until.clear()

    def __len__(self) -> int:
        """Leases outstanding, counting expired ones not yet swept."""
        return len(self._until)
