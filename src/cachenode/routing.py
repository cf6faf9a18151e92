"""Client-side routing: node addresses, and which node owns a key.

Owners come from rendezvous (highest random weight) hashing: every node gets
a score per key and the highest score owns it. Adding or removing a node
moves only the keys that node wins or held (about 1/N of them), and every
client computes the same owner from the same membership, with no ring state
to keep in sync. The gateway routes reads by it, and the manager moves keys
by it when the pool resizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b


class AddressError(ValueError):
    """Not a ``host:port`` node address."""


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` as a pair; raises AddressError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"not a host:port address: {address!r}")
    return host, int(port)


class Ring:
    """The owners of keys among ``node_ids`` (stable identifiers, not addresses)."""

    def __init__(self, node_ids: Sequence[str]) -> None:
        self.node_ids = tuple(node_ids)
        # blake2b keyed per node: a good, fast 64-bit score of (node, key).
        self._salts = [node_id.encode()[:64] for node_id in self.node_ids]

    def __len__(self) -> int:
        return len(self.node_ids)

    def owner(self, key: bytes) -> str | None:
        """The node that owns ``key``; None for an empty ring."""
        best: str | None = None
        best_score = -1
        for node_id, salt in zip(self.node_ids, self._salts, strict=True):
            score = int.from_bytes(blake2b(key, digest_size=8, key=salt).digest(), "big")
            if score > best_score:
                best, best_score = node_id, score
        return best
