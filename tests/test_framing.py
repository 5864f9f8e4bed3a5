"""Tests of the serial framing: COBS, CRC-32, delimiters and the streaming decoder."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaproto.errors import MalformedError, UsageError
from otaproto.framing import (
    CRC_BYTES,
    DELIMITER,
    Frame,
    FrameCounters,
    FrameDecoder,
    FrameError,
    FrameEvent,
    cobs_decode,
    cobs_encode,
    encode_frame,
    max_encoded_bytes,
)

MAX_BODY_BYTES = 600  # crosses the 254-byte COBS block size twice

NON_ZERO_254 = bytes(range(1, 255))
NON_ZERO_255 = bytes(range(1, 256))

# (data, COBS encoding): the classic cases, most from Cheshire and Baker's paper.
COBS_VECTORS = [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (NON_ZERO_254, b"\xff" + NON_ZERO_254),
    (b"\x00" + NON_ZERO_254, b"\x01\xff" + NON_ZERO_254),
    (NON_ZERO_255, b"\xff" + NON_ZERO_254 + b"\x02\xff"),
    (NON_ZERO_255[1:] + b"\x00", b"\xff" + NON_ZERO_255[1:] + b"\x01\x01"),
    (NON_ZERO_255[2:] + b"\x00\x01", b"\xfe" + NON_ZERO_255[2:] + b"\x02\x01"),
]

# CBOR {1: 0}: a body with a zero byte in it.
GOLDEN_BODY = bytes.fromhex("a10100")
GOLDEN_CRC = bytes.fromhex("04dfe03e")  # 0x3EE0DF04, little-endian
GOLDEN_WIRE = bytes.fromhex("03a10105") + GOLDEN_CRC + b"\x00"

bodies = st.binary(min_size=1, max_size=MAX_BODY_BYTES)
# Data rich in zeros and in long non-zero runs, the two edges of COBS.
cobs_data = st.one_of(
    st.binary(max_size=800),
    st.lists(st.sampled_from([b"\x00", b"\x01", b"\xff", NON_ZERO_254, b"\x00" * 20])).map(
        b"".join
    ),
)


def reference_crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC bit by bit, as a C port without a table would compute it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def reference_cobs_decode(data: bytes) -> bytes | None:
    """COBS decoding byte by byte, as a streaming C decoder would; None if invalid."""
    out = bytearray()
    left = 0  # data bytes left in the current block
    zero_due = False  # the current block ends in a 0x00
    for byte in data:
        if byte == 0:
            return None
        if left:
            out.append(byte)
            left -= 1
            continue
        if zero_due:
            out.append(0)
        left = byte - 1
        zero_due = byte != 0xFF
    if left or not data:
        return None
    return bytes(out)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = []
    start = 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


def feed_all(decoder: FrameDecoder, pieces: list[bytes]) -> list[FrameEvent]:
    events: list[FrameEvent] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    return events


def bodies_of(events: list[FrameEvent]) -> list[bytes]:
    return [event.body for event in events if isinstance(event, Frame)]


# --- COBS ------------------------------------------------------------------


@pytest.mark.parametrize(("data", "encoded"), COBS_VECTORS)
def test_cobs_golden_vectors(data: bytes, encoded: bytes) -> None:
    assert cobs_encode(data) == encoded
    assert cobs_decode(encoded) == data


def test_cobs_decode_accepts_the_papers_trailing_empty_block() -> None:
    assert cobs_decode(b"\xff" + NON_ZERO_254 + b"\x01") == NON_ZERO_254


@pytest.mark.parametrize(
    "encoded",
    [b"", b"\x00", b"\x02\x00", b"\x03\x11", b"\x05\x11\x22", b"\xff" + NON_ZERO_254[:-1]],
)
def test_cobs_decode_rejects_invalid(encoded: bytes) -> None:
    with pytest.raises(MalformedError) as info:
        cobs_decode(encoded)
    assert info.value.field == "frame"


@given(cobs_data)
def test_cobs_round_trip(data: bytes) -> None:
    encoded = cobs_encode(data)
    assert DELIMITER not in encoded
    assert len(encoded) <= len(data) + 1 + len(data) // 254
    assert cobs_decode(encoded) == data


@given(st.one_of(st.binary(max_size=600), cobs_data.map(cobs_encode)))
def test_cobs_decode_agrees_with_byte_by_byte_reference(encoded: bytes) -> None:
    expected = reference_cobs_decode(encoded)
    if expected is None:
        with pytest.raises(MalformedError):
            cobs_decode(encoded)
    else:
        assert cobs_decode(encoded) == expected


# --- CRC and whole frames --------------------------------------------------


def test_crc_is_iso_hdlc() -> None:
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert reference_crc32(b"123456789") == 0xCBF43926
    assert reference_crc32(GOLDEN_BODY).to_bytes(CRC_BYTES, "little") == GOLDEN_CRC


def test_frame_golden_vector() -> None:
    assert encode_frame(GOLDEN_BODY, 16) == GOLDEN_WIRE
    decoder = FrameDecoder(16)
    assert decoder.feed(GOLDEN_WIRE) == [Frame(GOLDEN_BODY)]
    assert decoder.counters == FrameCounters(frames_ok=1, frames_bad=0)


def test_max_encoded_bytes() -> None:
    assert max_encoded_bytes(1) == 1 + 4 + 1 + 1
    assert max_encoded_bytes(250) == 254 + 1 + 1 + 1
    assert max_encoded_bytes(2048) == 2052 + 1 + 8 + 1
    with pytest.raises(UsageError):
        max_encoded_bytes(-1)


@given(bodies)
def test_encoded_frame_fits_the_bound(body: bytes) -> None:
    wire = encode_frame(body, MAX_BODY_BYTES)
    assert len(wire) <= max_encoded_bytes(len(body))
    assert wire.index(DELIMITER) == len(wire) - 1


@pytest.mark.parametrize("body", [b"", bytes(17)])
def test_encode_frame_refuses_empty_or_oversize_body(body: bytes) -> None:
    with pytest.raises(UsageError):
        encode_frame(body, 16)


def test_encode_frame_accepts_exactly_max() -> None:
    assert FrameDecoder(16).feed(encode_frame(bytes(16), 16)) == [Frame(bytes(16))]


@pytest.mark.parametrize("max_body_bytes", [0, -5])
def test_max_body_bytes_must_be_positive(max_body_bytes: int) -> None:
    with pytest.raises(UsageError):
        FrameDecoder(max_body_bytes)
    with pytest.raises(UsageError):
        encode_frame(b"x", max_body_bytes)


# --- the streaming decoder -------------------------------------------------


@given(st.lists(bodies, min_size=1, max_size=5), st.lists(st.integers(min_value=0)))
def test_any_chunking_gives_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(body, MAX_BODY_BYTES) for body in frames)
    decoder = FrameDecoder(MAX_BODY_BYTES)
    events = feed_all(decoder, chunked(stream, cuts))
    assert events == [Frame(body) for body in frames]
    assert decoder.counters == FrameCounters(frames_ok=len(frames), frames_bad=0)
    assert decoder.buffered_bytes == 0


@settings(max_examples=50)
@given(st.binary(max_size=1500), st.lists(st.integers(min_value=0), max_size=20))
def test_events_do_not_depend_on_chunking(stream: bytes, cuts: list[int]) -> None:
    whole = FrameDecoder(MAX_BODY_BYTES).feed(stream)
    assert feed_all(FrameDecoder(MAX_BODY_BYTES), chunked(stream, cuts)) == whole
    one_by_one = [stream[index : index + 1] for index in range(len(stream))]
    assert feed_all(FrameDecoder(MAX_BODY_BYTES), one_by_one) == whole


def test_lone_and_repeated_delimiters_are_ignored() -> None:
    decoder = FrameDecoder(16)
    stream = b"\x00" + GOLDEN_WIRE + b"\x00\x00\x00" + GOLDEN_WIRE
    assert decoder.feed(stream) == [Frame(GOLDEN_BODY), Frame(GOLDEN_BODY)]
    assert decoder.counters == FrameCounters(frames_ok=2, frames_bad=0)


@given(bodies, st.binary(max_size=300), bodies, st.lists(st.integers(min_value=0), max_size=8))
def test_noise_between_frames(first: bytes, noise: bytes, second: bytes, cuts: list[int]) -> None:
    # The sender flushes with a lone 0x00 before each frame.
    stream = (
        b"\x00"
        + encode_frame(first, MAX_BODY_BYTES)
        + noise
        + b"\x00"
        + encode_frame(second, MAX_BODY_BYTES)
    )
    decoder = FrameDecoder(MAX_BODY_BYTES)
    events = feed_all(decoder, chunked(stream, cuts))
    frames = bodies_of(events)
    assert frames[0] == first
    assert frames[-1] == second
    assert decoder.frames_ok + decoder.frames_bad == len(events)


@given(bodies, st.data())
def test_flipped_bit_is_caught_and_next_frame_decodes(body: bytes, data: st.DataObject) -> None:
    wire = bytearray(encode_frame(body, MAX_BODY_BYTES))
    position = data.draw(st.integers(min_value=0, max_value=len(wire) - 2), label="byte")
    wire[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7), label="bit")
    decoder = FrameDecoder(MAX_BODY_BYTES)
    events = decoder.feed(bytes(wire) + encode_frame(b"next", MAX_BODY_BYTES))
    assert events[-1] == Frame(b"next")
    damaged = events[:-1]
    assert damaged
    assert all(isinstance(event, FrameError) for event in damaged)
    if wire[position] != 0:  # the flip did not cut the frame in two
        assert damaged in ([FrameError("crc")], [FrameError("cobs")])
    else:
        assert all(
            event in (FrameError("crc"), FrameError("cobs"), FrameError("short"))
            for event in damaged
        )


def test_oversize_stream_is_bounded_and_reported_once() -> None:
    decoder = FrameDecoder(MAX_BODY_BYTES)
    limit = max_encoded_bytes(MAX_BODY_BYTES)
    events: list[FrameEvent] = []
    for _ in range(100):
        events += decoder.feed(b"\x55" * 1000)
        assert decoder.buffered_bytes <= limit
    events += decoder.feed(b"\x00" + encode_frame(b"after", MAX_BODY_BYTES))
    assert events == [FrameError("oversize"), Frame(b"after")]
    assert decoder.counters == FrameCounters(frames_ok=1, frames_bad=1)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000])
def test_oversize_boundary(chunk_bytes: int) -> None:
    # max_body_bytes 16: a frame may hold 16 + 4 + 1 = 21 bytes before its delimiter.
    assert max_encoded_bytes(16) - 1 == 21
    fits = b"\x01" * 21 + b"\x00"  # 20 zeros: valid COBS, wrong CRC
    too_long = b"\x01" * 22 + b"\x00"
    garbage = b"\x55" * 22 + b"\x00"  # oversize before anyone looks at its COBS
    stream = fits + too_long + garbage + GOLDEN_WIRE
    pieces = [stream[index : index + chunk_bytes] for index in range(0, len(stream), chunk_bytes)]
    events = feed_all(FrameDecoder(16), pieces)
    assert events == [
        FrameError("crc"),
        FrameError("oversize"),
        FrameError("oversize"),
        Frame(GOLDEN_BODY),
    ]


def test_frame_that_decodes_too_long_is_oversize() -> None:
    # 306 wire bytes fit the buffer for max 300 (304 + 1 + 1) but decode to 305 zeros.
    assert max_encoded_bytes(300) - 1 == 306
    assert FrameDecoder(300).feed(b"\x01" * 306 + b"\x00") == [FrameError("oversize")]


def test_short_frame() -> None:
    assert FrameDecoder(16).feed(cobs_encode(b"\x01\x02\x03\x04") + b"\x00") == [
        FrameError("short")
    ]


def test_longest_frame_in_the_papers_form_fits() -> None:
    # body + CRC = 508 = 2 x 254 non-zero bytes: the paper's encoder ends with an
    # extra 01 block, which makes the frame exactly max_encoded_bytes long.
    max_body_bytes = 504
    body = next(
        candidate
        for candidate in (bytes([seed]) + b"\x07" * 503 for seed in range(1, 256))
        if DELIMITER not in zlib.crc32(candidate).to_bytes(CRC_BYTES, "little")
    )
    stuffed = body + zlib.crc32(body).to_bytes(CRC_BYTES, "little")
    wire = cobs_encode(stuffed) + b"\x01\x00"
    assert len(wire) == max_encoded_bytes(max_body_bytes)
    assert FrameDecoder(max_body_bytes).feed(wire) == [Frame(body)]


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=400), max_size=6), st.sampled_from([1, 16, 600]))
def test_arbitrary_bytes_never_raise(chunks: list[bytes], max_body_bytes: int) -> None:
    decoder = FrameDecoder(max_body_bytes)
    events = feed_all(decoder, chunks)
    assert decoder.buffered_bytes <= max_encoded_bytes(max_body_bytes)
    assert decoder.frames_ok == sum(isinstance(event, Frame) for event in events)
    assert decoder.frames_bad == sum(isinstance(event, FrameError) for event in events)
