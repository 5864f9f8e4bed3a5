"""The gateway's side of the serial update protocol: one node update, no I/O.

Rules (spec: ``docs/serial-protocol.md`` §Sender):

* The caller feeds frame bodies from the node (:meth:`NodeUpdate.receive`),
  asks for bodies to send (:meth:`NodeUpdate.poll`) and learns when to call
  again (:meth:`NodeUpdate.next_deadline_s`). Time is an argument; nothing
  here sleeps, reads a clock or touches a port.
* Every request carries an id; a retry of the same request reuses it (every
  request is idempotent on the node), a new request takes a new one, and a
  reply whose id is not the outstanding request's is dropped as stale.
* The update starts with HELLO, so a gateway that restarts mid-transfer learns
  from ``INFO`` what the node already has: the same image running and
  confirmed (nothing to do), the same image under test (wait for the verdict),
  or a receive in progress (BEGIN resumes at the node's durable offset).
* Data goes out in chunks of the node's ``chunk_bytes``, at most
  ``window_frames`` unacknowledged, anywhere in the node's span of
  ``SPAN_CHUNKS`` chunks from the first one missing. ACKs are cumulative with a bitmap of the
  chunks received beyond. A serial line delivers in order, so a chunk still
  missing when a chunk sent *after* it has arrived was lost: it is repeated at
  once (selective repeat), and nothing else is.
* When ACKs stop (link dropped, node stalled or reset), the sender probes with
  STATUS until the node answers, then continues from the node's own offset:
  a drop costs at most the window that was in flight.
* After FINISH is acknowledged (the node hashed its flash), TEST_BOOT, then
  HELLO polls through the reset until the node reports the new image
  confirmed (``succeeded``) or the old one back with the revert flag
  (``rolled_back``).

The states are :class:`UpdateState`, moved only through :data:`TRANSITIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from otaproto import nodelink as nl
from otaproto.errors import MalformedError, UsageError
from otaproto.manifest import Manifest
from otaproto.node_receiver import SPAN_CHUNKS


class UpdateState(StrEnum):
    """Where one node update stands on the gateway."""

    IDLE = "idle"
    HELLO = "hello"
    BEGIN = "begin"
    SENDING = "sending"
    PROBING = "probing"
    FINISHING = "finishing"
    VERIFIED = "verified"
    TEST_BOOT = "test_boot"
    REBOOTING = "rebooting"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ALREADY_INSTALLED = "already_installed"
    REJECTED = "rejected"
    FAILED = "failed"


FINAL_STATES = frozenset(
    {
        UpdateState.SUCCEEDED,
        UpdateState.ROLLED_BACK,
        UpdateState.ALREADY_INSTALLED,
        UpdateState.REJECTED,
        UpdateState.FAILED,
        UpdateState.VERIFIED,
    }
)

U = UpdateState
#: Allowed moves. Any state that is not final may also go to FAILED (timeouts,
#: link lost, a node that keeps failing) and back to HELLO (the link was
#: reopened, or the node lost the session: start over from what it reports).
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    U.IDLE: frozenset({U.HELLO}),
    U.HELLO: frozenset({U.HELLO, U.BEGIN, U.REBOOTING, U.ALREADY_INSTALLED, U.REJECTED}),
    U.BEGIN: frozenset({U.HELLO, U.SENDING, U.FINISHING, U.REJECTED}),
    U.SENDING: frozenset({U.HELLO, U.PROBING, U.FINISHING}),
    U.PROBING: frozenset({U.HELLO, U.SENDING, U.FINISHING}),
    U.FINISHING: frozenset({U.HELLO, U.VERIFIED, U.TEST_BOOT}),
    U.VERIFIED: frozenset(),
    U.TEST_BOOT: frozenset({U.HELLO, U.REBOOTING}),
    U.REBOOTING: frozenset({U.HELLO, U.SUCCEEDED, U.ROLLED_BACK}),
    U.SUCCEEDED: frozenset(),
    U.ROLLED_BACK: frozenset(),
    U.ALREADY_INSTALLED: frozenset(),
    U.REJECTED: frozenset(),
    U.FAILED: frozenset(),
}

#: ERROR codes that mean "the node will never take this image". BUSY is not
#: one: a test boot in progress ends, and the update may be retried later.
REJECTIONS = frozenset(
    {
        nl.ErrorCode.SIGNATURE,
        nl.ErrorCode.DEVICE_TYPE,
        nl.ErrorCode.ROLLBACK,
        nl.ErrorCode.TOO_LARGE,
    }
)


@dataclass(frozen=True)
class SenderConfig:
    """Timeouts and caps. The driver derives ``ack_timeout_s`` from the baud rate."""

    request_timeout_s: float = 1.0  #: HELLO, STATUS, ABORT, ... are repeated after this
    begin_timeout_s: float = 5.0  #: BEGIN is repeated after this (signature check, erase)
    finish_timeout_s: float = 5.0  #: FINISH is repeated after this (the node hashes its slot)
    ack_timeout_s: float = 1.0  #: no ACK progress for this long: probe
    reboot_timeout_s: float = 300.0  #: test boot to verdict (a swap is slow)
    link_lost_s: float = 30.0  #: nothing valid from the node for this long: give up
    max_window_frames: int = 32
    #: Largest chunk this gateway sends; a node that demands bigger is refused.
    max_chunk_bytes: int = 4000
    test_boot: bool = True  #: False stops at VERIFIED (image staged, not booted)
    max_restarts: int = 3  #: new BEGINs after a node lost the session or a digest failed


@dataclass
class _Request:
    msg_id: int
    body: bytes
    timeout_s: float
    deadline_s: float
    sends: int = 1


class NodeUpdate:
    """Bring one node to a new image; see the module rules."""

    def __init__(
        self,
        signed_manifest: bytes,
        manifest: Manifest,
        image: bytes,
        *,
        config: SenderConfig = SenderConfig(),
        first_id: int = 1,
    ) -> None:
        if len(image) != manifest.image_size:
            raise UsageError("image does not match the manifest's size")
        self._signed = signed_manifest
        self._manifest = manifest
        self._image = image
        self.config = config
        self._next_id = (first_id - 1) % nl.MAX_ID + 1
        self.state = UpdateState.IDLE
        self.reason = ""
        self.node_info: nl.Info | None = None
        self._request: _Request | None = None
        self._session = 0
        self._chunk = 0
        self._window = 0
        self._acked = 0
        self._sacked: set[int] = set()
        self._next_new = 0
        self._in_flight: dict[int, int] = {}  # chunk offset -> send number
        self._send_number = 0
        self._last_progress_s = 0.0
        self._last_heard_s = 0.0
        self._restarts = 0
        self._reboot_deadline_s = 0.0
        self._poll_at_s: float | None = None
        self._pending_out: list[bytes] = []
        #: Figures for reports and benchmarks.
        self.resumed_from = 0
        self.data_bytes_sent = 0
        self.resent_bytes = 0
        self.stale_replies = 0

    # -- public -------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True in a final state."""
        return self.state in FINAL_STATES

    @property
    def acked_offset(self) -> int:
        """Image bytes the node has confirmed are in its flash."""
        return self._acked

    @property
    def image_size(self) -> int:
        return self._manifest.image_size

    def start(self, now_s: float) -> None:
        """Begin with HELLO. Raises UsageError when already started."""
        if self.state is not UpdateState.IDLE:
            raise UsageError(f"update already started ({self.state})")
        self._last_heard_s = now_s
        self._move(UpdateState.HELLO)
        self._send_request(nl.MsgType.HELLO, now_s, self.config.request_timeout_s)

    def link_reopened(self, now_s: float) -> None:
        """The driver reopened the port: start over from HELLO (progress is on the node)."""
        if self.done:
            return
        self._move(UpdateState.HELLO)
        self._send_request(nl.MsgType.HELLO, now_s, self.config.request_timeout_s)

    def receive(self, body: bytes, now_s: float) -> None:
        """Take one frame body from the node. Malformed replies are counted and dropped."""
        try:
            msg = nl.decode(body)
        except MalformedError:
            self.stale_replies += 1
            return
        self._last_heard_s = now_s
        if msg.type is nl.MsgType.ACK:
            if msg.id == self._session and self.state in (U.SENDING, U.PROBING):
                self._on_ack(msg.fields[0], msg.fields[1], now_s)
            else:
                self.stale_replies += 1
            return
        request = self._request
        if request is None or msg.id != request.msg_id:
            self.stale_replies += 1
            return
        self._request = None
        handler = _REPLY_HANDLERS.get(self.state)
        if handler is None:
            self.stale_replies += 1
            return
        handler(self, msg, now_s)

    def poll(self, now_s: float) -> list[bytes]:
        """Bodies to send now, after handling any timeout that has come."""
        if self.done:
            return []
        self._check_timeouts(now_s)
        out, self._pending_out = self._pending_out, []
        if self.state is UpdateState.SENDING:
            out.extend(self._data_frames(now_s))
        return out

    def next_deadline_s(self) -> float | None:
        """The next time :meth:`poll` has work even if nothing arrives."""
        if self.done:
            return None
        deadlines = [self._last_heard_s + self.config.link_lost_s]
        if self._request is not None:
            deadlines.append(self._request.deadline_s)
        if self.state is UpdateState.SENDING:
            deadlines.append(self._last_progress_s + self.config.ack_timeout_s)
        if self.state is UpdateState.REBOOTING:
            deadlines.append(self._reboot_deadline_s)
            if self._poll_at_s is not None:
                deadlines.append(self._poll_at_s)
            deadlines.remove(self._last_heard_s + self.config.link_lost_s)
        return min(deadlines)

    # -- replies ------------------------------------------------------------

    def _on_hello(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is not nl.MsgType.INFO:
            return self._unexpected(msg, now_s)
        try:
            info = nl.decode_info(msg.fields[0])
        except MalformedError as exc:
            return self._fail(f"node sent a bad INFO: {exc}")
        self.node_info = info
        m = self._manifest
        if info.protocol_version != nl.PROTOCOL_VERSION:
            self._move(UpdateState.REJECTED)
            self.reason = f"node speaks protocol version {info.protocol_version}, not 1"
            return None
        if info.device_type not in m.device_types:
            self._move(UpdateState.REJECTED)
            self.reason = (
                f"node is a {info.device_type}, artifact is for {', '.join(m.device_types)}"
            )
            return None
        primary = info.primary
        if primary and primary.image_digest == m.image_digest:
            if info.boot_state == "confirmed":
                self._move(UpdateState.ALREADY_INSTALLED)
                self.reason = f"node already runs {m.version}, confirmed"
                return None
            return self._start_reboot_wait(now_s)  # under test: wait for the verdict
        if info.boot_state in ("test_pending", "swapping", "reverting", "testing"):
            return self._fail(f"node is busy ({info.boot_state} another image): try again later")
        if len(self._signed) + 16 > info.limits.max_frame_bytes:
            self._move(UpdateState.REJECTED)
            self.reason = (
                f"signed manifest does not fit the node's {info.limits.max_frame_bytes}-byte frames"
            )
            return None
        if info.limits.chunk_bytes > self.config.max_chunk_bytes:
            self._move(UpdateState.REJECTED)
            self.reason = (
                f"node wants {info.limits.chunk_bytes}-byte chunks, "
                f"this gateway sends at most {self.config.max_chunk_bytes}"
            )
            return None
        self._chunk = info.limits.chunk_bytes
        self._window = min(info.limits.window_frames, self.config.max_window_frames)
        self._move(UpdateState.BEGIN)
        self._send_request(nl.MsgType.BEGIN, now_s, self.config.begin_timeout_s, self._signed)
        return None

    def _on_begin(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is nl.MsgType.ERROR:
            return self._on_error(msg, now_s)
        if msg.type is not nl.MsgType.BEGIN_OK:
            return self._unexpected(msg, now_s)
        resume = msg.fields[0]
        size = self.image_size
        if resume > size or (resume % self._chunk and resume != size):
            return self._fail(f"node resumes at an impossible offset {resume}")
        self._session = msg.id
        self._acked = self._next_new = resume
        if not self.data_bytes_sent:
            self.resumed_from = resume
        self._sacked.clear()
        self._in_flight.clear()
        self._last_progress_s = now_s
        if resume == self.image_size:
            self._start_finish(now_s)
        else:
            self._move(UpdateState.SENDING)
        return None

    def _on_status(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is not nl.MsgType.STATUS_OK:
            return self._unexpected(msg, now_s)
        state, offset = msg.fields
        if state != "receiving" and state != "complete":
            return self._restart(now_s, f"node lost the session ({state})")
        self._rewind_to(offset, now_s)
        if self._acked >= self.image_size:
            self._start_finish(now_s)
        else:
            self._move(UpdateState.SENDING)
        return None

    def _on_finish(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is nl.MsgType.ERROR:
            if msg.fields[0] == nl.ErrorCode.DIGEST:
                return self._restart(now_s, "node found a digest mismatch")
            return self._on_error(msg, now_s)
        if msg.type is not nl.MsgType.FINISH_OK or msg.fields[0] != self._manifest.image_digest:
            return self._unexpected(msg, now_s)
        if not self.config.test_boot:
            self._move(UpdateState.VERIFIED)
            return None
        self._move(UpdateState.TEST_BOOT)
        self._send_request(nl.MsgType.TEST_BOOT, now_s, self.config.request_timeout_s)
        return None

    def _on_test_boot(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is nl.MsgType.ERROR:
            return self._on_error(msg, now_s)
        if msg.type is not nl.MsgType.TEST_BOOT_OK:
            return self._unexpected(msg, now_s)
        self._start_reboot_wait(now_s)
        return None

    def _on_rebooting(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is not nl.MsgType.INFO:
            return None
        try:
            info = nl.decode_info(msg.fields[0])
        except MalformedError:
            return None
        self.node_info = info
        running = info.primary.image_digest if info.primary else None
        if info.boot_state != "confirmed":
            self._poll_at_s = now_s + self.config.request_timeout_s  # no verdict yet: ask again
        else:
            if running == self._manifest.image_digest:
                self._move(UpdateState.SUCCEEDED)
                self.reason = f"node runs {self._manifest.version}, confirmed"
            else:
                self._move(UpdateState.ROLLED_BACK)
                old = info.primary.version if info.primary else "nothing"
                self.reason = f"node reverted to {old}" + (
                    " after a failed self-test" if info.last_reverted else ""
                )
        return None

    def _on_error(self, msg: nl.Message, now_s: float) -> None:
        code, text = msg.fields
        try:
            error_code = nl.ErrorCode(code)
        except ValueError:
            error_code = nl.ErrorCode.INTERNAL
        if error_code in REJECTIONS:
            self._move(UpdateState.REJECTED)
            self.reason = f"node refused: {error_code.name.lower()}: {text}"
        elif error_code is nl.ErrorCode.BUSY:
            self._fail(f"node is busy: {text}: try again later")
        elif error_code is nl.ErrorCode.BAD_STATE:
            self._restart(now_s, f"node state: {text}")
        else:
            self._fail(f"node error {error_code.name.lower()}: {text}")

    def _unexpected(self, msg: nl.Message, now_s: float) -> None:
        if msg.type is nl.MsgType.ERROR:
            return self._on_error(msg, now_s)
        return self._fail(f"unexpected {msg.type.name} in state {self.state}")

    # -- data ---------------------------------------------------------------

    def _on_ack(self, next_offset: int, bits: int, now_s: float) -> None:
        if next_offset > self.image_size:
            self._fail(f"node acknowledged {next_offset}, past the image")
            return
        newest_arrived = -1  # the latest send number the node has shown it received
        if next_offset > self._acked:
            self._acked = next_offset
            self._last_progress_s = now_s
            for offset in [o for o in self._in_flight if o < next_offset]:
                newest_arrived = max(newest_arrived, self._in_flight.pop(offset))
            self._sacked = {o for o in self._sacked if o >= next_offset}
        for i in range(SPAN_CHUNKS - 1):
            if bits >> i & 1:
                offset = next_offset + (i + 1) * self._chunk
                if offset < self.image_size and offset not in self._sacked:
                    self._sacked.add(offset)
                    newest_arrived = max(newest_arrived, self._in_flight.pop(offset, -1))
                    self._last_progress_s = now_s
        for offset, number in list(self._in_flight.items()):
            if number < newest_arrived:
                del self._in_flight[offset]  # overtaken on an in-order line: lost, repeat it
        if self._acked >= self.image_size:
            self._start_finish(now_s)

    def _data_frames(self, now_s: float) -> list[bytes]:
        frames: list[bytes] = []
        span_end = min(self._acked + SPAN_CHUNKS * self._chunk, self.image_size)
        offset = self._acked
        while offset < span_end and len(self._in_flight) < self._window:
            if offset not in self._sacked and offset not in self._in_flight:
                if offset < self._next_new:
                    self.resent_bytes += min(self._chunk, self.image_size - offset)
                frames.append(
                    nl.data(self._session, offset, self._image[offset : offset + self._chunk])
                )
                self._send_number += 1
                self._in_flight[offset] = self._send_number
                self.data_bytes_sent += min(self._chunk, self.image_size - offset)
                self._next_new = max(self._next_new, offset + self._chunk)
            offset += self._chunk
        return frames

    def _rewind_to(self, offset: int, now_s: float) -> None:
        self._acked = max(self._acked, min(offset, self.image_size))
        self._in_flight.clear()
        self._sacked = {o for o in self._sacked if o >= self._acked}
        self._last_progress_s = now_s

    # -- timers -------------------------------------------------------------

    def _check_timeouts(self, now_s: float) -> None:
        if self.state is UpdateState.REBOOTING:
            # A swap keeps the node silent for long: only the reboot timeout applies.
            if now_s >= self._reboot_deadline_s:
                self._fail("node gave no verdict on the test boot in time")
                return
            if self._request is None and self._poll_at_s is not None and now_s >= self._poll_at_s:
                self._poll_at_s = None
                self._send_request(nl.MsgType.HELLO, now_s, self.config.request_timeout_s)
        elif now_s - self._last_heard_s >= self.config.link_lost_s:
            self._fail(f"link lost: nothing from the node for {self.config.link_lost_s:g} s")
            return
        request = self._request
        if request is not None and now_s >= request.deadline_s:
            if self.state is UpdateState.REBOOTING:
                self._send_request(nl.MsgType.HELLO, now_s, self.config.request_timeout_s)
            else:
                request.sends += 1
                request.deadline_s = now_s + request.timeout_s
                self._pending_out.append(request.body)
        if (
            self.state is UpdateState.SENDING
            and self._in_flight
            and now_s - self._last_progress_s >= self.config.ack_timeout_s
        ):
            self._move(UpdateState.PROBING)
            self._send_request(nl.MsgType.STATUS, now_s, self.config.request_timeout_s)

    # -- helpers ------------------------------------------------------------

    def _start_finish(self, now_s: float) -> None:
        self._move(UpdateState.FINISHING)
        self._send_request(nl.MsgType.FINISH, now_s, self.config.finish_timeout_s)

    def _start_reboot_wait(self, now_s: float) -> None:
        self._move(UpdateState.REBOOTING)
        self._reboot_deadline_s = now_s + self.config.reboot_timeout_s
        self._send_request(nl.MsgType.HELLO, now_s, self.config.request_timeout_s)

    def _restart(self, now_s: float, why: str) -> None:
        self._restarts += 1
        if self._restarts > self.config.max_restarts:
            self._fail(f"{why}; gave up after {self.config.max_restarts} restarts")
            return
        self._move(UpdateState.HELLO)
        self._send_request(nl.MsgType.HELLO, now_s, self.config.request_timeout_s)

    def _send_request(
        self, msg_type: nl.MsgType, now_s: float, timeout_s: float, *fields: bytes
    ) -> None:
        msg_id = self._take_id()
        body = nl.encode(msg_type, msg_id, *fields)
        self._request = _Request(msg_id, body, timeout_s, now_s + timeout_s)
        self._pending_out.append(body)

    def _take_id(self) -> int:
        msg_id = self._next_id
        self._next_id = self._next_id % nl.MAX_ID + 1  # 1..65535: 0 is "no request"
        return msg_id

    def _fail(self, why: str) -> None:
        self.state = UpdateState.FAILED
        self.reason = why
        self._request = None

    def _move(self, new: UpdateState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise UsageError(f"update cannot go from {self.state} to {new}")
        self.state = new


_REPLY_HANDLERS = {
    UpdateState.HELLO: NodeUpdate._on_hello,
    UpdateState.BEGIN: NodeUpdate._on_begin,
    UpdateState.PROBING: NodeUpdate._on_status,
    UpdateState.FINISHING: NodeUpdate._on_finish,
    UpdateState.TEST_BOOT: NodeUpdate._on_test_boot,
    UpdateState.REBOOTING: NodeUpdate._on_rebooting,
}
