"""Tests of the protocol sessions (cachenode.sessions): request bytes in, reply bytes out."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping

import pytest

from cachenode import __version__
from cachenode.binarysession import BinarySession
from cachenode.leases import Leases
from cachenode.node import Node
from cachenode.protocol import (
    HEADER,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    MAX_KEYS_COUNT,
    MILLISECONDS,
    TICKET,
    Frame,
    FrameDecoder,
    Opcode,
    decode_keys_entries,
    encode_header,
    encode_request,
)
from cachenode.readleases import MAX_READ_LEASE_SECONDS
from cachenode.server import session_for
from cachenode.status import Status
from cachenode.store import DEFAULT_TOMBSTONE_SECONDS, MIB, Policy, Store, counted_size
from cachenode.streaminput import Value
from cachenode.textsession import TextSession

WALL_TIME = 1_700_000_000.0
WRITES = (Opcode.SET, Opcode.ADD)

# -- helpers -----------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# What the text protocol reports as the version: memcached's tools parse the
# leading numbers, and ours stays readable after them.
MEMCACHED_VERSION = f"1.6.0-imagecache-{__version__}"


def make_node(
    capacity: int = MIB,
    *,
    max_item_size: int = 64 * 1024,
    policy: Policy = Policy.LRU,
    clock: FakeClock | None = None,
) -> Node:
    store = Store(
        capacity,
        policy,
        max_item_size=max_item_size,
        clock=clock or FakeClock(),
        rng=random.Random(0),
    )
    return Node(store, wall_clock=lambda: WALL_TIME)


def decode_replies(out: list[Value]) -> list[Frame]:
    decoder = FrameDecoder(MAGIC_RESPONSE)
    decoder.feed(b"".join(out))
    frames: list[Frame] = []
    while (frame := decoder.next_frame()) is not None:
        assert isinstance(frame, Frame)
        frames.append(frame)
    assert decoder.buffered == 0, "a reply is cut short"
    return frames


def exchange(session: BinarySession, data: bytes) -> list[Frame]:
    return decode_replies(session.receive(data))


def call(
    session: BinarySession,
    opcode: int,
    key: bytes = b"",
    value: bytes = b"",
    *,
    request_id: int = 1,
    flags: int = 0,
    version: int = 0,
    ticket: int | None = None,
    extras: bytes = b"",
) -> Frame:
    """Send one request and return its one reply.

    A versioned SET or ADD carries a fresh write ticket unless ``ticket`` says
    which (0: none); other extras are sent as given.
    """
    if ticket is None:
        ticket = session._node.store.ticket() if version and opcode in WRITES else 0
    if ticket:
        extras = TICKET.pack(ticket)
    replies = exchange(
        session,
        encode_request(opcode, request_id, key, value, flags=flags, version=version, extras=extras),
    )
    assert len(replies) == 1
    reply = replies[0]
    assert reply.opcode == opcode
    assert reply.request_id == request_id
    return reply


def without_boot_id(stats: Mapping[str, object]) -> dict[str, object]:
    """Statistics that two nodes fed the same requests share (each draws its boot id)."""
    return {name: value for name, value in stats.items() if name != "boot_id"}


def store_contents(node: Node) -> list[tuple[bytes, Value]]:
    """(key, value) of every item, in recency order, without touching recency."""
    return [(key, item.value) for key, item in node.store._items.items()]


def config_of(session: BinarySession) -> dict[str, object]:
    reply = call(session, Opcode.CONFIG)
    assert reply.status == Status.OK
    config = json.loads(bytes(reply.value))
    assert isinstance(config, dict)
    return config


def text(session: TextSession, data: bytes) -> bytes:
    return b"".join(session.receive(data))


# -- choosing the protocol -------------------------------------------------------


def test_session_is_chosen_by_first_byte() -> None:
    node = make_node()
    assert isinstance(session_for(MAGIC_REQUEST, node), BinarySession)
    assert isinstance(session_for(ord("g"), node), TextSession)


# -- binary: basic operations ------------------------------------------------------


def test_ping_replies_with_the_node_version() -> None:
    session = BinarySession(make_node())
    reply = call(session, Opcode.PING, request_id=42)
    assert reply.status == Status.OK
    assert reply.value == __version__.encode()
    assert not session.closing


def test_get_of_missing_key_is_not_found() -> None:
    session = BinarySession(make_node())
    reply = call(session, Opcode.GET, b"missing")
    assert reply.status == Status.NOT_FOUND
    assert reply.value == b""


def test_set_then_get_round_trips_value_flags_and_version() -> None:
    node = make_node()
    session = BinarySession(node)
    reply = call(
        session, Opcode.SET, b"k", b"value", request_id=7, flags=0xCAFEBABE, version=(1 << 64) - 2
    )
    assert reply.status == Status.OK
    assert reply.version == (1 << 64) - 2
    reply = call(session, Opcode.GET, b"k", request_id=8)
    assert reply == Frame(
        Opcode.GET, 8, b"", b"value", Status.OK, flags=0xCAFEBABE, version=(1 << 64) - 2
    )
    assert node.store.used == counted_size(b"k", b"value")


def test_set_overwrites() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.SET, b"k", b"one", flags=1, version=1)
    call(session, Opcode.SET, b"k", b"two", flags=2, version=2)
    reply = call(session, Opcode.GET, b"k")
    assert (reply.value, reply.flags, reply.version) == (b"two", 2, 2)


def test_large_value_is_returned_whole() -> None:
    session = BinarySession(make_node())
    value = bytes(range(256)) * 100  # 25.6 KB: sent as header and value buffers
    assert call(session, Opcode.SET, b"big", value).status == Status.OK
    out = session.receive(encode_request(Opcode.GET, 3, b"big"))
    assert b"".join(out)[HEADER.size :] == value
    (reply,) = decode_replies(out)
    assert reply.status == Status.OK
    assert reply.value == value


def test_add_stores_only_when_absent() -> None:
    session = BinarySession(make_node())
    reply = call(session, Opcode.ADD, b"k", b"first", version=5)
    assert reply.status == Status.OK
    assert reply.version == 5
    reply = call(session, Opcode.ADD, b"k", b"second")
    assert reply.status == Status.NOT_STORED
    assert call(session, Opcode.GET, b"k").value == b"first"


def test_delete_then_not_found() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.SET, b"k", b"v")
    assert call(session, Opcode.DELETE, b"k").status == Status.OK
    assert call(session, Opcode.DELETE, b"k").status == Status.NOT_FOUND
    assert call(session, Opcode.GET, b"k").status == Status.NOT_FOUND


def test_clear_removes_every_item() -> None:
    node = make_node()
    session = BinarySession(node)
    for index in range(5):
        call(session, Opcode.SET, b"k%d" % index, b"v")
    assert call(session, Opcode.CLEAR).status == Status.OK
    assert len(node.store) == 0
    assert node.store.used == 0
    assert call(session, Opcode.GET, b"k1").status == Status.NOT_FOUND


def test_stats_reports_store_counters_as_json() -> None:
    node = make_node(capacity=2 * MIB)
    session = BinarySession(node)
    call(session, Opcode.SET, b"a", b"xyz")
    call(session, Opcode.GET, b"a")
    call(session, Opcode.GET, b"b")
    reply = call(session, Opcode.STATS)
    assert reply.status == Status.OK
    stats = json.loads(bytes(reply.value))
    assert stats["items"] == 1
    assert stats["bytes"] == counted_size(b"a", b"xyz")
    assert (stats["lookups"], stats["hits"], stats["misses"], stats["sets"]) == (2, 1, 1, 1)
    assert stats["capacity"] == 2 * MIB
    assert stats["capacity_mb"] == 2.0
    assert stats["policy"] == "lru"
    assert stats["version"] == __version__


def test_empty_key_is_an_invalid_argument_and_the_session_goes_on() -> None:
    node = make_node()
    session = BinarySession(node)
    reply = call(session, Opcode.SET, b"", b"v")
    assert reply.status == Status.INVALID_ARGUMENT
    assert reply.value  # a message
    assert len(node.store) == 0
    assert not session.closing
    assert call(session, Opcode.PING).status == Status.OK


def test_item_larger_than_capacity_is_too_large() -> None:
    node = make_node(capacity=4096, max_item_size=64 * 1024)
    session = BinarySession(node)
    call(session, Opcode.SET, b"small", b"v")
    reply = call(session, Opcode.SET, b"k", b"x" * 5000)
    assert reply.status == Status.TOO_LARGE
    assert store_contents(node) == [(b"small", b"v")]
    assert not session.closing


# -- binary: CONFIG ---------------------------------------------------------------------


def test_config_without_body_reports_the_current_settings() -> None:
    session = BinarySession(make_node(capacity=2 * MIB, max_item_size=MIB // 2))
    assert config_of(session) == {"capacity_mb": 2.0, "policy": "lru", "max_item_mb": 0.5}


def test_config_changes_settings_at_run_time() -> None:
    node = make_node(capacity=2 * MIB, max_item_size=MIB // 2)
    session = BinarySession(node)
    body = b'{"capacity_mb": 1, "policy": "random", "max_item_mb": 0.25}'
    reply = call(session, Opcode.CONFIG, value=body)
    assert reply.status == Status.OK
    assert json.loads(bytes(reply.value)) == {
        "capacity_mb": 1.0,
        "policy": "random",
        "max_item_mb": 0.25,
    }
    assert node.store.capacity == MIB
    assert node.store.policy is Policy.RANDOM
    assert node.store.max_item_size == MIB // 4


def test_config_shrinking_capacity_evicts_at_once() -> None:
    node = make_node(capacity=2 * MIB, max_item_size=MIB)
    session = BinarySession(node)
    for index in range(6):
        call(session, Opcode.SET, b"k%d" % index, b"x" * (300 * 1024))
    assert len(node.store) == 6
    call(session, Opcode.CONFIG, value=b'{"capacity_mb": 1}')
    assert node.store.used <= MIB
    assert [key for key, _ in store_contents(node)] == [b"k3", b"k4", b"k5"]


def test_lowering_max_item_size_makes_bigger_sets_too_large() -> None:
    node = make_node(capacity=4 * MIB, max_item_size=MIB)
    session = BinarySession(node)
    call(session, Opcode.CONFIG, value=b'{"max_item_mb": 0.001}')
    reply = call(session, Opcode.SET, b"k", b"x" * 2000)
    assert reply.status == Status.TOO_LARGE
    assert call(session, Opcode.SET, b"k", b"x" * 1000).status == Status.OK


def test_raising_max_item_size_admits_bigger_sets_at_once() -> None:
    node = make_node(capacity=4 * MIB, max_item_size=1000)
    session = BinarySession(node)
    assert call(session, Opcode.SET, b"k", b"x" * 5000).status == Status.TOO_LARGE
    call(session, Opcode.CONFIG, value=b'{"max_item_mb": 0.01}')
    reply = call(session, Opcode.SET, b"k", b"x" * 5000)
    assert reply.status == Status.OK
    assert call(session, Opcode.GET, b"k").value == b"x" * 5000


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\x80\x81", id="not-utf8"),
        pytest.param(b"[1, 2]", id="list"),
        pytest.param(b'"lru"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"bogus": 1}', id="unknown-setting"),
        pytest.param(b'{"capacity_mb": 1, "bogus": 1}', id="unknown-beside-valid"),
        pytest.param(b'{"policy": "lfu"}', id="bad-policy"),
        pytest.param(b'{"policy": 1}', id="policy-number"),
        pytest.param(b'{"policy": ["lru"]}', id="policy-list"),
        pytest.param(b'{"capacity_mb": -1}', id="negative-capacity"),
        pytest.param(b'{"capacity_mb": 0}', id="zero-capacity"),
        pytest.param(b'{"capacity_mb": 1e-9}', id="capacity-below-one-byte"),
        pytest.param(b'{"capacity_mb": "2"}', id="capacity-string"),
        pytest.param(b'{"capacity_mb": true}', id="capacity-bool"),
        pytest.param(b'{"capacity_mb": NaN}', id="capacity-nan"),
        pytest.param(b'{"max_item_mb": -5}', id="negative-max-item"),
        pytest.param(b'{"max_item_mb": 0}', id="zero-max-item"),
        pytest.param(b'{"capacity_mb": 1, "policy": "bogus"}', id="valid-capacity-bad-policy"),
        pytest.param(b'{"capacity_mb": 1, "max_item_mb": -1}', id="valid-capacity-bad-max-item"),
        pytest.param(b'{"policy": "random", "capacity_mb": -1}', id="valid-policy-bad-capacity"),
        pytest.param(b'{"capacity_mb": 1e308}', id="capacity-overflows"),
        pytest.param(b'{"capacity_mb": Infinity}', id="capacity-infinity"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
    ],
)
def test_bad_config_is_an_invalid_argument_and_changes_nothing(body: bytes) -> None:
    node = make_node(capacity=2 * MIB, max_item_size=MIB // 2)
    session = BinarySession(node)
    for index in range(10):
        call(session, Opcode.SET, b"k%d" % index, b"x" * 100_000)
    before = (config_of(session), store_contents(node), node.store.used, node.store.evictions)
    replies = exchange(
        session, encode_request(Opcode.CONFIG, 9, value=body) + encode_request(Opcode.PING, 10)
    )
    assert [(reply.opcode, reply.request_id, reply.status) for reply in replies] == [
        (Opcode.CONFIG, 9, Status.INVALID_ARGUMENT),
        (Opcode.PING, 10, Status.OK),
    ]
    assert replies[0].value  # a message saying what is wrong
    after = (config_of(session), store_contents(node), node.store.used, node.store.evictions)
    assert after == before
    assert not session.closing


# -- binary: oversized, unknown and malformed requests ---------------------------------------------


def test_oversized_set_is_too_large_and_the_session_keeps_working() -> None:
    node = make_node(max_item_size=1000)
    session = BinarySession(node)
    data = (
        encode_request(Opcode.SET, 1, b"big", b"x" * 1001)
        + encode_request(Opcode.SET, 2, b"small", b"ok")
        + encode_request(Opcode.GET, 3, b"small")
    )
    replies = exchange(session, data)
    assert [(reply.opcode, reply.request_id, reply.status) for reply in replies] == [
        (Opcode.SET, 1, Status.TOO_LARGE),
        (Opcode.SET, 2, Status.OK),
        (Opcode.GET, 3, Status.OK),
    ]
    assert replies[0].value  # a message
    assert replies[2].value == b"ok"
    assert store_contents(node) == [(b"small", b"ok")]
    assert not session.closing


def test_oversized_set_split_across_receives() -> None:
    node = make_node(max_item_size=1000)
    session = BinarySession(node)
    header = encode_header(MAGIC_REQUEST, Opcode.SET, 1, b"big", 50_000)
    replies = exchange(session, header)
    assert [(reply.request_id, reply.status) for reply in replies] == [(1, Status.TOO_LARGE)]
    for _ in range(4):
        assert exchange(session, b"y" * 10_000) == []
    replies = exchange(session, b"y" * 10_000 + encode_request(Opcode.PING, 2))
    assert [(reply.request_id, reply.status) for reply in replies] == [(2, Status.OK)]
    assert len(node.store) == 0
    assert not session.closing


def test_unknown_opcode_and_the_session_keeps_working() -> None:
    session = BinarySession(make_node())
    data = encode_request(0x42, 5, b"k", b"v") + encode_request(Opcode.PING, 6)
    replies = exchange(session, data)
    assert [(reply.opcode, reply.request_id, reply.status) for reply in replies] == [
        (0x42, 5, Status.UNKNOWN_OPCODE),
        (Opcode.PING, 6, Status.OK),
    ]
    assert not session.closing


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(encode_request(Opcode.PING, 1)[1:], id="bad-magic"),
        pytest.param(
            HEADER.pack(MAGIC_REQUEST, Opcode.GET, 0, 1, 33, 0, 2, 0, 0) + b"k" * 34,
            id="extras-too-long",
        ),
        pytest.param(encode_request(Opcode.GET, 3, b"k" * 251), id="key-too-long"),
        pytest.param(
            HEADER.pack(MAGIC_REQUEST, Opcode.SET, 0, 1, 0, (1 << 30) + 1, 4, 0, 0), id="huge-value"
        ),
        pytest.param(encode_request(Opcode.PING, 5).replace(b"\xca", b"\xcb", 1), id="response"),
    ],
)
def test_malformed_frame_gives_malformed_reply_and_closes(bad: bytes) -> None:
    node = make_node()
    session = BinarySession(node)
    data = (
        encode_request(Opcode.SET, 1, b"k", b"v")
        + bad
        + encode_request(Opcode.SET, 2, b"after", b"v")
    )
    replies = exchange(session, data)
    assert [(reply.opcode, reply.request_id, reply.status) for reply in replies] == [
        (Opcode.SET, 1, Status.OK),
        (0, 0, Status.MALFORMED),
    ]
    assert replies[1].value  # a message
    assert session.closing
    assert b"after" not in node.store


# -- binary: pipelining ----------------------------------------------------------------------------


def pipeline() -> tuple[bytes, list[tuple[int, int, int]]]:
    """Requests and the (opcode, request id, status) of their replies, in order."""
    requests = [
        (encode_request(Opcode.SET, 100, b"a", b"1"), (Opcode.SET, 100, Status.OK)),
        (encode_request(Opcode.GET, 7, b"a"), (Opcode.GET, 7, Status.OK)),
        (encode_request(Opcode.ADD, 0xFFFFFFFF, b"a", b"2"), (Opcode.ADD, 0xFFFFFFFF, 2)),
        (encode_request(Opcode.GET, 0, b"zz"), (Opcode.GET, 0, Status.NOT_FOUND)),
        (encode_request(Opcode.PING, 3), (Opcode.PING, 3, Status.OK)),
        (encode_request(0x77, 4), (0x77, 4, Status.UNKNOWN_OPCODE)),
        (encode_request(Opcode.DELETE, 5, b"a"), (Opcode.DELETE, 5, Status.OK)),
        (encode_request(Opcode.STATS, 6), (Opcode.STATS, 6, Status.OK)),
        (encode_request(Opcode.KEYS, 8), (Opcode.KEYS, 8, Status.OK)),
        (encode_request(Opcode.CLEAR, 9), (Opcode.CLEAR, 9, Status.OK)),
    ]
    return b"".join(data for data, _ in requests), [reply for _, reply in requests]


def test_pipelined_requests_are_answered_in_order() -> None:
    session = BinarySession(make_node())
    data, expected = pipeline()
    replies = exchange(session, data)
    assert [(reply.opcode, reply.request_id, reply.status) for reply in replies] == expected


def test_pipelined_requests_fed_one_byte_at_a_time() -> None:
    session = BinarySession(make_node())
    data, expected = pipeline()
    out: list[Value] = []
    for index in range(len(data)):
        out += session.receive(data[index : index + 1])
    replies = decode_replies(out)
    assert [(reply.opcode, reply.request_id, reply.status) for reply in replies] == expected


# -- binary: KEYS ----------------------------------------------------------------------------------


def test_keys_pagination_lists_every_key() -> None:
    node = make_node(capacity=4 * MIB)
    session = BinarySession(node)
    values = {b"key-%03d" % index: b"v" * index for index in range(57)}
    for key, value in values.items():
        call(session, Opcode.SET, key, value)
    listed: dict[bytes, int] = {}
    cursor = b""
    pages = 0
    while True:
        reply = call(session, Opcode.KEYS, cursor, flags=10, request_id=pages)
        assert reply.status == Status.OK
        entries = decode_keys_entries(reply.value)
        assert len(entries) <= 10
        for key, size in entries:
            assert key not in listed
            listed[key] = size
        pages += 1
        cursor = reply.key
        if not cursor:
            break
        assert int(cursor) > 0
    assert pages == 6
    assert listed == {key: counted_size(key, value) for key, value in values.items()}


def test_keys_default_count_returns_everything_in_one_page() -> None:
    session = BinarySession(make_node())
    for index in range(30):
        call(session, Opcode.SET, b"k%d" % index, b"v")
    reply = call(session, Opcode.KEYS)
    assert reply.key == b""
    assert sorted(key for key, _ in decode_keys_entries(reply.value)) == sorted(
        b"k%d" % index for index in range(30)
    )


def test_keys_count_is_capped() -> None:
    node = make_node(capacity=16 * MIB)
    for index in range(MAX_KEYS_COUNT + 50):
        node.store.set(b"k%d" % index, b"")
    session = BinarySession(node)
    reply = call(session, Opcode.KEYS, flags=0xFFFFFFFF)
    assert len(decode_keys_entries(reply.value)) == MAX_KEYS_COUNT
    assert reply.key == b"50"


def test_keys_of_empty_store() -> None:
    reply = call(BinarySession(make_node()), Opcode.KEYS)
    assert (reply.status, reply.key, reply.value) == (Status.OK, b"", b"")


def test_keys_with_bad_cursor_is_an_invalid_argument() -> None:
    session = BinarySession(make_node())
    reply = call(session, Opcode.KEYS, b"not-a-number")
    assert reply.status == Status.INVALID_ARGUMENT
    assert not session.closing


# -- text protocol ---------------------------------------------------------------------------------


def test_text_set_and_get() -> None:
    node = make_node()
    session = TextSession(node)
    assert text(session, b"set foo 5 0 5\r\nhello\r\n") == b"STORED\r\n"
    assert text(session, b"get foo\r\n") == b"VALUE foo 5 5\r\nhello\r\nEND\r\n"
    assert text(session, b"get missing\r\n") == b"END\r\n"
    item = node.store.get(b"foo")
    assert item is not None
    assert (item.value, item.flags) == (b"hello", 5)


def test_text_get_of_several_keys_lists_present_ones_in_order() -> None:
    session = TextSession(make_node())
    text(session, b"set a 1 0 1\r\nA\r\nset c 3 0 3\r\nCCC\r\n")
    assert text(session, b"get c b a\r\n") == (b"VALUE c 3 3\r\nCCC\r\nVALUE a 1 1\r\nA\r\nEND\r\n")


def test_text_gets_returns_the_version_as_cas() -> None:
    node = make_node()
    node.store.set(b"k", b"value", flags=2, version=424242)
    session = TextSession(node)
    assert text(session, b"gets k\r\n") == b"VALUE k 2 5 424242\r\nvalue\r\nEND\r\n"
    assert text(session, b"get k\r\n") == b"VALUE k 2 5\r\nvalue\r\nEND\r\n"


def test_binary_set_is_visible_to_text_get() -> None:
    node = make_node()
    call(BinarySession(node), Opcode.SET, b"k", b"bin", flags=9, version=3)
    assert text(TextSession(node), b"gets k\r\n") == b"VALUE k 9 3 3\r\nbin\r\nEND\r\n"


def test_text_add() -> None:
    session = TextSession(make_node())
    assert text(session, b"add k 0 0 1\r\na\r\n") == b"STORED\r\n"
    assert text(session, b"add k 0 0 1\r\nb\r\n") == b"NOT_STORED\r\n"
    assert text(session, b"get k\r\n") == b"VALUE k 0 1\r\na\r\nEND\r\n"


def test_text_noreply_stores_silently() -> None:
    node = make_node()
    session = TextSession(node)
    assert text(session, b"set k 0 0 1 noreply\r\na\r\n") == b""
    assert text(session, b"add k 0 0 1 noreply\r\nb\r\n") == b""
    assert text(session, b"add j 0 0 1 noreply\r\nb\r\n") == b""
    assert sorted(store_contents(node)) == [(b"j", b"b"), (b"k", b"a")]


def test_text_delete() -> None:
    node = make_node()
    session = TextSession(node)
    text(session, b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nset c 0 0 1\r\n3\r\n")
    assert text(session, b"delete a\r\n") == b"DELETED\r\n"
    assert text(session, b"delete a\r\n") == b"NOT_FOUND\r\n"
    assert text(session, b"delete b 0\r\n") == b"DELETED\r\n"
    assert text(session, b"delete c noreply\r\n") == b""
    assert text(session, b"delete c noreply\r\n") == b""
    assert len(node.store) == 0


def test_text_flush_all() -> None:
    node = make_node()
    session = TextSession(node)
    text(session, b"set a 0 0 1\r\n1\r\n")
    assert text(session, b"flush_all\r\n") == b"OK\r\n"
    assert len(node.store) == 0
    text(session, b"set a 0 0 1\r\n1\r\n")
    assert text(session, b"flush_all noreply\r\n") == b""
    assert len(node.store) == 0


def test_text_flush_all_with_delay_is_refused_and_clears_nothing() -> None:
    node = make_node()
    session = TextSession(node)
    text(session, b"set a 0 0 1\r\n1\r\n")
    assert text(session, b"flush_all 10\r\n").startswith(b"CLIENT_ERROR ")
    assert len(node.store) == 1


def test_text_stats() -> None:
    clock = FakeClock(100.0)
    node = make_node(capacity=2 * MIB, max_item_size=4096, clock=clock)
    session = TextSession(node)
    text(session, b"set a 0 0 3\r\nabc\r\nget a b\r\ndelete a\r\n")
    clock.advance(61.7)
    reply = text(session, b"stats\r\n")
    assert reply.endswith(b"\r\nEND\r\n")
    lines = reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""]
    stats: dict[str, str] = {}
    for line in lines[:-2]:
        word, name, value = line.decode().split(" ", 2)
        assert word == "STAT"
        stats[name] = value
    assert stats["version"] == MEMCACHED_VERSION
    assert stats["uptime"] == "61"
    assert stats["time"] == str(int(WALL_TIME))
    assert (stats["cmd_get"], stats["get_hits"], stats["get_misses"]) == ("2", "1", "1")
    assert (stats["cmd_set"], stats["delete_hits"]) == ("1", "1")
    assert (stats["curr_items"], stats["bytes"]) == ("0", "0")
    assert stats["limit_maxbytes"] == str(2 * MIB)
    assert stats["item_size_max"] == "4096"
    assert stats["eviction_policy"] == "lru"


def test_text_stats_unknown_group_is_an_error() -> None:
    assert text(TextSession(make_node()), b"stats bogus\r\n") == b"ERROR\r\n"


def test_text_version() -> None:
    assert text(TextSession(make_node()), b"version\r\n") == (
        b"VERSION " + MEMCACHED_VERSION.encode() + b"\r\n"
    )


def test_text_quit_closes_and_ignores_what_follows() -> None:
    node = make_node()
    session = TextSession(node)
    assert text(session, b"version\r\nquit\r\nset k 0 0 1\r\nv\r\n") == (
        b"VERSION " + MEMCACHED_VERSION.encode() + b"\r\n"
    )
    assert session.closing
    assert len(node.store) == 0


def test_text_bad_command_replies_and_goes_on() -> None:
    session = TextSession(make_node())
    assert text(session, b"bogus\r\nset k x 0 1\r\nv\r\nget k\r\n") == (
        b"ERROR\r\nCLIENT_ERROR bad command line format\r\n"
        # The refused set's data line is then read as a command line, as in memcached.
        b"ERROR\r\nEND\r\n"
    )
    assert not session.closing


def test_text_oversized_set_is_too_large_and_the_session_goes_on() -> None:
    node = make_node(max_item_size=100)
    session = TextSession(node)
    data = b"set big 0 0 101\r\n" + b"x" * 101 + b"\r\nset k 0 0 2\r\nok\r\nget k big\r\n"
    assert text(session, data) == (
        b"SERVER_ERROR object too large for cache\r\nSTORED\r\nVALUE k 0 2\r\nok\r\nEND\r\n"
    )
    assert text(session, b"set big 0 0 101 noreply\r\n" + b"x" * 101 + b"\r\n") == b""
    assert not session.closing


def test_text_item_over_capacity_is_too_large() -> None:
    node = make_node(capacity=1000, max_item_size=4096)
    session = TextSession(node)
    assert text(session, b"set k 0 0 2000\r\n" + b"x" * 2000 + b"\r\n") == (
        b"SERVER_ERROR object too large for cache\r\n"
    )
    assert len(node.store) == 0


def test_text_malformed_data_block_closes() -> None:
    session = TextSession(make_node())
    reply = text(session, b"set k 0 0 2\r\nabcd\r\nversion\r\n")
    assert reply.startswith(b"CLIENT_ERROR ")
    assert reply.endswith(b"\r\n")
    assert session.closing


def test_text_overlong_line_closes() -> None:
    session = TextSession(make_node())
    assert text(session, b"x" * 3000).startswith(b"CLIENT_ERROR ")
    assert session.closing


def test_text_replies_fed_one_byte_at_a_time() -> None:
    session = TextSession(make_node())
    data = b"set a 1 0 3\r\nabc\r\nget a\r\ndelete a\r\nget a\r\n"
    out = b"".join(text(session, data[index : index + 1]) for index in range(len(data)))
    assert out == b"STORED\r\nVALUE a 1 3\r\nabc\r\nEND\r\nDELETED\r\nEND\r\n"


# -- text protocol: expiry ------------------------------------------------------------------------


def test_text_exptime_in_seconds_uses_the_store_clock() -> None:
    clock = FakeClock()
    node = make_node(clock=clock)
    session = TextSession(node)
    assert text(session, b"set k 0 10 1\r\nv\r\n") == b"STORED\r\n"
    clock.advance(9.9)
    assert text(session, b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    clock.advance(0.1)
    assert text(session, b"get k\r\n") == b"END\r\n"
    assert text(session, b"add k 0 0 1\r\nw\r\n") == b"STORED\r\n"


def test_text_exptime_zero_never_expires() -> None:
    clock = FakeClock()
    session = TextSession(make_node(clock=clock))
    text(session, b"set k 0 0 1\r\nv\r\n")
    clock.advance(10**9)
    assert text(session, b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_text_negative_exptime_expires_at_once() -> None:
    session = TextSession(make_node())
    assert text(session, b"set k 0 -1 1\r\nv\r\n") == b"STORED\r\n"
    assert text(session, b"get k\r\n") == b"END\r\n"


def test_text_exptime_over_30_days_is_a_unix_time() -> None:
    clock = FakeClock()
    session = TextSession(make_node(clock=clock))
    exptime = int(WALL_TIME) + 100
    assert text(session, b"set k 0 %d 1\r\nv\r\n" % exptime) == b"STORED\r\n"
    clock.advance(99)
    assert text(session, b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    clock.advance(1)
    assert text(session, b"get k\r\n") == b"END\r\n"


def test_text_exptime_of_30_days_is_relative() -> None:
    clock = FakeClock()
    session = TextSession(make_node(clock=clock))
    thirty_days = 30 * 24 * 3600
    text(session, b"set k 0 %d 1\r\nv\r\n" % thirty_days)
    clock.advance(thirty_days - 1)
    assert text(session, b"get k\r\n") != b"END\r\n"
    clock.advance(1)
    assert text(session, b"get k\r\n") == b"END\r\n"


# -- one whole request per receive (the sessions' fast paths) -------------------------------------

# Each entry is one receive. Whole GETs take the fast path; the others are
# shapes it must leave to the decoder: a GET split over two receives, one that
# carries a value, a key over the limit, a reserved field set, two GETs in one
# read, and text lines that are not a single plain "get".
BINARY_RECEIVES = [
    encode_request(Opcode.SET, 1, b"a", b"1" * 100),
    encode_request(Opcode.GET, 2, b"a"),
    encode_request(Opcode.GET, 3, b"missing"),
    encode_request(Opcode.GET, 4, b"a")[:10],
    encode_request(Opcode.GET, 4, b"a")[10:],
    encode_request(Opcode.GET, 5, b"a", b"ignored value"),
    encode_request(Opcode.GET, 6, b"a") + encode_request(Opcode.GET, 7, b"a"),
    encode_request(Opcode.GET, 8, b""),
    encode_request(Opcode.GET, 9, b"k" * 251),
]
TEXT_RECEIVES = [
    b"set a 5 0 3\r\nabc\r\n",
    b"get a\r\n",
    b"get a missing a\r\n",
    b"get missing\r\n",
    b"get a",
    b"\r\n",
    b"get a\r\nget a\r\n",
    b"get a\n",
    b"get \r\n",
    b"get " + b"k" * 251 + b"\r\n",
    b"gets a\r\n",
    b"get " + b"a " * 1100 + b"\r\n",
]


def receive_byte_by_byte(session: BinarySession | TextSession, stream: bytes) -> bytes:
    """The replies to ``stream`` fed one byte per receive, until the session closes."""
    out: list[Value] = []
    for index in range(len(stream)):
        if session.closing:  # the server closes the connection here
            break
        out += session.receive(stream[index : index + 1])
    return b"".join(out)


@pytest.mark.parametrize("count", range(1, len(BINARY_RECEIVES) + 1))
def test_binary_whole_requests_answer_as_byte_by_byte_ones(count: int) -> None:
    receives = BINARY_RECEIVES[:count]
    whole, split = BinarySession(make_node()), BinarySession(make_node())
    out_whole = [reply for data in receives for reply in whole.receive(data)]
    out_split = receive_byte_by_byte(split, b"".join(receives))
    assert b"".join(out_whole) == out_split
    assert whole.closing == split.closing
    # The fast path counts its lookups like the decoder's path does.
    assert without_boot_id(whole._node.stats()) == without_boot_id(split._node.stats())


def test_fast_binary_get_replies_with_value_flags_version_and_request_id() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.SET, b"photo", b"v" * 5000, flags=3, version=42)
    (reply,) = exchange(session, encode_request(Opcode.GET, 0xABCDEF, b"photo"))
    assert (reply.status, reply.request_id, reply.value, reply.flags) == (
        Status.OK,
        0xABCDEF,
        b"v" * 5000,
        3,
    )
    assert reply.version == 42


@pytest.mark.parametrize("count", range(1, len(TEXT_RECEIVES) + 1))
def test_text_whole_lines_answer_as_byte_by_byte_ones(count: int) -> None:
    receives = TEXT_RECEIVES[:count]
    whole, split = TextSession(make_node()), TextSession(make_node())
    out_whole = b"".join(reply for data in receives for reply in whole.receive(data))
    out_split = receive_byte_by_byte(split, b"".join(receives))
    assert out_whole == out_split
    assert whole.closing == split.closing


# -- binary: fill leases and CHECK ----------------------------------------------------------------


def test_lease_is_granted_once_and_others_are_told_to_wait() -> None:
    clock = FakeClock()
    session = BinarySession(make_node(clock=clock))
    first = call(session, Opcode.LEASE, b"k", flags=2000)
    assert first.status == Status.NOT_FOUND  # granted: load and fill
    second = call(session, Opcode.LEASE, b"k", flags=2000)
    assert second.status == Status.LEASED
    assert second.flags == 2000  # milliseconds left on the holder's lease
    clock.advance(1.5)
    assert call(session, Opcode.LEASE, b"k").flags == 500
    clock.advance(0.5)  # the holder never filled: the lease ran out
    assert call(session, Opcode.LEASE, b"k", flags=100).status == Status.NOT_FOUND
    stats = session._node.stats()
    assert (stats["leases_granted"], stats["lease_waits"]) == (2, 2)
    # Asking for leases is not a lookup: the GET before it counted the miss.
    assert (stats["lookups"], stats["misses"]) == (0, 0)


def test_lease_of_a_cached_key_returns_the_item() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.SET, b"k", b"value", flags=2, version=9)
    reply = call(session, Opcode.LEASE, b"k")
    assert (reply.status, reply.value, reply.flags, reply.version) == (Status.OK, b"value", 2, 9)


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(encode_request(Opcode.ADD, 5, b"k", b"v", version=3), id="refused-fill"),
        pytest.param(encode_request(Opcode.SET, 5, b"k", b"v"), id="set"),
        pytest.param(encode_request(Opcode.DELETE, 5, b"k", version=7), id="invalidation"),
        pytest.param(encode_request(Opcode.RELEASE, 5, b"k"), id="release"),
        pytest.param(encode_request(Opcode.CLEAR, 5), id="clear"),
    ],
)
def test_a_write_delete_release_or_clear_ends_the_lease(ending: bytes) -> None:
    session = BinarySession(make_node())
    assert call(session, Opcode.LEASE, b"k").status == Status.NOT_FOUND
    assert call(session, Opcode.LEASE, b"k").status == Status.LEASED
    (reply,) = exchange(session, ending)
    # A DELETE of nothing is NOT_FOUND; a fill without a write ticket NOT_STORED.
    assert reply.status in (Status.OK, Status.NOT_FOUND, Status.NOT_STORED)
    after = call(session, Opcode.LEASE, b"k")
    assert after.status in (Status.OK, Status.NOT_FOUND)  # the item, or a new lease


# -- binary: read leases ----------------------------------------------------------------------


def milliseconds(reply: Frame) -> int | None:
    """The milliseconds a reply's extras carry; None when it carries none."""
    return MILLISECONDS.unpack(reply.extras)[0] if reply.extras else None


def lease_check(session: BinarySession, key: bytes, ms: int) -> Frame:
    return call(session, Opcode.CHECK, key, flags=1, extras=MILLISECONDS.pack(ms))


def settled_node() -> tuple[BinarySession, FakeClock]:
    """A node past the time in which it counts every key as leased by its last incarnation."""
    clock = FakeClock()
    session = BinarySession(make_node(clock=clock))
    clock.advance(MAX_READ_LEASE_SECONDS)
    return session, clock


def test_a_check_grants_the_read_lease_asked_for_up_to_the_maximum() -> None:
    session, _ = settled_node()
    call(session, Opcode.SET, b"k", b"v", version=4)
    assert milliseconds(lease_check(session, b"k", 200)) == 200
    assert milliseconds(lease_check(session, b"k", 60_000)) == MAX_READ_LEASE_SECONDS * 1000
    plain = call(session, Opcode.CHECK, b"k", flags=1)
    assert (plain.status, plain.version, milliseconds(plain)) == (Status.OK, 4, None)
    missing = lease_check(session, b"nothing", 200)
    assert (missing.status, milliseconds(missing)) == (Status.NOT_FOUND, None)
    assert session._node.stats()["read_leases_granted"] == 2


def test_an_invalidation_reports_how_long_leases_on_older_versions_still_run() -> None:
    session, clock = settled_node()
    call(session, Opcode.SET, b"k", b"v4", version=4)
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=5)) == 0  # never leased
    call(session, Opcode.SET, b"k", b"v5", version=5)
    lease_check(session, b"k", 200)
    clock.advance(0.05)
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=6)) == 150
    # The lease was on version 5: removing versions older than 5 waits for nothing.
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=5)) == 0
    assert milliseconds(call(session, Opcode.DELETE, b"other", version=9)) == 0
    clock.advance(0.15)
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=6)) == 0


def test_a_newer_version_leased_keeps_the_older_versions_lease_in_the_reply() -> None:
    session, clock = settled_node()
    call(session, Opcode.SET, b"k", b"v5", version=5)
    lease_check(session, b"k", 300)  # on 5, until 0.3
    call(session, Opcode.SET, b"k", b"v6", version=6)
    clock.advance(0.1)
    lease_check(session, b"k", 100)  # on 6, until 0.2
    # Invalidating up to 6 must still wait for the lease on 5; up to 7, for both.
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=6)) == 200
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=7)) == 200
    assert milliseconds(call(session, Opcode.DELETE, b"k")) == 200  # unversioned: every version


def test_clear_reports_the_longest_read_lease_of_any_key() -> None:
    session, clock = settled_node()
    for key, ms in ((b"a", 100), (b"b", 400), (b"c", 250)):
        call(session, Opcode.SET, key, b"v", version=1)
        lease_check(session, key, ms)
    clock.advance(0.1)
    assert milliseconds(call(session, Opcode.CLEAR, version=2)) == 300


def test_a_new_incarnation_counts_every_key_as_leased_for_the_longest_lease() -> None:
    """It cannot know what its previous incarnation granted, only for how long at most."""
    clock = FakeClock()
    session = BinarySession(make_node(clock=clock))
    longest = int(MAX_READ_LEASE_SECONDS * 1000)
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=3)) == longest
    assert milliseconds(call(session, Opcode.CLEAR)) == longest
    clock.advance(MAX_READ_LEASE_SECONDS - 0.25)
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=3)) == 250
    clock.advance(0.25)
    assert milliseconds(call(session, Opcode.DELETE, b"k", version=3)) == 0


def test_ended_read_leases_are_forgotten() -> None:
    session, clock = settled_node()
    for n in range(100):
        call(session, Opcode.SET, b"k%d" % n, b"v", version=1)
        lease_check(session, b"k%d" % n, 100)
    assert len(session._node.read_leases) == 100
    clock.advance(0.2)
    call(session, Opcode.SET, b"last", b"v", version=1)
    lease_check(session, b"last", 100)
    assert len(session._node.read_leases) == 1


@pytest.mark.parametrize("extras", [b"\x00", b"\x00" * 8])
def test_a_read_lease_time_of_the_wrong_size_is_an_invalid_argument(extras: bytes) -> None:
    session, _ = settled_node()
    call(session, Opcode.SET, b"k", b"v", version=1)
    reply = call(session, Opcode.CHECK, b"k", extras=extras)
    assert reply.status == Status.INVALID_ARGUMENT
    assert len(session._node.read_leases) == 0


# -- binary: write tickets --------------------------------------------------------------------


def test_a_granted_lease_is_a_write_ticket_for_the_fill() -> None:
    session = BinarySession(make_node())
    granted = call(session, Opcode.LEASE, b"k")
    assert granted.status == Status.NOT_FOUND
    fill = call(session, Opcode.ADD, b"k", b"v", version=3, ticket=granted.version)
    assert fill.status == Status.OK


@pytest.mark.parametrize("opcode", WRITES)
def test_a_versioned_write_without_a_ticket_is_refused_and_changes_nothing(opcode: int) -> None:
    session = BinarySession(make_node())
    reply = call(session, opcode, b"k", b"v", version=3, ticket=0)
    assert reply.status == Status.NOT_STORED
    assert b"ticket" in bytes(reply.value)
    assert call(session, Opcode.GET, b"k").status == Status.NOT_FOUND
    # Unversioned writes (memcached's kind) need none.
    assert call(session, opcode, b"k", b"plain").status == Status.OK


@pytest.mark.parametrize("opcode", WRITES)
def test_a_ticket_as_old_as_a_tombstone_is_refused(opcode: int) -> None:
    """However long a client paused between its ticket and its write, no
    tombstone created after the ticket can have expired when the write lands."""
    clock = FakeClock()
    session = BinarySession(make_node(clock=clock))
    ticket = call(session, Opcode.TICKET).version
    clock.advance(DEFAULT_TOMBSTONE_SECONDS - 0.001)
    assert call(session, opcode, b"k", b"v", version=3, ticket=ticket).status == Status.OK
    clock.advance(0.001)
    reply = call(session, opcode, b"k2", b"v", version=3, ticket=ticket)
    assert reply.status == Status.NOT_STORED
    assert call(session, Opcode.GET, b"k2").status == Status.NOT_FOUND


def test_a_ticket_of_another_incarnation_or_from_the_future_is_refused() -> None:
    clock = FakeClock()
    before_restart = BinarySession(make_node(clock=clock))
    after_restart = BinarySession(make_node(clock=clock))  # same clock, new node
    ticket = call(before_restart, Opcode.TICKET).version
    assert call(after_restart, Opcode.SET, b"k", b"v", version=3, ticket=ticket).status == (
        Status.NOT_STORED
    )
    future = call(after_restart, Opcode.TICKET).version + 1_000_000
    assert call(after_restart, Opcode.SET, b"k", b"v", version=3, ticket=future).status == (
        Status.NOT_STORED
    )


def test_a_clear_voids_every_ticket_taken_before_it() -> None:
    clock = FakeClock()
    session = BinarySession(make_node(clock=clock))
    before = call(session, Opcode.TICKET).version
    clock.advance(0.001)
    call(session, Opcode.CLEAR)
    clock.advance(0.001)
    after = call(session, Opcode.TICKET).version
    assert call(session, Opcode.ADD, b"k", b"old", version=3, ticket=before).status == (
        Status.NOT_STORED
    )
    assert call(session, Opcode.ADD, b"k", b"v", version=3, ticket=after).status == Status.OK


def test_extras_other_than_a_write_ticket_are_refused() -> None:
    session = BinarySession(make_node())
    short = encode_request(Opcode.SET, 1, b"k", b"v", version=3, extras=b"1234")
    on_get = encode_request(Opcode.GET, 2, b"k", extras=TICKET.pack(1))
    replies = exchange(session, short + on_get)
    assert [r.status for r in replies] == [Status.INVALID_ARGUMENT, Status.INVALID_ARGUMENT]
    assert not session.closing
    assert call(session, Opcode.GET, b"k").status == Status.NOT_FOUND


def test_ping_and_stats_report_the_incarnation() -> None:
    node, other = make_node(), make_node()
    boot_id = call(BinarySession(node), Opcode.PING).version
    assert boot_id == node.stats()["boot_id"] != other.stats()["boot_id"]
    assert boot_id > 0


def test_a_refused_stale_fill_still_ends_the_lease() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.DELETE, b"k", version=10)  # an upload of version 10 invalidated
    assert call(session, Opcode.LEASE, b"k").status == Status.NOT_FOUND
    assert call(session, Opcode.ADD, b"k", b"old", version=9).status == Status.NOT_STORED
    assert call(session, Opcode.LEASE, b"k").status == Status.NOT_FOUND  # a new lease


def test_text_set_and_delete_end_a_lease() -> None:
    node = make_node()
    binary, text_session = BinarySession(node), TextSession(node)
    assert call(binary, Opcode.LEASE, b"k").status == Status.NOT_FOUND
    assert text(text_session, b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    assert call(binary, Opcode.LEASE, b"k").status == Status.OK
    assert text(text_session, b"delete k\r\n") == b"DELETED\r\n"
    assert call(binary, Opcode.LEASE, b"k").status == Status.NOT_FOUND
    assert text(text_session, b"delete k\r\n") == b"NOT_FOUND\r\n"
    assert call(binary, Opcode.LEASE, b"k").status == Status.NOT_FOUND


def test_lease_time_is_capped_at_sixty_seconds() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.LEASE, b"k", flags=3_600_000)
    assert call(session, Opcode.LEASE, b"k").flags == 60_000


def test_check_gives_the_version_without_the_value_and_counts_the_reads_it_answers() -> None:
    session = BinarySession(make_node())
    call(session, Opcode.SET, b"k", b"v" * 1000, flags=1, version=12)
    reply = call(session, Opcode.CHECK, b"k", flags=3)  # on behalf of three reads
    assert (reply.status, reply.version, reply.flags, reply.value) == (Status.OK, 12, 1, b"")
    # A miss counts nothing: the reads go on to a GET, which counts them.
    assert call(session, Opcode.CHECK, b"gone", flags=3).status == Status.NOT_FOUND
    stats = session._node.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"]) == (3, 3, 0)


def test_a_check_naming_another_version_counts_nothing() -> None:
    """A CHECK may name the version the client's copy holds: when the node holds
    another, the client reads the key anew (a GET, which counts), so the CHECK
    must not count those reads as hits too."""
    session = BinarySession(make_node())
    call(session, Opcode.SET, b"k", b"v" * 1000, flags=1, version=12)
    assert call(session, Opcode.CHECK, b"k", flags=2, version=12).version == 12
    assert call(session, Opcode.CHECK, b"k", flags=3, version=11).version == 12
    stats = session._node.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"]) == (2, 2, 0)


def test_an_oversized_write_ends_the_lease() -> None:
    node = make_node(max_item_size=100)
    binary, text_session = BinarySession(node), TextSession(node)
    assert call(binary, Opcode.LEASE, b"k").status == Status.NOT_FOUND
    assert call(binary, Opcode.ADD, b"k", b"v" * 200, version=3).status == Status.TOO_LARGE
    assert call(binary, Opcode.LEASE, b"k").status == Status.NOT_FOUND  # a new lease
    assert text(text_session, b"set k 0 0 200\r\n" + b"v" * 200 + b"\r\n").startswith(
        b"SERVER_ERROR"
    )
    assert call(binary, Opcode.LEASE, b"k").status == Status.NOT_FOUND


def test_expired_leases_are_swept_without_rebuilding_at_every_grant() -> None:
    clock = FakeClock()
    leases = Leases(clock)
    for number in range(20_000):
        assert leases.acquire(b"key%d" % number, 1.0) == 0.0
        clock.advance(0.001)  # about 1,000 leases live at any time
    assert len(leases) < 3_000  # expired ones were swept
    # Live leases outnumbering the first sweep are kept, and each sweep at
    # least halves the work until the next one (amortised O(1) per grant).
    crowded = Leases(FakeClock())
    for number in range(5_000):
        crowded.acquire(b"key%d" % number, 60.0)
    assert len(crowded) == 5_000
    assert crowded.acquire(b"key0", 60.0) > 0


def test_lease_of_the_empty_key_is_an_invalid_argument() -> None:
    session = BinarySession(make_node())
    assert call(session, Opcode.LEASE, b"").status == Status.INVALID_ARGUMENT
    assert call(session, Opcode.LOOKUP, b"").status == Status.INVALID_ARGUMENT


def test_lookup_is_a_counted_get_that_answers_a_miss_with_its_lease() -> None:
    clock = FakeClock()
    session = BinarySession(make_node(clock=clock))
    granted = call(session, Opcode.LOOKUP, b"k", flags=2000)
    assert granted.status == Status.NOT_FOUND  # a miss, and the lease to fill it
    held = call(session, Opcode.LOOKUP, b"k", flags=2000)
    assert (held.status, held.flags) == (Status.LEASED, 2000)
    # The granted lease carries the fill's ticket, as LEASE's does.
    fill = call(session, Opcode.ADD, b"k", b"value", flags=2, version=9, ticket=granted.version)
    assert fill.status == Status.OK
    hit = call(session, Opcode.LOOKUP, b"k")
    assert (hit.status, hit.value, hit.flags, hit.version) == (Status.OK, b"value", 2, 9)
    stats = session._node.stats()
    # Each LOOKUP is a read: two misses, one hit; only the first was granted.
    assert (stats["lookups"], stats["misses"], stats["hits"]) == (3, 2, 1)
    assert (stats["leases_granted"], stats["lease_waits"]) == (1, 1)


# -- what memcached's tools ask for (libmemcached's memcstat, memcdump) ----------


def test_text_version_parses_as_a_memcached_release() -> None:
    # libmemcached reads "major.minor.micro" with strtol and refuses a major of 0.
    reply = text(TextSession(make_node()), b"version\r\n")
    version = reply.removeprefix(b"VERSION ").removesuffix(b"\r\n").decode()
    release, _, ours = version.partition("-imagecache-")
    major, minor, micro = (int(number) for number in release.split("."))
    assert (major, minor) >= (1, 4)
    assert micro >= 0
    assert ours == __version__


def stat_lines(reply: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs of a stats reply, which must end with END."""
    assert reply.endswith(b"END\r\n")
    pairs = []
    for line in reply.removesuffix(b"END\r\n").split(b"\r\n")[:-1]:
        word, name, value = line.decode().split(" ")
        assert word == "STAT"
        pairs.append((name, value))
    return pairs


def test_text_stats_items_and_slabs_show_one_slab_class() -> None:
    node = make_node()
    session = TextSession(node)
    assert text(session, b"stats items\r\n") == b"END\r\n"  # no class holds items
    assert dict(stat_lines(text(session, b"stats slabs\r\n")))["active_slabs"] == "0"
    text(session, b"set a 0 0 3\r\nabc\r\nset bb 0 0 5\r\nvwxyz\r\n")
    items = dict(stat_lines(text(session, b"stats items\r\n")))
    assert items["items:1:number"] == "2"
    assert items["items:1:mem_requested"] == str(node.store.used)
    assert {name.split(":")[1] for name in items} == {"1"}
    slabs = dict(stat_lines(text(session, b"stats slabs\r\n")))
    assert (slabs["active_slabs"], slabs["1:used_chunks"], slabs["1:cmd_set"]) == ("1", "2", "2")
    assert slabs["total_malloced"] == str(node.store.used)


def test_text_cachedump_lists_keys_sizes_and_expiry_times() -> None:
    clock = FakeClock()
    node = make_node(clock=clock)
    session = TextSession(node)
    text(session, b"set forever 0 0 3\r\nabc\r\nset brief 0 100 5\r\nvwxyz\r\n")
    text(session, b"set gone 0 10 1\r\nx\r\n")
    clock.advance(50)  # "gone" has expired, "brief" expires in 50 s
    reply = text(session, b"stats cachedump 1 0\r\n")
    assert sorted(reply.split(b"\r\n")[:-2]) == [
        b"ITEM brief [5 b; %d s]" % (WALL_TIME + 50),
        b"ITEM forever [3 b; 0 s]",
    ]
    assert reply.endswith(b"\r\nEND\r\n")
    assert text(session, b"stats cachedump 1 1\r\n").count(b"ITEM ") == 1  # the limit
    assert node.store.stats().lookups == 0  # listing is not reading


def test_text_cachedump_of_other_classes_is_empty_up_to_the_last_class() -> None:
    session = TextSession(make_node())
    text(session, b"set k 0 0 1\r\nv\r\n")
    # memcdump asks for classes 0 to 63: all but class 1 are empty.
    assert text(session, b"stats cachedump 0 0\r\nstats cachedump 63 0\r\n") == b"END\r\nEND\r\n"
    assert text(session, b"stats cachedump 64 0\r\n") == b"CLIENT_ERROR Illegal slab id\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"stats cachedump\r\n",
        b"stats cachedump 1\r\n",
        b"stats cachedump 1 0 0\r\n",
        b"stats cachedump one 0\r\n",
        b"stats cachedump -1 0\r\n",
        b"stats cachedump 1 -5\r\n",
        b"stats cachedump 4294967296 0\r\n",
    ],
)
def test_text_bad_cachedump_line_is_a_client_error(line: bytes) -> None:
    session = TextSession(make_node())
    text(session, b"set k 0 0 1\r\nv\r\n")
    assert text(session, line + b"get k\r\n") == (
        b"CLIENT_ERROR bad command line format\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    )


def test_text_cachedump_leaves_out_keys_a_text_line_cannot_carry() -> None:
    node = make_node()
    binary = BinarySession(node)
    for key in (b"plain", b"with space", b"tab\there", b"new\r\nline", b"caf\xc3\xa9"):
        assert call(binary, Opcode.SET, key, b"v").status == Status.OK
    reply = text(TextSession(node), b"stats cachedump 1 0\r\n")
    keys = sorted(line.split(b" ")[1] for line in reply.split(b"\r\n")[:-2])
    assert keys == [b"caf\xc3\xa9", b"plain"]


def test_text_cachedump_reply_stops_at_two_megabytes_as_memcached() -> None:
    node = make_node(capacity=64 * MIB)
    binary = BinarySession(node)
    for number in range(12_000):  # about 3 MB of ITEM lines
        key = b"%0240d" % number
        assert call(binary, Opcode.SET, key, b"v").status == Status.OK
    reply = text(TextSession(node), b"stats cachedump 1 0\r\n")
    assert reply.endswith(b"\r\nEND\r\n")
    assert 2 * MIB - 300 < len(reply) <= 2 * MIB


def test_a_bad_request_gets_one_log_line_in_either_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = make_node()
    with caplog.at_level(logging.INFO, logger="cachenode"):
        call(BinarySession(node), 0x7F)
        assert len(caplog.records) == 1
        assert "unknown opcode 0x7f" in caplog.records[0].getMessage()
        text(TextSession(node), b"frobnicate\r\n")
        assert len(caplog.records) == 2
        assert "bad text command" in caplog.records[1].getMessage()
