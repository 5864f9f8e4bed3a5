"""The gateway's driver for Shoal's own serial protocol: one node, one link, one update.

:class:`ShoalSerialDriver` is the ``shoal-serial`` node driver
(:mod:`gateway_proxy.drivers`); :func:`flash_node` runs a whole update in one
go for ``shoal flash`` and the benchmarks.

Rules:

* The protocol decisions live in :class:`otaproto.node_sender.NodeUpdate`;
  this loop only moves bytes and time: read what arrived, feed it, write what
  the update wants sent, sleep at most until its next deadline.
* A link that breaks (port vanished, USB replugged) is reopened with backoff
  until the update's own link-lost timer gives up; the update then starts over
  from HELLO and resumes at the node's offset, except while the node reboots
  into a test image: then the HELLO polls for the verdict simply go on.
* Request ids start at a random value, so that replies to a previous gateway
  process's requests, still in the line, are never taken for this one's.
* ``ack_timeout_s`` follows the baud rate: a full window at the line rate plus
  room for a flash erase on the node.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway_proxy.config import NodePort
from gateway_proxy.drivers import (
    BootOutcome,
    BootVerdict,
    InstallProgress,
    InstallState,
    NodeDriver,
    NodeInventory,
    ProgressFn,
    RunningImage,
    StepFailed,
    TransferOutcome,
    TransferReport,
)
from otaio.serial_link import Link, SerialLink, reopen
from otaproto import nodelink as nl
from otaproto.artifact import VerifiedArtifact
from otaproto.errors import LinkBroken, MalformedError, UsageError
from otaproto.framing import Frame, FrameDecoder, encode_frame
from otaproto.node_sender import NodeUpdate, SenderConfig, UpdateState

#: Frames the gateway writes are bounded by the node's advertised size; this
#: only bounds what the encoder accepts and what the reply decoder buffers.
WIRE_MAX_BODY_BYTES = 4096
READ_BYTES = 65536
MAX_WAIT_S = 0.05
#: The largest window the ack timeout has to cover, in bytes.
WINDOW_ALLOWANCE_BYTES = 8 * 1024
#: Room for the node to erase a flash page (nRF52840: 85 ms) and answer.
FLASH_ALLOWANCE_S = 0.5


def config_for_baud(baud: int, *, test_boot: bool = True) -> SenderConfig:
    """Sender timeouts suited to a line of ``baud`` bits per second (8N1)."""
    window_s = WINDOW_ALLOWANCE_BYTES * 10 / baud
    return SenderConfig(ack_timeout_s=FLASH_ALLOWANCE_S + 2 * window_s, test_boot=test_boot)


@dataclass(frozen=True)
class Progress:
    """A snapshot for progress bars."""

    state: UpdateState
    acked_bytes: int
    image_bytes: int
    elapsed_s: float


@dataclass(frozen=True)
class FlashReport:
    """How one node update ended, with the figures benchmarks and operators want."""

    state: UpdateState
    reason: str
    image_bytes: int
    data_bytes_sent: int
    resent_bytes: int
    resumed_from: int
    link_reopens: int
    seconds_to_verified: float | None
    seconds_total: float


def flash_node(
    open_link: Callable[[], Link],
    artifact: VerifiedArtifact,
    image: bytes,
    *,
    config: SenderConfig,
    progress: Callable[[Progress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> FlashReport:
    """Bring the node on ``open_link()`` to ``image`` (already verified and rebuilt).

    Returns a report in every outcome the protocol knows (succeeded, rolled
    back, rejected, failed); raises LinkBroken only when the port cannot be
    opened at all at the start.
    """
    update = _new_update(artifact, image, config)
    started = clock()
    run = _drive(update, open_link, progress=progress, clock=clock, sleep=sleep)
    return FlashReport(
        state=update.state,
        reason=update.reason,
        image_bytes=update.image_size,
        data_bytes_sent=update.data_bytes_sent,
        resent_bytes=update.resent_bytes,
        resumed_from=update.resumed_from,
        link_reopens=run.reopens,
        seconds_to_verified=run.verified_after_s,
        seconds_total=clock() - started,
    )


def _new_update(artifact: VerifiedArtifact, image: bytes, config: SenderConfig) -> NodeUpdate:
    return NodeUpdate(
        artifact.signed_manifest,
        artifact.manifest,
        image,
        config=config,
        first_id=random.SystemRandom().randrange(1, 0x10000),
    )


@dataclass
class _Run:
    reopens: int = 0
    verified_after_s: float | None = None


def _drive(
    update: NodeUpdate,
    open_link: Callable[[], Link],
    *,
    until: Callable[[NodeUpdate], bool] = lambda u: u.done,
    progress: Callable[[Progress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> _Run:
    """Move bytes and time for ``update`` on a link of its own until ``until(update)``.

    Starts the update if it is new; an update stopped earlier (at REBOOTING)
    continues on the new link where it was: its pending request goes out again
    at its deadline. The link is closed on return. Raises LinkBroken when the
    port cannot be opened (at the start, or again before the update gives up).
    """
    started = clock()
    link = open_link()
    decoder = FrameDecoder(WIRE_MAX_BODY_BYTES)
    run = _Run()
    last_report = -1.0
    if update.state is UpdateState.IDLE:
        update.start(clock())
    try:
        while not until(update):
            now = clock()
            try:
                for body in update.poll(now):
                    link.write(encode_frame(body, WIRE_MAX_BODY_BYTES))
                deadline = update.next_deadline_s()
                wait_s = (
                    MAX_WAIT_S if deadline is None else min(MAX_WAIT_S, max(0.0, deadline - now))
                )
                data = link.read(READ_BYTES, wait_s)
            except LinkBroken:
                link.close()
                link = reopen(open_link, update.config.link_lost_s, clock=clock, sleep=sleep)
                run.reopens += 1
                decoder = FrameDecoder(WIRE_MAX_BODY_BYTES)
                if update.state is not UpdateState.REBOOTING:
                    # Mid-transfer the node's own offset is the truth: ask again
                    # from HELLO. While it reboots the HELLO polls go on by
                    # themselves; starting over would take a reverted node for
                    # one that still needs the image.
                    update.link_reopened(clock())
                continue
            now = clock()
            for event in decoder.feed(data):
                if isinstance(event, Frame):
                    update.receive(event.body, now)
            if run.verified_after_s is None and update.state in (
                UpdateState.TEST_BOOT,
                UpdateState.VERIFIED,
            ):
                run.verified_after_s = now - started
            if progress is not None and (now - last_report >= 0.1 or until(update)):
                last_report = now
                progress(
                    Progress(update.state, update.acked_offset, update.image_size, now - started)
                )
    finally:
        link.close()
    return run


def query_info(
    open_link: Callable[[], Link],
    *,
    timeout_s: float = 3.0,
    clock: Callable[[], float] = time.monotonic,
) -> nl.Info:
    """Ask a node who it is and what it runs (HELLO -> INFO), for the inventory.

    Repeats HELLO every half second until ``timeout_s``. Raises LinkBroken when
    the port cannot be opened or the node does not answer, MalformedError for
    an INFO that does not decode.
    """
    reply = _ask(open_link, nl.MsgType.HELLO, timeout_s=timeout_s, clock=clock)
    if reply.type is not nl.MsgType.INFO:
        raise LinkBroken(f"node answered HELLO with {reply.type.name}")
    return nl.decode_info(reply.fields[0])


def _ask(
    open_link: Callable[[], Link],
    msg_type: nl.MsgType,
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> nl.Message:
    """Send one field-less request, repeated every half second, until its reply or an ERROR.

    Every such request is idempotent on the node, so a repeat is safe. Raises
    LinkBroken when the port cannot be opened or nothing answers in time.
    """
    msg_id = random.SystemRandom().randrange(1, 0x10000)
    decoder = FrameDecoder(WIRE_MAX_BODY_BYTES)
    link = open_link()
    try:
        deadline = clock() + timeout_s
        next_send = clock()
        while clock() < deadline:
            if clock() >= next_send:
                link.write(encode_frame(nl.encode(msg_type, msg_id), WIRE_MAX_BODY_BYTES))
                next_send = clock() + 0.5
            for event in decoder.feed(link.read(READ_BYTES, MAX_WAIT_S)):
                if not isinstance(event, Frame):
                    continue
                try:
                    msg = nl.decode(event.body)
                except MalformedError:
                    continue
                if msg.id == msg_id and msg.type in (msg_type | 0x80, nl.MsgType.ERROR):
                    return msg
    finally:
        link.close()
    raise LinkBroken(f"node did not answer {msg_type.name} within {timeout_s:g} s")


#: How a running update is reported while it transfers.
_INSTALL_STATES = {
    UpdateState.HELLO: InstallState.FLASHING,
    UpdateState.BEGIN: InstallState.FLASHING,
    UpdateState.SENDING: InstallState.FLASHING,
    UpdateState.PROBING: InstallState.FLASHING,
    UpdateState.FINISHING: InstallState.VERIFYING,
    UpdateState.VERIFIED: InstallState.VERIFYING,  # the last report: the node checked it all
}
#: How a transfer (an update with ``test_boot=False``) ended, by where it stopped.
_TRANSFER_OUTCOMES = {
    UpdateState.VERIFIED: TransferOutcome.STAGED,
    UpdateState.REBOOTING: TransferOutcome.TESTING,
    UpdateState.ALREADY_INSTALLED: TransferOutcome.ALREADY_INSTALLED,
    UpdateState.REJECTED: TransferOutcome.REJECTED,
    UpdateState.FAILED: TransferOutcome.FAILED,
}


class ShoalSerialDriver(NodeDriver):
    """The ``shoal-serial`` driver: Shoal's own protocol, split into the driver steps.

    * transfer: a :class:`NodeUpdate` with ``test_boot=False``, which stops at
      VERIFIED (the node hashed its staging slot); it stops early, as TESTING,
      when the node already test-boots this image.
    * test_boot: a new update with ``test_boot=True``; from the node's INFO it
      resumes at the image's end (BEGIN answers with the full size, FINISH
      re-checks the digest), sends TEST_BOOT and stops once the node took it.
      Nothing else: so it works whether or not the node was reset while the
      hooks held the update, and never sends data the node already has.
    * await_boot: the same update, on to the node's verdict.
    * confirm: the node confirms itself after its self-test (``confirmed`` is
      True on success), so this is only used for a node left under test:
      CONFIRM, then INFO to check it runs the image.

    The node keeps no timer of its own in any of these pauses (the receiver
    has no clock; a staged image survives resets), so hooks may hold the
    update between steps as long as they like.

    Options (``[nodes.NAME.options]``): ``reboot_timeout_s`` (test boot to
    verdict, default 300), ``link_lost_s`` (silence before a transfer gives
    up, default 30), ``info_timeout_s`` (HELLO/CONFIRM/RESET answers, default 3).
    """

    def __init__(self, node: NodePort) -> None:
        super().__init__(node)
        self.options.only("reboot_timeout_s", "link_lost_s", "info_timeout_s")
        base = config_for_baud(node.baud, test_boot=False)
        self._config = replace(
            base,
            reboot_timeout_s=self.options.number(
                "reboot_timeout_s", base.reboot_timeout_s, minimum=1.0
            ),
            link_lost_s=self.options.number("link_lost_s", base.link_lost_s, minimum=1.0),
        )
        self._info_timeout_s = self.options.number("info_timeout_s", 3.0, minimum=0.1)
        #: The update between test_boot (or a transfer that found TESTING) and await_boot.
        self._booting: NodeUpdate | None = None

    def _open(self) -> Link:
        return SerialLink(self.node.port, baud=self.node.baud)

    def inventory(self) -> NodeInventory:
        """HELLO -> INFO. Raises LinkBroken, MalformedError."""
        info = query_info(self._open, timeout_s=self._info_timeout_s)
        primary = info.primary
        return NodeInventory(
            device_type=info.device_type,
            boot_state=info.boot_state,
            running=None if primary is None else RunningImage(
                primary.version, primary.sequence, primary.image_digest, primary.image_size
            ),
            protocol=f"shoal-serial/{info.protocol_version}",
            extra={
                "confirmed_sequence": info.confirmed_sequence,
                "last_reverted": info.last_reverted,
                "receive_offset": info.receive_offset,
            },
        )  # fmt: skip

    def transfer(
        self, artifact: VerifiedArtifact, image: bytes, progress: ProgressFn
    ) -> TransferReport:
        """Stage the image; see the class rules. Raises LinkBroken when the port will not open."""
        self._booting = None
        update = _new_update(artifact, image, self._config)

        def report(p: Progress) -> None:
            state = _INSTALL_STATES.get(p.state)
            if state is not None:
                progress(InstallProgress(state, p.acked_bytes, p.image_bytes))

        _drive(update, self._open, until=_paused, progress=report)
        outcome = _TRANSFER_OUTCOMES.get(update.state, TransferOutcome.FAILED)
        if outcome is TransferOutcome.TESTING:
            self._booting = update
        reason = update.reason or {
            TransferOutcome.STAGED: f"{artifact.manifest.version} staged and verified by the node",
            TransferOutcome.TESTING: f"the node already test-boots {artifact.manifest.version}",
        }.get(outcome, f"transfer ended in {update.state}")
        return TransferReport(
            outcome, reason, update.image_size, update.data_bytes_sent, update.resumed_from
        )

    def test_boot(self, artifact: VerifiedArtifact, image: bytes) -> None:
        """HELLO, BEGIN (resumes at the end), FINISH, TEST_BOOT. Raises StepFailed, LinkBroken."""
        update = _new_update(artifact, image, replace(self._config, test_boot=True))
        _drive(update, self._open, until=_paused)
        if update.state is UpdateState.REBOOTING or update.state is UpdateState.ALREADY_INSTALLED:
            self._booting = update
            return
        raise StepFailed(update.reason or f"test boot ended in {update.state}")

    def await_boot(self, artifact: VerifiedArtifact) -> BootOutcome:
        """Poll the rebooting node until its verdict. Raises UsageError without a test boot."""
        update, self._booting = self._booting, None
        if update is None:
            raise UsageError("await_boot() without a test boot in progress")
        if not update.done:
            _drive(update, self._open)
        if update.state in (UpdateState.SUCCEEDED, UpdateState.ALREADY_INSTALLED):
            return BootOutcome(BootVerdict.NEW_IMAGE, True, update.reason)
        if update.state is UpdateState.ROLLED_BACK:
            return BootOutcome(BootVerdict.REVERTED, True, update.reason)
        # While rebooting the update fails only when no verdict came in time.
        return BootOutcome(BootVerdict.TIMED_OUT, False, update.reason)

    def confirm(self, artifact: VerifiedArtifact) -> BootOutcome:
        """CONFIRM, then INFO: what the node runs now. Raises StepFailed, LinkBroken."""
        reply = _ask(self._open, nl.MsgType.CONFIRM, timeout_s=self._info_timeout_s)
        info = query_info(self._open, timeout_s=self._info_timeout_s)
        running = info.primary
        if running is None or running.image_digest != artifact.manifest.image_digest:
            old = running.version if running else "nothing"
            return BootOutcome(BootVerdict.REVERTED, True, f"node reverted to {old}")
        if reply.type is nl.MsgType.ERROR or info.boot_state != "confirmed":
            detail = reply.fields[1] if reply.type is nl.MsgType.ERROR else info.boot_state
            raise StepFailed(f"node did not confirm {artifact.manifest.version}: {detail}")
        return BootOutcome(
            BootVerdict.NEW_IMAGE, True, f"node runs {artifact.manifest.version}, confirmed"
        )

    def reset(self) -> None:
        """RESET (the node answers, then resets). Raises StepFailed, LinkBroken."""
        reply = _ask(self._open, nl.MsgType.RESET, timeout_s=self._info_timeout_s)
        if reply.type is nl.MsgType.ERROR:
            raise StepFailed(f"node refused to reset: {reply.fields[1]}")


def _paused(update: NodeUpdate) -> bool:
    """Where a driver step hands back: a final state, or a test boot under way."""
    return update.done or update.state is UpdateState.REBOOTING
