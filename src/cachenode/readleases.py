"""Read leases: how long a client may answer reads of a key from its own copy.

A client that keeps copies of values (the gateway's kept copies) asks, with a
CHECK, for a read lease: for that many milliseconds after it sent the CHECK,
it may serve the version the CHECK confirmed without asking again. The node
never calls a holder back. Instead every invalidation (DELETE, CLEAR) tells
its sender how long leases on what it removed still run, and the sender waits
that long before it acknowledges the change: Gray and Cheriton's leases (SOSP
1989), with the writer waiting leases out instead of revoking them. So a hot
key costs its readers one CHECK per lease instead of one per read, and a
change of a key read in the last lease time is acknowledged that much later.

A node that restarts has forgotten what its previous incarnation granted.
No lease ran longer than ``MAX_READ_LEASE_SECONDS``, so a new incarnation
counts every key as leased until that long after it started.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

MAX_READ_LEASE_SECONDS = 0.5


class _KeyLeases:
    """When the leases of one key end: those on ``version``, and those on older ones."""

    __slots__ = ("older_until", "until", "version")

    def __init__(self, version: int, until: float) -> None:
        self.version = version
        self.until = until
        self.older_until = 0.0  # leases on versions before ``version``

    @property
    def last_end(self) -> float:
        return max(self.until, self.older_until)


class ReadLeases:
    def __init__(
        self, clock: Callable[[], float], max_seconds: float = MAX_READ_LEASE_SECONDS
    ) -> None:
        self._clock = clock
        self.max_seconds = max_seconds
        # Leases an earlier incarnation may have granted end by then.
        self._floor = clock() + max_seconds
        self._latest = self._floor  # when the last lease of any key ends
        # Least recently granted first, so that ended ones are dropped from the front.
        self._keys: OrderedDict[bytes, _KeyLeases] = OrderedDict()
        self.granted = 0

    def grant(self, key: bytes, version: int, seconds: float) -> float:
        """Lease ``key`` at ``version`` for ``seconds`` (at most the maximum);
        returns the seconds granted."""
        seconds = min(seconds, self.max_seconds)
        if seconds <= 0:
            return 0.0
        now = self._clock()
        until = now + seconds
        leases = self._keys.get(key)
        if leases is None:
            self._keys[key] = _KeyLeases(version, until)
        else:
            self._keys.move_to_end(key)
            if version == leases.version:
                leases.until = max(leases.until, until)
            elif version > leases.version:
                leases.older_until = leases.last_end
                leases.version, leases.until = version, until
            else:  # cannot happen with versions that only grow; stays safe if it does
                leases.older_until = max(leases.older_until, until)
        self._latest = max(self._latest, until)
        self.granted += 1
        self._drop_ended(now)
        return seconds

    def seconds_left(self, key: bytes, before_version: int = 0) -> float:
        """How long leases on versions of ``key`` older than ``before_version``
        (every version, for 0) still run: what invalidating them must wait."""
        leases = self._keys.get(key)
        end = self._floor
        if leases is not None:
            if before_version == 0 or before_version > leases.version:
                end = max(end, leases.last_end)
            else:
                end = max(end, leases.older_until)
        return max(0.0, end - self._clock())

    def seconds_left_on_any(self) -> float:
        """How long any lease of any key still runs: what a CLEAR must wait."""
        return max(0.0, self._latest - self._clock())

    def _drop_ended(self, now: float) -> None:
        keys = self._keys
        while keys:
            oldest = next(iter(keys))
            if keys[oldest].last_end > now:
                return
            del keys[oldest]

    def __len__(self) -> int:
        """Keys with a lease that may still run (ended ones are dropped lazily)."""
        return len(self._keys)
