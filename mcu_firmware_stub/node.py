"""A simulated MCU node: flash, bootloader, application and the serial receiver, on one link.

Rules:

* The node's whole state is its flash file (``STATE_DIR/flash.bin``): stop the
  process at any moment (a power cut, a kill) and a new process on the same
  state folder boots exactly as the MCU would.
* Every start is a reset: the bootloader finishes or undoes an interrupted
  swap, test-boots a pending image or reverts an unconfirmed one, then the
  application runs its self-test. A passing self-test on a test boot confirms
  the image; a failing one resets the node again, which reverts it.
* The main loop is the MCU's: read the UART, decode frames, hand each to the
  receiver, write the replies. During a flash operation the loop is stalled
  (the flash model sleeps) while the link keeps receiving into its buffer, as
  a UART with DMA does.
* A :class:`~mcu_firmware_stub.flash.PowerCut` ends :meth:`SimulatedNode.run`
  by propagating: the simulation's power is off, nothing else may happen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from mcu_firmware_stub.bootloader import Bootloader, Layout, Slot, SlotInfo
from mcu_firmware_stub.flash import Flash, FlashFaults, FlashTiming
from otaio.serial_link import Link
from otaproto import nodelink as nl
from otaproto.artifact import VerifiedArtifact
from otaproto.errors import UsageError
from otaproto.framing import Frame, FrameDecoder, encode_frame
from otaproto.keys import TrustedKeys
from otaproto.manifest import Manifest
from otaproto.node_receiver import NodeReceiver

KIB = 1024
READ_CHUNK_BYTES = 4096
IDLE_POLL_S = 0.05


@dataclass(frozen=True)
class NodeConfig:
    """How a simulated node is built and provisioned."""

    state_dir: Path
    device_type: str
    trusted: TrustedKeys
    slot_bytes: int = 512 * KIB
    page_bytes: int = 4 * KIB
    chunk_bytes: int = 1 * KIB
    window_frames: int = 4
    max_frame_bytes: int = 2200
    timing: FlashTiming = field(default_factory=FlashTiming)
    faults: FlashFaults = field(default_factory=FlashFaults)
    #: Versions whose self-test fails after a test boot (the knob for rollbacks).
    fail_self_test: frozenset[str] = frozenset()

    @property
    def limits(self) -> nl.NodeLimits:
        """What this node advertises in INFO."""
        return nl.NodeLimits(
            max_frame_bytes=self.max_frame_bytes,
            chunk_bytes=self.chunk_bytes,
            window_frames=self.window_frames,
            max_image_bytes=self.slot_bytes - self.page_bytes,
        )


class _Store:
    """The bootloader as the receiver's SlotStore."""

    def __init__(self, bootloader: Bootloader) -> None:
        self._b = bootloader

    @property
    def boot_state(self) -> str:
        return str(self._b.state)

    @property
    def confirmed_sequence(self) -> int:
        return self._b.confirmed_sequence

    @property
    def last_reverted(self) -> bool:
        return self._b.last_reverted

    def primary(self) -> nl.SlotSummary | None:
        return _summary(self._b.slot_info(Slot.PRIMARY))

    def secondary(self) -> nl.SlotSummary | None:
        return _summary(self._b.slot_info(Slot.SECONDARY))

    def begin_receive(self, signed_manifest: bytes, manifest: Manifest) -> int:
        return self._b.begin_receive(signed_manifest, manifest)

    def write_image(self, offset: int, data: bytes) -> None:
        self._b.write_image(offset, data)

    def persist_progress(self, offset: int) -> None:
        self._b.persist_progress(offset)

    def receive_progress(self) -> tuple[bytes, int] | None:
        return self._b.receive_progress()

    def finish_receive(self) -> bool:
        return self._b.finish_receive()

    def request_test_boot(self) -> None:
        self._b.request_test_boot()

    def confirm(self) -> None:
        self._b.confirm()

    def abort_receive(self) -> None:
        self._b.abort_receive()


def _summary(info: SlotInfo | None) -> nl.SlotSummary | None:
    if info is None or not info.valid:
        return None
    return nl.SlotSummary(info.version, info.sequence, info.image_digest, info.image_size)


def serve_link(
    link: Link, handle_bytes: Callable[[bytes], Iterable[bytes]], stop: threading.Event | None
) -> None:
    """The MCU's main loop: read ``link``, write back what ``handle_bytes`` answers, until
    ``stop`` is set (never, when None). What ``link`` or ``handle_bytes`` raise propagates."""
    while stop is None or not stop.is_set():
        data = link.read(READ_CHUNK_BYTES, IDLE_POLL_S)
        if data:
            for reply in handle_bytes(data):
                link.write(reply)


class FlashSettings(Protocol):
    """The part of a node's configuration that sizes and places its flash file."""

    @property
    def state_dir(self) -> Path: ...
    @property
    def slot_bytes(self) -> int: ...
    @property
    def page_bytes(self) -> int: ...
    @property
    def timing(self) -> FlashTiming: ...
    @property
    def faults(self) -> FlashFaults: ...


def open_flash(config: FlashSettings) -> Flash:
    """The node's flash file, ``flash.bin`` in ``config.state_dir`` (created if missing),
    sized for two slots, the scratch page and the journal (:meth:`Layout.flash_bytes_for`)."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return Flash(
        config.state_dir / "flash.bin",
        Layout.flash_bytes_for(config.slot_bytes, config.page_bytes),
        page_bytes=config.page_bytes,
        timing=config.timing,
        faults=config.faults,
    )


class SimulatedNode:
    """One node on one link; see the module rules."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        initial: VerifiedArtifact | None = None,
        log: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.config = config
        self._log = log
        self.flash = open_flash(config)
        self.bootloader = Bootloader(
            self.flash,
            slot_bytes=config.slot_bytes,
            trusted=config.trusted,
            device_type=config.device_type,
        )
        if initial is not None and self.bootloader.slot_info(Slot.PRIMARY) is None:
            self.bootloader.provision(initial.signed_manifest, initial.rebuild_image())
            log(f"provisioned {initial.manifest.version}")
        self.resets = 0
        self._reset()

    @property
    def running(self) -> SlotInfo | None:
        """The valid image in the primary slot, if any."""
        info = self.bootloader.slot_info(Slot.PRIMARY)
        return info if info is not None and info.valid else None

    def _reset(self) -> None:
        """What a reset does: bootloader, then the application's self-test.

        A failing self-test resets once more, which reverts the test image; a
        node with nothing to revert to keeps running the unconfirmed image
        rather than resetting forever.
        """
        for attempt in range(2):
            self.resets += 1
            outcome = self.bootloader.boot()
            running = outcome.running
            self._log(
                f"boot: {outcome.state}, running {running.version if running else 'nothing'}"
                + (" (reverted)" if outcome.reverted else "")
            )
            if str(outcome.state) != "testing" or running is None:
                break
            if running.version not in self.config.fail_self_test:
                self.bootloader.confirm()
                self._log(f"self-test of {running.version} passed: confirmed")
                break
            self._log(f"self-test of {running.version} failed" + ("" if attempt else ": resetting"))
        self.receiver = NodeReceiver(
            _Store(self.bootloader),
            device_type=self.config.device_type,
            trusted=self.config.trusted,
            limits=self.config.limits,
            page_bytes=self.config.page_bytes,
        )
        self.decoder = FrameDecoder(self.config.max_frame_bytes)

    def handle_bytes(self, data: bytes) -> Iterable[bytes]:
        """Feed received bytes; yield the framed replies to write, resetting when asked."""
        for event in self.decoder.feed(data):
            if isinstance(event, Frame):
                reaction = self.receiver.handle(event.body)
            else:
                reaction = self.receiver.frame_error(event.reason)
            for reply in reaction.replies:
                yield encode_frame(reply, self.config.max_frame_bytes)
            if reaction.reset:
                self._reset()
                return

    def run(self, link: Link, stop: threading.Event | None = None) -> None:
        """Serve ``link`` until ``stop`` is set. PowerCut and LinkError propagate."""
        serve_link(link, self.handle_bytes, stop)

    def close(self) -> None:
        """Close the flash file."""
        self.flash.close()


class ServableNode(Protocol):
    """What :class:`ServingThread` needs of a node: both :class:`SimulatedNode` and
    :class:`~mcu_firmware_stub.smp_node.SmpNode` serve a link this way."""

    def run(self, link: Link, stop: threading.Event | None = None) -> None: ...

    def close(self) -> None: ...


NodeT = TypeVar("NodeT", bound=ServableNode)


class ServingThread(Generic[NodeT]):
    """A node serving ``link`` from its own thread, until :meth:`stop`.

    For the demo, tests and benchmarks, where the gateway runs in the same
    process. An exception that ends the node (a :class:`PowerCut`, a broken
    link) is kept in :attr:`error` rather than lost with the thread.
    """

    #: The node in the UsageError of :meth:`stop`, and the thread's default name.
    label = "node"
    thread_name = "node"

    def __init__(self, node: NodeT, link: Link, *, name: str | None = None) -> None:
        self.node = node
        self.link = link
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=self.thread_name if name is None else name, daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self.node.run(self.link, self._stop)
        except BaseException as exc:
            self.error = exc

    @property
    def alive(self) -> bool:
        """Whether the node still serves (False after a power cut or a broken link)."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving, then close the link and the flash. Raises UsageError if it hangs."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            raise UsageError(f"{self.label} did not stop within {timeout_s:g} s")
        self.link.close()
        self.node.close()


class NodeThread(ServingThread[SimulatedNode]):
    """A :class:`SimulatedNode` serving ``link`` from its own thread; see :class:`ServingThread`."""

    label = "simulated node"
    thread_name = "simulated-node"
