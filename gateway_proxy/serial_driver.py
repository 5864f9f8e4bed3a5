"""The gateway's driver for Shoal's own serial protocol: one node, one link, one update.

Rules:

* The protocol decisions live in :class:`otaproto.node_sender.NodeUpdate`;
  this loop only moves bytes and time: read what arrived, feed it, write what
  the update wants sent, sleep at most until its next deadline.
* A link that breaks (port vanished, USB replugged) is reopened with backoff
  until the update's own link-lost timer gives up; the update then starts over
  from HELLO and resumes at the node's offset.
* Request ids start at a random value, so that replies to a previous gateway
  process's requests, still in the line, are never taken for this one's.
* ``ack_timeout_s`` follows the baud rate: a full window at the line rate plus
  room for a flash erase on the node.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from otaio.serial_link import Link
from otaproto import nodelink as nl
from otaproto.artifact import VerifiedArtifact
from otaproto.errors import LinkBroken, MalformedError
from otaproto.framing import Frame, FrameDecoder, encode_frame
from otaproto.node_sender import NodeUpdate, SenderConfig, UpdateState

#: Frames the gateway writes are bounded by the node's advertised size; this
#: only bounds what the encoder accepts and what the reply decoder buffers.
WIRE_MAX_BODY_BYTES = 4096
READ_BYTES = 65536
MAX_WAIT_S = 0.05
REOPEN_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0)
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
    update = NodeUpdate(
        artifact.signed_manifest,
        artifact.manifest,
        image,
        config=config,
        first_id=random.SystemRandom().randrange(1, 0x10000),
    )
    started = clock()
    link = open_link()
    decoder = FrameDecoder(WIRE_MAX_BODY_BYTES)
    reopens = 0
    verified_at: float | None = None
    last_report = -1.0
    update.start(clock())
    try:
        while not update.done:
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
                link = _reopen(open_link, update, clock, sleep)
                reopens += 1
                decoder = FrameDecoder(WIRE_MAX_BODY_BYTES)
                update.link_reopened(clock())
                continue
            now = clock()
            for event in decoder.feed(data):
                if isinstance(event, Frame):
                    update.receive(event.body, now)
            if verified_at is None and update.state in (
                UpdateState.TEST_BOOT,
                UpdateState.VERIFIED,
            ):
                verified_at = now - started
            if progress is not None and (now - last_report >= 0.1 or update.done):
                last_report = now
                progress(
                    Progress(update.state, update.acked_offset, update.image_size, now - started)
                )
    finally:
        link.close()
    return FlashReport(
        state=update.state,
        reason=update.reason,
        image_bytes=update.image_size,
        data_bytes_sent=update.data_bytes_sent,
        resent_bytes=update.resent_bytes,
        resumed_from=update.resumed_from,
        link_reopens=reopens,
        seconds_to_verified=verified_at,
        seconds_total=clock() - started,
    )


def _reopen(
    open_link: Callable[[], Link],
    update: NodeUpdate,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Link:
    """Reopen the port with backoff until it opens or the update's patience ends."""
    give_up_at = clock() + update.config.link_lost_s
    attempt = 0
    while True:
        try:
            return open_link()
        except LinkBroken:
            if clock() >= give_up_at:
                raise
            sleep(REOPEN_BACKOFF_S[min(attempt, len(REOPEN_BACKOFF_S) - 1)])
            attempt += 1


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
    msg_id = random.SystemRandom().randrange(1, 0x10000)
    decoder = FrameDecoder(WIRE_MAX_BODY_BYTES)
    link = open_link()
    try:
        deadline = clock() + timeout_s
        next_hello = clock()
        while clock() < deadline:
            if clock() >= next_hello:
                link.write(encode_frame(nl.hello(msg_id), WIRE_MAX_BODY_BYTES))
                next_hello = clock() + 0.5
            for event in decoder.feed(link.read(READ_BYTES, MAX_WAIT_S)):
                if not isinstance(event, Frame):
                    continue
                try:
                    msg = nl.decode(event.body)
                except MalformedError:
                    continue
                if msg.type is nl.MsgType.INFO and msg.id == msg_id:
                    return nl.decode_info(msg.fields[0])
    finally:
        link.close()
    raise LinkBroken(f"node did not answer HELLO within {timeout_s:g} s")
