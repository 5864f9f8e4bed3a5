"""A simulated MCU node in SMP mode: Zephyr's mcumgr OS and image groups over MCUboot slots.

The twin of :mod:`mcu_firmware_stub.node` for the protocol that Zephyr and
MCUboot devices are updated with today (field notes §5, §6; ``docs/smp.md``
§The simulated node). Rules:

* **Same hardware.** The same flash file (nRF52840 timing, power cuts, wear,
  persistence: stop the process at any moment and a new one on the same state
  folder boots as the MCU would) and the same A/B swap bootloader, with slots
  holding MCUboot image files (:class:`McubootBootloader`).
* **Every start is a reset**: the bootloader finishes or undoes an interrupted
  swap, test-boots a pending image (only if it passes the node's trust:
  MCUboot header, SHA-256 TLV, signature by a trusted key or, when allowed, a
  hash-only image) or reverts an unconfirmed one. Unlike Shoal mode the
  application never confirms itself: the SMP client confirms with an image
  state write, and a reset before that reverts (MCUboot's test swap).
* **The main loop is the MCU's**: read the UART, decode packets, answer each
  before reading on. A flash operation stalls the loop (the flash model
  sleeps) while the link keeps receiving, as a UART with DMA does. A reset
  command is answered first, then the node resets; bytes it had not read yet
  are lost with its RAM.
* **Framing**: console (default; the node also prints a Zephyr-style log line
  at each boot, so clients must skip text) or raw. A packet larger than the
  buffer (``buf_size - 4`` console, ``buf_size`` raw) is dropped unanswered,
  as Zephyr's transport drops it.
* **Requests** (:class:`SmpServer`): OS echo, reset, mcumgr params; image
  state read and write, upload, erase. Any other group or command is answered
  ``rc`` ENOTSUP, a payload that does not decode ``rc`` EINVAL. Image group
  failures are ``{"err": {"group": 1, "rc": ...}}`` for v2 requests and the
  ``rc`` of :data:`otaproto.smp.IMAGE_ERROR_V1` for v1; a signature that no
  trusted key made is the SMP-level ``rc`` EACCESSDENIED in both.
* **Uploads** go to the secondary slot and are erased as they go. The first
  request (offset 0) carries ``len`` and the MCUboot header (magic); a
  request at offset 0 with the ``sha`` and ``len`` of the upload in progress
  is answered with the offset the node already has, which is how clients
  resume (also across resets, from the last page boundary recorded). A
  request at another offset than the expected one is answered with the
  expected ``off``. The last reply carries ``match`` when a ``sha`` was given.
* A :class:`~mcu_firmware_stub.flash.PowerCut` ends :meth:`SmpNode.run` by
  propagating: the simulation's power is off, nothing else may happen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from mcu_firmware_stub.bootloader import BootState, McubootBootloader, Slot
from mcu_firmware_stub.flash import FlashFaults, FlashTiming
from mcu_firmware_stub.node import ServingThread, open_flash, serve_link
from otaio.serial_link import Link
from otaproto import mcuboot, smp
from otaproto.errors import (
    DigestMismatch,
    InvalidInput,
    LimitExceeded,
    MalformedError,
    SignatureError,
    UnknownKeyError,
    UsageError,
)

KIB = 1024
#: What Zephyr's samples build with (CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE is often 2048 there).
DEFAULT_BUF_SIZE = 2048
DEFAULT_BUF_COUNT = 4

ImgErr = smp.ImgMgmtErr


class Framing(StrEnum):
    """How packets travel on the UART."""

    CONSOLE = "console"
    RAW = "raw"


@dataclass(frozen=True)
class SmpNodeConfig:
    """How an SMP-mode node is built and provisioned.

    Raises UsageError for a buffer too small to hold an upload request.
    """

    state_dir: Path
    trust: mcuboot.ImageTrust
    slot_bytes: int = 512 * KIB
    page_bytes: int = 4 * KIB
    #: The reassembly buffer advertised in mcumgr params.
    buf_size: int = DEFAULT_BUF_SIZE
    buf_count: int = DEFAULT_BUF_COUNT
    framing: Framing = Framing.CONSOLE
    #: Print a Zephyr-style log line at each boot (console framing only).
    uart_log: bool = True
    timing: FlashTiming = field(default_factory=FlashTiming)
    faults: FlashFaults = field(default_factory=FlashFaults)

    def __post_init__(self) -> None:
        if self.max_packet_bytes < 128:
            raise UsageError(f"buf_size {self.buf_size} is too small for SMP uploads")
        if self.buf_count < 1:
            raise UsageError(f"buf_count must be at least 1, not {self.buf_count}")

    @property
    def max_packet_bytes(self) -> int:
        """The largest request packet the node accepts."""
        return smp.max_packet_bytes(self.buf_size, console=self.framing is Framing.CONSOLE)

    @property
    def max_image_bytes(self) -> int:
        """The largest image file an upload may announce (a slot less one page)."""
        return self.slot_bytes - self.page_bytes


@dataclass
class Reaction:
    """What the node does after one request: packets to send (unframed), then maybe reset."""

    replies: list[bytes] = field(default_factory=list)
    reset: bool = False


class _Refused(Exception):
    """Internal: the request is answered with an error payload."""

    def __init__(self, payload: smp.Payload, why: str) -> None:
        super().__init__(why)
        self.payload = payload
        self.why = why


@dataclass
class _Upload:
    """The upload of this lifetime, in RAM (lost at a reset, like the MCU's)."""

    total_bytes: int
    sha: bytes | None
    #: The next offset the client must send (bytes accepted so far).
    received: int
    #: Bytes programmed into flash (``received`` less the tail).
    flushed: int
    #: The offset last recorded in the journal (a resume after a reset starts there).
    durable: int
    #: Accepted bytes not programmed yet: less than a flash word.
    tail: bytearray = field(default_factory=bytearray)
    match: bool | None = None


class SmpServer:
    """The mcumgr handlers of one power-on lifetime, over the node's bootloader.

    :meth:`handle` takes one request packet (header + CBOR, unframed) and
    returns the reply packets; flash work happens synchronously inside it, as
    on the MCU. ``active_hash`` is the hash of the image the last boot runs
    (None when nothing valid runs); ``word_bytes`` the flash's write unit.
    Raises only PowerCut (from the flash) and UsageError for its own bugs;
    anything a client sends becomes a reply.
    """

    def __init__(
        self,
        bootloader: McubootBootloader,
        config: SmpNodeConfig,
        *,
        active_hash: bytes | None,
        word_bytes: int = 4,
        log: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self._boot = bootloader
        self._word_bytes = word_bytes
        self._config = config
        self._active_hash = active_hash
        self._log = log
        self._upload: _Upload | None = None
        self._version = smp.Version.V2  # of the request being handled

    def handle(self, packet: bytes) -> Reaction:
        """Answer one request packet. Replies are dropped for packets that are not requests."""
        try:
            header = smp.Header.decode(packet)
        except MalformedError as exc:
            self._log(f"dropped a packet: {exc}")
            return Reaction()
        if not header.op.is_request:
            return Reaction()
        self._version = header.version
        reaction = Reaction()
        try:
            payload = smp.decode_packet(packet).payload
            answer = self._dispatch(header, payload, reaction)
        except MalformedError as exc:
            self._log(f"{_name(header)}: {exc}")
            answer = {"rc": int(smp.MgmtErr.EINVAL)}
        except _Refused as refused:
            self._log(f"{_name(header)} refused: {refused.why}")
            answer = refused.payload
        except InvalidInput as exc:  # the node's own flash let it down
            self._log(f"{_name(header)} failed: {exc}")
            answer = {"rc": int(smp.MgmtErr.EUNKNOWN)}
        reaction.replies.append(smp.encode_packet(header.reply(), answer))
        return reaction

    def _dispatch(
        self, header: smp.Header, payload: smp.Payload, reaction: Reaction
    ) -> smp.Payload:
        key = (header.group, header.command)
        write = header.op is smp.Op.WRITE
        if key == (smp.Group.OS, smp.OsCommand.ECHO):
            return {"r": smp.parse_echo_request(payload)}
        if key == (smp.Group.OS, smp.OsCommand.RESET) and write:
            smp.parse_reset_request(payload)
            reaction.reset = True
            return {}
        if key == (smp.Group.OS, smp.OsCommand.MCUMGR_PARAMS) and not write:
            return {"buf_size": self._config.buf_size, "buf_count": self._config.buf_count}
        if key == (smp.Group.IMAGE, smp.ImageCommand.STATE):
            if write:
                self._state_write(smp.parse_state_write(payload))
            return self.image_states().to_cbor()
        if key == (smp.Group.IMAGE, smp.ImageCommand.UPLOAD) and write:
            return self._upload_chunk(smp.parse_upload_request(payload))
        if key == (smp.Group.IMAGE, smp.ImageCommand.ERASE) and write:
            self._erase(smp.parse_erase_request(payload))
            return {}
        raise _Refused({"rc": int(smp.MgmtErr.ENOTSUP)}, "not supported")

    # -- errors ------------------------------------------------------------------------

    def _image_error(self, code: smp.ImgMgmtErr, why: str) -> NoReturn:
        raise _Refused(smp.error_payload(self._version, code, group=smp.Group.IMAGE), why)

    def _rc(self, rc: smp.MgmtErr, why: str) -> NoReturn:
        raise _Refused({"rc": int(rc)}, why)

    def _refuse_image(self, exc: InvalidInput) -> NoReturn:
        """Map why an image must not run to the reply (module rules)."""
        if isinstance(exc, UnknownKeyError | SignatureError):
            self._rc(smp.MgmtErr.EACCESSDENIED, str(exc))
        if isinstance(exc, DigestMismatch):
            self._image_error(ImgErr.INVALID_HASH, str(exc))
        if isinstance(exc, LimitExceeded):
            self._image_error(ImgErr.INVALID_IMAGE_TOO_LARGE, str(exc))
        if isinstance(exc, MalformedError) and exc.field.startswith("mcuboot header"):
            self._image_error(ImgErr.INVALID_IMAGE_HEADER, str(exc))
        self._image_error(ImgErr.INVALID_TLV, str(exc))

    def _check_secondary_free(self) -> None:
        state = self._boot.state
        if state is BootState.TEST_PENDING:
            self._image_error(ImgErr.IMAGE_ALREADY_PENDING, "a test boot is pending")
        if state is not BootState.CONFIRMED:
            self._image_error(ImgErr.NO_FREE_SLOT, f"the secondary slot is in use ({state})")

    # -- image state ---------------------------------------------------------------------

    def image_states(self) -> smp.ImageStates:
        """What an image state read answers: each slot holding an image whose hash checks.

        Primary: ``active`` when it is what runs, ``confirmed`` unless a test
        boot runs it. Secondary: ``pending`` while a test waits for the reset,
        ``confirmed`` during a test boot (it is the image a reset brings back).
        """
        state = self._boot.state
        entries = []
        primary = self._boot.slot_image(Slot.PRIMARY)
        if primary is not None:
            active = primary.hash == self._active_hash
            entries.append(
                smp.ImageSlotState(
                    slot=0,
                    version=str(primary.version),
                    hash=primary.hash,
                    bootable=primary.bootable,
                    confirmed=active and state is not BootState.TESTING,
                    active=active,
                )
            )
        secondary = self._boot.slot_image(Slot.SECONDARY)
        if secondary is not None:
            entries.append(
                smp.ImageSlotState(
                    slot=1,
                    version=str(secondary.version),
                    hash=secondary.hash,
                    bootable=secondary.bootable,
                    pending=state is BootState.TEST_PENDING,
                    confirmed=state is BootState.TESTING,
                )
            )
        return smp.ImageStates(tuple(entries))

    def _state_write(self, request: smp.StateWrite) -> None:
        image_hash = request.hash
        if image_hash is not None and len(image_hash) != smp.SHA256_BYTES:
            self._image_error(ImgErr.INVALID_HASH, f"a {len(image_hash)}-byte hash")
        primary = self._boot.slot_image(Slot.PRIMARY)
        secondary = self._boot.slot_image(Slot.SECONDARY)
        if request.confirm:
            running = self._active_hash
            if image_hash is None or (running is not None and image_hash == running):
                if running is None:
                    self._image_error(ImgErr.NO_IMAGE, "no valid image runs")
                if self._boot.state is BootState.TESTING:
                    self._boot.confirm()
                    self._log(f"confirmed {primary.version if primary else '?'}")
                return
            if secondary is not None and image_hash == secondary.hash:
                self._image_error(
                    ImgErr.IMAGE_CONFIRMATION_DENIED,
                    "test the image and reset before confirming it",
                )
            self._image_error(ImgErr.HASH_NOT_FOUND, "no image with that hash")
        if image_hash is None:
            self._image_error(ImgErr.INVALID_HASH, "a test needs the image's hash")
        if primary is not None and image_hash == primary.hash:
            self._image_error(ImgErr.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED, "that image runs")
        if secondary is None or image_hash != secondary.hash:
            self._image_error(ImgErr.HASH_NOT_FOUND, "no image with that hash")
        state = self._boot.state
        if state is BootState.TEST_PENDING:
            return  # the same test again
        if state is not BootState.CONFIRMED:
            self._image_error(ImgErr.IMAGE_ALREADY_PENDING, f"a test boot runs ({state})")
        try:
            image = self._boot.request_test()
        except InvalidInput as exc:
            self._refuse_image(exc)
        self._upload = None
        self._log(f"test boot of {image.version} at the next reset")

    # -- upload --------------------------------------------------------------------------

    def _upload_chunk(self, request: smp.UploadRequest) -> smp.Payload:
        if request.image not in (None, 0):
            self._image_error(ImgErr.INVALID_SLOT, f"image {request.image}: this node has image 0")
        self._check_secondary_free()
        if request.offset == 0:
            upload = self._start_upload(request)
            if upload.received:
                return smp.upload_reply(upload.received, upload.match)
        else:
            current = self._upload
            if current is None:
                return smp.upload_reply(0)  # after a reset: the client starts over with len
            if request.offset != current.received:
                return smp.upload_reply(current.received)
            upload = current
        if upload.received + len(request.data) > upload.total_bytes:
            self._image_error(ImgErr.INVALID_IMAGE_DATA_OVERRUN, "data past the announced len")
        if request.data:
            self._write(upload, request.data)
        return smp.upload_reply(upload.received, upload.match)

    def _start_upload(self, request: smp.UploadRequest) -> _Upload:
        """Check the first request of an upload; resume or start it. Returns the upload."""
        total = request.image_len
        if total is None or total == 0:
            self._image_error(ImgErr.INVALID_LENGTH, "the request at offset 0 needs len")
        if total > self._config.max_image_bytes:
            self._image_error(
                ImgErr.INVALID_IMAGE_TOO_LARGE,
                f"{total} bytes, over {self._config.max_image_bytes}",
            )
        sha = request.sha if request.sha and len(request.sha) == smp.SHA256_BYTES else None
        current = self._upload
        same = current is not None and (current.sha, current.total_bytes) == (sha, total)
        if current is not None and same and sha is not None:
            return current  # the client restarted: it learns the offset the node has
        try:
            header = mcuboot.read_header(request.data)
        except MalformedError as exc:
            code = (
                ImgErr.INVALID_IMAGE_HEADER_MAGIC
                if "magic" in exc.field
                else ImgErr.INVALID_IMAGE_HEADER
            )
            self._image_error(code, f"the first chunk must hold the MCUboot header: {exc}")
        if request.upgrade:
            running = self._boot.slot_image(Slot.PRIMARY)
            if running is not None and _release(header.version) <= _release(running.version):
                self._image_error(
                    ImgErr.CURRENT_VERSION_IS_NEWER,
                    f"{header.version} is not newer than the running {running.version}",
                )
        offset = self._boot.begin_upload(sha, total)
        upload = _Upload(total, sha, offset, offset, offset)
        if offset == total:
            upload.match = True if sha is not None else None
        self._upload = upload
        self._log(
            f"upload of {total} bytes "
            + (f"resumed at {offset}" if offset else "started")
            + ("" if sha else " (no sha: it cannot resume)")
        )
        return upload

    def _write(self, upload: _Upload, data: bytes) -> None:
        """Accept ``data`` at ``upload.received``: program whole words, keep the rest in RAM."""
        upload.tail += data
        upload.received += len(data)
        last = upload.received == upload.total_bytes
        word = self._word_bytes
        count = len(upload.tail) if last else len(upload.tail) // word * word
        if count:
            self._boot.write_image(upload.flushed, bytes(upload.tail[:count]))
            del upload.tail[:count]
            upload.flushed += count
        page_bytes = self._config.page_bytes
        boundary = upload.flushed // page_bytes * page_bytes
        if not last and boundary > upload.durable:
            self._boot.persist_progress(boundary)
            upload.durable = boundary
        if last:
            intact = self._boot.finish_upload()
            upload.match = intact if upload.sha is not None else None
            self._log(f"upload complete{'' if intact else ': the file does not match its sha'}")
            if not intact:
                self._upload = None

    def _erase(self, slot: int | None) -> None:
        if slot not in (None, 1):
            self._image_error(ImgErr.INVALID_SLOT, f"slot {slot} cannot be erased")
        if self._boot.state is not BootState.CONFIRMED:
            self._rc(smp.MgmtErr.EBADSTATE, f"the secondary slot is in use ({self._boot.state})")
        self._boot.erase_secondary()
        self._upload = None
        self._log("erased the secondary slot")


def _release(version: mcuboot.ImageVersion) -> tuple[int, int, int]:
    """What Zephyr compares for ``upgrade``: major, minor, revision (not the build)."""
    return (version.major, version.minor, version.revision)


def _name(header: smp.Header) -> str:
    return smp.Request(header.op, header.group, header.command).describe()


class SmpNode:
    """One SMP-mode node on one link; see the module rules.

    ``initial_image`` (an MCUboot image file) is programmed into an empty
    primary slot before the first boot, as a factory would. Raises what
    :class:`Flash` and :class:`McubootBootloader` raise for a state folder or
    geometry that cannot work, and what :meth:`mcuboot.ImageTrust.verify`
    raises for an initial image the node would not boot.
    """

    def __init__(
        self,
        config: SmpNodeConfig,
        *,
        initial_image: bytes | None = None,
        log: Callable[[str], None] = lambda _line: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._log = log
        self._clock = clock
        self.flash = open_flash(config)
        self.resets = 0
        self._output = bytearray()
        try:
            self.bootloader = McubootBootloader(
                self.flash, slot_bytes=config.slot_bytes, trust=config.trust
            )
            if initial_image is not None:
                info = self.bootloader.slot_info(Slot.PRIMARY)
                if info is None or not info.valid:
                    self.bootloader.provision_image(initial_image)
                    log(f"provisioned {mcuboot.parse_image(initial_image).version}")
            self._reset()
        except BaseException:
            self.flash.close()
            raise

    @property
    def running(self) -> mcuboot.McubootImage | None:
        """The image the last boot runs (verified at that boot), if any."""
        return self._running

    def _reset(self) -> None:
        """What a reset does: the bootloader, then a fresh application with empty RAM."""
        self.resets += 1
        self._booted_at_s = self._clock()
        outcome = self.bootloader.boot()
        self._running = (
            self.bootloader.slot_image(Slot.PRIMARY) if outcome.running is not None else None
        )
        running = self._running
        how = " (test boot)" if outcome.swapped else " (reverted)" if outcome.reverted else ""
        line = f"boot: {outcome.state}, running {running.version if running else 'nothing'}{how}"
        self._log(line)
        self.server = SmpServer(
            self.bootloader,
            self.config,
            active_hash=running.hash if running else None,
            word_bytes=self.flash.word_bytes,
            log=self._log,
        )
        self.decoder: smp.ConsoleDecoder | smp.RawDecoder
        if self.config.framing is Framing.CONSOLE:
            self.decoder = smp.ConsoleDecoder(self.config.max_packet_bytes, max_text_bytes=0)
            if self.config.uart_log:
                self._output += self._uart_log_line(line)
        else:
            self.decoder = smp.RawDecoder(self.config.max_packet_bytes)

    def _uart_log_line(self, text: str) -> bytes:
        """A log line as Zephyr prints it: ``[hh:mm:ss.mmm,uuu] <inf> module: text``."""
        uptime_us = max(0, round((self._clock() - self._booted_at_s) * 1e6))
        seconds, micros = divmod(uptime_us, 1_000_000)
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        stamp = f"{hours:02}:{minutes:02}:{seconds:02}.{micros // 1000:03},{micros % 1000:03}"
        return f"[{stamp}] <inf> shoal_sim: {text}\r\n".encode()

    def _frame(self, packet: bytes) -> bytes:
        if self.config.framing is Framing.CONSOLE:
            return smp.encode_console(packet)
        return packet

    def pending_output(self) -> bytes:
        """What the node wants to print before it reads (its boot log), once."""
        output, self._output = bytes(self._output), bytearray()
        return output

    def handle_bytes(self, data: bytes) -> Iterator[bytes]:
        """Feed received bytes; yield what to write back, resetting when asked."""
        for packet in self.decoder.feed(data):
            reaction = self.server.handle(packet)
            for reply in reaction.replies:
                yield self._frame(reply)
            if reaction.reset:
                self._reset()
                output = self.pending_output()
                if output:
                    yield output
                return

    def run(self, link: Link, stop: threading.Event | None = None) -> None:
        """Serve ``link`` until ``stop`` is set. PowerCut and LinkError propagate."""
        output = self.pending_output()
        if output:
            link.write(output)
        serve_link(link, self.handle_bytes, stop)

    def close(self) -> None:
        """Close the flash file."""
        self.flash.close()


class SmpNodeThread(ServingThread[SmpNode]):
    """An :class:`SmpNode` serving ``link`` from its own thread; see :class:`ServingThread`."""

    label = "SMP node"
    thread_name = "smp-node"
