"""The node's side of the serial update protocol: a state machine with no I/O.

Rules (spec: ``docs/serial-protocol.md`` §Receiver):

* The receiver is fed one frame body at a time and answers with the bodies to
  send back (:class:`Reaction`); flash and boot state live behind an injected
  :class:`SlotStore` (the bootloader), called synchronously, as a C node calls
  its flash driver from its main loop. No clocks, no sockets, no threads.
* BEGIN is checked completely **before anything is written**: signature with
  the provisioned keys, device type, sequence number newer than both the
  confirmed floor and the running image, image size within the slot, and no
  test boot pending or running.
* DATA is accepted only for the open session, at a chunk-aligned offset inside
  the span ``[next, next + SPAN_CHUNKS * chunk)``, and written to flash at
  once: the flash is the reassembly buffer, so selective repeat needs no frame
  buffers, only a 32-bit bitmap of the chunks received beyond ``next``. The
  span is wider than the window (the frames a gateway may have unacknowledged,
  which bounds the node's receive buffer), so a lost chunk never stalls the
  line while it is repeated. Each frame is a full ``chunk_bytes`` except the
  last, so writes stay word-aligned.
  Every DATA is answered by ``ACK [session, next, bits]``; a duplicate or
  out-of-window frame is answered too, so a lost ACK costs nothing.
* Progress is made durable whenever the contiguous prefix crosses a flash
  page boundary; after a power cut a BEGIN of the same image resumes there.
* FINISH hashes what is *in flash* (read-back) against the signed digest;
  only then may TEST_BOOT mark the image for a test boot. Nothing the node did
  not verify is ever bootable.

Transfer states (stored by name): ``idle -> receiving -> complete ->
verified``; see :data:`TRANSITIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from otaproto import cose
from otaproto import nodelink as nl
from otaproto.artifact import check_installable
from otaproto.errors import (
    DeviceTypeMismatch,
    InvalidInput,
    LimitExceeded,
    MalformedError,
    RollbackRefused,
    UsageError,
    VerificationError,
)
from otaproto.keys import TrustedKeys
from otaproto.manifest import Manifest


class TransferState(StrEnum):
    """Where one image transfer stands on the node."""

    IDLE = "idle"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    VERIFIED = "verified"


class Event(StrEnum):
    """What moves the transfer machine."""

    BEGIN = "begin"
    LAST_DATA = "last_data"
    DIGEST_OK = "digest_ok"
    DIGEST_BAD = "digest_bad"
    ABORT = "abort"
    TEST_BOOT = "test_boot"


S, E = TransferState, Event
#: Every allowed (state, event) pair; anything else is a UsageError naming both.
TRANSITIONS: dict[tuple[TransferState, Event], TransferState] = {
    (S.IDLE, E.BEGIN): S.RECEIVING,
    (S.RECEIVING, E.BEGIN): S.RECEIVING,
    (S.COMPLETE, E.BEGIN): S.RECEIVING,
    (S.VERIFIED, E.BEGIN): S.RECEIVING,
    (S.RECEIVING, E.LAST_DATA): S.COMPLETE,
    (S.COMPLETE, E.DIGEST_OK): S.VERIFIED,
    (S.COMPLETE, E.DIGEST_BAD): S.IDLE,
    (S.IDLE, E.ABORT): S.IDLE,
    (S.RECEIVING, E.ABORT): S.IDLE,
    (S.COMPLETE, E.ABORT): S.IDLE,
    (S.VERIFIED, E.ABORT): S.IDLE,
    (S.VERIFIED, E.TEST_BOOT): S.IDLE,
    (S.IDLE, E.TEST_BOOT): S.IDLE,
}

#: Boot states in which the secondary slot must not be touched.
BUSY_BOOT_STATES = frozenset({"test_pending", "testing", "swapping", "reverting"})


class SlotStore(Protocol):
    """What the receiver needs from the node's bootloader (the flash behind it)."""

    @property
    def boot_state(self) -> str: ...
    @property
    def confirmed_sequence(self) -> int: ...
    @property
    def last_reverted(self) -> bool: ...
    def primary(self) -> nl.SlotSummary | None: ...
    def secondary(self) -> nl.SlotSummary | None: ...
    def begin_receive(self, signed_manifest: bytes, manifest: Manifest) -> int: ...
    def write_image(self, offset: int, data: bytes) -> None: ...
    def persist_progress(self, offset: int) -> None: ...
    def receive_progress(self) -> tuple[bytes, int] | None: ...
    def finish_receive(self) -> bool: ...
    def request_test_boot(self) -> None: ...
    def confirm(self) -> None: ...
    def abort_receive(self) -> None: ...


@dataclass
class Reaction:
    """What the node does after one frame: bodies to send, and whether to reset after."""

    replies: list[bytes] = field(default_factory=list)
    reset: bool = False


MAX_WINDOW_FRAMES = 32
#: Chunks from ``next`` on that a node accepts: ``next`` itself and the 31
#: chunks the ACK bitmap's bits 0..30 describe.
SPAN_CHUNKS = 32


@dataclass
class _Session:
    session_id: int
    manifest: Manifest
    next_offset: int
    received_bits: int = 0
    durable_offset: int = 0


class NodeReceiver:
    """The node's protocol state machine; see the module rules."""

    def __init__(
        self,
        store: SlotStore,
        *,
        device_type: str,
        trusted: TrustedKeys,
        limits: nl.NodeLimits,
        page_bytes: int,
    ) -> None:
        if limits.chunk_bytes % 4 or page_bytes % limits.chunk_bytes:
            raise UsageError("chunk_bytes must be a multiple of 4 that divides the page size")
        if not 1 <= limits.window_frames <= MAX_WINDOW_FRAMES:
            raise UsageError(f"window_frames must be 1..{MAX_WINDOW_FRAMES}")
        self._store = store
        self._device_type = device_type
        self._trusted = trusted
        self.limits = limits
        self._page_bytes = page_bytes
        self.state = TransferState.IDLE
        self._session: _Session | None = None
        self.frames_rejected = 0

    # -- the one entry point ------------------------------------------------

    def handle(self, body: bytes) -> Reaction:
        """React to one frame body from the gateway. Never raises for bad input."""
        try:
            msg = nl.decode(body)
        except MalformedError as exc:
            self.frames_rejected += 1
            return Reaction([nl.error(nl.request_id_of(body), nl.ErrorCode.MALFORMED, str(exc))])
        handler = _HANDLERS.get(msg.type)
        if handler is None:
            self.frames_rejected += 1
            return Reaction(
                [nl.error(msg.id, nl.ErrorCode.MALFORMED, f"{msg.type.name} is not a request")]
            )
        try:
            return handler(self, msg)
        except (UsageError, InvalidInput) as exc:
            # The store refused what the checks above let through: report it,
            # forget the session and keep serving; an MCU must not hang on it.
            self._session = None
            self.state = TransferState.IDLE
            return Reaction([nl.error(msg.id, nl.ErrorCode.INTERNAL, str(exc))])

    def frame_error(self, reason: str) -> Reaction:
        """React to a frame the framing layer refused (``oversize``, ``crc``, ...).

        Corrupt frames are dropped silently (the sender's timeout or the next
        gap ACK recovers); an oversized one is answered so that a gateway that
        ignored the advertised limit learns why.
        """
        self.frames_rejected += 1
        if reason == "oversize":
            return Reaction(
                [
                    nl.error(
                        0, nl.ErrorCode.TOO_LARGE, f"frame over {self.limits.max_frame_bytes} bytes"
                    )
                ]
            )
        return Reaction()

    # -- requests -----------------------------------------------------------

    def info(self) -> nl.Info:
        """What ``INFO`` reports now."""
        progress = self._store.receive_progress()
        return nl.Info(
            protocol_version=nl.PROTOCOL_VERSION,
            device_type=self._device_type,
            limits=self.limits,
            boot_state=self._store.boot_state,
            primary=self._store.primary(),
            secondary=self._store.secondary(),
            receive_digest=progress[0] if progress else None,
            receive_offset=progress[1] if progress else 0,
            confirmed_sequence=self._store.confirmed_sequence,
            last_reverted=self._store.last_reverted,
        )

    def _hello(self, msg: nl.Message) -> Reaction:
        return Reaction([nl.info(msg.id, self.info())])

    def _begin(self, msg: nl.Message) -> Reaction:
        signed: bytes = msg.fields[0]
        try:
            manifest = self._check_manifest(signed)
        except _Refusal as refusal:
            return Reaction([nl.error(msg.id, refusal.code, refusal.text)])
        try:
            resume = self._store.begin_receive(signed, manifest)
        except LimitExceeded as exc:
            return Reaction([nl.error(msg.id, nl.ErrorCode.TOO_LARGE, str(exc))])
        self._move(Event.BEGIN)
        self._session = _Session(msg.id, manifest, resume, durable_offset=resume)
        if resume == manifest.image_size:
            self._move(Event.LAST_DATA)  # everything is already in flash: FINISH may follow
        return Reaction([nl.encode(nl.MsgType.BEGIN_OK, msg.id, resume)])

    def _check_manifest(self, signed: bytes) -> Manifest:
        try:
            parts = cose.decode_signed_manifest(signed)
            manifest = cose.verify_signed(parts, self._trusted)
        except LimitExceeded as exc:
            raise _Refusal(nl.ErrorCode.TOO_LARGE, str(exc)) from exc
        except VerificationError as exc:
            raise _Refusal(nl.ErrorCode.SIGNATURE, str(exc)) from exc
        except InvalidInput as exc:
            raise _Refusal(nl.ErrorCode.MALFORMED, str(exc)) from exc
        running = self._store.primary()
        floor = max(self._store.confirmed_sequence, running.sequence if running else 0)
        try:
            check_installable(
                manifest,
                device_type=self._device_type,
                installed_sequence=floor if running or floor else None,
            )
        except DeviceTypeMismatch as exc:
            raise _Refusal(nl.ErrorCode.DEVICE_TYPE, str(exc)) from exc
        except RollbackRefused as exc:
            raise _Refusal(nl.ErrorCode.ROLLBACK, str(exc)) from exc
        if manifest.image_size > self.limits.max_image_bytes:
            raise _Refusal(
                nl.ErrorCode.TOO_LARGE,
                f"image of {manifest.image_size} bytes, slot holds {self.limits.max_image_bytes}",
            )
        if self._store.boot_state in BUSY_BOOT_STATES:
            raise _Refusal(nl.ErrorCode.BUSY, f"boot state is {self._store.boot_state}")
        return manifest

    def _data(self, msg: nl.Message) -> Reaction:
        offset: int = msg.fields[0]
        chunk: bytes = msg.fields[1]
        session = self._session
        if session is not None and msg.id != session.session_id:
            self.frames_rejected += 1
            return Reaction()  # a straggler of an older session: drop quietly
        if session is None:
            self.frames_rejected += 1
            return Reaction([nl.error(msg.id, nl.ErrorCode.BAD_STATE, "DATA before BEGIN")])
        if self.state is not TransferState.RECEIVING:
            # All of it is in already; a repeat means our last ACK was lost.
            return Reaction([nl.ack(msg.id, session.next_offset, 0)])
        size = session.manifest.image_size
        chunk_bytes = self.limits.chunk_bytes
        if offset + len(chunk) > size:
            self.frames_rejected += 1
            return Reaction(
                [nl.error(msg.id, nl.ErrorCode.OFFSET, f"data ends past image size {size}")]
            )
        if (
            offset % chunk_bytes
            or not chunk
            or len(chunk) > chunk_bytes
            or (len(chunk) != chunk_bytes and offset + len(chunk) != size)
        ):
            self.frames_rejected += 1
            return Reaction(
                [
                    nl.error(
                        msg.id,
                        nl.ErrorCode.OFFSET,
                        f"data must be aligned {chunk_bytes}-byte chunks",
                    )
                ]
            )
        index = (offset - session.next_offset) // chunk_bytes  # 0 = the next missing chunk
        if 0 <= index < SPAN_CHUNKS and not (
            index and session.received_bits >> (index - 1) & 1
        ):
            self._store.write_image(offset, chunk)
            if index:
                session.received_bits |= 1 << (index - 1)
            else:
                session.next_offset = offset + len(chunk)
                while session.received_bits & 1:
                    session.received_bits >>= 1
                    session.next_offset = min(session.next_offset + chunk_bytes, size)
                session.received_bits >>= 1
                self._make_durable(session)
        return Reaction([nl.ack(msg.id, session.next_offset, session.received_bits)])

    def _make_durable(self, session: _Session) -> None:
        size = session.manifest.image_size
        durable = (
            size
            if session.next_offset == size
            else (session.next_offset - session.next_offset % self._page_bytes)
        )
        if durable > session.durable_offset:
            self._store.persist_progress(durable)
            session.durable_offset = durable
        if session.next_offset == size:
            self._move(Event.LAST_DATA)

    def _status(self, msg: nl.Message) -> Reaction:
        offset = self._session.next_offset if self._session else 0
        return Reaction([nl.encode(nl.MsgType.STATUS_OK, msg.id, str(self.state), offset)])

    def _finish(self, msg: nl.Message) -> Reaction:
        if self.state is TransferState.VERIFIED and self._session is not None:
            return Reaction(
                [nl.encode(nl.MsgType.FINISH_OK, msg.id, self._session.manifest.image_digest)]
            )
        if self.state is not TransferState.COMPLETE or self._session is None:
            return Reaction(
                [nl.error(msg.id, nl.ErrorCode.BAD_STATE, f"FINISH while {self.state}")]
            )
        if not self._store.finish_receive():
            self._move(Event.DIGEST_BAD)
            self._session = None
            return Reaction(
                [
                    nl.error(
                        msg.id,
                        nl.ErrorCode.DIGEST,
                        "image in flash does not match the signed digest",
                    )
                ]
            )
        self._move(Event.DIGEST_OK)
        return Reaction(
            [nl.encode(nl.MsgType.FINISH_OK, msg.id, self._session.manifest.image_digest)]
        )

    def _test_boot(self, msg: nl.Message) -> Reaction:
        if (self.state, Event.TEST_BOOT) not in TRANSITIONS:
            return Reaction(
                [nl.error(msg.id, nl.ErrorCode.BAD_STATE, f"TEST_BOOT while {self.state}")]
            )
        try:
            self._store.request_test_boot()
        except UsageError as exc:
            return Reaction([nl.error(msg.id, nl.ErrorCode.BAD_STATE, str(exc))])
        self._move(Event.TEST_BOOT)
        self._session = None
        return Reaction([nl.encode(nl.MsgType.TEST_BOOT_OK, msg.id)], reset=True)

    def _confirm(self, msg: nl.Message) -> Reaction:
        if self._store.boot_state not in {"testing", "confirmed"}:
            return Reaction(
                [
                    nl.error(
                        msg.id, nl.ErrorCode.BAD_STATE, f"boot state is {self._store.boot_state}"
                    )
                ]
            )
        self._store.confirm()
        return Reaction([nl.encode(nl.MsgType.CONFIRM_OK, msg.id, self._store.confirmed_sequence)])

    def _abort(self, msg: nl.Message) -> Reaction:
        self._store.abort_receive()
        self._move(Event.ABORT)
        self._session = None
        return Reaction([nl.encode(nl.MsgType.ABORT_OK, msg.id)])

    def _reset(self, msg: nl.Message) -> Reaction:
        return Reaction([nl.encode(nl.MsgType.RESET_OK, msg.id)], reset=True)

    def _move(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise UsageError(
                f"transfer event {event} is not allowed in state {self.state}"
            ) from None


class _Refusal(Exception):
    def __init__(self, code: nl.ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


_HANDLERS = {
    nl.MsgType.HELLO: NodeReceiver._hello,
    nl.MsgType.BEGIN: NodeReceiver._begin,
    nl.MsgType.DATA: NodeReceiver._data,
    nl.MsgType.STATUS: NodeReceiver._status,
    nl.MsgType.FINISH: NodeReceiver._finish,
    nl.MsgType.TEST_BOOT: NodeReceiver._test_boot,
    nl.MsgType.CONFIRM: NodeReceiver._confirm,
    nl.MsgType.ABORT: NodeReceiver._abort,
    nl.MsgType.RESET: NodeReceiver._reset,
}
