"""Tests of the memcached text protocol codec (cachenode.textprotocol)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.errors import ProtocolError
from cachenode.streaminput import COLLECT_THRESHOLD, VIEW_MIN
from cachenode.textprotocol import (
    BAD_FORMAT,
    ERROR,
    MAX_LINE_LENGTH,
    BadCommand,
    CacheDump,
    Delete,
    FlushAll,
    OversizedStore,
    Quit,
    Retrieve,
    Stats,
    StoreCommand,
    TextCommand,
    TextDecoder,
    Version,
    cachedump_reply,
    client_error,
    server_error,
    value_header,
)

MAX_VALUE = 1000

# -- helpers -----------------------------------------------------------------


def drain(decoder: TextDecoder) -> list[TextCommand]:
    commands: list[TextCommand] = []
    while (command := decoder.next_command()) is not None:
        commands.append(command)
    return commands


def decode_chunks(chunks: Iterable[bytes], max_value_length: int = MAX_VALUE) -> list[TextCommand]:
    decoder = TextDecoder(max_value_length)
    commands: list[TextCommand] = []
    for chunk in chunks:
        decoder.feed(chunk)
        commands += drain(decoder)
    return commands


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[index : index + 1] for index in range(len(data))]


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


# -- every command -------------------------------------------------------------

COMMANDS: list[tuple[bytes, TextCommand]] = [
    (b"get foo\r\n", Retrieve([b"foo"], with_cas=False)),
    (b"get a bb ccc\r\n", Retrieve([b"a", b"bb", b"ccc"], with_cas=False)),
    (b"gets foo\r\n", Retrieve([b"foo"], with_cas=True)),
    (b"gets a bb ccc\r\n", Retrieve([b"a", b"bb", b"ccc"], with_cas=True)),
    (b"get " + b"k" * 250 + b"\r\n", Retrieve([b"k" * 250], with_cas=False)),
    (b"set foo 0 0 5\r\nhello\r\n", StoreCommand(False, b"foo", 0, 0, b"hello", False)),
    (
        b"set foo 4294967295 3600 7\r\nhe\r\nllo\r\n",
        StoreCommand(False, b"foo", 0xFFFFFFFF, 3600, b"he\r\nllo", False),
    ),
    (b"set empty 1 0 0\r\n\r\n", StoreCommand(False, b"empty", 1, 0, b"", False)),
    (b"set foo 0 -1 3\r\nabc\r\n", StoreCommand(False, b"foo", 0, -1, b"abc", False)),
    (
        b"set big 0 0 1000\r\n" + b"x" * 1000 + b"\r\n",
        StoreCommand(False, b"big", 0, 0, b"x" * 1000, False),
    ),
    (b"add foo 7 0 3\r\nabc\r\n", StoreCommand(True, b"foo", 7, 0, b"abc", False)),
    (b"set foo 5 0 3 noreply\r\nabc\r\n", StoreCommand(False, b"foo", 5, 0, b"abc", True)),
    (b"add foo 5 0 3 noreply\r\nabc\r\n", StoreCommand(True, b"foo", 5, 0, b"abc", True)),
    (b"delete foo\r\n", Delete(b"foo", noreply=False)),
    (b"delete foo 0\r\n", Delete(b"foo", noreply=False)),
    (b"delete foo noreply\r\n", Delete(b"foo", noreply=True)),
    (b"delete foo 0 noreply\r\n", Delete(b"foo", noreply=True)),
    (b"flush_all\r\n", FlushAll(noreply=False)),
    (b"flush_all noreply\r\n", FlushAll(noreply=True)),
    (b"flush_all 10\r\n", BadCommand(b"CLIENT_ERROR flush_all with a delay is not supported\r\n")),
    (b"flush_all 0 noreply\r\n", FlushAll(noreply=True)),
    (b"stats\r\n", Stats(b"")),
    (b"stats items\r\n", Stats(b"items")),
    (b"version\r\n", Version()),
    (b"quit\r\n", Quit()),
    # A bare LF ends a line too, as in memcached; extra spaces are ignored.
    (b"get foo\n", Retrieve([b"foo"], with_cas=False)),
    (b"get   foo  bar \r\n", Retrieve([b"foo", b"bar"], with_cas=False)),
]
COMMAND_IDS = [data.split(b"\r\n")[0][:40].decode(errors="replace") for data, _ in COMMANDS]


@pytest.mark.parametrize(("data", "expected"), COMMANDS, ids=COMMAND_IDS)
def test_command_fed_whole(data: bytes, expected: TextCommand) -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(data)
    assert decoder.next_command() == expected
    assert decoder.next_command() is None


@pytest.mark.parametrize(("data", "expected"), COMMANDS, ids=COMMAND_IDS)
def test_command_fed_one_byte_at_a_time(data: bytes, expected: TextCommand) -> None:
    decoder = TextDecoder(MAX_VALUE)
    for chunk in one_byte_at_a_time(data[:-1]):
        decoder.feed(chunk)
        assert decoder.next_command() is None
    decoder.feed(data[-1:])
    assert decoder.next_command() == expected
    assert decoder.next_command() is None


@pytest.mark.parametrize(("data", "expected"), COMMANDS, ids=COMMAND_IDS)
def test_command_with_trailing_bytes(data: bytes, expected: TextCommand) -> None:
    following = b"set next 3 0 4\r\nnext\r\n"
    for cut in (1, 5, 16, 18, len(following) - 1):
        decoder = TextDecoder(MAX_VALUE)
        decoder.feed(data + following[:cut])
        assert decoder.next_command() == expected
        assert decoder.next_command() is None
        decoder.feed(following[cut:])
        assert decoder.next_command() == StoreCommand(False, b"next", 3, 0, b"next", False)
        assert decoder.next_command() is None


def test_pipelined_commands_in_one_feed() -> None:
    data = b"".join(data for data, _ in COMMANDS)
    assert decode_chunks([data]) == [command for _, command in COMMANDS]
    assert decode_chunks(one_byte_at_a_time(data)) == [command for _, command in COMMANDS]


# -- bad lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"bogus\r\n", ERROR),
        (b"GET foo\r\n", ERROR),
        (b"\r\n", ERROR),
        (b"   \r\n", ERROR),
        (b"get\r\n", ERROR),
        (b"gets\r\n", ERROR),
        (b"version now\r\n", ERROR),
        (b"quit now\r\n", ERROR),
        (b"incr foo 1\r\n", ERROR),
        (b"get " + b"k" * 251 + b"\r\n", BAD_FORMAT),
        (b"get ok " + b"k" * 251 + b"\r\n", BAD_FORMAT),
        (b"set\r\n", BAD_FORMAT),
        (b"set foo\r\n", BAD_FORMAT),
        (b"set foo 0 0\r\n", BAD_FORMAT),
        (b"set foo x 0 5\r\n", BAD_FORMAT),
        (b"set foo 0 x 5\r\n", BAD_FORMAT),
        (b"set foo 0 0 x\r\n", BAD_FORMAT),
        (b"set foo -1 0 5\r\n", BAD_FORMAT),
        (b"set foo 4294967296 0 5\r\n", BAD_FORMAT),
        (b"set foo 0 0 -1\r\n", BAD_FORMAT),
        (b"set foo 0 0 5 sometimes\r\n", BAD_FORMAT),
        (b"set foo 0 0 5 noreply extra\r\n", BAD_FORMAT),
        (b"add foo 0 0\r\n", BAD_FORMAT),
        (b"delete\r\n", BAD_FORMAT),
        (b"delete noreply\r\n", BAD_FORMAT),
        (b"delete foo 5\r\n", BAD_FORMAT),
        (b"delete foo 0 0\r\n", BAD_FORMAT),
        (b"delete " + b"k" * 251 + b"\r\n", BAD_FORMAT),
        (b"flush_all soon\r\n", BAD_FORMAT),
        (b"flush_all 1 2\r\n", BAD_FORMAT),
    ],
)
def test_bad_line_gives_memcached_reply_and_decoding_goes_on(line: bytes, reply: bytes) -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(line + b"version\r\n")
    assert decoder.next_command() == BadCommand(reply)
    assert decoder.next_command() == Version()
    assert decoder.next_command() is None


def test_memcached_reply_texts() -> None:
    assert ERROR == b"ERROR\r\n"
    assert BAD_FORMAT == b"CLIENT_ERROR bad command line format\r\n"
    assert client_error("oops") == b"CLIENT_ERROR oops\r\n"
    assert server_error("oops") == b"SERVER_ERROR oops\r\n"
    assert value_header(b"k", 5, 10) == b"VALUE k 5 10\r\n"
    assert value_header(b"k", 5, 10, 99) == b"VALUE k 5 10 99\r\n"


def test_set_with_too_long_key_skips_its_data_block() -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(b"set " + b"k" * 251 + b" 0 0 5\r\nhello\r\nversion\r\n")
    assert decoder.next_command() == BadCommand(BAD_FORMAT)
    assert decoder.next_command() == Version()


@pytest.mark.parametrize(
    "data",
    [
        b"set foo 0 0 5\r\nhelloXY",
        b"set foo 0 0 5\r\nhello\nX",
        b"set foo 0 0 5\r\nhello w",
        b"set foo 0 0 0\r\nab",
        b"add foo 0 0 3\r\nabc\n\r",
    ],
)
def test_data_block_without_crlf_raises_protocol_error(data: bytes) -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(data)
    with pytest.raises(ProtocolError):
        decoder.next_command()
    decoder = TextDecoder(MAX_VALUE)
    for chunk in one_byte_at_a_time(data[:-1]):
        decoder.feed(chunk)
        assert decoder.next_command() is None
    decoder.feed(data[-1:])
    with pytest.raises(ProtocolError):
        decoder.next_command()


def test_line_longer_than_limit_without_newline_raises_protocol_error() -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(b"g" * MAX_LINE_LENGTH)
    assert decoder.next_command() is None  # 2048 bytes may still become a line
    decoder.feed(b"g")
    with pytest.raises(ProtocolError):
        decoder.next_command()


def test_overlong_line_fed_whole_raises_even_with_a_late_newline() -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(b"get " + b"k" * 3000 + b"\r\n")
    with pytest.raises(ProtocolError):
        decoder.next_command()


def test_line_of_maximum_length_is_a_line() -> None:
    line = b"get " + b"k" * (MAX_LINE_LENGTH - len(b"get ") - 1) + b"\r\n"
    assert len(line) == MAX_LINE_LENGTH + 1  # 2048 bytes before the LF
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(line)
    assert decoder.next_command() == BadCommand(BAD_FORMAT)  # key over 250 bytes


def test_long_data_block_is_not_mistaken_for_a_long_line() -> None:
    value = b"v" * 5000
    decoder = TextDecoder(10_000)
    for start in range(0, 5000, 1000):
        decoder.feed((b"set k 0 0 5000\r\n" if start == 0 else b"") + value[start : start + 1000])
        assert decoder.next_command() is None
    decoder.feed(b"\r\n")
    assert decoder.next_command() == StoreCommand(False, b"k", 0, 0, value, False)


# -- oversized data blocks ------------------------------------------------------------------

OVERSIZED = b"set big 1 0 1001\r\n" + b"B" * 1001 + b"\r\n"
NEXT = b"get big\r\n"


def test_oversized_set_is_skipped_and_next_command_decodes() -> None:
    assert decode_chunks([OVERSIZED + NEXT]) == [
        OversizedStore(b"big", 1001, noreply=False),
        Retrieve([b"big"], with_cas=False),
    ]


def test_oversized_add_noreply() -> None:
    data = b"add big 1 0 1001 noreply\r\n" + b"B" * 1001 + b"\r\n" + NEXT
    assert decode_chunks([data]) == [
        OversizedStore(b"big", 1001, noreply=True),
        Retrieve([b"big"], with_cas=False),
    ]


@pytest.mark.parametrize(
    "cut",
    [
        len(b"set big 1 0 1001\r\n"),  # line, then block and next command
        len(b"set big 1 0 1001\r\n") + 500,  # block split
        len(OVERSIZED) - 2,  # split before the block's CRLF
        len(OVERSIZED) - 1,  # split inside the block's CRLF
        len(OVERSIZED),  # block ends with the feed
        len(OVERSIZED) + 3,  # next command split
    ],
)
def test_oversized_set_split_across_feeds_is_skipped(cut: int) -> None:
    data = OVERSIZED + NEXT
    assert decode_chunks([data[:cut], data[cut:]]) == [
        OversizedStore(b"big", 1001, noreply=False),
        Retrieve([b"big"], with_cas=False),
    ]


def test_oversized_set_one_byte_at_a_time() -> None:
    assert decode_chunks(one_byte_at_a_time(OVERSIZED + NEXT)) == [
        OversizedStore(b"big", 1001, noreply=False),
        Retrieve([b"big"], with_cas=False),
    ]


def test_oversized_block_is_not_buffered() -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(b"set huge 0 0 1000000\r\n")
    assert decoder.next_command() == OversizedStore(b"huge", 1_000_000, noreply=False)
    for _ in range(100):
        decoder.feed(b"z" * 10_000)
        assert decoder.next_command() is None
    decoder.feed(b"\r\nversion\r\n")
    assert decoder.next_command() == Version()


def test_limit_may_change_between_feeds() -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.max_value_length = 2000
    decoder.feed(OVERSIZED)
    assert decoder.next_command() == StoreCommand(False, b"big", 1, 0, b"B" * 1001, False)


# -- properties ------------------------------------------------------------------------------

TOKENS = [
    b"get",
    b"gets",
    b"set",
    b"add",
    b"delete",
    b"flush_all",
    b"stats",
    b"version",
    b"quit",
    b"noreply",
    b"k",
    b"0",
    b"1",
    b"3",
    b"-1",
    b"12",
    b"4294967296",
    b"abc",
    b" ",
    b" ",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"\r",
]


@st.composite
def text_streams(draw: st.DrawFn) -> bytes:
    """Random bytes, or random runs of protocol tokens with random bytes mixed in."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    parts = draw(st.lists(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=4), max_size=40))
    return b"".join(parts)


def decode_collecting_errors(
    decoder: TextDecoder, chunks: list[bytes]
) -> tuple[list[TextCommand], bool]:
    commands: list[TextCommand] = []
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while (command := decoder.next_command()) is not None:
                assert isinstance(
                    command,
                    Retrieve
                    | StoreCommand
                    | OversizedStore
                    | Delete
                    | FlushAll
                    | Stats
                    | Version
                    | Quit
                    | BadCommand,
                )
                commands.append(command)
        except ProtocolError:
            return commands, True
    return commands, False


@settings(max_examples=400, deadline=None)
@given(
    stream=text_streams(),
    max_value_length=st.sampled_from([0, 2, 10, MAX_VALUE]),
    data=st.data(),
)
def test_arbitrary_bytes_give_commands_none_or_protocol_error(
    stream: bytes, max_value_length: int, data: st.DataObject
) -> None:
    chunks = data.draw(chunkings(stream))
    chunked = decode_collecting_errors(TextDecoder(max_value_length), chunks)
    whole = decode_collecting_errors(TextDecoder(max_value_length), [stream])
    # How the bytes are cut into feeds never changes what comes out.
    assert chunked == whole
    for command in chunked[0]:
        if isinstance(command, StoreCommand):
            assert len(command.value) <= max_value_length
        if isinstance(command, OversizedStore):
            assert command.length > max_value_length


# Keys cannot hold the whitespace that separates a line's fields.
NO_WHITESPACE = bytes.maketrans(b" \t\n\r\x0b\x0c", b"______")


@settings(max_examples=200, deadline=None)
@given(
    commands=st.lists(
        st.tuples(
            st.booleans(),
            st.binary(min_size=1, max_size=250).map(lambda key: key.translate(NO_WHITESPACE)),
            st.integers(0, 0xFFFFFFFF),
            st.integers(-1, 10**6),
            st.binary(max_size=30),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    ),
    data=st.data(),
)
def test_store_commands_round_trip_with_arbitrary_chunking(
    commands: list[tuple[bool, bytes, int, int, bytes, bool]], data: st.DataObject
) -> None:
    stream = b"".join(
        b"%s %s %d %d %d%s\r\n%s\r\n"
        % (
            b"add" if add else b"set",
            key,
            flags,
            exptime,
            len(value),
            b" noreply" if noreply else b"",
            value,
        )
        for add, key, flags, exptime, value, noreply in commands
    )
    expected = [
        StoreCommand(add, key, flags, exptime, value, noreply)
        for add, key, flags, exptime, value, noreply in commands
    ]
    assert decode_chunks(data.draw(chunkings(stream))) == expected


# -- large values spanning reads (collected in their own buffer) ------------------------------

LARGE = bytes(range(256)) * 800  # 200 KiB, above the collecting threshold


@pytest.mark.parametrize(
    "cuts",
    [
        [20],  # the line and a little of the value, then the rest
        [20, 70_000, 140_000, 204_818],  # the CRLF split from the value's end
        [20, 204_819],  # the CRLF split in two
        [204_820],  # the whole block, and the next command separately
        list(range(20, 204_900, 4096)),  # many small reads
    ],
)
def test_large_value_split_across_reads_is_collected_whole(cuts: list[int]) -> None:
    data = b"set big 3 0 %d\r\n" % len(LARGE) + LARGE + b"\r\nget big\r\n"
    bounds = [0, *cuts, len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode_chunks(chunks, max_value_length=1 << 20) == [
        StoreCommand(False, b"big", 3, 0, LARGE, False),
        Retrieve([b"big"], False),
    ]


def test_large_value_without_crlf_after_it_raises_protocol_error() -> None:
    decoder = TextDecoder(1 << 20)
    decoder.feed(b"add big 0 0 %d\r\n" % len(LARGE) + LARGE[:1000])
    assert decoder.next_command() is None
    assert not decoder.idle
    decoder.feed(LARGE[1000:] + b"XX")
    with pytest.raises(ProtocolError):
        decoder.next_command()


# -- large values kept as views of their chunk ------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(
        st.sampled_from([0, 100, VIEW_MIN - 1, VIEW_MIN, 40_000, COLLECT_THRESHOLD + 5_000]),
        min_size=1,
        max_size=4,
    ),
    data=st.data(),
)
def test_decoded_values_are_exact_and_keep_little_else_alive(
    sizes: list[int], data: st.DataObject
) -> None:
    # As in the binary decoder: a value may be a view of its chunk, never one
    # that keeps more than 1 KiB of other bytes alive with it.
    commands = [
        StoreCommand(False, b"k%d" % number, 0, 0, bytes([number]) * size, False)
        for number, size in enumerate(sizes)
    ]
    stream = b"".join(
        b"set %s 0 0 %d\r\n%s\r\n" % (command.key, len(command.value), command.value)
        for command in commands
    )
    chunks = data.draw(st.one_of(st.just([stream]), chunkings(stream)))
    decoded = decode_chunks(chunks, max_value_length=1 << 20)
    assert decoded == commands
    for command in decoded:
        assert isinstance(command, StoreCommand)
        if isinstance(command.value, memoryview):
            assert command.value.readonly
            assert len(command.value) >= VIEW_MIN
            assert memoryview(command.value.obj).nbytes - len(command.value) <= 1024


def test_large_value_alone_in_its_chunk_is_not_copied() -> None:
    chunk = b"set big 0 0 %d\r\n" % len(LARGE) + LARGE + b"\r\n"
    decoder = TextDecoder(1 << 20)
    decoder.feed(chunk)
    (command,) = drain(decoder)
    assert isinstance(command, StoreCommand)
    assert isinstance(command.value, memoryview)
    assert command.value.obj is chunk
    assert command.value == LARGE


# -- stats cachedump (libmemcached's memcdump) -------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"stats cachedump 1 0\r\n", CacheDump(1, 0)),
        (b"stats cachedump 63 100\r\n", CacheDump(63, 100)),
        (b"stats  cachedump 0 4294967295\r\n", CacheDump(0, (1 << 32) - 1)),
        (b"stats cachedump 64 0\r\n", BadCommand(b"CLIENT_ERROR Illegal slab id\r\n")),
        (b"stats cachedump 1 x\r\n", BadCommand(BAD_FORMAT)),
        (b"stats cachedump 1\r\n", BadCommand(BAD_FORMAT)),
    ],
)
def test_stats_cachedump_decodes(line: bytes, expected: TextCommand) -> None:
    decoder = TextDecoder(MAX_VALUE)
    decoder.feed(line)
    assert decoder.next_command() == expected


def test_cachedump_reply_format_and_limit() -> None:
    entries = [(b"a", 3, 0), (b"b c", 1, 0), (b"d", 10, 1_700_000_000)]
    assert cachedump_reply(iter(entries), 0) == (
        b"ITEM a [3 b; 0 s]\r\nITEM d [10 b; 1700000000 s]\r\nEND\r\n"
    )
    assert cachedump_reply(iter(entries), 1) == b"ITEM a [3 b; 0 s]\r\nEND\r\n"
    assert cachedump_reply(iter([]), 0) == b"END\r\n"
