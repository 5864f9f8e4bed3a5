"""The ``smp`` node driver: Zephyr/MCUboot nodes updated over mcumgr's SMP, on a serial line.

Rules (spec: ``docs/smp.md`` for the bytes, ``docs/drivers-and-hooks.md`` for the steps):

* The bytes are :mod:`otaproto.smp` (console framing by default, raw framing
  as an option); this module moves them and keeps time. One request is
  outstanding at a time; a reply that is not to it (a late reply to a request
  this driver gave up on, or to another client) is dropped by sequence
  number, op, group and command.
* The image a Shoal artifact carries for an SMP node is an MCUboot image
  (``imgtool sign``). The gateway has checked Shoal's signature on the
  artifact; MCUboot checks the image's own hash and signature on the node.
  The driver only parses the image for its SHA-256 TLV, the *hash* by which
  SMP names images in slots (:mod:`otaproto.mcuboot`).
* Transfer resumes: every upload starts with the request at offset 0 that
  carries the file's length and SHA-256, and an SMP server that already holds
  part of that same upload answers with the offset it has; the driver always
  continues from the offset the server returns, never from its own count.
  Chunks are as large as the server's advertised buffer allows
  (``mcumgr params``), capped by the ``max_request_bytes`` option for servers
  whose UART loses long requests. The first request waits
  ``first_timeout_s`` (the server erases the slot), the others
  ``chunk_timeout_s``; a request without a reply is sent again, at most
  ``retries`` times.
* A test boot is "image state write {hash, confirm: false}" then "reset".
  The server answers the reset before it resets, so an answer after it
  proves nothing: the verdict comes from the image state alone. The new hash
  active in slot 0 means the new image runs; the old image active with the
  new one no longer pending means MCUboot refused or reverted it; anything
  else (the reset not happened yet, the node silent while it swaps) is
  waited on until ``reboot_timeout_s``.
* Confirming writes ``confirm: true`` without a hash (the running image)
  after checking that the running image is the new one: with the hash, a
  node that had meanwhile reverted would be told to make the failed image
  permanent at its next reset.
* Every step opens the port and closes it before returning (hooks run
  between steps). A port that breaks mid-upload is reopened with backoff for
  up to ``link_lost_s``, and the upload resumes at the server's offset.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from gateway_proxy.config import NodePort
from gateway_proxy.drivers import (
    BootOutcome,
    BootVerdict,
    DriverOptionError,
    InstallProgress,
    InstallState,
    NodeDriver,
    NodeInventory,
    ProgressFn,
    RunningImage,
    StepFailed,
    StepRejected,
    TransferOutcome,
    TransferReport,
)
from otaio.serial_link import Link, SerialLink, reopen
from otaproto import mcuboot, smp
from otaproto.artifact import VerifiedArtifact
from otaproto.errors import InvalidInput, LinkBroken, MalformedError

READ_BYTES = 4096
#: What a server without ``mcumgr params`` is assumed to take (Zephyr's default netbuf).
DEFAULT_BUF_SIZE = 384
#: A smaller advertised buffer could not carry an upload request with an MCUboot header.
MIN_BUF_SIZE = 128
#: Upload errors that may pass on a later try; every other refusal is final.
TRANSIENT_ERRORS = frozenset({smp.MgmtErr.EBUSY, smp.MgmtErr.ETIMEOUT, smp.MgmtErr.ENOMEM})
#: Image-group upload errors about the node's state, not the image: a later try may pass.
TRANSIENT_IMAGE_ERRORS = frozenset(
    {
        smp.ImgMgmtErr.NO_FREE_SLOT,
        smp.ImgMgmtErr.IMAGE_ALREADY_PENDING,
        smp.ImgMgmtErr.FLASH_WRITE_FAILED,
        smp.ImgMgmtErr.FLASH_ERASE_FAILED,
        smp.ImgMgmtErr.FLASH_OPEN_FAILED,
        smp.ImgMgmtErr.FLASH_READ_FAILED,
        smp.ImgMgmtErr.NO_FREE_MEMORY,
        smp.ImgMgmtErr.FLASH_CONTEXT_ALREADY_SET,
    }
)
#: Most times one upload reopens a port that broke under it.
MAX_REOPENS = 10
#: Replies in a row that do not move the offset forward before the upload gives up.
MAX_STALLS = 3
#: How often the image state is asked for while waiting for a test boot's verdict.
BOOT_POLL_S = 0.5


class SmpTimeout(LinkBroken):
    """The node did not answer a request in time, after every retry."""


@dataclass(frozen=True)
class SmpSettings:
    """The driver's options (``[nodes.NAME.options]`` in ``gateway.toml``)."""

    device_type: str
    framing: str = "console"  #: "console" (base64 lines, shares a shell UART) or "raw"
    line_bytes: int = smp.CONSOLE_LINE_BYTES
    max_request_bytes: int | None = None  #: cap below the server's buffer (lossy UARTs)
    first_timeout_s: float = 40.0  #: the first upload request: the server erases the slot
    chunk_timeout_s: float = 2.5
    request_timeout_s: float = 2.5  #: every other request
    retries: int = 5
    reboot_timeout_s: float = 120.0
    link_lost_s: float = 30.0
    #: A server answers a reset before it resets (Zephyr: 250 ms later); ask nothing sooner.
    reset_delay_s: float = 1.0
    #: Upload requests sent before the first is answered. 1 is what every SMP client
    #: does; more hides the turnaround and the node's flash writes, for a server
    #: that takes a whole request while it works on the last (``buf_count`` > 1 and
    #: a UART that is not starved meanwhile).
    window: int = 1


class SmpSession:
    """One open port to one SMP server: send a request, get its reply's payload.

    Raises (from :meth:`call`) SmpTimeout when no reply came after the retries,
    LinkBroken when the port fails, :class:`otaproto.smp.SmpErrorReply` when
    the server refused, MalformedError for a reply that does not decode.
    """

    def __init__(self, link: Link, settings: SmpSettings, *, clock: Callable[[], float]) -> None:
        self.link = link
        self.settings = settings
        self._clock = clock
        self._matcher = smp.RequestMatcher(window=settings.window)
        self._console = settings.framing == "console"
        self._console_decoder = smp.ConsoleDecoder(max_line_bytes=max(settings.line_bytes, 128))
        self._raw_decoder = smp.RawDecoder()
        self._pending: list[bytes] = []  # packets read but not looked at yet
        self.requests_sent = 0
        self.retries_used = 0

    def _frame(self, packet: bytes) -> bytes:
        if self._console:
            return smp.encode_console(packet, self.settings.line_bytes)
        return packet

    def _packets(self, data: bytes) -> list[bytes]:
        if self._console:
            return self._console_decoder.feed(data)
        return self._raw_decoder.feed(data)

    def send(self, request: smp.Request) -> int:
        """Write ``request`` without waiting; its sequence number (see :meth:`next_reply`)."""
        packet = self._matcher.send(request)
        self.link.write(self._frame(packet))
        self.requests_sent += 1
        return packet[6]  # the header's sequence byte

    def next_reply(self, timeout_s: float) -> smp.Packet | None:
        """The next reply to any outstanding request, or None after ``timeout_s`` of
        silence (every outstanding request is then abandoned: late replies are stale)."""
        deadline = self._clock() + timeout_s
        while True:
            while self._pending:
                try:
                    reply = self._matcher.match(self._pending.pop(0))
                except MalformedError:
                    continue  # noise that framed well: not an answer to anything
                if reply is not None:
                    return reply
            left_s = deadline - self._clock()
            if left_s <= 0:
                break
            self._pending = self._packets(self.link.read(READ_BYTES, left_s))
        if not self._console:
            self._raw_decoder.reset()  # a partial packet will never finish
        self._matcher.abandon()
        return None

    def abandon(self) -> None:
        """Forget every outstanding request (their replies will be stale)."""
        self._matcher.abandon()

    def call(
        self, request: smp.Request, timeout_s: float | None = None, *, retries: int | None = None
    ) -> smp.Payload:
        """Send ``request`` and wait for its reply; send it again on silence."""
        timeout_s = self.settings.request_timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.settings.retries if retries is None else retries)
        self.abandon()
        for attempt in range(attempts):
            if attempt:
                self.retries_used += 1
            self.send(request)
            reply = self.next_reply(timeout_s)
            if reply is not None:
                return smp.check_reply(reply, request.describe())
        raise SmpTimeout(f"{request.describe()}: no reply in {attempts} x {timeout_s:g} s")


class SmpDriver(NodeDriver):
    """Zephyr/MCUboot nodes over SMP; see the module rules."""

    protocol = "smp"

    def __init__(
        self,
        node: NodePort,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        open_link: Callable[[], Link] | None = None,
    ) -> None:
        super().__init__(node)
        o = self.options
        o.only(
            "device_type", "framing", "line_bytes", "max_request_bytes", "first_timeout_s",
            "chunk_timeout_s", "request_timeout_s", "retries", "reboot_timeout_s", "link_lost_s",
            "reset_delay_s", "window",
        )  # fmt: skip
        framing = o.text("framing", "console")
        if framing not in ("console", "raw"):
            raise DriverOptionError(
                f"nodes.{node.name}.options.framing must be console or raw, not {framing!r}"
            )
        cap = o.integer("max_request_bytes", 0, minimum=0, maximum=65535)
        self.settings = SmpSettings(
            device_type=o.text("device_type"),
            framing=framing,
            line_bytes=o.integer(
                "line_bytes", smp.CONSOLE_LINE_BYTES, minimum=16, maximum=smp.CONSOLE_LINE_BYTES
            ),
            max_request_bytes=cap or None,
            first_timeout_s=o.number("first_timeout_s", 40.0, minimum=0.1, maximum=600),
            chunk_timeout_s=o.number("chunk_timeout_s", 2.5, minimum=0.05, maximum=600),
            request_timeout_s=o.number("request_timeout_s", 2.5, minimum=0.05, maximum=600),
            retries=o.integer("retries", 5, minimum=0, maximum=100),
            reboot_timeout_s=o.number("reboot_timeout_s", 120.0, minimum=1, maximum=3600),
            link_lost_s=o.number("link_lost_s", 30.0, minimum=0, maximum=3600),
            reset_delay_s=o.number("reset_delay_s", 1.0, minimum=0, maximum=60),
            window=o.integer("window", 1, minimum=1, maximum=8),
        )
        self._clock = clock
        self._sleep = sleep
        self._open_link = open_link or (lambda: SerialLink(node.port, baud=node.baud))
        self._hashes: dict[bytes, bytes] = {}

    # -- plumbing ----------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[SmpSession]:
        link = self._open_link()
        try:
            yield SmpSession(link, self.settings, clock=self._clock)
        finally:
            link.close()

    def _states(self, session: SmpSession) -> smp.ImageStates:
        return smp.parse_image_states(session.call(smp.image_state_read()))

    def _max_packet_bytes(self, session: SmpSession) -> tuple[int, int]:
        """The largest request the server takes (its buffer), and that capped by our option."""
        try:
            params = smp.parse_params_reply(session.call(smp.params_request(), retries=1))
            buf_size = params.buf_size
        except (smp.SmpErrorReply, MalformedError, SmpTimeout):
            buf_size = DEFAULT_BUF_SIZE  # an older server without the params command
        if buf_size < MIN_BUF_SIZE:
            buf_size = DEFAULT_BUF_SIZE  # nonsense from the peer: assume Zephyr's default
        limit = smp.max_packet_bytes(buf_size, console=self.settings.framing == "console")
        if self.settings.max_request_bytes is not None:
            return limit, min(limit, self.settings.max_request_bytes)
        return limit, limit

    def _image_hash(self, artifact: VerifiedArtifact, image: bytes) -> bytes:
        """The SHA-256 TLV SMP names the image by (remembered for the later steps).

        Raises InvalidInput for an image that is not an MCUboot image.
        """
        image_hash = mcuboot.parse_image(image).hash
        self._hashes[artifact.manifest.image_digest] = image_hash
        return image_hash

    def _known_hash(self, artifact: VerifiedArtifact) -> bytes:
        """The MCUboot hash of ``artifact``'s image, as :meth:`transfer` found it."""
        image_hash = self._hashes.get(artifact.manifest.image_digest)
        if image_hash is None:
            raise StepFailed("await_boot or confirm called before transfer for this image")
        return image_hash

    # -- steps -------------------------------------------------------------------------

    def inventory(self) -> NodeInventory:
        """Slot 0's image as the node reports it (version, hash, confirmed)."""
        with self._session() as session:
            states = self._states(session)
        running = next((s for s in states.images if s.active), states.slot(0))
        extra = {
            "slots": [
                {"slot": s.slot, "version": s.version, "hash": (s.hash or b"").hex(),
                 "active": s.active, "confirmed": s.confirmed, "pending": s.pending}
                for s in states.images
            ]
        }  # fmt: skip
        if running is None:
            return NodeInventory(self.settings.device_type, "empty", None, self.protocol, extra)
        boot_state = "confirmed" if running.confirmed else "testing"
        return NodeInventory(
            self.settings.device_type,
            boot_state,
            RunningImage(version=running.version, identity=running.hash),
            self.protocol,
            extra,
        )

    def transfer(
        self, artifact: VerifiedArtifact, image: bytes, progress: ProgressFn
    ) -> TransferReport:
        """Upload ``image`` into slot 1, resuming at the server's offset."""
        types = artifact.manifest.device_types
        if self.settings.device_type not in types:
            return TransferReport(
                TransferOutcome.REJECTED,
                f"the artifact is for {', '.join(types)}, not {self.settings.device_type}",
                len(image),
            )
        try:
            image_hash = self._image_hash(artifact, image)
        except InvalidInput as exc:
            return TransferReport(
                TransferOutcome.REJECTED, f"not an MCUboot image: {exc}", len(image)
            )
        total = len(image)
        states = self._clear_other_test(image_hash)
        if states is None:
            return TransferReport(
                TransferOutcome.FAILED,
                "the node stays on a test of another image after resets",
                total,
            )
        with self._session() as session:
            primary, secondary = states.slot(0), states.slot(1)
            if primary is not None and primary.hash == image_hash and primary.active:
                if primary.confirmed:
                    return TransferReport(
                        TransferOutcome.ALREADY_INSTALLED, "the node runs this image", total
                    )
                return TransferReport(
                    TransferOutcome.TESTING, "the node test-boots this image", total
                )
            if secondary is not None and secondary.hash == image_hash:
                progress(InstallProgress(InstallState.VERIFYING, total, total))
                return TransferReport(
                    TransferOutcome.STAGED, "slot 1 holds this image already", total,
                    resumed_from_bytes=total,
                )  # fmt: skip
            server_max, max_packet = self._max_packet_bytes(session)
        # The first request carries the whole MCUboot header: the server checks it
        # before it erases the slot (Zephyr refuses a shorter first chunk).
        first_max = max_packet
        while first_max < server_max and smp.max_upload_chunk_bytes(
            first_max, 0, remaining_bytes=total, image_len=total, sha=bytes(32)
        ) < min(total, mcuboot.HEADER_BYTES):
            first_max += 1
        return self._upload(image, image_hash, (first_max, max_packet), progress)

    def _clear_other_test(self, image_hash: bytes) -> smp.ImageStates | None:
        """The image state, once no other image is under test or pending (None: it stays).

        An earlier update that stopped between its test boot and its confirm
        leaves the node running an unconfirmed image, or with one pending; the
        node would refuse an upload then. A reset reverts the first; the second
        takes two (the pending image boots under test, then reverts).
        """
        for _ in range(3):
            with self._session() as session:
                states = self._states(session)
            if not _other_on_test(states, image_hash):
                return states
            self.reset()
            deadline = self._clock() + self.settings.reboot_timeout_s
            while True:
                try:
                    with self._session() as session:
                        self._states(session)
                    break
                except (LinkBroken, MalformedError, smp.SmpErrorReply):
                    if self._clock() >= deadline:
                        return None
                    self._sleep(BOOT_POLL_S)
        return None

    def _upload(
        self,
        image: bytes,
        image_hash: bytes,
        limits: tuple[int, int],
        progress: ProgressFn,
    ) -> TransferReport:
        first_max, max_packet = limits
        window = self.settings.window
        total = len(image)
        file_sha = hashlib.sha256(image).digest()
        sent = 0
        reopens = 0
        stalls = 0
        resumed_from: int | None = None  # what the server held when this transfer began
        # Every reply must move the offset forward; a server that does not is given
        # MAX_STALLS chances in a row and the whole upload a bounded number of requests.
        smallest = max(1, smp.max_upload_chunk_bytes(max_packet, total, remaining_bytes=total))
        requests_left = (
            2 * (total // smallest + 1) + MAX_REOPENS + 4 * window * (self.settings.retries + 1)
        )
        link = self._open_link()
        session = SmpSession(link, self.settings, clock=self._clock)

        def failed(reason: str) -> TransferReport:
            return TransferReport(
                TransferOutcome.FAILED, reason, total, sent, resumed_from or 0
            )  # fmt: skip

        try:
            offset = 0  # what the server has acknowledged
            next_offset = 0  # where the next request starts (ahead of it with a window)
            ask_where = True  # the request at offset 0: the server answers where it is
            in_flight: dict[int, tuple[int, int, bool]] = {}  # sequence -> offset, size, at 0
            silences = 0
            while True:
                try:
                    # Fill the window: the request at 0 goes alone (its answer says
                    # where the server is); then chunks back to back, window-many.
                    if ask_where and not in_flight:
                        requests_left -= 1
                        size = smp.max_upload_chunk_bytes(
                            first_max, 0, remaining_bytes=total, image_len=total, sha=file_sha
                        )
                        request = smp.upload_request(0, image[:size], image_len=total, sha=file_sha)
                        in_flight[session.send(request)] = (0, size, True)
                        sent += size
                    while not ask_where and len(in_flight) < window and next_offset < total:
                        requests_left -= 1
                        size = smp.max_upload_chunk_bytes(
                            max_packet, next_offset, remaining_bytes=total - next_offset
                        )
                        if size <= 0:
                            raise StepFailed(f"a request of {max_packet} bytes holds no data")
                        chunk = image[next_offset : next_offset + size]
                        in_flight[session.send(smp.upload_request(next_offset, chunk))] = (
                            next_offset, size, False,
                        )  # fmt: skip
                        next_offset += size
                        sent += size
                    if requests_left < 0:
                        return failed(f"the upload made no headway (the node is at {offset})")
                    first_pending = any(at_zero for _, _, at_zero in in_flight.values())
                    timeout_s = (
                        self.settings.first_timeout_s
                        if first_pending
                        else self.settings.chunk_timeout_s
                    )
                    packet = session.next_reply(timeout_s)
                except LinkBroken:
                    reopens += 1
                    if reopens > MAX_REOPENS:
                        raise
                    link.close()
                    link = reopen(
                        self._open_link, self.settings.link_lost_s, clock=self._clock,
                        sleep=self._sleep,
                    )  # fmt: skip
                    session = SmpSession(link, self.settings, clock=self._clock)
                    in_flight.clear()
                    ask_where = True
                    continue
                if packet is None:  # silence: everything in flight is lost; go again
                    silences += 1
                    if silences > self.settings.retries:
                        return failed(
                            f"the node went silent during the upload ({silences} x "
                            f"{timeout_s:g} s without an answer at offset {offset})"
                        )
                    session.retries_used += 1
                    in_flight.clear()
                    next_offset = offset
                    ask_where = ask_where or offset == 0
                    continue
                silences = 0
                asked_at, size, was_first = in_flight.pop(packet.header.sequence)
                try:
                    answer = smp.parse_upload_reply(smp.check_reply(packet, "image upload"))
                except smp.SmpErrorReply as exc:
                    reason = f"the node refused the upload: {exc.error}"
                    if _transient(exc.error):
                        return failed(reason)
                    return TransferReport(
                        TransferOutcome.REJECTED, reason, total, sent, resumed_from or 0
                    )  # fmt: skip
                if answer.offset > total:
                    raise MalformedError("smp upload.off", f"{answer.offset} is past the image")
                if not was_first and answer.offset > asked_at + size:
                    # Only the answer to the request at 0 may jump (to what the server
                    # holds); any other jump claims bytes nobody sent.
                    raise MalformedError(
                        "smp upload.off",
                        f"{answer.offset} is past the {asked_at + size} bytes sent so far",
                    )
                if resumed_from is None:
                    resumed_from = answer.offset if answer.offset > size else 0
                stalls = stalls + 1 if answer.offset <= offset and not was_first else 0
                if stalls > MAX_STALLS:
                    return failed(f"the node's offset stays at {answer.offset}")
                offset = answer.offset
                if was_first or answer.offset != asked_at + size:
                    # The server is elsewhere than the window assumed (it resumed, or
                    # lost a request): what is in flight is answered with its offset
                    # and written nowhere; go on from the server's word.
                    session.abandon()
                    in_flight.clear()
                    next_offset = offset
                # A server back at 0 starts over: the request at 0 carries len and sha.
                ask_where = offset == 0
                progress(InstallProgress(InstallState.FLASHING, offset, total))
                if offset >= total:
                    if answer.match is False:
                        # Slot 1's header says "this image" over a wrong body: clear it,
                        # or the next try would take it for staged.
                        with suppress(LinkBroken, smp.SmpErrorReply, MalformedError):
                            session.call(smp.image_erase(1))
                        return failed("the node's SHA-256 of the upload does not match the image")
                    break
            progress(InstallProgress(InstallState.VERIFYING, total, total))
            secondary = self._states(session).slot(1)
        finally:
            link.close()
        if secondary is None or secondary.hash != image_hash:
            found = "nothing" if secondary is None else (secondary.hash or b"").hex()[:16]
            return TransferReport(
                TransferOutcome.REJECTED,
                f"slot 1 holds {found} after the upload, not the image "
                "(MCUboot did not accept its header or TLVs)",
                total, sent, resumed_from,
            )  # fmt: skip
        return TransferReport(TransferOutcome.STAGED, "", total, sent, resumed_from)

    def test_boot(self, artifact: VerifiedArtifact, image: bytes) -> None:
        """Mark slot 1 for one test boot, then reset the node."""
        image_hash = self._image_hash(artifact, image)
        with self._session() as session:
            try:
                session.call(smp.image_state_write(image_hash, confirm=False))
            except smp.SmpErrorReply as exc:
                if _refuses_image(exc.error):
                    raise StepRejected(
                        f"the node refused the test boot: {exc.error}"
                        " (MCUboot does not accept the image: untrusted key, bad hash or TLVs)"
                    ) from exc
                raise StepFailed(f"the node refused the test boot: {exc.error}") from exc
            self._reset(session)

    def await_boot(self, artifact: VerifiedArtifact) -> BootOutcome:
        """Poll the image state until slot 0 runs the new hash, or the old one without it."""
        image_hash = self._known_hash(artifact)
        deadline = self._clock() + self.settings.reboot_timeout_s
        last = "no answer"
        while self._clock() < deadline:
            try:
                with self._session() as session:
                    states = self._states(session)
            except (LinkBroken, MalformedError, smp.SmpErrorReply) as exc:
                last = str(exc)  # resetting, swapping, or the port re-enumerating
                self._sleep(BOOT_POLL_S)
                continue
            verdict = _verdict(states, image_hash)
            if verdict is not None:
                return verdict
            last = "the test boot has not happened yet"
            self._sleep(BOOT_POLL_S)
        return BootOutcome(
            BootVerdict.TIMED_OUT, False,
            f"no verdict {self.settings.reboot_timeout_s:g} s after the reset ({last})",
        )  # fmt: skip

    def confirm(self, artifact: VerifiedArtifact) -> BootOutcome:
        """Confirm the running image once it is checked to be the new one."""
        image_hash = self._known_hash(artifact)
        with self._session() as session:
            verdict = _verdict(self._states(session), image_hash)
            if verdict is None or verdict.verdict is not BootVerdict.NEW_IMAGE:
                return BootOutcome(
                    BootVerdict.REVERTED, False,
                    "the node no longer runs the new image: it reverted before the confirm",
                )  # fmt: skip
            if verdict.confirmed:
                return verdict
            try:
                session.call(smp.image_state_write(None, confirm=True))
            except smp.SmpErrorReply as exc:
                raise StepFailed(f"the node refused to confirm: {exc.error}") from exc
            after = _verdict(self._states(session), image_hash)
        if after is None or after.verdict is not BootVerdict.NEW_IMAGE:
            return BootOutcome(
                BootVerdict.REVERTED, False,
                "the node reverted to its previous image while being confirmed",
            )  # fmt: skip
        if not after.confirmed:
            raise StepFailed("the node answered the confirm but does not report it confirmed")
        return after

    def reset(self) -> None:
        """Reset the node; an unconfirmed test image reverts. Returns once it has reset."""
        with self._session() as session:
            self._reset(session)

    def _reset(self, session: SmpSession) -> None:
        # It may reset before its answer leaves the UART: silence is no failure. It
        # answers before it resets, so wait out its reset delay before asking more.
        with suppress(SmpTimeout):
            session.call(smp.reset_request(), retries=0)
        self._sleep(self.settings.reset_delay_s)


def _other_on_test(states: smp.ImageStates, image_hash: bytes) -> bool:
    """Whether another image than ``image_hash`` runs unconfirmed or is pending."""
    for entry in states.images:
        if entry.hash == image_hash:
            continue
        if entry.pending or (entry.active and not (entry.confirmed or entry.permanent)):
            return True
    return False


def _transient(error: smp.ErrorInfo) -> bool:
    """Whether an upload refusal is about the node's state (retry) rather than the image."""
    if error.group is None:
        return error.rc in TRANSIENT_ERRORS
    return error.group == smp.Group.IMAGE and error.rc in TRANSIENT_IMAGE_ERRORS


def _verdict(states: smp.ImageStates, image_hash: bytes) -> BootOutcome | None:
    """What the image state says of a test boot of ``image_hash``; None: not decided yet."""
    active = next((s for s in states.images if s.active), None)
    if active is not None and active.hash == image_hash:
        confirmed = active.confirmed or active.permanent
        return BootOutcome(
            BootVerdict.NEW_IMAGE, confirmed,
            "the new image runs" + (" and is confirmed" if confirmed else " under test"),
        )  # fmt: skip
    staged = next((s for s in states.images if s.hash == image_hash), None)
    if active is not None and (staged is None or not staged.pending):
        return BootOutcome(
            BootVerdict.REVERTED, False,
            f"the node runs {active.version} again: MCUboot refused or reverted the new image",
        )  # fmt: skip
    return None


def _refuses_image(error: smp.ErrorInfo) -> bool:
    """Whether a refused test boot is about the image itself (it would be refused again)."""
    if error.group is None:
        return error.rc == smp.MgmtErr.EACCESSDENIED
    return error.group == smp.Group.IMAGE and error.rc in (
        smp.ImgMgmtErr.INVALID_HASH, smp.ImgMgmtErr.INVALID_TLV,
        smp.ImgMgmtErr.INVALID_IMAGE_HEADER, smp.ImgMgmtErr.INVALID_IMAGE_HEADER_MAGIC,
    )  # fmt: skip
