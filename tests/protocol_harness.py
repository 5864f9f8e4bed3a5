"""In-memory harness for the serial protocol: a fake clock, a lossy channel, a fake slot store.

The channel carries *framed* bytes (COBS + CRC), so corruption exercises the
framing layer as a real line would. Nothing here sleeps: time advances in
steps of the fake clock.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

from otaproto import nodelink as nl
from otaproto.framing import Frame, FrameDecoder, encode_frame
from otaproto.manifest import Manifest
from otaproto.node_receiver import NodeReceiver
from otaproto.node_sender import NodeUpdate

MAX_BODY = 2200


@dataclass
class Faults:
    loss: float = 0.0
    corrupt: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_s: float = 0.002
    stall_from_s: float | None = None
    stall_for_s: float = 0.0


@dataclass(order=True)
class _Item:
    at_s: float
    seq: int
    data: bytes = field(compare=False)


class Channel:
    """One direction of a link with seeded faults, delivering whole frames."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self.rng = random.Random(seed)
        self.queue: list[_Item] = []
        self.seq = 0
        self.sent_bytes = 0

    def send(self, data: bytes, now_s: float) -> None:
        self.sent_bytes += len(data)
        f = self.faults
        if self.rng.random() < f.loss:
            return
        if self.rng.random() < f.corrupt:
            flipped = bytearray(data)
            at = self.rng.randrange(len(flipped))
            flipped[at] ^= 1 << self.rng.randrange(8)
            data = bytes(flipped)
        at_s = now_s + f.delay_s
        if f.stall_from_s is not None and f.stall_from_s <= now_s < f.stall_from_s + f.stall_for_s:
            return  # the link is dead meanwhile
        if self.rng.random() < f.reorder:
            at_s += f.delay_s * 3
        copies = 2 if self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            self.seq += 1
            heapq.heappush(self.queue, _Item(at_s, self.seq, data))

    def due(self, now_s: float) -> list[bytes]:
        out = []
        while self.queue and self.queue[0].at_s <= now_s:
            out.append(heapq.heappop(self.queue).data)
        return out


class MemoryStore:
    """A fake bootloader: the secondary slot in a bytearray, for transfer-only tests."""

    def __init__(self, slot_bytes: int, page_bytes: int) -> None:
        self.slot = bytearray(b"\xff" * slot_bytes)
        self.page_bytes = page_bytes
        self.manifest: Manifest | None = None
        self.durable = 0
        self.verified = False
        self.boot_state = "confirmed"
        self.confirmed_sequence = 0
        self.last_reverted = False
        self.writes: list[tuple[int, int]] = []
        self.erased_through = -1

    def primary(self) -> nl.SlotSummary | None:
        return None

    def secondary(self) -> nl.SlotSummary | None:
        return None

    def begin_receive(self, signed_manifest: bytes, manifest: Manifest) -> int:
        if self.manifest is None or self.manifest.image_digest != manifest.image_digest:
            self.manifest, self.durable = manifest, 0
        self.verified = False
        self.erased_through = self.durable // self.page_bytes - 1
        return self.durable

    def write_image(self, offset: int, data: bytes) -> None:
        assert self.manifest is not None
        assert offset + len(data) <= self.manifest.image_size
        last_page = (offset + len(data) - 1) // self.page_bytes
        while self.erased_through < last_page:
            self.erased_through += 1
            start = self.erased_through * self.page_bytes
            self.slot[start : start + self.page_bytes] = b"\xff" * self.page_bytes
        self.slot[offset : offset + len(data)] = data
        self.writes.append((offset, len(data)))

    def persist_progress(self, offset: int) -> None:
        end = self.manifest.image_size if self.manifest else -1
        assert offset % self.page_bytes == 0 or offset == end
        self.durable = offset

    def receive_progress(self) -> tuple[bytes, int] | None:
        return (self.manifest.image_digest, self.durable) if self.manifest else None

    def finish_receive(self) -> bool:
        assert self.manifest is not None
        ok = (
            hashlib.sha256(self.slot[: self.manifest.image_size]).digest()
            == self.manifest.image_digest
        )
        self.verified = ok
        if not ok:
            self.manifest, self.durable = None, 0
        return ok

    def request_test_boot(self) -> None:
        from otaproto.errors import UsageError

        if not self.verified:
            raise UsageError("secondary slot is not verified")
        self.boot_state = "test_pending"

    def confirm(self) -> None:
        self.boot_state = "confirmed"

    def abort_receive(self) -> None:
        self.manifest, self.durable, self.verified = None, 0, False


@dataclass
class Run:
    update: NodeUpdate
    receiver: NodeReceiver
    elapsed_s: float
    gw_to_node: Channel
    node_to_gw: Channel


def run_transfer(
    update: NodeUpdate,
    receiver: NodeReceiver,
    *,
    down: Faults | None = None,
    up: Faults | None = None,
    seed: int = 0,
    limit_s: float = 600.0,
    step_s: float = 0.001,
) -> Run:
    """Drive the update against the receiver until it ends or the fake clock hits the limit."""
    gw_to_node = Channel(down or Faults(), seed)
    node_to_gw = Channel(up or Faults(), seed + 1)
    node_decoder = FrameDecoder(MAX_BODY)
    gw_decoder = FrameDecoder(MAX_BODY)
    now = 0.0
    update.start(now)
    while not update.done and now < limit_s:
        for body in update.poll(now):
            gw_to_node.send(encode_frame(body, MAX_BODY), now)
        for data in gw_to_node.due(now):
            for event in node_decoder.feed(data):
                reaction = (
                    receiver.handle(event.body)
                    if isinstance(event, Frame)
                    else receiver.frame_error(event.reason)
                )
                for reply in reaction.replies:
                    node_to_gw.send(encode_frame(reply, MAX_BODY), now)
        for data in node_to_gw.due(now):
            for event in gw_decoder.feed(data):
                if isinstance(event, Frame):
                    update.receive(event.body, now)
        now += step_s
    return Run(update, receiver, now, gw_to_node, node_to_gw)
