"""Tests of the binary protocol codec (cachenode.protocol): encoders and FrameDecoder."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.errors import ProtocolError
from cachenode.protocol import (
    HEADER,
    HEADER_SIZE,
    KEYS_ENTRY,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    MAX_EXTRAS_LENGTH,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    Frame,
    FrameDecoder,
    Opcode,
    OversizedFrame,
    decode_keys_entries,
    encode_frame,
    encode_header,
    encode_keys_entries,
    encode_request,
    encode_response,
)
from cachenode.status import Status
from cachenode.streaminput import COLLECT_THRESHOLD, VIEW_MIN

Decoded = Frame | OversizedFrame

# -- helpers -----------------------------------------------------------------


def encode(magic: int, frame: Frame) -> bytes:
    return encode_frame(
        magic,
        frame.opcode,
        frame.request_id,
        frame.key,
        frame.value,
        status=frame.status,
        flags=frame.flags,
        version=frame.version,
        extras=frame.extras,
    )


def drain(decoder: FrameDecoder) -> list[Decoded]:
    frames: list[Decoded] = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def decode_chunks(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[Decoded]:
    """Feed each chunk and collect every frame that becomes complete."""
    frames: list[Decoded] = []
    for chunk in chunks:
        decoder.feed(chunk)
        frames += drain(decoder)
    return frames


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[index : index + 1] for index in range(len(data))]


def raw_header(
    magic: int = MAGIC_REQUEST,
    opcode: int = Opcode.GET,
    status: int = 0,
    key_length: int = 0,
    extras_length: int = 0,
    value_length: int = 0,
    request_id: int = 1,
    flags: int = 0,
    version: int = 0,
) -> bytes:
    return HEADER.pack(
        magic, opcode, status, key_length, extras_length, value_length, request_id, flags, version
    )


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random points (possibly into empty pieces)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


# -- every frame kind ------------------------------------------------------------


def request_frames() -> list[Frame]:
    frames = []
    for opcode in Opcode:
        frames += [
            Frame(opcode, 1),
            Frame(opcode, 2, key=b"some-key"),
            Frame(opcode, 3, key=b"k", value=b"value bytes"),
            Frame(opcode, 4, value=b'{"policy": "lru"}'),
            Frame(opcode, 0xFFFFFFFF, key=b"k" * MAX_KEY_LENGTH, value=b"\x00\xff" * 100),
            Frame(opcode, 5, key=b"k", value=b"v", flags=0xDEADBEEF, version=(1 << 64) - 1),
            Frame(opcode, 6, flags=1, version=1),
        ]
    return frames


def response_frames() -> list[Frame]:
    frames = []
    for opcode in Opcode:
        for status in Status:
            if status is Status.UNAVAILABLE:
                continue  # never sent on the wire
            frames.append(Frame(opcode, 7, status=status))
            frames.append(Frame(opcode, 8, value=b"message", status=status))
        frames += [
            Frame(opcode, 9, value=b"value", flags=42, version=1234567890123),
            Frame(opcode, 10, key=b"12345", value=b"entries"),
            Frame(opcode, 0, key=b"k" * MAX_KEY_LENGTH, value=b"x" * 1000, flags=0xFFFFFFFF),
        ]
    return frames


ALL_FRAMES = [(MAGIC_REQUEST, frame) for frame in request_frames()] + [
    (MAGIC_RESPONSE, frame) for frame in response_frames()
]


def frame_id(magic: int, frame: Frame) -> str:
    direction = "request" if magic == MAGIC_REQUEST else "response"
    return f"{direction}-{Opcode(frame.opcode).name}-{frame.request_id}-{Status(frame.status).name}"


FRAME_IDS = [frame_id(magic, frame) for magic, frame in ALL_FRAMES]


@pytest.mark.parametrize(("magic", "frame"), ALL_FRAMES, ids=FRAME_IDS)
def test_frame_fed_whole(magic: int, frame: Frame) -> None:
    decoder = FrameDecoder(magic)
    decoder.feed(encode(magic, frame))
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize(("magic", "frame"), ALL_FRAMES, ids=FRAME_IDS)
def test_frame_fed_one_byte_at_a_time(magic: int, frame: Frame) -> None:
    data = encode(magic, frame)
    decoder = FrameDecoder(magic)
    for index, chunk in enumerate(one_byte_at_a_time(data)):
        decoder.feed(chunk)
        if index < len(data) - 1:
            assert decoder.next_frame() is None
            assert decoder.buffered == index + 1
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize(("magic", "frame"), ALL_FRAMES, ids=FRAME_IDS)
def test_frame_with_trailing_partial_frame(magic: int, frame: Frame) -> None:
    following = Frame(Opcode.SET, 99, key=b"next", value=b"following value", flags=5)
    tail = encode(magic, following)
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 2, len(tail) - 1):
        decoder = FrameDecoder(magic)
        decoder.feed(encode(magic, frame) + tail[:cut])
        assert decoder.next_frame() == frame
        assert decoder.next_frame() is None
        assert decoder.buffered == cut
        decoder.feed(tail[cut:])
        assert decoder.next_frame() == following
        assert decoder.next_frame() is None
        assert decoder.buffered == 0


def test_request_encoder_matches_frame_encoder() -> None:
    assert encode_request(Opcode.SET, 7, b"k", b"v", flags=3, version=4) == encode_frame(
        MAGIC_REQUEST, Opcode.SET, 7, b"k", b"v", flags=3, version=4
    )
    assert encode_response(
        Opcode.GET, 7, Status.NOT_FOUND, b"v", key=b"k", flags=3, version=4
    ) == encode_frame(
        MAGIC_RESPONSE, Opcode.GET, 7, b"k", b"v", status=Status.NOT_FOUND, flags=3, version=4
    )


def test_header_layout() -> None:
    data = encode_response(Opcode.KEYS, 0x01020304, Status.TOO_LARGE, b"vv", key=b"kkk", flags=9)
    assert HEADER_SIZE == 28
    assert data[0] == MAGIC_RESPONSE
    assert data[1] == Opcode.KEYS
    assert data[2:4] == Status.TOO_LARGE.to_bytes(2, "big")
    assert data[4:6] == (3).to_bytes(2, "big")
    assert data[6:8] == b"\x00\x00"
    assert data[8:12] == (2).to_bytes(4, "big")
    assert data[12:16] == b"\x01\x02\x03\x04"
    assert data[16:20] == (9).to_bytes(4, "big")
    assert data[20:28] == bytes(8)
    assert data[28:] == b"kkkvv"


def test_encode_header_then_value_equals_whole_frame() -> None:
    value = b"x" * 5000
    header = encode_header(MAGIC_REQUEST, Opcode.SET, 3, b"key", len(value), flags=2, version=1)
    assert header + value == encode_request(Opcode.SET, 3, b"key", value, flags=2, version=1)


def test_unknown_opcode_is_decoded_as_a_plain_int() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(encode_request(0x42, 17, b"k"))
    assert decoder.next_frame() == Frame(0x42, 17, b"k")


def test_pipelined_frames_in_one_feed() -> None:
    frames = [
        Frame(Opcode.SET, 1, b"a", b"1", flags=1),
        Frame(Opcode.GET, 2, b"a"),
        Frame(Opcode.PING, 3),
        Frame(Opcode.DELETE, 4, b"a"),
        Frame(Opcode.CONFIG, 5, value=b"{}"),
    ]
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(b"".join(encode(MAGIC_REQUEST, frame) for frame in frames))
    assert drain(decoder) == frames
    assert decoder.buffered == 0


def test_pipelined_frames_split_across_feeds() -> None:
    frames = [Frame(Opcode.SET, index, b"k%d" % index, b"v" * index) for index in range(20)]
    data = b"".join(encode(MAGIC_REQUEST, frame) for frame in frames)
    decoder = FrameDecoder(MAGIC_REQUEST)
    chunks = [data[start : start + 37] for start in range(0, len(data), 37)]
    assert decode_chunks(decoder, chunks) == frames
    assert decoder.buffered == 0


def test_decoder_accepts_only_its_own_direction() -> None:
    request = encode_request(Opcode.PING, 1)
    decoder = FrameDecoder(MAGIC_RESPONSE)
    decoder.feed(request)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_empty_feed_changes_nothing() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(b"")
    assert decoder.next_frame() is None
    data = encode_request(Opcode.GET, 1, b"k")
    decoder.feed(data[:5])
    decoder.feed(b"")
    assert decoder.buffered == 5
    decoder.feed(data[5:])
    assert decoder.next_frame() == Frame(Opcode.GET, 1, b"k")


# -- malformed input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(raw_header(magic=0x00), id="magic-zero"),
        pytest.param(raw_header(magic=MAGIC_RESPONSE), id="magic-response"),
        pytest.param(raw_header(magic=0x80), id="magic-memcached-binary"),
        pytest.param(raw_header(extras_length=MAX_EXTRAS_LENGTH + 1), id="extras-33"),
        pytest.param(raw_header(extras_length=0xFFFF), id="extras-ffff"),
        pytest.param(raw_header(key_length=MAX_KEY_LENGTH + 1), id="key-251"),
        pytest.param(raw_header(key_length=0xFFFF), id="key-ffff"),
        pytest.param(raw_header(value_length=MAX_VALUE_LENGTH + 1), id="value-2^30+1"),
        pytest.param(raw_header(value_length=0xFFFFFFFF), id="value-ffffffff"),
    ],
)
def test_malformed_header_raises_protocol_error(header: bytes) -> None:
    for max_value_length in (MAX_VALUE_LENGTH, 10):
        decoder = FrameDecoder(MAGIC_REQUEST, max_value_length)
        decoder.feed(header)
        with pytest.raises(ProtocolError):
            decoder.next_frame()
        # Also when it arrives byte by byte: the error comes with the whole header.
        decoder = FrameDecoder(MAGIC_REQUEST, max_value_length)
        for chunk in one_byte_at_a_time(header[:-1]):
            decoder.feed(chunk)
            assert decoder.next_frame() is None
        decoder.feed(header[-1:])
        with pytest.raises(ProtocolError):
            decoder.next_frame()


def test_malformed_frame_after_a_good_one() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(encode_request(Opcode.PING, 1) + raw_header(extras_length=0xFF))
    assert decoder.next_frame() == Frame(Opcode.PING, 1)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_limits_themselves_are_legal() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(raw_header(key_length=MAX_KEY_LENGTH, value_length=MAX_VALUE_LENGTH))
    # A legal header: the decoder waits for the key and value.
    assert decoder.next_frame() is None
    assert decoder.buffered == HEADER_SIZE


def test_a_value_being_collected_counts_as_buffered_with_its_header() -> None:
    # Collected in a buffer of its own: its header, extras and key were
    # consumed, yet none of it has come out as a frame.
    frame = Frame(Opcode.SET, 9, b"key", b"v" * (COLLECT_THRESHOLD + 5), extras=b"\0" * 8)
    stream = encode(MAGIC_REQUEST, frame)
    decoder = FrameDecoder(MAGIC_REQUEST)
    for cut in (HEADER_SIZE + 11 + 100, len(stream) - 1):
        decoder.feed(stream[decoder.buffered : cut])
        assert decoder.next_frame() is None
        assert decoder.buffered == cut
    decoder.feed(stream[-1:])
    assert decoder.next_frame() == frame
    assert decoder.buffered == 0


# -- oversized values ----------------------------------------------------------------

LIMIT = 10
BIG = Frame(Opcode.SET, 77, b"big-key", b"B" * 25, flags=3, version=4)
AFTER = Frame(Opcode.GET, 78, b"after")
BIG_OVERSIZED = OversizedFrame(Opcode.SET, 77, b"big-key", 25)


def oversized_stream() -> bytes:
    return encode(MAGIC_REQUEST, BIG) + encode(MAGIC_REQUEST, AFTER)


def test_oversized_value_in_one_piece_is_skipped() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
    decoder.feed(oversized_stream())
    assert drain(decoder) == [BIG_OVERSIZED, AFTER]
    assert decoder.buffered == 0


def test_value_at_the_limit_is_not_oversized() -> None:
    frame = Frame(Opcode.SET, 1, b"k", b"x" * LIMIT)
    decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
    decoder.feed(encode(MAGIC_REQUEST, frame))
    assert decoder.next_frame() == frame


def test_oversized_header_waits_for_the_whole_key() -> None:
    data = encode(MAGIC_REQUEST, BIG)
    decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
    decoder.feed(data[: HEADER_SIZE + 3])
    assert decoder.next_frame() is None
    decoder.feed(data[HEADER_SIZE + 3 : HEADER_SIZE + len(BIG.key)])
    assert decoder.next_frame() == BIG_OVERSIZED
    assert decoder.next_frame() is None
    assert decoder.buffered == 0
    decoder.feed(data[HEADER_SIZE + len(BIG.key) :] + encode(MAGIC_REQUEST, AFTER))
    assert drain(decoder) == [AFTER]


@pytest.mark.parametrize(
    "cuts",
    [
        pytest.param([HEADER_SIZE + 7], id="header-and-key-then-rest"),
        pytest.param([HEADER_SIZE + 7 + 5, HEADER_SIZE + 7 + 20], id="body-in-three"),
        pytest.param([HEADER_SIZE + 7 + 24], id="last-body-byte-with-next-frame"),
        pytest.param([HEADER_SIZE + 7 + 25], id="body-ends-at-feed-end"),
        pytest.param([HEADER_SIZE + 7 + 25 + 3], id="next-frame-split"),
        pytest.param([HEADER_SIZE + 7 + 10, HEADER_SIZE + 7 + 30], id="skip-then-next-partial"),
    ],
)
def test_oversized_value_split_across_feeds_is_skipped(cuts: list[int]) -> None:
    data = oversized_stream()
    bounds = [0, *cuts, len(data)]
    chunks = [data[start:end] for start, end in itertools.pairwise(bounds)]
    decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
    assert decode_chunks(decoder, chunks) == [BIG_OVERSIZED, AFTER]
    assert decoder.buffered == 0


def test_oversized_value_one_byte_at_a_time_is_skipped() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
    results = decode_chunks(decoder, one_byte_at_a_time(oversized_stream()))
    assert results == [BIG_OVERSIZED, AFTER]
    assert decoder.buffered == 0


def test_oversized_body_is_not_buffered() -> None:
    decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
    header = encode_header(MAGIC_REQUEST, Opcode.SET, 5, b"k", 1_000_000)
    decoder.feed(header)
    assert decoder.next_frame() == OversizedFrame(Opcode.SET, 5, b"k", 1_000_000)
    for _ in range(100):
        decoder.feed(b"z" * 10_000)
        assert decoder.next_frame() is None
        assert decoder.buffered == 0
    decoder.feed(encode_request(Opcode.PING, 6))
    assert decoder.next_frame() == Frame(Opcode.PING, 6)


def test_several_oversized_frames_in_a_row() -> None:
    frames = [Frame(Opcode.SET, index, b"k", b"x" * (LIMIT + index)) for index in range(1, 5)]
    data = b"".join(encode(MAGIC_REQUEST, frame) for frame in frames) + encode(MAGIC_REQUEST, AFTER)
    expected: list[Decoded] = [
        OversizedFrame(Opcode.SET, index, b"k", LIMIT + index) for index in range(1, 5)
    ]
    expected.append(AFTER)
    for chunk_size in (1, 7, len(data)):
        decoder = FrameDecoder(MAGIC_REQUEST, max_value_length=LIMIT)
        chunks = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
        assert decode_chunks(decoder, chunks) == expected


# -- KEYS entries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries",
    [
        [],
        [(b"k", 0)],
        [(b"a", 257), (b"bb", 300), (b"k" * MAX_KEY_LENGTH, 0xFFFFFFFF)],
        [(b"", 5)],
    ],
)
def test_keys_entries_round_trip(entries: list[tuple[bytes, int]]) -> None:
    encoded = encode_keys_entries(entries)
    assert len(encoded) == sum(KEYS_ENTRY.size + len(key) for key, _ in entries)
    assert decode_keys_entries(encoded) == entries


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=MAX_KEY_LENGTH), st.integers(0, 0xFFFFFFFF)), max_size=20)
)
def test_keys_entries_round_trip_property(entries: list[tuple[bytes, int]]) -> None:
    assert decode_keys_entries(encode_keys_entries(entries)) == entries


def test_truncated_keys_entries_raise_protocol_error() -> None:
    encoded = encode_keys_entries([(b"alpha", 300), (b"beta", 400)])
    whole_first = KEYS_ENTRY.size + len(b"alpha")
    for length in range(1, len(encoded)):
        if length == whole_first:
            assert decode_keys_entries(encoded[:length]) == [(b"alpha", 300)]
            continue
        with pytest.raises(ProtocolError):
            decode_keys_entries(encoded[:length])


# -- properties -------------------------------------------------------------------------

frames_strategy = st.builds(
    Frame,
    opcode=st.integers(0, 255),
    request_id=st.integers(0, 0xFFFFFFFF),
    key=st.binary(max_size=MAX_KEY_LENGTH),
    value=st.binary(max_size=300),
    status=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFFFFFF),
    version=st.integers(0, (1 << 64) - 1),
    extras=st.sampled_from([b"", b"\x00" * 8, bytes(range(MAX_EXTRAS_LENGTH))]),
)


def decode_collecting_errors(
    decoder: FrameDecoder, chunks: list[bytes]
) -> tuple[list[Decoded], bool]:
    """Frames decoded, and whether the stream ended in a ProtocolError.

    Fails the test if ``next_frame`` returns or raises anything else.
    """
    frames: list[Decoded] = []
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while (frame := decoder.next_frame()) is not None:
                assert isinstance(frame, Frame | OversizedFrame)
                frames.append(frame)
        except ProtocolError:
            return frames, True
        assert decoder.buffered >= 0
    return frames, False


def consumed(frames: list[Decoded]) -> int:
    total = 0
    for frame in frames:
        if isinstance(frame, Frame):
            total += HEADER_SIZE + len(frame.extras) + len(frame.key) + len(frame.value)
        else:
            total += HEADER_SIZE + len(frame.extras) + len(frame.key) + frame.value_length
    return total


@st.composite
def arbitrary_streams(draw: st.DrawFn) -> bytes:
    """Random bytes, or random bytes behind a header that is legal or nearly so."""
    tail = draw(st.binary(max_size=200))
    kind = draw(st.sampled_from(["raw", "header", "frames"]))
    if kind == "raw":
        return tail
    if kind == "frames":
        frames = draw(st.lists(frames_strategy, max_size=3))
        return b"".join(encode(MAGIC_REQUEST, frame) for frame in frames) + tail
    header = raw_header(
        magic=draw(st.sampled_from([MAGIC_REQUEST, MAGIC_REQUEST, MAGIC_RESPONSE, 0])),
        opcode=draw(st.integers(0, 255)),
        status=draw(st.integers(0, 0xFFFF)),
        key_length=draw(st.sampled_from([0, 1, 5, 40, 250, 251, 0xFFFF])),
        extras_length=draw(st.sampled_from([0, 0, 0, 8, MAX_EXTRAS_LENGTH + 1])),
        value_length=draw(
            st.sampled_from([0, 1, 10, 11, 100, 1000, MAX_VALUE_LENGTH, MAX_VALUE_LENGTH + 1])
        ),
        request_id=draw(st.integers(0, 0xFFFFFFFF)),
    )
    return header + tail


@settings(max_examples=300, deadline=None)
@given(
    stream=arbitrary_streams(),
    max_value_length=st.sampled_from([0, 10, 100, MAX_VALUE_LENGTH]),
    data=st.data(),
)
def test_arbitrary_bytes_give_frames_none_or_protocol_error(
    stream: bytes, max_value_length: int, data: st.DataObject
) -> None:
    chunks = data.draw(chunkings(stream))
    chunked, chunked_error = decode_collecting_errors(
        FrameDecoder(MAGIC_REQUEST, max_value_length), chunks
    )
    whole, whole_error = decode_collecting_errors(
        FrameDecoder(MAGIC_REQUEST, max_value_length), [stream]
    )
    # How the bytes are cut into feeds never changes what comes out.
    assert (chunked, chunked_error) == (whole, whole_error)
    for frame in chunked:
        if isinstance(frame, Frame):
            assert len(frame.value) <= max_value_length
        else:
            assert frame.value_length > max_value_length
    if not chunked_error:
        decoder = FrameDecoder(MAGIC_REQUEST, max_value_length)
        frames, _ = decode_collecting_errors(decoder, chunks)
        # Every byte is either in a frame, skipped as an oversized body, or buffered.
        assert consumed(frames) + decoder.buffered >= len(stream)
        if not any(isinstance(frame, OversizedFrame) for frame in frames):
            assert consumed(frames) + decoder.buffered == len(stream)


@settings(max_examples=200, deadline=None)
@given(
    magic=st.sampled_from([MAGIC_REQUEST, MAGIC_RESPONSE]),
    frames=st.lists(frames_strategy, min_size=1, max_size=5),
    max_value_length=st.sampled_from([0, 50, 299, MAX_VALUE_LENGTH]),
    data=st.data(),
)
def test_round_trip_with_arbitrary_chunking(
    magic: int, frames: list[Frame], max_value_length: int, data: st.DataObject
) -> None:
    stream = b"".join(encode(magic, frame) for frame in frames)
    chunks = data.draw(chunkings(stream))
    decoder = FrameDecoder(magic, max_value_length)
    expected: list[Decoded] = [
        frame
        if len(frame.value) <= max_value_length
        else OversizedFrame(
            frame.opcode, frame.request_id, frame.key, len(frame.value), frame.extras
        )
        for frame in frames
    ]
    assert decode_chunks(decoder, chunks) == expected
    assert decoder.buffered == 0


# -- large values kept as views of their chunk ------------------------------------------------


def _value_sizes() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 100, VIEW_MIN - 1, VIEW_MIN, 40_000, COLLECT_THRESHOLD + 5_000])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(_value_sizes(), min_size=1, max_size=4), data=st.data())
def test_decoded_values_are_exact_and_keep_little_else_alive(
    sizes: list[int], data: st.DataObject
) -> None:
    # A value may be a view of the chunk it came in (no copy), but never one
    # that keeps more than 1 KiB of other bytes alive with it: stored items
    # must cost about what the node counts for them.
    frames = [
        Frame(Opcode.SET, number, b"k%d" % number, bytes([number]) * size)
        for number, size in enumerate(sizes)
    ]
    stream = b"".join(encode(MAGIC_REQUEST, frame) for frame in frames)
    chunks = data.draw(st.one_of(st.just([stream]), chunkings(stream)))
    decoded = decode_chunks(FrameDecoder(MAGIC_REQUEST), chunks)
    assert decoded == frames
    for frame in decoded:
        assert isinstance(frame, Frame)
        if isinstance(frame.value, memoryview):
            assert frame.value.readonly
            assert len(frame.value) >= VIEW_MIN
            assert memoryview(frame.value.obj).nbytes - len(frame.value) <= 1024


def test_large_value_alone_in_its_chunk_is_not_copied() -> None:
    value = bytes(range(256)) * 100
    chunk = encode_request(Opcode.SET, 1, b"key", value)
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(chunk)
    (frame,) = drain(decoder)
    assert isinstance(frame, Frame)
    assert isinstance(frame.value, memoryview)
    assert frame.value.obj is chunk
    assert frame.value == value


def test_large_values_sharing_a_chunk_are_copied_out_of_it() -> None:
    values = [b"a" * VIEW_MIN, b"b" * VIEW_MIN]
    chunk = b"".join(encode_request(Opcode.SET, n, b"k", v) for n, v in enumerate(values))
    decoder = FrameDecoder(MAGIC_REQUEST)
    decoder.feed(chunk)
    frames = drain(decoder)
    assert [frame.value for frame in frames if isinstance(frame, Frame)] == values
    assert all(type(frame.value) is bytes for frame in frames if isinstance(frame, Frame))
