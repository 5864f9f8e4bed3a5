"""Messages of Shoal's serial update protocol (gateway <-> node), as CBOR.

Rules (spec: ``docs/serial-protocol.md`` §Messages):

* Each frame body (see :mod:`otaproto.framing`) is one CBOR array
  ``[type, id, fields...]``. ``type`` is a small unsigned integer; a reply's
  type is its request's type with bit 7 set (``BEGIN 0x02`` -> ``0x82``);
  ``ERROR`` is ``0xFF``.
* ``id`` is the request id (u16) of a request, echoed by its reply, so that a
  late reply is never taken as the answer to a newer request. For ``DATA`` and
  its ``ACK`` the id is the *session*: the request id of the ``BEGIN`` that
  opened the transfer. Data or acks of another session are dropped.
* Positional fields keep a C parser to a fixed walk: no string keys on the
  data path. Maps appear only in ``INFO`` (small integer keys).
* Data is acknowledged selectively: ``ACK [session, next, bits]`` says every
  byte below ``next`` is written and which chunks of the window beyond it
  arrived, so the sender repeats only what was lost.
* Decoding is strict: the body must be deterministic CBOR (RFC 8949 §4.2.1:
  shortest forms, sorted map keys, no tags), so a C parser that reads only the
  shortest forms accepts exactly what this one does; wrong arity, wrong types,
  out-of-range integers, texts over 128 UTF-8 bytes and unknown types are
  :class:`~otaproto.errors.MalformedError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from otaproto import cbor
from otaproto.errors import MalformedError

PROTOCOL_VERSION = 1
MAX_ID = 0xFFFF
MAX_OFFSET = 0xFFFFFFFF
DIGEST_BYTES = 32
MAX_TEXT_BYTES = 128


class MsgType(IntEnum):
    """Message types; replies are ``request | 0x80``."""

    HELLO = 0x01
    BEGIN = 0x02
    DATA = 0x03
    STATUS = 0x04
    FINISH = 0x05
    TEST_BOOT = 0x06
    CONFIRM = 0x07
    ABORT = 0x08
    RESET = 0x09
    INFO = 0x81
    BEGIN_OK = 0x82
    ACK = 0x83
    STATUS_OK = 0x84
    FINISH_OK = 0x85
    TEST_BOOT_OK = 0x86
    CONFIRM_OK = 0x87
    ABORT_OK = 0x88
    RESET_OK = 0x89
    ERROR = 0xFF


class ErrorCode(IntEnum):
    """Why a node refused a request (``ERROR`` messages)."""

    MALFORMED = 1  #: not a message this node understands
    BAD_STATE = 2  #: not now (data before begin, test boot before verify, ...)
    SIGNATURE = 3  #: unknown key or bad signature on the manifest
    DEVICE_TYPE = 4  #: manifest is for another device type
    ROLLBACK = 5  #: sequence number not newer than the confirmed one
    TOO_LARGE = 6  #: image larger than the slot, or frame larger than advertised
    OFFSET = 7  #: data outside the image or not where the node expects it
    DIGEST = 8  #: the received image does not match the signed digest
    BUSY = 9  #: a test boot is pending or running: confirm or reset first
    INTERNAL = 10  #: the node failed on its own


@dataclass(frozen=True)
class NodeLimits:
    """What a node advertises in ``INFO``; the gateway never exceeds it."""

    max_frame_bytes: int  #: largest frame *body* the node accepts
    chunk_bytes: int  #: largest data payload in one DATA frame
    window_frames: int  #: DATA frames the gateway may have unacknowledged
    max_image_bytes: int  #: largest image the secondary slot holds


@dataclass(frozen=True)
class SlotSummary:
    """One slot as a node reports it."""

    version: str
    sequence: int
    image_digest: bytes
    image_size: int


@dataclass(frozen=True)
class Info:
    """The node's ``INFO`` reply: who it is, what it runs, how far a receive got."""

    protocol_version: int
    device_type: str
    limits: NodeLimits
    boot_state: str
    primary: SlotSummary | None
    secondary: SlotSummary | None
    receive_digest: bytes | None
    receive_offset: int
    confirmed_sequence: int
    last_reverted: bool


@dataclass(frozen=True)
class Message:
    """A decoded message: its type, id and positional fields."""

    type: MsgType
    id: int
    fields: tuple[Any, ...]


# Field shapes per type: "u" unsigned int, "u16", "b" bytes, "b32" 32-byte digest,
# "t" text, "bool", "info" the INFO map, "?b" optional bytes.
_SHAPES: dict[MsgType, tuple[str, ...]] = {
    MsgType.HELLO: (),
    MsgType.BEGIN: ("b",),
    MsgType.DATA: ("u32", "b"),
    MsgType.STATUS: (),
    MsgType.FINISH: (),
    MsgType.TEST_BOOT: (),
    MsgType.CONFIRM: (),
    MsgType.ABORT: (),
    MsgType.RESET: (),
    MsgType.INFO: ("info",),
    MsgType.BEGIN_OK: ("u32",),
    MsgType.ACK: ("u32", "u32"),
    MsgType.STATUS_OK: ("t", "u32"),
    MsgType.FINISH_OK: ("b32",),
    MsgType.TEST_BOOT_OK: (),
    MsgType.CONFIRM_OK: ("u",),
    MsgType.ABORT_OK: (),
    MsgType.RESET_OK: (),
    MsgType.ERROR: ("u", "t"),
}


def encode(msg_type: MsgType, msg_id: int, *fields: Any) -> bytes:
    """The CBOR body of one message (no framing)."""
    return cbor.encode([int(msg_type), msg_id, *fields])


def hello(msg_id: int) -> bytes:
    return encode(MsgType.HELLO, msg_id)


def begin(msg_id: int, signed_manifest: bytes) -> bytes:
    return encode(MsgType.BEGIN, msg_id, signed_manifest)


def data(session: int, offset: int, chunk: bytes) -> bytes:
    return encode(MsgType.DATA, session, offset, chunk)


def ack(session: int, next_offset: int, received_bits: int = 0) -> bytes:
    """Cumulative ACK: every byte below ``next_offset`` is in flash; bit ``i`` of
    ``received_bits`` says the chunk at ``next_offset + (i + 1) * chunk`` is too."""
    return encode(MsgType.ACK, session, next_offset, received_bits)


def error(msg_id: int, code: ErrorCode, text: str) -> bytes:
    return encode(MsgType.ERROR, msg_id, int(code), text.encode()[:120].decode(errors="ignore"))


def info(msg_id: int, value: Info) -> bytes:
    """``INFO`` with its map (keys 1..9, see the spec)."""
    limits = value.limits
    body: dict[int, Any] = {
        1: value.protocol_version,
        2: value.device_type,
        3: [
            limits.max_frame_bytes,
            limits.chunk_bytes,
            limits.window_frames,
            limits.max_image_bytes,
        ],
        4: value.boot_state,
        5: _slot_out(value.primary),
        6: _slot_out(value.secondary),
        7: [value.receive_digest, value.receive_offset] if value.receive_digest else None,
        8: value.confirmed_sequence,
        9: value.last_reverted,
    }
    return encode(MsgType.INFO, msg_id, body)


def _slot_out(slot: SlotSummary | None) -> list[Any] | None:
    if slot is None:
        return None
    return [slot.version, slot.sequence, slot.image_digest, slot.image_size]


def decode(body: bytes) -> Message:
    """Decode one frame body. Raises MalformedError."""
    raw = cbor.decode_deterministic(body, "message", max_depth=4)
    if not isinstance(raw, list) or len(raw) < 2:
        raise MalformedError("message", "not an array [type, id, ...]")
    type_value, msg_id = raw[0], raw[1]
    if not _is_uint(msg_id, MAX_ID):
        raise MalformedError("message.id", "must be an unsigned 16-bit integer")
    if not _is_uint(type_value, 0xFF):
        raise MalformedError("message.type", "must be an unsigned byte")
    try:
        msg_type = MsgType(type_value)
    except ValueError as exc:
        raise MalformedError("message.type", f"unknown type 0x{type_value:02x}") from exc
    shape = _SHAPES[msg_type]
    fields = raw[2:]
    if len(fields) != len(shape):
        raise MalformedError(
            f"message {msg_type.name}", f"has {len(fields)} fields, expected {len(shape)}"
        )
    checked = tuple(
        _check(kind, value, f"{msg_type.name}.{i}")
        for i, (kind, value) in enumerate(zip(shape, fields, strict=True))
    )
    return Message(msg_type, msg_id, checked)


def request_id_of(body: bytes) -> int:
    """The id of a message that failed to decode, when it has one, else 0.

    So that an ERROR about a request this node does not understand (a newer
    message type, say) still reaches the request that caused it.
    """
    try:
        raw = cbor.decode(body, "message", max_depth=4)
    except MalformedError:
        return 0
    if isinstance(raw, list) and len(raw) >= 2 and _is_uint(raw[1], MAX_ID):
        return int(raw[1])
    return 0


def decode_info(value: Any) -> Info:
    """The fields of an ``INFO`` map. Raises MalformedError."""
    if not isinstance(value, dict):
        raise MalformedError("INFO", "must be a map")
    try:
        limits = value[3]
        if not (
            isinstance(limits, list)
            and len(limits) == 4
            and all(_is_uint(v, MAX_OFFSET) for v in limits)
        ):
            raise MalformedError("INFO.limits", "must be 4 unsigned integers")
        progress = value[7]
        if progress is not None and not (
            isinstance(progress, list)
            and len(progress) == 2
            and _is_digest(progress[0])
            and _is_uint(progress[1], MAX_OFFSET)
        ):
            raise MalformedError("INFO.receive", "must be [digest, offset] or null")
        result = Info(
            protocol_version=_check("u", value[1], "INFO.version"),
            device_type=_check("t", value[2], "INFO.device_type"),
            limits=NodeLimits(*limits),
            boot_state=_check("t", value[4], "INFO.boot_state"),
            primary=_slot_in(value[5], "INFO.primary"),
            secondary=_slot_in(value[6], "INFO.secondary"),
            receive_digest=progress[0] if progress else None,
            receive_offset=progress[1] if progress else 0,
            confirmed_sequence=_check("u", value[8], "INFO.confirmed_sequence"),
            last_reverted=_check("bool", value[9], "INFO.last_reverted"),
        )
    except KeyError as exc:
        raise MalformedError("INFO", f"missing key {exc.args[0]}") from exc
    if result.limits.window_frames < 1 or result.limits.chunk_bytes < 1:
        raise MalformedError("INFO.limits", "window and chunk must be at least 1")
    return result


def _slot_in(value: Any, where: str) -> SlotSummary | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 4):
        raise MalformedError(where, "must be [version, sequence, digest, size] or null")
    return SlotSummary(
        _check("t", value[0], where),
        _check("u", value[1], where),
        _check("b32", value[2], where),
        _check("u32", value[3], where),
    )


def _is_uint(value: Any, top: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


def _is_digest(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == DIGEST_BYTES


_KINDS: dict[str, Callable[[Any], bool]] = {
    "u": lambda v: _is_uint(v, 2**64 - 1),
    "u32": lambda v: _is_uint(v, MAX_OFFSET),
    "b": lambda v: isinstance(v, bytes),
    "b32": _is_digest,
    "t": lambda v: isinstance(v, str) and len(v.encode()) <= MAX_TEXT_BYTES,
    "bool": lambda v: isinstance(v, bool),
    "info": lambda v: isinstance(v, dict),
}


def _check(kind: str, value: Any, where: str) -> Any:
    if not _KINDS[kind](value):
        raise MalformedError(f"message {where}", f"must be of kind {kind}")
    return value
