"""Client-side routing (cachenode.routing): which node owns a key, and node addresses."""

from __future__ import annotations

from collections import Counter

import pytest

from cachenode.client import NodeClient
from cachenode.errors import NodeUnavailable
from cachenode.routing import AddressError, Ring, parse_address
from tests.conftest import NodeProcess

KEYS = [f"img-{i:05d}".encode() for i in range(20_000)]
NODES = [f"node-{i}" for i in range(5)]


def placement(ring: Ring) -> dict[bytes, str | None]:
    return {key: ring.owner(key) for key in KEYS}


def moved(before: Ring, after: Ring) -> float:
    """The share of KEYS whose owner changed from ``before`` to ``after``."""
    old, new = placement(before), placement(after)
    return sum(old[key] != new[key] for key in KEYS) / len(KEYS)


def test_keys_spread_evenly_over_the_nodes() -> None:
    counts = Counter(placement(Ring(NODES)).values())
    assert set(counts) == set(NODES)
    fair = len(KEYS) / len(NODES)
    for node_id, count in counts.items():
        assert abs(count - fair) < 0.1 * fair, f"{node_id} owns {count} keys, fair is {fair:g}"


def test_the_same_node_list_gives_the_same_placement() -> None:
    assert placement(Ring(NODES)) == placement(Ring(list(NODES)))
    # The order of the list does not matter: owners are decided per (node, key).
    assert placement(Ring(NODES)) == placement(Ring(list(reversed(NODES))))


def test_adding_a_node_moves_only_the_keys_it_wins() -> None:
    before, after = Ring(NODES), Ring([*NODES, "node-new"])
    old, new = placement(before), placement(after)
    for key in KEYS:
        # A key changes owner only to the new node, never between old ones.
        assert new[key] in (old[key], "node-new")
    share = moved(before, after)
    assert abs(share - 1 / 6) < 0.02, f"{share:.3f} of the keys moved, about 1/6 should"


def test_removing_a_node_moves_only_the_keys_it_held() -> None:
    before, after = Ring(NODES), Ring(NODES[1:])
    old, new = placement(before), placement(after)
    for key in KEYS:
        if old[key] != NODES[0]:
            assert new[key] == old[key], "a key of a staying node moved"
    share = moved(before, after)
    assert abs(share - 1 / 5) < 0.02, f"{share:.3f} of the keys moved, about 1/5 should"


def test_an_empty_ring_owns_nothing_and_one_node_owns_everything() -> None:
    assert len(Ring(())) == 0
    assert Ring(()).owner(b"img") is None
    assert set(placement(Ring(["only"])).values()) == {"only"}


@pytest.mark.parametrize(
    ("address", "pair"),
    [("127.0.0.1:11311", ("127.0.0.1", 11311)), ("h:1", ("h", 1)), ("h:65535", ("h", 65535))],
)
def test_addresses_parse_to_host_and_port(address: str, pair: tuple[str, int]) -> None:
    assert parse_address(address) == pair


@pytest.mark.parametrize(
    "address",
    ["", "host", "host:", ":11311", "host:0", "host:65536", "host:-1", "host:http", "h:1.5"],
)
def test_bad_addresses_are_refused_with_the_address_named(address: str) -> None:
    with pytest.raises(AddressError, match="not a host:port address") as refused:
        parse_address(address)
    assert repr(address) in str(refused.value)
    assert isinstance(refused.value, ValueError)


async def test_a_client_at_an_address_talks_to_that_node(node_process: NodeProcess) -> None:
    address = f"{node_process.host}:{node_process.port}"
    async with NodeClient.at(address, timeout=2, connect_timeout=0.5) as client:
        assert await client.set(b"k", b"v")
        assert await client.get(b"k") == b"v"
        assert (client.host, client.port, client.address) == (
            node_process.host,
            node_process.port,
            address,
        )
        # The options reach the client.
        assert (client.timeout, client.connect_timeout) == (2, 0.5)


async def test_a_client_at_a_bad_address_is_refused_before_connecting() -> None:
    with pytest.raises(AddressError):
        NodeClient.at("nowhere")


async def test_a_client_at_an_address_with_no_node_fails_as_unavailable(
    node_process: NodeProcess,
) -> None:
    async with NodeClient.at(f"{node_process.host}:1", connect_timeout=0.5) as client:
        with pytest.raises(NodeUnavailable):
            await client.ping()
