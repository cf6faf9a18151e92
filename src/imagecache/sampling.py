"""Which keys the miss curve samples: a function of the key alone, the same everywhere.

A key hashes (CRC-32) into one of HASH_BUCKETS buckets; a sampling rate is a
number of them, its threshold. Lookups of a key are sampled while its bucket
is below the threshold, so every gateway process samples the same keys and
the manager (manager.misscurve, manager.curves) simulates their lookups as
one stream. Which rate is in force is the manager's choice
(manager.samplingrate); a gateway starts at INITIAL_RATE until the manager
names one (keysamples).

Here, below the gateway and the manager both, because both sample: the
gateway picks the lookups it posts, the manager checks and filters them.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import zlib

# Keys hash into this many buckets; a rate is a number of them.
HASH_BUCKETS = 1 << 24
# The rate every gateway and the manager start at, until the manager's first
# window says more (about 0.8 %).
INITIAL_RATE = 2.0**-7


def sampling_threshold(rate: float) -> int:
    """The bucket threshold of a sampling ``rate`` (0 < rate <= 1)."""
    if not 0 < rate <= 1:
        raise ValueError(f"a sampling rate is above 0 and at most 1, not {rate}")
    return max(1, round(rate * HASH_BUCKETS))


def sample_bucket(key: bytes) -> int:
    """The hash bucket of ``key``: its references are sampled at every rate whose
    threshold is above it (the same answer everywhere)."""
    return zlib.crc32(key) % HASH_BUCKETS


def is_sampled(key: bytes, threshold: int) -> bool:
    """Whether references to ``key`` belong to the sample (the same answer everywhere)."""
    return sample_bucket(key) < threshold
