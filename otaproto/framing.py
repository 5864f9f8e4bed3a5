"""Byte framing of the serial update protocol: COBS, CRC-32 and 0x00 delimiters.

Rules (a C decoder on a heap-less MCU must accept and reject exactly the same
frames as :class:`FrameDecoder`):

* One frame on the wire is ``COBS(body || crc32_le(body)) || 0x00``.
* ``body`` is one message (CBOR, which framing never looks into), 1 to
  ``max_body_bytes`` long. Each side knows the other's ``max_body_bytes``.
* ``crc32_le(body)`` is CRC-32/ISO-HDLC, the one of Ethernet, zlib and PNG
  (:func:`zlib.crc32`): reflected polynomial 0xEDB88320, initial value and
  final XOR 0xFFFFFFFF; check value ``crc32(b"123456789") == 0xCBF43926``.
  It is appended as 4 bytes, least significant first.
* COBS is Cheshire and Baker's Consistent Overhead Byte Stuffing (IEEE/ACM
  Trans. Networking, 1999). The encoded bytes are a sequence of blocks; a
  block is a code byte ``c`` (1..255) followed by ``c - 1`` non-zero bytes.
  A block with ``c < 0xFF`` stands for its bytes followed by one 0x00; a block
  with ``c == 0xFF`` stands for its 254 bytes and no 0x00. The 0x00 that the
  last block stands for is not part of the data. So empty data encodes as
  ``01``, and encoded bytes never contain 0x00, which leaves 0x00 free as the
  delimiter.
* The encoder writes the shortest form: when the data ends with a run of
  non-zero bytes whose length is a multiple of 254, the last block is an 0xFF
  block, with no empty ``01`` block after it. The decoder also accepts that
  ``01`` block, since the reference C code of the paper writes it.
* A sender may send a lone 0x00 before a frame to flush line noise out of the
  receiver. Empty frames (two delimiters in a row) are skipped silently.
* The receiver collects bytes up to each 0x00 and handles that frame:

  1. ``"oversize"`` as soon as the frame grows past
     ``max_encoded_bytes(max_body_bytes) - 1`` bytes (the delimiter is not
     stored); it is reported once, and the rest up to the next 0x00 dropped.
  2. ``"cobs"`` if the frame is not valid COBS (a block runs past its end).
  3. ``"oversize"`` if it decodes to more than ``max_body_bytes + 4`` bytes.
  4. ``"short"`` if it decodes to fewer than ``1 + 4`` bytes.
  5. ``"crc"`` if the last 4 decoded bytes are not ``crc32_le`` of the rest.
  6. Otherwise the rest is a frame body.

* A bad frame is an event (:class:`FrameError`), never an exception: a serial
  line gets noise, and the receiver is back in step at the next 0x00, because
  0x00 occurs nowhere inside an encoded frame.

Why CRC-32 and not CRC-16: frames carry up to several KiB of firmware, and
a frame that passes a check is written to flash. CRC-16/CCITT keeps Hamming
distance 4 only up to 32,751 data bits (just under 4 KiB) and falls to 2
beyond (two flipped bits 32,767 apart pass), and it catches every burst only
up to 16 bits; longer or scattered damage passes about once in 2**16 bad
frames, which a noisy line will reach within a few multi-megabyte updates.
CRC-32 catches every burst up to 32 bits and keeps Hamming distance 4 up to
91,607 data bits (about 11 KiB), and lets other damage pass once in 2**32.
A flipped COBS code byte moves a zero and so damages several body bytes at
once, another reason to want the wide margin. (The signed image digest still
catches what slips through, but only at the end of the whole transfer.) The
cost on an MCU is small: a 1 KiB table (256 x 4 bytes), or a 64-byte table of
16 entries processed a nibble at a time, or a hardware CRC unit that can
reflect its input and output.

RAM of a C receiver: one array of ``max_encoded_bytes(max_body_bytes) - 1``
bytes for the frame being received, a write index (16 bits are enough up to
64 KiB), and one flag "dropping an oversize frame until the next 0x00". At
the delimiter the frame is decoded in place, as :func:`cobs_decode` does:
each code byte becomes the 0x00 it stands for, and the bytes move down over
the first code byte and over the code byte after each 0xFF block (decoding
never writes ahead of where it reads); then the CRC is checked in the same
array. No heap and no second buffer. A receiver may instead undo COBS as
bytes arrive, with one state byte (bytes left in the current block) and a
flag (whether that block ends in a 0x00), and then needs only
``max_body_bytes + 4`` bytes of buffer; it accepts the same frames, though it
may call some garbage ``"oversize"`` where this module says ``"cobs"``. A
sender needs no buffer beyond the body: it writes block by block (looking at
most 254 bytes ahead for the next zero), with the 4 CRC bytes as the tail of
the last block(s).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Literal

from otaproto.errors import MalformedError, UsageError

CRC_BYTES = 4
DELIMITER = 0x00

#: Most data bytes one COBS block can carry (code byte 0xFF).
_BLOCK_DATA_BYTES = 254
_FULL_BLOCK_CODE = 0xFF
#: A run of this many 0x01 code bytes or more (a run of zeros in the data) is
#: decoded in one step instead of block by block; it only saves Python time.
_LONG_ONES = b"\x01" * 16
_ONES = re.compile(rb"\x01+")

FrameErrorReason = Literal["oversize", "cobs", "short", "crc"]


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data`` (any length, empty included) in the shortest form.

    The result is at most ``len(data) + 1 + len(data) // 254`` bytes and holds
    no 0x00. Never raises.
    """
    out = bytearray()
    runs = data.split(b"\x00")
    last = len(runs) - 1
    for index, run in enumerate(runs):
        run_bytes = len(run)
        if run_bytes < _BLOCK_DATA_BYTES:  # the common case: one block per run
            out.append(run_bytes + 1)
            out += run
            continue
        start = 0
        while run_bytes - start >= _BLOCK_DATA_BYTES:
            out.append(_FULL_BLOCK_CODE)
            out += run[start : start + _BLOCK_DATA_BYTES]
            start += _BLOCK_DATA_BYTES
        # After 0xFF blocks, a zero that follows still needs its own block; at
        # the very end of the data nothing follows, so the shortest form stops.
        if start < run_bytes or index != last:
            out.append(run_bytes - start + 1)
            out += run[start:]
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Undo :func:`cobs_encode` (also accepting the paper's trailing ``01`` block).

    Works like the in-place C decoder: every code byte is replaced by the 0x00
    it stands for, then the first code byte and the code byte after each 0xFF
    block (which stand for no 0x00) are removed. A delimiter is not part of
    ``data``. Raises MalformedError("frame", ...) for empty data, a 0x00 byte,
    or a block that runs past the end.
    """
    size = len(data)
    if size == 0:
        raise MalformedError("frame", "no COBS data (even empty data encodes to one byte)")
    if data.find(DELIMITER) >= 0:
        raise MalformedError("frame", "COBS data holds a 0x00 byte")
    decoded = bytearray(data)
    no_zero_at: list[int] = []  # where the code byte after a 0xFF block sits
    ones_from = data.find(_LONG_ONES)
    if ones_from < 0:
        ones_from = size
    index = 0
    while index < size:
        code = data[index]
        if code == 1 and index >= ones_from:
            # Consecutive 0x01 bytes met at a code byte are all code bytes
            # (empty blocks): one 0x00 each.
            ones = _ONES.match(data, index)
            end = ones.end() if ones is not None else index + 1
            decoded[index:end] = bytes(end - index)
            index = end
            ones_from = data.find(_LONG_ONES, index)
            if ones_from < 0:
                ones_from = size
            continue
        if code == _FULL_BLOCK_CODE:
            no_zero_at.append(index + _FULL_BLOCK_CODE)
        decoded[index] = 0
        index += code
    if index != size:
        raise MalformedError("frame", f"a COBS block runs {index - size} bytes past the end")
    for position in reversed(no_zero_at):
        if position < size:
            del decoded[position]
    del decoded[0]
    return bytes(decoded)


def max_encoded_bytes(body_bytes: int) -> int:
    """Most wire bytes of one frame with a ``body_bytes`` body: CRC, COBS and delimiter.

    The COBS bound is the paper's (one code byte, plus one per 254 bytes), so
    it also covers a sender that writes the trailing ``01`` block. Raises
    UsageError for a negative size.
    """
    if body_bytes < 0:
        raise UsageError(f"a body cannot be {body_bytes} bytes long")
    stuffed_bytes = body_bytes + CRC_BYTES
    return stuffed_bytes + 1 + stuffed_bytes // _BLOCK_DATA_BYTES + 1


def encode_frame(body: bytes, max_body_bytes: int) -> bytes:
    """The wire bytes of one frame, ending in the delimiter.

    The body is ours to send, so an empty or oversize one is our bug: raises
    UsageError (also for a ``max_body_bytes`` below 1).
    """
    _check_max_body_bytes(max_body_bytes)
    if not body:
        raise UsageError("a frame body cannot be empty")
    if len(body) > max_body_bytes:
        raise UsageError(f"frame body is {len(body)} bytes, over the limit of {max_body_bytes}")
    crc = zlib.crc32(body).to_bytes(CRC_BYTES, "little")
    return cobs_encode(body + crc) + bytes((DELIMITER,))


@dataclass(frozen=True)
class Frame:
    """One frame that passed the COBS and CRC checks; ``body`` is still unparsed."""

    body: bytes


@dataclass(frozen=True)
class FrameError:
    """One frame that was dropped, and why (see the module rules for the order).

    ``reason`` is ``"oversize"``, ``"cobs"``, ``"short"`` or ``"crc"``.
    """

    reason: FrameErrorReason


FrameEvent = Frame | FrameError


@dataclass(frozen=True)
class FrameCounters:
    """A snapshot of a decoder's counts, for link statistics."""

    frames_ok: int
    frames_bad: int


class FrameDecoder:
    """Turns received bytes, in chunks of any size, into frames and frame errors.

    Sans-IO: no clock, no thread, no port. The events from a byte stream do not
    depend on how it was cut into chunks. The decoder never holds more than
    ``max_encoded_bytes(max_body_bytes) - 1`` bytes between calls.
    """

    def __init__(self, max_body_bytes: int) -> None:
        """Raises UsageError for a ``max_body_bytes`` below 1."""
        _check_max_body_bytes(max_body_bytes)
        self._max_body_bytes = max_body_bytes
        self._capacity_bytes = max_encoded_bytes(max_body_bytes) - 1
        self._buffer = bytearray()
        self._dropping = False  # inside an oversize frame, until the next delimiter
        self._frames_ok = 0
        self._frames_bad = 0

    @property
    def max_body_bytes(self) -> int:
        """The largest body this decoder accepts."""
        return self._max_body_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an unfinished frame held now (0 while dropping an oversize one)."""
        return len(self._buffer)

    @property
    def frames_ok(self) -> int:
        """Frames delivered so far."""
        return self._frames_ok

    @property
    def frames_bad(self) -> int:
        """Frame errors reported so far (empty frames are not counted)."""
        return self._frames_bad

    @property
    def counters(self) -> FrameCounters:
        """Both counts at once."""
        return FrameCounters(self._frames_ok, self._frames_bad)

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Take received bytes; return the events they complete, in order.

        Never raises for any content of ``data``: bad frames come back as
        FrameError events.
        """
        events: list[FrameEvent] = []
        start = 0
        size = len(data)
        while start < size:
            end = data.find(DELIMITER, start)
            if end < 0:
                self._take(data, start, size, events)
                break
            if not self._buffer and not self._dropping:
                # The whole frame is in this chunk: decode it without buffering.
                frame_bytes = end - start
                if frame_bytes > self._capacity_bytes:
                    events.append(self._bad("oversize"))
                elif frame_bytes:
                    events.append(self._decode(data[start:end]))
            else:
                self._take(data, start, end, events)
                if not self._dropping:
                    events.append(self._decode(bytes(self._buffer)))
                    self._buffer.clear()
                self._dropping = False
            start = end + 1
        return events

    def _take(self, data: bytes, start: int, end: int, events: list[FrameEvent]) -> None:
        """Append ``data[start:end]`` (no delimiter in it) to the unfinished frame."""
        if self._dropping:
            return
        if len(self._buffer) + (end - start) > self._capacity_bytes:
            self._buffer.clear()
            self._dropping = True
            events.append(self._bad("oversize"))
            return
        self._buffer += data[start:end]

    def _decode(self, frame: bytes) -> FrameEvent:
        """Check one non-empty frame (delimiter removed) in the order of the module rules."""
        try:
            decoded = cobs_decode(frame)
        except MalformedError:
            return self._bad("cobs")
        if len(decoded) > self._max_body_bytes + CRC_BYTES:
            return self._bad("oversize")
        if len(decoded) < 1 + CRC_BYTES:
            return self._bad("short")
        body = decoded[:-CRC_BYTES]
        if zlib.crc32(body) != int.from_bytes(decoded[-CRC_BYTES:], "little"):
            return self._bad("crc")
        self._frames_ok += 1
        return Frame(body)

    def _bad(self, reason: FrameErrorReason) -> FrameError:
        self._frames_bad += 1
        return FrameError(reason)


def _check_max_body_bytes(max_body_bytes: int) -> None:
    if max_body_bytes < 1:
        raise UsageError(f"max_body_bytes must be at least 1, not {max_body_bytes}")
