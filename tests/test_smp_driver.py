# ruff: noqa: F811  (the fixtures imported from test_smp_node are parameters here)
"""The smp driver against the simulated node's SMP mode, and against misbehaving servers.

The node runs in-process behind a link that hands every write to it at once
and a clock that only moves when someone waits, so these tests are fast and
exact; the pty, the pacing relay and smpclient are covered in
``tests/test_smp_node.py``, a real Zephyr in ``tests/test_smp_qemu.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway_proxy.config import NodePort
from gateway_proxy.drivers import (
    BootVerdict,
    DriverOptionError,
    HookFailed,
    NoHooks,
    Phase,
    TransferOutcome,
    UpdateOutcome,
)
from gateway_proxy.smp_driver import SmpDriver
from mcu_firmware_stub.bootloader import BootState
from mcu_firmware_stub.smp_node import SmpNode
from otaio.serial_link import Link
from otaproto import mcuboot, smp
from otaproto.artifact import VerifiedArtifact, build_full_artifact, verify_artifact
from otaproto.errors import LinkBroken, MalformedError
from otaproto.keys import SigningKey, TrustedKeys
from tests.test_smp_node import (  # noqa: F401  (fixtures)
    Images,
    image_hash,
    images,
    keys,
    node_config,
    trust,
)

DEVICE = "t"


class Clock:
    """Time that passes only when the driver waits for something."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


class Server:
    """Something that answers the bytes a driver writes: a node, or a scripted server."""

    def answer(self, data: bytes) -> bytes:
        raise NotImplementedError


class NodeServer(Server):
    def __init__(self, node: SmpNode) -> None:
        self.node = node

    def answer(self, data: bytes) -> bytes:
        return b"".join(self.node.handle_bytes(data))


class MemoryLink:
    """A link whose writes reach the server at once; breaks after ``break_after`` writes."""

    def __init__(self, server: Server, clock: Clock, break_after: int | None = None) -> None:
        self.server, self.clock, self.break_after = server, clock, break_after
        self.inbox = bytearray()
        self.writes = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise LinkBroken("closed")
        self.writes += 1
        if self.break_after is not None and self.writes > self.break_after:
            self.closed = True
            raise LinkBroken("test: the port vanished")
        self.inbox += self.server.answer(data)

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        if self.closed:
            raise LinkBroken("closed")
        data = bytes(self.inbox[:max_bytes])
        del self.inbox[:max_bytes]
        if not data:
            self.clock.sleep(timeout_s)
        return data

    def close(self) -> None:
        self.closed = True


class Opener:
    """Opens links to one server; the first may break after some writes."""

    def __init__(self, server: Server, clock: Clock, first_breaks_after: int | None = None):
        self.server, self.clock, self.first_breaks_after = server, clock, first_breaks_after
        self.opened = 0

    def __call__(self) -> Link:
        self.opened += 1
        breaks = self.first_breaks_after if self.opened == 1 else None
        return MemoryLink(self.server, self.clock, breaks)


def make_driver(open_link: Callable[[], Link], clock: Clock, **options: object) -> SmpDriver:
    node = NodePort("n1", "memory", driver="smp", options={"device_type": DEVICE, **options})
    return SmpDriver(node, clock=clock, sleep=clock.sleep, open_link=open_link)


def artifact_of(image: bytes, version: str = "2.0.0") -> VerifiedArtifact:
    key = SigningKey.from_ed25519_seed(bytes(range(32)))
    data = build_full_artifact(
        image, name="app", version=version, sequence=2, device_types=(DEVICE,), key=key,
        created_s=0,
    )  # fmt: skip
    return verify_artifact(data, TrustedKeys([key.public_key]))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sim_node(tmp_path: Path, trust: mcuboot.ImageTrust, images: Images, clock: Clock) -> SmpNode:
    return SmpNode(node_config(tmp_path / "node", trust), initial_image=images.old, clock=clock)


def test_a_whole_update_through_the_template(
    tmp_path: Path, trust: mcuboot.ImageTrust, images: Images, clock: Clock
) -> None:
    node = sim_node(tmp_path, trust, images, clock)
    driver = make_driver(Opener(NodeServer(node), clock), clock)
    result = driver.run_update(
        artifact_of(images.new), images.new, hooks=NoHooks(), progress=lambda p: None
    )
    assert result.outcome is UpdateOutcome.SUCCEEDED, result.reason
    assert result.reason == "the new image runs and is confirmed"
    assert node.bootloader.state is BootState.CONFIRMED
    assert node.running is not None and str(node.running.version) == "2.0.0"
    inventory = driver.inventory()
    assert inventory.running is not None
    assert inventory.running.identity == image_hash(images.new)


def test_a_reopened_port_resumes_and_counts_what_the_node_held_at_the_start(
    tmp_path: Path, trust: mcuboot.ImageTrust, images: Images, clock: Clock
) -> None:
    node = sim_node(tmp_path, trust, images, clock)
    opener = Opener(NodeServer(node), clock, first_breaks_after=12)
    driver = make_driver(opener, clock, max_request_bytes=512)
    report = driver.transfer(artifact_of(images.new), images.new, lambda p: None)
    assert report.outcome is TransferOutcome.STAGED, report.reason
    assert opener.opened >= 3  # the state read, the broken upload, its reopening
    assert report.resumed_from_bytes == 0  # the node held nothing when it began
    # Only the request that asked where the node was repeats bytes.
    assert len(images.new) <= report.bytes_sent < len(images.new) + 512


def test_a_node_left_on_another_images_test_is_reverted_before_the_upload(
    tmp_path: Path, trust: mcuboot.ImageTrust, images: Images, clock: Clock
) -> None:
    node = sim_node(tmp_path, trust, images, clock)
    driver = make_driver(Opener(NodeServer(node), clock), clock)
    first = artifact_of(images.new)
    assert driver.transfer(first, images.new, lambda p: None).outcome is TransferOutcome.STAGED
    driver.test_boot(first, images.new)
    assert driver.await_boot(first).verdict is BootVerdict.NEW_IMAGE
    assert node.bootloader.state is BootState.TESTING  # and the update stopped here
    # Another update comes: the node is brought back first, then it takes the image.
    other = artifact_of(images.ecdsa, "3.0.0")
    result = driver.run_update(other, images.ecdsa, hooks=NoHooks(), progress=lambda p: None)
    assert result.outcome is UpdateOutcome.SUCCEEDED, result.reason
    assert node.running is not None and str(node.running.version) == "3.0.0"


class RefuseAt:
    """Hooks that refuse at one boundary."""

    def __init__(self, phase: Phase, when: str) -> None:
        self.phase, self.when = phase, when

    def enter(self, phase: Phase) -> None:
        if (phase, "enter") == (self.phase, self.when):
            raise HookFailed(f"hook {phase}_Enter_10 failed (exit 3)")

    def leave(self, phase: Phase) -> None:
        if (phase, "leave") == (self.phase, self.when):
            raise HookFailed(f"hook {phase}_Leave_10 failed (exit 3)")

    def error(self, phase: Phase, reason: str) -> None:
        return None


@pytest.mark.parametrize(("phase", "when"), [(Phase.REBOOT, "leave"), (Phase.COMMIT, "enter")])
def test_a_hook_refusing_after_the_test_boot_leaves_the_node_on_its_old_image(
    tmp_path: Path,
    trust: mcuboot.ImageTrust,
    images: Images,
    clock: Clock,
    phase: Phase,
    when: str,
) -> None:
    node = sim_node(tmp_path, trust, images, clock)
    driver = make_driver(Opener(NodeServer(node), clock), clock)
    with pytest.raises(HookFailed):
        driver.run_update(
            artifact_of(images.new), images.new, hooks=RefuseAt(phase, when),
            progress=lambda p: None,
        )  # fmt: skip
    assert node.running is not None and str(node.running.version) == "1.0.0"
    assert node.bootloader.state is BootState.CONFIRMED


class Scripted(Server):
    """An SMP server that answers every upload with ``answer(offset, size)``."""

    def __init__(self, answer: Callable[[int, int], smp.Payload]) -> None:
        self.decoder = smp.ConsoleDecoder()
        self.reply_to = answer
        self.uploads = 0

    def answer(self, data: bytes) -> bytes:
        out = b""
        for raw in self.decoder.feed(data):
            packet = smp.decode_packet(raw)
            header = packet.header
            if header.group == smp.Group.IMAGE and header.command == smp.ImageCommand.STATE:
                payload: smp.Payload = {
                    "images": [{"slot": 0, "version": "1.0.0", "hash": bytes(32),
                                "active": True, "confirmed": True}]
                }  # fmt: skip
            elif header.group == smp.Group.OS and header.command == smp.OsCommand.MCUMGR_PARAMS:
                payload = {"buf_size": 512, "buf_count": 4}
            else:
                self.uploads += 1
                request = smp.parse_upload_request(packet.payload)
                payload = self.reply_to(request.offset, len(request.data))
            reply = smp.encode_packet(header.reply(), payload)
            out += smp.encode_console(reply)
        return out


def test_a_server_whose_offset_never_moves_fails_the_transfer_instead_of_looping(
    images: Images, clock: Clock
) -> None:
    server = Scripted(lambda offset, size: {"off": 4096})
    driver = make_driver(Opener(server, clock), clock)
    report = driver.transfer(artifact_of(images.new), images.new, lambda p: None)
    assert report.outcome is TransferOutcome.FAILED
    assert "offset stays at 4096" in report.reason
    assert server.uploads < 10


def test_a_server_that_claims_bytes_nobody_sent_is_refused(images: Images, clock: Clock) -> None:
    server = Scripted(lambda offset, size: {"off": offset + size + (1000 if offset else 0)})
    driver = make_driver(Opener(server, clock), clock)
    with pytest.raises(MalformedError, match=r"past the .* bytes sent"):
        driver.transfer(artifact_of(images.new), images.new, lambda p: None)


def test_a_server_that_keeps_going_back_runs_out_of_requests(images: Images, clock: Clock) -> None:
    # Forward on every reply, but back to the start now and then: no reply stalls,
    # yet the upload would never end.
    def answer(offset: int, size: int) -> smp.Payload:
        return {"off": 0 if offset > 8192 else offset + size}

    server = Scripted(answer)
    driver = make_driver(Opener(server, clock), clock)
    report = driver.transfer(artifact_of(images.new), images.new, lambda p: None)
    assert report.outcome is TransferOutcome.FAILED
    assert server.uploads < 1000


def test_an_artifact_for_another_device_type_is_refused_before_the_node_is_asked(
    images: Images, clock: Clock
) -> None:
    server = Scripted(lambda offset, size: {"off": offset + size})
    driver = make_driver(Opener(server, clock), clock, device_type="another")
    report = driver.transfer(artifact_of(images.new), images.new, lambda p: None)
    assert report.outcome is TransferOutcome.REJECTED and "not another" in report.reason
    assert server.uploads == 0


class Lossy(Server):
    """A node whose UART loses whole requests now and then (every ``every``-th write)."""

    def __init__(self, node: SmpNode, every: int) -> None:
        self.inner, self.every, self.writes, self.lost = NodeServer(node), every, 0, 0

    def answer(self, data: bytes) -> bytes:
        self.writes += 1
        if self.writes % self.every == 0:
            self.lost += 1
            return b""
        return self.inner.answer(data)


@pytest.mark.parametrize("window", [1, 4])
def test_requests_lost_in_a_window_are_sent_again_from_the_nodes_offset(
    tmp_path: Path, trust: mcuboot.ImageTrust, images: Images, clock: Clock, window: int
) -> None:
    node = sim_node(tmp_path, trust, images, clock)
    server = Lossy(node, every=7)
    driver = make_driver(Opener(server, clock), clock, max_request_bytes=600, window=window)
    report = driver.transfer(artifact_of(images.new), images.new, lambda p: None)
    assert report.outcome is TransferOutcome.STAGED, report.reason
    assert server.lost >= 3
    slots = {entry["slot"]: entry["hash"] for entry in driver.inventory().extra["slots"]}
    assert slots[1] == image_hash(images.new).hex()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"nodes\.n1\.options\.device_type"),
        ({"device_type": DEVICE, "framing": "slip"}, r"framing must be console or raw"),
        ({"device_type": DEVICE, "line_bytes": 200}, r"nodes\.n1\.options\.line_bytes"),
        ({"device_type": DEVICE, "window": 0}, r"nodes\.n1\.options\.window"),
        ({"device_type": DEVICE, "mtu": 512}, r"unknown option mtu"),
    ],
)
def test_bad_smp_options_are_refused_when_the_driver_is_made_naming_the_key(
    options: dict[str, object], message: str, clock: Clock
) -> None:
    node = NodePort("n1", "memory", driver="smp", options=options)
    with pytest.raises(DriverOptionError, match=message):
        SmpDriver(node, clock=clock, sleep=clock.sleep, open_link=lambda: None)  # type: ignore[arg-type, return-value]
