"""SMP, the mcumgr Simple Management Protocol of Zephyr and MCUboot: packets, framing, messages.

Sans-IO: bytes in, packets and bytes out; no port, no clock. Spec: ``docs/smp.md``,
which cites the mcumgr documentation for every rule below (field notes §5).

Rules:

* **Packet** = 8-byte big-endian header + payload. Header byte 0 is
  ``res(3 bits, 0) | version(2 bits: 0 = v1, 1 = v2) | op(3 bits)``; op 0 read,
  1 read response, 2 write, 3 write response (a reply's op is its request's
  op + 1). Then flags (u8, 0), payload length (u16), group (u16), sequence
  (u8, echoed by the reply) and command (u8). Reserved bits, the reserved
  versions 2 and 3 and ops above 3 are :class:`MalformedError`. A packet's
  length must be exactly 8 + the payload length.
* **Payload** = one CBOR map with text keys (RFC 8949). Zephyr's zcbor writes
  indefinite-length maps and arrays, so the decoder accepts indefinite lengths
  (also for strings); it refuses tags, duplicate keys, non-text map keys,
  nesting deeper than :data:`MAX_CBOR_DEPTH`, simple values other than
  false/true/null, and trailing bytes. The reader is our own
  (:class:`_CborReader`): every length is checked against the bytes left before
  anything is allocated, and it can only raise :class:`MalformedError`.
  Payloads we send are deterministic CBOR (definite lengths), which every SMP
  server accepts. An empty payload (length 0) reads as ``{}``.
* **Console framing** (UART shared with a shell or log output): the packet
  ``body`` becomes ``u16_be(len(body) + 2) || body || u16_be(crc16(body))``,
  base64-encoded (RFC 4648, with padding) and cut into lines of at most
  :data:`CONSOLE_LINE_BYTES` (127) bytes: the first line starts with
  ``06 09``, the others with ``04 14``, each ends with ``\\n``, so a line
  carries up to 124 base64 characters (93 bytes). Every line's base64 stands
  on its own (a multiple of 4 characters). CRC-16/XMODEM: polynomial 0x1021,
  initial value 0, no reflection, no final XOR; check value
  ``crc16(b"123456789") == 0x31C3``; over ``body`` only.
* **Console decoding** (:class:`ConsoleDecoder`): text outside SMP lines (log
  lines such as ``[00:00:00.022,374] <inf> ...``) is skipped; a start marker
  may appear anywhere, even in the middle of a text line, and a new start
  marker abandons an unfinished packet (resync). A text line between the lines
  of one packet is skipped and the packet goes on. A bad line drops the packet
  it belongs to, never the decoder: line too long, bad base64, a length field
  below 10 (header + CRC) or above ``max_packet_bytes + 2``, more bytes than
  the length field announced, a bad CRC, or a continuation line with no packet
  started. Drops are counted per reason, never raised. The one-shot
  :func:`decode_console` raises instead.
* **Raw framing**: packets back to back, nothing added; the header's length
  says where a packet ends. There is no resync: an oversize packet is skipped
  by its announced length, and the I/O layer calls :meth:`RawDecoder.reset`
  after an input timeout (as Zephyr's raw UART transport clears its buffer).
* **Size**: a console packet is at most ``buf_size - 4`` bytes, where
  ``buf_size`` is the server's advertised reassembly buffer (the length field
  and CRC share it); a raw packet at most ``buf_size``. See
  :func:`max_packet_bytes` and :func:`max_upload_chunk_bytes`.
* **Errors in replies**: v1 ``{"rc": n}`` with n an :class:`MgmtErr` (0 is
  success); v2 ``{"err": {"group": g, "rc": n}}`` with n a group code (for the
  image group an :class:`ImgMgmtErr`); a v2 server still answers SMP-level
  failures with ``{"rc": n}``. An optional ``"rsn"`` text explains.
* **Matching** (:class:`RequestMatcher`): stop-and-wait. Sequence numbers run
  mod 256; a reply is the answer only when op, group, command and sequence
  all match the one outstanding request; anything else is stale and dropped.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import Any, Final

import cbor2

from otaproto import cbor
from otaproto.errors import InvalidInput, LimitExceeded, MalformedError, UsageError

HEADER_BYTES: Final = 8
MAX_PAYLOAD_BYTES: Final = 0xFFFF
#: Longest console line, marker and newline included (mcumgr's MTU of 127).
CONSOLE_LINE_BYTES: Final = 127
START_MARKER: Final = b"\x06\x09"
CONTINUE_MARKER: Final = b"\x04\x14"
LINE_END: Final = b"\n"
#: Bytes of the console length field and of the CRC, both u16 big-endian.
CONSOLE_FIELD_BYTES: Final = 2
#: Largest body (header + payload) console framing can carry: the length field
#: counts body + CRC in 16 bits.
MAX_CONSOLE_PACKET_BYTES: Final = 0xFFFF - CONSOLE_FIELD_BYTES
MAX_RAW_PACKET_BYTES: Final = HEADER_BYTES + MAX_PAYLOAD_BYTES
#: Deepest CBOR nesting an SMP payload needs (``{"images": [{...}]}`` is 3).
MAX_CBOR_DEPTH: Final = 8
#: The SHA-256 that identifies an upload (``"sha"``) and an image (``"hash"``).
SHA256_BYTES: Final = 32

_HEADER = struct.Struct(">BBHHBB")
_U16 = struct.Struct(">H")


class Op(IntEnum):
    """The op field: what a packet does."""

    READ = 0
    READ_RSP = 1
    WRITE = 2
    WRITE_RSP = 3

    @property
    def is_request(self) -> bool:
        return self in (Op.READ, Op.WRITE)

    @property
    def reply(self) -> Op:
        """The op of the reply to a request with this op. Raises UsageError for a reply op."""
        if not self.is_request:
            raise UsageError(f"{self.name} is a reply op; it has no reply")
        return Op(self + 1)


class Version(IntEnum):
    """The version field: v2 adds group-specific errors (``{"err": ...}``)."""

    V1 = 0
    V2 = 1


class Group(IntEnum):
    """Management groups Shoal speaks (user groups start at 64)."""

    OS = 0
    IMAGE = 1


class OsCommand(IntEnum):
    """Commands of the OS group (0)."""

    ECHO = 0
    RESET = 5
    MCUMGR_PARAMS = 6


class ImageCommand(IntEnum):
    """Commands of the image group (1)."""

    STATE = 0
    UPLOAD = 1
    ERASE = 5


class MgmtErr(IntEnum):
    """SMP-level result codes (``mcumgr_err_t``), the ``rc`` of v1 and of v2 SMP errors."""

    EOK = 0
    EUNKNOWN = 1
    ENOMEM = 2
    EINVAL = 3
    ETIMEOUT = 4
    ENOENT = 5
    EBADSTATE = 6
    EMSGSIZE = 7
    ENOTSUP = 8
    ECORRUPT = 9
    EBUSY = 10
    EACCESSDENIED = 11
    UNSUPPORTED_TOO_OLD = 12
    UNSUPPORTED_TOO_NEW = 13
    EPERUSER = 256


class ImgMgmtErr(IntEnum):
    """Image group result codes (``img_mgmt_err_code_t``), the ``err.rc`` of v2 with group 1."""

    OK = 0
    UNKNOWN = 1
    FLASH_CONFIG_QUERY_FAIL = 2
    NO_IMAGE = 3
    NO_TLVS = 4
    INVALID_TLV = 5
    TLV_MULTIPLE_HASHES_FOUND = 6
    TLV_INVALID_SIZE = 7
    HASH_NOT_FOUND = 8
    NO_FREE_SLOT = 9
    FLASH_OPEN_FAILED = 10
    FLASH_READ_FAILED = 11
    FLASH_WRITE_FAILED = 12
    FLASH_ERASE_FAILED = 13
    INVALID_SLOT = 14
    NO_FREE_MEMORY = 15
    FLASH_CONTEXT_ALREADY_SET = 16
    FLASH_CONTEXT_NOT_SET = 17
    FLASH_AREA_DEVICE_NULL = 18
    INVALID_PAGE_OFFSET = 19
    INVALID_OFFSET = 20
    INVALID_LENGTH = 21
    INVALID_IMAGE_HEADER = 22
    INVALID_IMAGE_HEADER_MAGIC = 23
    INVALID_HASH = 24
    INVALID_FLASH_ADDRESS = 25
    VERSION_GET_FAILED = 26
    CURRENT_VERSION_IS_NEWER = 27
    IMAGE_ALREADY_PENDING = 28
    INVALID_IMAGE_VECTOR_TABLE = 29
    INVALID_IMAGE_TOO_LARGE = 30
    INVALID_IMAGE_DATA_OVERRUN = 31
    IMAGE_CONFIRMATION_DENIED = 32
    IMAGE_SETTING_TEST_TO_ACTIVE_DENIED = 33


#: What a v1 peer is told for an image group failure (v1 has only ``MgmtErr``).
#: Shoal's own choice, listed in docs/smp.md: wrong input is EINVAL, a missing
#: image ENOENT, a slot in the wrong state EBADSTATE, flash failures EUNKNOWN.
IMAGE_ERROR_V1: Final[Mapping[ImgMgmtErr, MgmtErr]] = {
    ImgMgmtErr.OK: MgmtErr.EOK,
    ImgMgmtErr.UNKNOWN: MgmtErr.EUNKNOWN,
    ImgMgmtErr.FLASH_CONFIG_QUERY_FAIL: MgmtErr.EUNKNOWN,
    ImgMgmtErr.NO_IMAGE: MgmtErr.ENOENT,
    ImgMgmtErr.NO_TLVS: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_TLV: MgmtErr.EINVAL,
    ImgMgmtErr.TLV_MULTIPLE_HASHES_FOUND: MgmtErr.EINVAL,
    ImgMgmtErr.TLV_INVALID_SIZE: MgmtErr.EINVAL,
    ImgMgmtErr.HASH_NOT_FOUND: MgmtErr.ENOENT,
    ImgMgmtErr.NO_FREE_SLOT: MgmtErr.EBADSTATE,
    ImgMgmtErr.FLASH_OPEN_FAILED: MgmtErr.EUNKNOWN,
    ImgMgmtErr.FLASH_READ_FAILED: MgmtErr.EUNKNOWN,
    ImgMgmtErr.FLASH_WRITE_FAILED: MgmtErr.EUNKNOWN,
    ImgMgmtErr.FLASH_ERASE_FAILED: MgmtErr.EUNKNOWN,
    ImgMgmtErr.INVALID_SLOT: MgmtErr.EINVAL,
    ImgMgmtErr.NO_FREE_MEMORY: MgmtErr.ENOMEM,
    ImgMgmtErr.FLASH_CONTEXT_ALREADY_SET: MgmtErr.EUNKNOWN,
    ImgMgmtErr.FLASH_CONTEXT_NOT_SET: MgmtErr.EUNKNOWN,
    ImgMgmtErr.FLASH_AREA_DEVICE_NULL: MgmtErr.EUNKNOWN,
    ImgMgmtErr.INVALID_PAGE_OFFSET: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_OFFSET: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_LENGTH: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_IMAGE_HEADER: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_IMAGE_HEADER_MAGIC: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_HASH: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_FLASH_ADDRESS: MgmtErr.EINVAL,
    ImgMgmtErr.VERSION_GET_FAILED: MgmtErr.EUNKNOWN,
    ImgMgmtErr.CURRENT_VERSION_IS_NEWER: MgmtErr.EBADSTATE,
    ImgMgmtErr.IMAGE_ALREADY_PENDING: MgmtErr.EBADSTATE,
    ImgMgmtErr.INVALID_IMAGE_VECTOR_TABLE: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_IMAGE_TOO_LARGE: MgmtErr.EINVAL,
    ImgMgmtErr.INVALID_IMAGE_DATA_OVERRUN: MgmtErr.EINVAL,
    ImgMgmtErr.IMAGE_CONFIRMATION_DENIED: MgmtErr.EBADSTATE,
    ImgMgmtErr.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED: MgmtErr.EBADSTATE,
}


# -- header and packet ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The 8-byte SMP header. ``length`` is the payload length in bytes.

    Raises UsageError when a field does not fit its width (our bug: decoded
    headers always fit).
    """

    op: Op
    group: int
    command: int
    sequence: int = 0
    length: int = 0
    version: Version = Version.V2
    flags: int = 0

    def __post_init__(self) -> None:
        for name, value, top in (
            ("group", self.group, 0xFFFF),
            ("command", self.command, 0xFF),
            ("sequence", self.sequence, 0xFF),
            ("length", self.length, MAX_PAYLOAD_BYTES),
            ("flags", self.flags, 0xFF),
        ):
            if not 0 <= value <= top:
                raise UsageError(f"SMP header {name} {value} is outside 0..{top}")

    def encode(self) -> bytes:
        """The 8 header bytes."""
        first = (int(self.version) << 3) | int(self.op)
        return _HEADER.pack(first, self.flags, self.length, self.group, self.sequence, self.command)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Read the first 8 bytes of ``data``.

        Raises MalformedError when there are fewer, a reserved bit is set, or
        the version is one of the reserved 2 and 3.
        """
        if len(data) < HEADER_BYTES:
            raise MalformedError("smp header", f"{len(data)} bytes, need {HEADER_BYTES}")
        first, flags, length, group, sequence, command = _HEADER.unpack_from(data)
        if first & 0xE0:
            raise MalformedError("smp header", f"reserved bits set in byte 0 ({first:#04x})")
        version, op = (first >> 3) & 0x03, first & 0x07
        if version > Version.V2:
            raise MalformedError("smp header.version", f"reserved version {version}")
        if op > Op.WRITE_RSP:
            raise MalformedError("smp header.op", f"op {op} is not 0..3")
        return cls(
            op=Op(op),
            group=group,
            command=command,
            sequence=sequence,
            length=length,
            version=Version(version),
            flags=flags,
        )

    def reply(self, length: int = 0) -> Header:
        """The header of the reply to this request: op + 1, the same version,
        group, command and sequence. Raises UsageError for a reply header."""
        return replace(self, op=self.op.reply, length=length, flags=0)


Payload = dict[str, Any]


@dataclass(frozen=True)
class Packet:
    """One decoded packet: its header and its payload map."""

    header: Header
    payload: Payload


def encode_packet(header: Header, payload: Mapping[str, Any]) -> bytes:
    """Header and CBOR payload; ``header.length`` is replaced by the real length.

    Raises UsageError when the payload does not encode or exceeds 65535 bytes.
    """
    try:
        body = cbor.encode(dict(payload))
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        raise UsageError(f"SMP payload does not encode as CBOR: {exc}") from exc
    if len(body) > MAX_PAYLOAD_BYTES:
        raise UsageError(f"SMP payload is {len(body)} bytes, over {MAX_PAYLOAD_BYTES}")
    return replace(header, length=len(body)).encode() + body


def decode_packet(data: bytes) -> Packet:
    """Decode one whole packet (as a framing decoder delivers it).

    Raises MalformedError when the header is bad, the byte count is not
    8 + the header's length, or the payload is not one CBOR map with text keys
    (see the module rules).
    """
    header = Header.decode(data)
    if len(data) != HEADER_BYTES + header.length:
        raise MalformedError(
            "smp packet",
            f"{len(data)} bytes, but the header announces {HEADER_BYTES} + {header.length}",
        )
    return Packet(header, decode_payload(data[HEADER_BYTES:]))


def decode_payload(data: bytes) -> Payload:
    """The payload map of a packet; empty data is ``{}``. Raises MalformedError."""
    if not data:
        return {}
    reader = _CborReader(data)
    value = reader.item(0)
    if reader.position != len(data):
        raise MalformedError(
            "smp payload", f"{len(data) - reader.position} trailing bytes after the CBOR map"
        )
    if not isinstance(value, dict):
        raise MalformedError("smp payload", f"a CBOR {type(value).__name__}, not a map")
    return value


class _Break:
    """The 0xFF that ends an indefinite-length item."""


_BREAK = _Break()


class _CborReader:
    """A strict, bounded CBOR reader for SMP payloads (module rules).

    Every declared length is compared with the bytes left before it is used,
    so a payload can never make it allocate more than its own size. Raises
    only MalformedError.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.position = 0

    def item(self, depth: int) -> Any:
        value = self._item(depth)
        if value is _BREAK:
            raise MalformedError("smp payload", "a break byte (0xff) outside an indefinite item")
        return value

    def _item(self, depth: int) -> Any:
        if depth > MAX_CBOR_DEPTH:
            raise MalformedError("smp payload", f"CBOR nested deeper than {MAX_CBOR_DEPTH}")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if initial == 0xFF:
            return _BREAK
        if major == 7:
            return self._simple(info)
        if info == 31:
            if major in (2, 3):
                return self._indefinite_string(major)
            if major == 4:
                return self._indefinite_array(depth)
            if major == 5:
                return self._indefinite_map(depth)
            raise MalformedError("smp payload", f"indefinite length on CBOR major type {major}")
        argument = self._argument(info)
        if major == 0:
            return argument
        if major == 1:
            return -1 - argument
        if major == 2:
            return self._bytes(argument)
        if major == 3:
            return self._text(self._bytes(argument))
        if major == 4:
            self._check_count(argument, 1)
            return [self.item(depth + 1) for _ in range(argument)]
        if major == 5:
            self._check_count(argument, 2)
            result: dict[str, Any] = {}
            for _ in range(argument):
                if not self._map_entry(result, depth):
                    raise MalformedError("smp payload", "a break inside a definite-length map")
            return result
        raise MalformedError("smp payload", "CBOR tags are not allowed in SMP payloads")

    def _take(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self._data):
            raise MalformedError("smp payload", "truncated: the data ends inside a CBOR item")
        chunk = self._data[self.position : end]
        self.position = end
        return chunk

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if info > 27:
            raise MalformedError("smp payload", f"reserved CBOR additional information {info}")
        return int.from_bytes(self._take(1 << (info - 24)), "big")

    def _check_count(self, count: int, min_item_bytes: int) -> None:
        if count * min_item_bytes > len(self._data) - self.position:
            raise MalformedError("smp payload", f"CBOR container of {count} items in fewer bytes")

    def _bytes(self, length: int) -> bytes:
        if length > len(self._data) - self.position:
            raise MalformedError("smp payload", f"CBOR string of {length} bytes runs past the end")
        return self._take(length)

    @staticmethod
    def _text(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedError("smp payload", "CBOR text is not UTF-8") from exc

    def _indefinite_string(self, major: int) -> bytes | str:
        parts = bytearray()
        while True:
            initial = self._take(1)[0]
            if initial == 0xFF:
                break
            if initial >> 5 != major or initial & 0x1F == 31:
                raise MalformedError("smp payload", "a bad chunk in an indefinite CBOR string")
            parts += self._bytes(self._argument(initial & 0x1F))
        return bytes(parts) if major == 2 else self._text(bytes(parts))

    def _indefinite_array(self, depth: int) -> list[Any]:
        result: list[Any] = []
        while (value := self._item(depth + 1)) is not _BREAK:
            result.append(value)
        return result

    def _indefinite_map(self, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while self._map_entry(result, depth):
            pass
        return result

    def _map_entry(self, result: dict[str, Any], depth: int) -> bool:
        """Read one key/value pair into ``result``; False at an indefinite map's break."""
        key = self._item(depth + 1)
        if key is _BREAK:
            return False
        if not isinstance(key, str):
            raise MalformedError("smp payload", f"a map key is a {type(key).__name__}, not text")
        if key in result:
            raise MalformedError("smp payload", f"duplicate map key {key!r}")
        result[key] = self.item(depth + 1)
        return True

    def _simple(self, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            return struct.unpack(">e", self._take(2))[0]
        if info == 26:
            return struct.unpack(">f", self._take(4))[0]
        if info == 27:
            return struct.unpack(">d", self._take(8))[0]
        raise MalformedError("smp payload", f"CBOR simple value {info} is not allowed")


# -- CRC and console framing -------------------------------------------------------


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16_TABLE: Final = _crc16_table()


def crc16_xmodem(data: bytes, crc: int = 0) -> int:
    """CRC-16/XMODEM of ``data`` (poly 0x1021, init 0): ``crc16_xmodem(b"123456789") == 0x31C3``.

    ``crc`` continues an earlier computation over preceding bytes.
    """
    table = _CRC16_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def _base64_chars_per_line(line_bytes: int) -> int:
    """Base64 characters in one line of ``line_bytes`` (marker and newline take 3)."""
    return (line_bytes - len(START_MARKER) - len(LINE_END)) // 4 * 4


def encode_console(packet: bytes, line_bytes: int = CONSOLE_LINE_BYTES) -> bytes:
    """The console lines of one packet (header + payload), ready for the UART.

    Raises UsageError for an empty packet, one over
    :data:`MAX_CONSOLE_PACKET_BYTES`, or ``line_bytes`` outside 7..127 (a line
    must carry at least 4 base64 characters).
    """
    if not packet:
        raise UsageError("an SMP packet cannot be empty")
    if len(packet) > MAX_CONSOLE_PACKET_BYTES:
        raise UsageError(
            f"SMP packet is {len(packet)} bytes, over the console limit {MAX_CONSOLE_PACKET_BYTES}"
        )
    if not 7 <= line_bytes <= CONSOLE_LINE_BYTES:
        raise UsageError(f"console line_bytes must be 7..{CONSOLE_LINE_BYTES}, not {line_bytes}")
    framed = _U16.pack(len(packet) + CONSOLE_FIELD_BYTES) + packet + _U16.pack(crc16_xmodem(packet))
    text = base64.b64encode(framed)
    step = _base64_chars_per_line(line_bytes)
    out = bytearray()
    for start in range(0, len(text), step):
        out += START_MARKER if start == 0 else CONTINUE_MARKER
        out += text[start : start + step]
        out += LINE_END
    return bytes(out)


class ConsoleDrop(StrEnum):
    """Why a console decoder dropped (part of) a packet; see the module rules."""

    LINE_TOO_LONG = "line_too_long"
    BASE64 = "base64"
    LENGTH = "length"
    OVERSIZE = "oversize"
    OVERRUN = "overrun"
    CRC = "crc"
    TRUNCATED = "truncated"
    ORPHAN = "orphan"


class _DropError(Exception):
    """Internal: one packet is dropped for ``reason`` (``size`` for an oversize one)."""

    def __init__(self, reason: ConsoleDrop, detail: str, size: int = 0) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.size = size


class _Reassembly:
    """The lines of one console packet: length field, body and CRC as they arrive."""

    def __init__(self, max_packet_bytes: int) -> None:
        self._max_packet_bytes = max_packet_bytes
        self._expected = 0  # body + CRC bytes, from the length field
        self._data: bytearray | None = None

    @property
    def active(self) -> bool:
        return self._data is not None

    def abandon(self) -> None:
        self._data = None

    def line(self, is_start: bool, text: bytes) -> bytes | None:
        """Add one line's base64 (marker and newline removed); the body when complete.

        Raises _DropError for a bad line; the packet is abandoned then.
        """
        data = self._data
        self._data = None  # until this line is accepted
        if is_start and data is not None:
            raise _DropError(ConsoleDrop.TRUNCATED, "a new packet started before this one ended")
        raw = _strict_base64(text)
        if is_start:
            data, raw = self._start(raw)
        elif data is None:
            raise _DropError(ConsoleDrop.ORPHAN, "a continuation line with no packet started")
        data += raw
        if len(data) < self._expected:
            self._data = data
            return None
        if len(data) > self._expected:
            raise _DropError(
                ConsoleDrop.OVERRUN, f"{len(data)} bytes, the length field said {self._expected}"
            )
        body, crc = bytes(data[:-CONSOLE_FIELD_BYTES]), _U16.unpack(data[-CONSOLE_FIELD_BYTES:])[0]
        if crc16_xmodem(body) != crc:
            raise _DropError(ConsoleDrop.CRC, f"CRC {crc:#06x} is not {crc16_xmodem(body):#06x}")
        return body

    def _start(self, raw: bytes) -> tuple[bytearray, bytes]:
        """A new packet from its first line: (empty buffer, the bytes after the length)."""
        if len(raw) < CONSOLE_FIELD_BYTES:
            raise _DropError(ConsoleDrop.LENGTH, "the first line holds no length field")
        (expected,) = _U16.unpack_from(raw)
        if expected < HEADER_BYTES + CONSOLE_FIELD_BYTES:
            raise _DropError(ConsoleDrop.LENGTH, f"length field {expected} is below 10")
        size = expected - CONSOLE_FIELD_BYTES
        if size > self._max_packet_bytes:
            raise _DropError(
                ConsoleDrop.OVERSIZE, f"a {size}-byte packet, over {self._max_packet_bytes}", size
            )
        self._expected = expected
        return bytearray(), raw[CONSOLE_FIELD_BYTES:]


def _strict_base64(text: bytes) -> bytes:
    if len(text) % 4:
        raise _DropError(ConsoleDrop.BASE64, f"{len(text)} base64 characters, not a multiple of 4")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise _DropError(ConsoleDrop.BASE64, f"not base64 ({exc})") from exc


def _check_max_packet(max_packet_bytes: int, top: int) -> None:
    if not HEADER_BYTES <= max_packet_bytes <= top:
        raise UsageError(f"max_packet_bytes must be {HEADER_BYTES}..{top}, not {max_packet_bytes}")


class ConsoleDecoder:
    """Console-framed bytes in, whole packets (header + payload, unparsed) out.

    Sans-IO and total: :meth:`feed` never raises for any input; what it drops is
    counted in :attr:`drops` (the last one described in :attr:`last_drop`),
    and the text between packets is kept (the last ``max_text_bytes`` of it)
    for :meth:`take_text`. Memory is bounded by one line, one packet of
    ``max_packet_bytes`` and the text buffer. Raises UsageError for limits
    that cannot work.
    """

    def __init__(
        self,
        max_packet_bytes: int = MAX_CONSOLE_PACKET_BYTES,
        *,
        max_line_bytes: int = CONSOLE_LINE_BYTES,
        max_text_bytes: int = 4096,
    ) -> None:
        _check_max_packet(max_packet_bytes, MAX_CONSOLE_PACKET_BYTES)
        if max_line_bytes < len(START_MARKER) + len(LINE_END) + 4:
            raise UsageError(f"max_line_bytes {max_line_bytes} cannot hold one base64 group")
        if max_text_bytes < 0:
            raise UsageError(f"max_text_bytes must be >= 0, not {max_text_bytes}")
        self._max_line_chars = max_line_bytes - len(START_MARKER) - len(LINE_END)
        self._max_text_bytes = max_text_bytes
        self._packet = _Reassembly(max_packet_bytes)
        self._line: bytearray | None = None  # base64 of the SMP line being read
        self._line_is_start = False
        self._carry = b""  # a possible first marker byte at the end of the last chunk
        self._text = bytearray()
        self.drops: Counter[ConsoleDrop] = Counter()
        self.packets_ok = 0
        self.last_drop: _DropError | None = None

    @property
    def idle(self) -> bool:
        """Whether no line or packet is partly received."""
        return self._line is None and not self._packet.active and not self._carry

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes (any cut); return the packets they complete, in order."""
        buf = self._carry + data if self._carry else data
        self._carry = b""
        packets: list[bytes] = []
        position, size = 0, len(buf)
        while position < size:
            line = self._line
            if line is not None:
                position = self._read_line(line, buf, position, packets)
                continue
            start = buf.find(START_MARKER, position)
            more = buf.find(CONTINUE_MARKER, position)
            marker = min((at for at in (start, more) if at >= 0), default=-1)
            if marker < 0:
                end = size
                if buf[-1] in (START_MARKER[0], CONTINUE_MARKER[0]):
                    end, self._carry = size - 1, buf[-1:]
                self._add_text(buf[position:end])
                break
            self._add_text(buf[position:marker])
            self._line = bytearray()
            self._line_is_start = marker == start
            position = marker + len(START_MARKER)
        return packets

    def _read_line(self, line: bytearray, buf: bytes, position: int, packets: list[bytes]) -> int:
        """Add to the SMP line in progress; finish it at its newline. Returns the new position."""
        newline = buf.find(LINE_END, position)
        end = len(buf) if newline < 0 else newline
        room = self._max_line_chars - len(line)
        if end - position > room:
            self._line = None
            self._packet.abandon()
            self._drop(
                _DropError(ConsoleDrop.LINE_TOO_LONG, f"a line over {self._max_line_chars} chars")
            )
            return position + room  # look for the next marker after what fit
        line += buf[position:end]
        if newline < 0:
            return len(buf)
        self._line = None
        try:
            body = self._packet.line(self._line_is_start, bytes(line))
        except _DropError as exc:
            self._drop(exc)
        else:
            if body is not None:
                self.packets_ok += 1
                packets.append(body)
        return newline + 1

    def _drop(self, error: _DropError) -> None:
        self.drops[error.reason] += 1
        self.last_drop = error

    def _add_text(self, text: bytes) -> None:
        if not text or not self._max_text_bytes:
            return
        self._text += text
        excess = len(self._text) - self._max_text_bytes
        if excess > 0:
            del self._text[:excess]

    def take_text(self) -> bytes:
        """The non-SMP bytes received since the last call (at most ``max_text_bytes``)."""
        text, self._text = bytes(self._text), bytearray()
        return text

    def reset(self) -> None:
        """Forget a partial line and packet (after a reset of the peer, say)."""
        self._line = None
        self._carry = b""
        self._packet.abandon()


def decode_console(data: bytes, max_packet_bytes: int = MAX_CONSOLE_PACKET_BYTES) -> bytes:
    """The one packet whose console lines are exactly ``data``, nothing else around them.

    For a peer that must be right (tests, golden vectors). Raises
    LimitExceeded for a packet over ``max_packet_bytes``, MalformedError for
    anything else that :class:`ConsoleDecoder` would skip or drop.
    """
    decoder = ConsoleDecoder(max_packet_bytes, max_text_bytes=len(data))
    packets: list[bytes] = []
    for line in data.splitlines(keepends=True):
        packets += decoder.feed(line)
        error = decoder.last_drop
        if error is None:
            continue
        if error.reason is ConsoleDrop.OVERSIZE:
            raise LimitExceeded("SMP console packet", error.size, max_packet_bytes) from error
        raise MalformedError("smp console", f"{error.reason}: {error.detail}") from error
    if decoder.take_text():
        raise MalformedError("smp console", "text outside the SMP lines")
    if not decoder.idle:
        raise MalformedError("smp console", "truncated: the last packet did not end")
    if len(packets) != 1:
        raise MalformedError("smp console", f"{len(packets)} packets, expected 1")
    return packets[0]


# -- raw framing ---------------------------------------------------------------------


class RawDecoder:
    """Raw-framed bytes (packets back to back) in, whole packets out.

    Never raises for input. A packet over ``max_packet_bytes`` is counted in
    :attr:`oversize_drops` and its announced bytes skipped without being stored.
    Raises UsageError for a limit outside 8..65543.
    """

    def __init__(self, max_packet_bytes: int = MAX_RAW_PACKET_BYTES) -> None:
        _check_max_packet(max_packet_bytes, MAX_RAW_PACKET_BYTES)
        self._max_packet_bytes = max_packet_bytes
        self._buffer = bytearray()
        self._skip_bytes = 0
        self.oversize_drops = 0
        self.packets_ok = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an unfinished packet held now."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the packets they complete, in order."""
        view = memoryview(data)
        if self._skip_bytes:
            skipped = min(self._skip_bytes, len(view))
            self._skip_bytes -= skipped
            view = view[skipped:]
        self._buffer += view
        packets: list[bytes] = []
        while len(self._buffer) >= HEADER_BYTES:
            total = HEADER_BYTES + _U16.unpack_from(self._buffer, 2)[0]
            if total > self._max_packet_bytes:
                self.oversize_drops += 1
                skipped = min(total, len(self._buffer))
                del self._buffer[:skipped]
                self._skip_bytes = total - skipped
                if self._skip_bytes:
                    break
                continue
            if len(self._buffer) < total:
                break
            packets.append(bytes(self._buffer[:total]))
            del self._buffer[:total]
            self.packets_ok += 1
        return packets

    def reset(self) -> None:
        """Forget a partial packet: the input timeout of a raw UART transport."""
        self._buffer.clear()
        self._skip_bytes = 0


def max_packet_bytes(buf_size: int, *, console: bool = True) -> int:
    """The largest packet a server with reassembly buffer ``buf_size`` takes.

    Console framing decodes into that buffer together with the length field
    and CRC, so it is ``buf_size - 4``; raw framing puts the packet alone in it.
    Raises UsageError when not even a header fits.
    """
    room = buf_size - 2 * CONSOLE_FIELD_BYTES if console else buf_size
    top = MAX_CONSOLE_PACKET_BYTES if console else MAX_RAW_PACKET_BYTES
    if room < HEADER_BYTES:
        raise UsageError(f"buf_size {buf_size} cannot hold an SMP header")
    return min(room, top)


# -- errors in replies -----------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfo:
    """An error a server replied with: ``group`` None for an SMP-level ``rc``."""

    rc: int
    group: int | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        """``MGMT_ERR_EINVAL``, ``IMG_MGMT_ERR_NO_IMAGE``, or the number when unknown."""
        if self.group is None:
            try:
                return f"MGMT_ERR_{MgmtErr(self.rc).name}"
            except ValueError:
                return f"MGMT_ERR_{self.rc}"
        if self.group == Group.IMAGE:
            try:
                return f"IMG_MGMT_ERR_{ImgMgmtErr(self.rc).name}"
            except ValueError:
                pass
        return f"group {self.group} error {self.rc}"

    def __str__(self) -> str:
        return self.name + (f" ({self.reason})" if self.reason else "")


class SmpErrorReply(InvalidInput):
    """The SMP server refused a request: it answered with ``rc`` or ``err``."""

    def __init__(self, error: ErrorInfo, request: str) -> None:
        super().__init__(f"{request} refused: {error}")
        self.error = error


def reply_error(payload: Payload) -> ErrorInfo | None:
    """The error in a reply payload, or None for success (``rc`` 0 or absent).

    Raises MalformedError when ``rc``, ``rsn`` or ``err`` has the wrong shape.
    """
    reason = payload.get("rsn")
    if reason is not None and not isinstance(reason, str):
        raise MalformedError("smp reply.rsn", "must be text")
    err = payload.get("err")
    if err is not None:
        if not isinstance(err, dict):
            raise MalformedError("smp reply.err", "must be a map")
        group, rc = _uint(err.get("group"), "smp reply.err.group"), err.get("rc", 0)
        rc = _uint(rc, "smp reply.err.rc")
        if rc:
            return ErrorInfo(rc, group, reason)
    rc = payload.get("rc", 0)
    if not _is_int(rc):
        raise MalformedError("smp reply.rc", "must be an integer")
    return ErrorInfo(rc, None, reason) if rc else None


def check_reply(packet: Packet, request: str = "request") -> Payload:
    """The payload of a successful reply. Raises SmpErrorReply, or MalformedError."""
    error = reply_error(packet.payload)
    if error is not None:
        raise SmpErrorReply(error, request)
    return packet.payload


def error_payload(version: Version, rc: int, *, group: int | None = None) -> Payload:
    """What a server answers for an error: ``{"err": ...}`` for a group error in v2,
    else ``{"rc": rc}`` (v1 peers get :data:`IMAGE_ERROR_V1` for image codes)."""
    if group is None:
        return {"rc": int(rc)}
    if version is Version.V2:
        return {"err": {"group": int(group), "rc": int(rc)}}
    if group == Group.IMAGE and rc in set(ImgMgmtErr):
        return {"rc": int(IMAGE_ERROR_V1[ImgMgmtErr(rc)])}
    return {"rc": int(MgmtErr.EUNKNOWN)}


# -- requests, and the matcher ------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request before it has a sequence number: op, group, command and payload map."""

    op: Op
    group: int
    command: int
    payload: Payload = field(default_factory=dict)

    def encode(self, sequence: int, version: Version = Version.V2) -> bytes:
        """The packet bytes with this sequence number. Raises UsageError."""
        header = Header(self.op, self.group, self.command, sequence=sequence, version=version)
        return encode_packet(header, self.payload)

    def describe(self) -> str:
        """A short name for messages: ``image upload``, ``os echo``..."""
        names: dict[tuple[int, int], str] = {
            (Group.OS, OsCommand.ECHO): "os echo",
            (Group.OS, OsCommand.RESET): "os reset",
            (Group.OS, OsCommand.MCUMGR_PARAMS): "os mcumgr params",
            (Group.IMAGE, ImageCommand.STATE): "image state",
            (Group.IMAGE, ImageCommand.UPLOAD): "image upload",
            (Group.IMAGE, ImageCommand.ERASE): "image erase",
        }
        return names.get((self.group, self.command), f"group {self.group} command {self.command}")


def echo_request(text: str) -> Request:
    """OS echo (write): the server answers ``{"r": text}``."""
    return Request(Op.WRITE, Group.OS, OsCommand.ECHO, {"d": text})


def params_request() -> Request:
    """OS mcumgr params (read): the server answers ``{"buf_size", "buf_count"}``."""
    return Request(Op.READ, Group.OS, OsCommand.MCUMGR_PARAMS)


def reset_request(*, force: bool = False) -> Request:
    """OS reset (write); ``force`` asks the server not to let the application veto it."""
    return Request(Op.WRITE, Group.OS, OsCommand.RESET, {"force": 1} if force else {})


def image_state_read() -> Request:
    """Image state (read): the server answers with every slot's state."""
    return Request(Op.READ, Group.IMAGE, ImageCommand.STATE)


def image_state_write(image_hash: bytes | None = None, *, confirm: bool = False) -> Request:
    """Image state (write): test the image with ``image_hash`` (confirm false) at the
    next reset, or confirm one (``image_hash`` None: the running image).

    Raises UsageError for a hash that is not 32 bytes, or for a test without a hash.
    """
    if image_hash is None and not confirm:
        raise UsageError("an image test needs the image hash")
    if image_hash is not None and len(image_hash) != SHA256_BYTES:
        raise UsageError(f"an image hash is {SHA256_BYTES} bytes, not {len(image_hash)}")
    payload: Payload = {"confirm": confirm}
    if image_hash is not None:
        payload["hash"] = image_hash
    return Request(Op.WRITE, Group.IMAGE, ImageCommand.STATE, payload)


def image_erase(slot: int | None = None) -> Request:
    """Image erase (write) of ``slot`` (the server's default is slot 1)."""
    return Request(
        Op.WRITE, Group.IMAGE, ImageCommand.ERASE, {} if slot is None else {"slot": slot}
    )


def upload_request(
    offset: int,
    data: bytes,
    *,
    image_len: int | None = None,
    sha: bytes | None = None,
    image: int | None = None,
    upgrade: bool | None = None,
) -> Request:
    """Image upload (write) of ``data`` at ``offset``.

    ``image_len`` (the whole file's length) must be given exactly at offset 0;
    ``sha`` (SHA-256 of the whole file, which lets the server resume and check
    the upload), ``image`` and ``upgrade`` only at offset 0. Raises UsageError
    otherwise.
    """
    if offset < 0:
        raise UsageError(f"upload offset {offset} is negative")
    if (offset == 0) != (image_len is not None):
        raise UsageError("an upload request carries len exactly when its offset is 0")
    if offset and (sha is not None or image is not None or upgrade is not None):
        raise UsageError("sha, image and upgrade go only with the upload at offset 0")
    if sha is not None and len(sha) != SHA256_BYTES:
        raise UsageError(f"an upload sha is {SHA256_BYTES} bytes, not {len(sha)}")
    payload: Payload = {"off": offset, "data": data}
    if image_len is not None:
        payload["len"] = image_len
    if sha is not None:
        payload["sha"] = sha
    if image is not None:
        payload["image"] = image
    if upgrade is not None:
        payload["upgrade"] = upgrade
    return Request(Op.WRITE, Group.IMAGE, ImageCommand.UPLOAD, payload)


def _cbor_head_bytes(value: int) -> int:
    """Bytes of a CBOR item head whose argument is ``value``."""
    return 1 if value < 24 else 2 if value <= 0xFF else 3 if value <= 0xFFFF else 5


def max_upload_chunk_bytes(
    max_packet_bytes: int,
    offset: int,
    *,
    remaining_bytes: int | None = None,
    image_len: int | None = None,
    sha: bytes | None = None,
    image: int | None = None,
    upgrade: bool | None = None,
    version: Version = Version.V2,
    align_bytes: int = 1,
) -> int:
    """The most ``data`` bytes an upload request at ``offset`` can carry.

    The request (header + CBOR map, the other fields as given, see
    :func:`upload_request`) stays within ``max_packet_bytes`` (use
    :func:`max_packet_bytes` for a server's ``buf_size``). The size is found by
    encoding, not estimated. The result is at most ``remaining_bytes`` and,
    unless it is all that remains, a multiple of ``align_bytes``. Returns 0
    when not even one byte fits. Raises UsageError for bad arguments.
    """
    if align_bytes < 1:
        raise UsageError(f"align_bytes must be >= 1, not {align_bytes}")
    request = upload_request(
        offset, b"", image_len=image_len, sha=sha, image=image, upgrade=upgrade
    )
    empty_bytes = len(request.encode(0, version))
    # The data item's head grows from 1 byte (length 0) with its length.
    fixed_bytes = empty_bytes - 1
    chunk = max(0, max_packet_bytes - fixed_bytes - 1)
    while chunk > 0 and fixed_bytes + _cbor_head_bytes(chunk) + chunk > max_packet_bytes:
        chunk -= 1
    if remaining_bytes is not None:
        if remaining_bytes < 0:
            raise UsageError(f"remaining_bytes {remaining_bytes} is negative")
        if chunk >= remaining_bytes:
            return remaining_bytes
    chunk -= chunk % align_bytes
    encoded = len(
        replace(request, payload={**request.payload, "data": bytes(chunk)}).encode(0, version)
    )
    if chunk and encoded > max_packet_bytes:
        raise UsageError(f"upload chunk arithmetic is off: {encoded} > {max_packet_bytes}")
    return chunk


class RequestMatcher:
    """Sequence numbers and stale-reply filtering for one SMP client.

    :meth:`send` encodes a request with the next sequence number (mod 256) and
    adds it to the outstanding ones. With ``window`` 1 (the default, and what
    every SMP client does) there is one: a new request replaces an earlier one
    (after a timeout, say), whose late reply is then stale. A larger window
    keeps that many, for a client that sends the next request before the
    last one is answered (a server with several buffers); sending past it
    drops the oldest. :meth:`match` returns the reply to an outstanding
    request and forgets that request; anything else is counted in
    :attr:`stale_replies` and returns None. A window is at most 128, so that
    a sequence number is never outstanding twice.
    """

    def __init__(
        self, *, version: Version = Version.V2, first_sequence: int = 0, window: int = 1
    ) -> None:
        if not 0 <= first_sequence <= 0xFF:
            raise UsageError(f"first_sequence must be 0..255, not {first_sequence}")
        if not 1 <= window <= 128:
            raise UsageError(f"window must be 1..128, not {window}")
        self._version = version
        self._next_sequence = first_sequence
        self._window = window
        self._outstanding: dict[int, Header] = {}  # by sequence, oldest first
        self.stale_replies = 0

    @property
    def outstanding(self) -> Header | None:
        """The header of the oldest request waiting for its reply, if any."""
        return next(iter(self._outstanding.values()), None)

    @property
    def in_flight(self) -> int:
        """How many requests wait for their replies."""
        return len(self._outstanding)

    def send(self, request: Request) -> bytes:
        """The packet bytes of ``request`` (unframed); it becomes outstanding."""
        sequence = self._next_sequence
        packet = request.encode(sequence, self._version)
        self._next_sequence = (sequence + 1) & 0xFF
        while len(self._outstanding) >= self._window:
            del self._outstanding[next(iter(self._outstanding))]
        self._outstanding[sequence] = Header.decode(packet)
        return packet

    def abandon(self) -> None:
        """Stop waiting for every outstanding reply (late arrivals will be stale)."""
        self._outstanding.clear()

    def match(self, reply: bytes | Packet) -> Packet | None:
        """The reply to an outstanding request, or None when ``reply`` is stale.

        Raises MalformedError when ``reply`` is bytes that do not decode.
        """
        packet = decode_packet(reply) if isinstance(reply, bytes | bytearray) else reply
        header = packet.header
        expected = self._outstanding.get(header.sequence)
        if (
            expected is None
            or not expected.op.is_request
            or header.op is not expected.op.reply
            or header.group != expected.group
            or header.command != expected.command
        ):
            self.stale_replies += 1
            return None
        del self._outstanding[header.sequence]
        return packet


# -- typed payloads --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _uint(value: Any, where: str, top: int = 0xFFFF_FFFF) -> int:
    if not (_is_int(value) and 0 <= value <= top):
        raise MalformedError(where, f"must be an unsigned integer up to {top}")
    return int(value)


def _optional(payload: Payload, key: str, kind: type, where: str) -> Any:
    value = payload.get(key)
    if value is None:
        return None
    if kind is int:
        return _uint(value, where)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise MalformedError(where, f"must be {kind.__name__}")
    return value


@dataclass(frozen=True)
class McumgrParams:
    """The server's reassembly buffer size and count (OS command 6)."""

    buf_size: int
    buf_count: int


def parse_params_reply(payload: Payload) -> McumgrParams:
    """Raises MalformedError when ``buf_size`` or ``buf_count`` is missing or not a uint."""
    return McumgrParams(
        _uint(payload.get("buf_size"), "smp params.buf_size"),
        _uint(payload.get("buf_count"), "smp params.buf_count"),
    )


def parse_echo_reply(payload: Payload) -> str:
    """The echoed text. Raises MalformedError when ``r`` is not text."""
    text = payload.get("r")
    if not isinstance(text, str):
        raise MalformedError("smp echo.r", "must be text")
    return text


def parse_echo_request(payload: Payload) -> str:
    """The text to echo. Raises MalformedError when ``d`` is not text."""
    text = payload.get("d")
    if not isinstance(text, str):
        raise MalformedError("smp echo.d", "must be text")
    return text


def parse_reset_request(payload: Payload) -> bool:
    """Whether the reset is forced (``force`` 1 or true). Raises MalformedError."""
    force = payload.get("force", 0)
    if not (isinstance(force, bool) or _is_int(force)):
        raise MalformedError("smp reset.force", "must be an integer or a bool")
    _optional(payload, "boot_mode", int, "smp reset.boot_mode")
    return bool(force)


def parse_erase_request(payload: Payload) -> int | None:
    """The slot to erase, or None for the server's default. Raises MalformedError."""
    slot = _optional(payload, "slot", int, "smp erase.slot")
    return None if slot is None else int(slot)


@dataclass(frozen=True)
class ImageSlotState:
    """One entry of an image state reply (``images``)."""

    slot: int
    version: str
    hash: bytes | None = None
    image: int | None = None
    bootable: bool = False
    pending: bool = False
    confirmed: bool = False
    active: bool = False
    permanent: bool = False

    def to_cbor(self) -> Payload:
        """The map a server sends (all five flags, as Zephyr's img_mgmt does)."""
        entry: Payload = {"slot": self.slot, "version": self.version}
        if self.image is not None:
            entry["image"] = self.image
        if self.hash is not None:
            entry["hash"] = self.hash
        entry.update(
            bootable=self.bootable,
            pending=self.pending,
            confirmed=self.confirmed,
            active=self.active,
            permanent=self.permanent,
        )
        return entry


@dataclass(frozen=True)
class ImageStates:
    """An image state reply: the slots the server holds images in."""

    images: tuple[ImageSlotState, ...]
    split_status: int | None = None

    def slot(self, slot: int, image: int | None = None) -> ImageSlotState | None:
        """The entry for ``slot`` (of ``image`` when the server names images)."""
        for entry in self.images:
            if entry.slot == slot and (image is None or entry.image in (None, image)):
                return entry
        return None

    def to_cbor(self) -> Payload:
        payload: Payload = {"images": [entry.to_cbor() for entry in self.images]}
        if self.split_status is not None:
            payload["splitStatus"] = self.split_status
        return payload


def parse_image_states(payload: Payload) -> ImageStates:
    """The slots of an image state reply. Raises MalformedError for a wrong shape;
    absent flags are false, as the spec allows."""
    images = payload.get("images")
    if not isinstance(images, list):
        raise MalformedError("smp image state.images", "must be an array")
    entries = []
    for index, raw in enumerate(images):
        where = f"smp image state.images[{index}]"
        if not isinstance(raw, dict):
            raise MalformedError(where, "must be a map")
        version = raw.get("version")
        if not isinstance(version, str):
            raise MalformedError(f"{where}.version", "must be text")
        image_hash = _optional(raw, "hash", bytes, f"{where}.hash")
        flags = {
            name: bool(_optional(raw, name, bool, f"{where}.{name}"))
            for name in ("bootable", "pending", "confirmed", "active", "permanent")
        }
        entries.append(
            ImageSlotState(
                slot=_uint(raw.get("slot"), f"{where}.slot"),
                version=version,
                hash=image_hash,
                image=_optional(raw, "image", int, f"{where}.image"),
                **flags,
            )
        )
    split = payload.get("splitStatus")
    if split is not None and not _is_int(split):
        raise MalformedError("smp image state.splitStatus", "must be an integer")
    return ImageStates(tuple(entries), split)


@dataclass(frozen=True)
class StateWrite:
    """An image state write: test ``hash`` (confirm false) or confirm it (or the running one)."""

    hash: bytes | None
    confirm: bool


def parse_state_write(payload: Payload) -> StateWrite:
    """Raises MalformedError for a ``hash`` that is not bytes or a non-bool ``confirm``."""
    image_hash = _optional(payload, "hash", bytes, "smp image state.hash")
    confirm = _optional(payload, "confirm", bool, "smp image state.confirm")
    return StateWrite(image_hash, bool(confirm))


@dataclass(frozen=True)
class UploadRequest:
    """One image upload request as a server reads it."""

    offset: int
    data: bytes
    image_len: int | None = None
    sha: bytes | None = None
    image: int | None = None
    upgrade: bool = False


def parse_upload_request(payload: Payload) -> UploadRequest:
    """Raises MalformedError when ``off`` or ``data`` is missing or any field has
    the wrong type; a ``sha`` longer than 32 bytes is refused too."""
    sha = _optional(payload, "sha", bytes, "smp upload.sha")
    if sha is not None and len(sha) > SHA256_BYTES:
        raise MalformedError("smp upload.sha", f"{len(sha)} bytes, over {SHA256_BYTES}")
    data = payload.get("data")
    if not isinstance(data, bytes):
        raise MalformedError("smp upload.data", "must be bytes")
    return UploadRequest(
        offset=_uint(payload.get("off"), "smp upload.off"),
        data=data,
        image_len=_optional(payload, "len", int, "smp upload.len"),
        sha=sha,
        image=_optional(payload, "image", int, "smp upload.image"),
        upgrade=bool(_optional(payload, "upgrade", bool, "smp upload.upgrade")),
    )


@dataclass(frozen=True)
class UploadProgress:
    """An upload reply: the next offset the server expects, and at the end
    whether the image matched the ``sha`` given at offset 0."""

    offset: int
    match: bool | None = None


def parse_upload_reply(payload: Payload) -> UploadProgress:
    """Raises MalformedError when ``off`` is missing or ``match`` is not a bool."""
    match = _optional(payload, "match", bool, "smp upload.match")
    return UploadProgress(_uint(payload.get("off"), "smp upload.off"), match)


def upload_reply(offset: int, match: bool | None = None) -> Payload:
    """The payload a server answers an upload request with."""
    payload: Payload = {"off": offset}
    if match is not None:
        payload["match"] = match
    return payload
