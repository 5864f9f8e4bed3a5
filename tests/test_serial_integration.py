"""The serial path over real ptys: node processes, the pacing relay, the gateway driver and CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway_proxy.serial_driver import config_for_baud, flash_node
from mcu_firmware_stub.bootloader import Slot
from otaio.serial_link import SerialLink
from otaio.wire import PacedWire, WireConfig
from otaproto import nodelink as nl
from otaproto.framing import Frame, FrameDecoder, encode_frame
from otaproto.node_sender import UpdateState
from tests.node_fixtures import (
    Images,
    artifact_file,
    images,
    make_artifact,
    node_config,
    node_on_pty,
    process,
    shoal,
    write_keys,
)

PAGE = 4096
FAST_BAUD = 2_000_000


@pytest.fixture(scope="module")
def imgs() -> Images:
    return images(48 * 1024)


@contextmanager
def node_process(
    tmp: Path, port: str, initial: Path, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    keys = write_keys(tmp / "keys")
    argv = shoal(
        "mcu-sim", "--port", port, "--state-dir", str(tmp / "node"), "--device-type", "nrf52840",
        "--trust", str(keys / "release.pub"), "--initial-artifact", str(initial),
        "--slot-kib", "64", "--no-flash-timing", *extra,
    )  # fmt: skip
    with process(argv) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == port.encode(), "mcu-sim did not come up"
        yield proc


def primary_image(tmp: Path, size: int) -> bytes:
    return (tmp / "node" / "flash.bin").read_bytes()[PAGE : PAGE + size]


def wait_until(predicate: object, timeout_s: float) -> None:
    done = threading.Event()
    deadline_steps = int(timeout_s / 0.02)
    for _ in range(deadline_steps):
        if predicate():  # type: ignore[operator]
            return
        done.wait(0.02)
    raise AssertionError("condition not reached in time")


def test_a_node_process_is_updated_through_the_paced_line(tmp_path: Path, imgs: Images) -> None:
    initial = artifact_file(tmp_path, imgs.old, "v1.art")
    with (
        PacedWire(WireConfig(baud=FAST_BAUD)) as wire,
        node_process(tmp_path, wire.b_path, initial),
    ):
        report = flash_node(
            lambda: SerialLink(wire.a_path), imgs.new, imgs.new.payload,
            config=config_for_baud(FAST_BAUD),
        )  # fmt: skip
        assert report.state is UpdateState.SUCCEEDED, report.reason
        assert report.resent_bytes == 0
        assert report.seconds_to_verified is not None
        again = flash_node(
            lambda: SerialLink(wire.a_path), imgs.new, imgs.new.payload,
            config=config_for_baud(FAST_BAUD),
        )  # fmt: skip
        assert again.state is UpdateState.ALREADY_INSTALLED
    assert primary_image(tmp_path, len(imgs.new.payload)) == imgs.new.payload


def test_a_failing_self_test_rolls_back_and_the_cli_says_so(tmp_path: Path, imgs: Images) -> None:
    initial = artifact_file(tmp_path, imgs.old, "v1.art")
    new = artifact_file(tmp_path, imgs.new, "v2.art")
    with (
        PacedWire(WireConfig(baud=FAST_BAUD)) as wire,
        node_process(tmp_path, wire.b_path, initial, "--fail-self-test", "2.0.0"),
    ):
        run = subprocess.run(
            shoal("flash", "--port", wire.a_path, "--artifact", str(new), "--trust",
                  str(tmp_path / "keys" / "release.pub"), "--baud", str(FAST_BAUD), "--json"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 4, run.stderr
    report = json.loads(run.stdout)
    assert report["state"] == "rolled_back"
    assert "failed self-test" in report["reason"]
    assert primary_image(tmp_path, len(imgs.old.payload)) == imgs.old.payload


def test_the_cli_exits_3_when_the_node_refuses_the_signer(tmp_path: Path, imgs: Images) -> None:
    from otaproto.keys import SigningKey

    stranger = SigningKey.from_ed25519_seed(bytes(range(5, 37)))
    evil = make_artifact(imgs.new.payload, "6.6.6", 9, key=stranger)
    evil_file = artifact_file(tmp_path, evil, "evil.art")
    (tmp_path / "stranger.pub").write_bytes(stranger.public_key.to_pem())
    initial = artifact_file(tmp_path, imgs.old, "v1.art")
    with (
        PacedWire(WireConfig(baud=FAST_BAUD)) as wire,
        node_process(tmp_path, wire.b_path, initial),
    ):
        run = subprocess.run(
            shoal("flash", "--port", wire.a_path, "--artifact", str(evil_file), "--trust",
                  str(tmp_path / "stranger.pub"), "--json"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 3, run.stderr
    assert "unknown key id" in json.loads(run.stdout)["reason"]
    assert primary_image(tmp_path, len(imgs.old.payload)) == imgs.old.payload


def test_a_killed_gateway_resumes_from_the_node_offset(tmp_path: Path, imgs: Images) -> None:
    initial = artifact_file(tmp_path, imgs.old, "v1.art")
    new = artifact_file(tmp_path, imgs.new, "v2.art")
    size = len(imgs.new.payload)
    baud = 230400
    with PacedWire(WireConfig(baud=baud)) as wire, node_process(tmp_path, wire.b_path, initial):
        pub = str(tmp_path / "keys" / "release.pub")
        argv = shoal("flash", "--port", wire.a_path, "--artifact", str(new), "--trust", pub,
                     "--baud", str(baud), "--json")  # fmt: skip
        with process(argv) as gateway:
            wait_until(lambda: wire.stats().delivered_a_to_b_bytes > size * 0.6, timeout_s=30)
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(timeout=10)
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["state"] == "succeeded"
    assert report["resumed_from"] >= PAGE
    assert report["resumed_from"] % PAGE == 0
    assert report["data_bytes_sent"] == size - report["resumed_from"]
    assert primary_image(tmp_path, size) == imgs.new.payload


def test_a_node_killed_mid_transfer_boots_its_old_image_and_the_update_resumes(
    tmp_path: Path, imgs: Images
) -> None:
    initial = artifact_file(tmp_path, imgs.old, "v1.art")
    size = len(imgs.new.payload)
    with PacedWire(WireConfig(baud=230400)) as wire:
        with node_process(tmp_path, wire.b_path, initial) as node:
            wait_until(lambda: True, 0.1)
            result: list[object] = []
            gateway = threading.Thread(
                target=lambda: result.append(
                    flash_node(lambda: SerialLink(wire.a_path), imgs.new, imgs.new.payload,
                               config=config_for_baud(230400))
                ),
            )  # fmt: skip
            gateway.start()
            wait_until(lambda: wire.stats().delivered_a_to_b_bytes > size * 0.5, timeout_s=30)
            node.send_signal(signal.SIGKILL)  # the power goes off
            node.wait(timeout=10)
            with node_process(tmp_path, wire.b_path, initial):
                gateway.join(timeout=120)
        report = result[0]
    assert report.state is UpdateState.SUCCEEDED, report.reason  # type: ignore[attr-defined]
    assert report.resumed_from == 0  # type: ignore[attr-defined]
    assert report.data_bytes_sent < 2 * size  # type: ignore[attr-defined]
    assert primary_image(tmp_path, size) == imgs.new.payload


def test_mcu_sim_power_cut_knob_exits_75_and_the_node_boots_after(
    tmp_path: Path, imgs: Images
) -> None:
    initial = artifact_file(tmp_path, imgs.old, "v1.art")
    with PacedWire(WireConfig(baud=FAST_BAUD)) as wire:
        with node_process(tmp_path, wire.b_path, initial):
            pass  # provisioned at the factory, before the knob is set
        with node_process(tmp_path, wire.b_path, initial, "--cut-after-ops", "6") as node:
            report = flash_node(
                lambda: SerialLink(wire.a_path), imgs.new, imgs.new.payload,
                config=config_for_baud(FAST_BAUD).__class__(link_lost_s=3.0, ack_timeout_s=0.3,
                                                             request_timeout_s=0.3),
            )  # fmt: skip
            assert report.state is UpdateState.FAILED
            assert node.wait(timeout=10) == 75
        with node_process(tmp_path, wire.b_path, initial):
            report = flash_node(
                lambda: SerialLink(wire.a_path), imgs.new, imgs.new.payload,
                config=config_for_baud(FAST_BAUD),
            )  # fmt: skip
    assert report.state is UpdateState.SUCCEEDED, report.reason
    assert primary_image(tmp_path, len(imgs.new.payload)) == imgs.new.payload


# --- a hostile gateway ---------------------------------------------------------


class RawGateway:
    """Sends whatever it likes to a node on a pty and reads the replies."""

    def __init__(self, path: str) -> None:
        self.link = SerialLink(path)
        self.decoder = FrameDecoder(4096)

    def send_raw(self, data: bytes) -> None:
        self.link.write(data)

    def request(self, body: bytes) -> nl.Message:
        self.send_raw(encode_frame(body, 4096))
        return self.reply()

    def reply(self, timeout_s: float = 5.0) -> nl.Message:
        steps = int(timeout_s / 0.05)
        for _ in range(steps):
            for event in self.decoder.feed(self.link.read(4096, 0.05)):
                if isinstance(event, Frame):
                    return nl.decode(event.body)
        raise AssertionError("no reply from the node")


def test_a_hostile_gateway_gets_errors_and_the_node_keeps_its_image(
    tmp_path: Path, imgs: Images
) -> None:
    from otaproto.keys import SigningKey

    older = make_artifact(imgs.old.payload[::-1], "0.9.0", 0)
    stranger = make_artifact(
        imgs.new.payload, "6.6.6", 9, key=SigningKey.from_ed25519_seed(bytes(32))
    )
    config = node_config(tmp_path / "node")
    with node_on_pty(config, imgs.old) as node:
        gw = RawGateway(node.path)
        writes_before = node.node.flash.total_write_ops
        E = nl.ErrorCode

        def refused(body: bytes, code: nl.ErrorCode) -> None:
            msg = gw.request(body)
            assert (msg.type, msg.fields[0]) == (nl.MsgType.ERROR, code), msg

        # Garbage, bad CBOR, unknown messages and oversized frames.
        gw.send_raw(b"\x13\x37" * 300 + b"\x00")  # noise: dropped silently
        refused(b"\xff\xfe", E.MALFORMED)
        refused(nl.encode(nl.MsgType.INFO, 1, {}), E.MALFORMED)  # a reply is not a request
        refused(b"\x82\x18\x77\x01", E.MALFORMED)  # unknown type 0x77
        gw.send_raw(encode_frame(b"\x00" * 3000, 4096))
        assert gw.reply().fields[0] == E.TOO_LARGE
        # Data before BEGIN.
        refused(nl.data(5, 0, b"\x00" * 1024), E.BAD_STATE)
        # Manifests it must refuse before writing anything.
        refused(nl.begin(6, stranger.signed_manifest), E.SIGNATURE)
        refused(nl.begin(7, imgs.old.signed_manifest), E.ROLLBACK)  # a replay of what it runs
        refused(nl.begin(8, older.signed_manifest), E.ROLLBACK)
        refused(nl.begin(9, b"\xd2\x84" + b"\x00" * 50), E.MALFORMED)
        assert node.node.flash.total_write_ops == writes_before, "wrote before refusing"
        # A valid BEGIN, then offsets outside the image and misaligned chunks.
        ok = gw.request(nl.begin(10, imgs.new.signed_manifest))
        assert ok.type is nl.MsgType.BEGIN_OK
        refused(nl.data(10, len(imgs.new.payload), b"\x00" * 1024), E.OFFSET)
        refused(nl.data(10, 2**32 - 1, b"\x00" * 4), E.OFFSET)
        refused(nl.data(10, 3, b"\x00" * 1024), E.OFFSET)
        refused(nl.data(10, 0, b"\x00" * 2048), E.OFFSET)
        refused(nl.encode(nl.MsgType.TEST_BOOT, 11), E.BAD_STATE)  # nothing verified yet
        refused(nl.encode(nl.MsgType.FINISH, 12), E.BAD_STATE)
        # Wrong data that is accepted is caught by the read-back digest and never booted.
        for offset in range(0, len(imgs.new.payload), 1024):
            msg = gw.request(
                nl.data(10, offset, b"\xa5" * min(1024, len(imgs.new.payload) - offset))
            )
            assert msg.type is nl.MsgType.ACK
        refused(nl.encode(nl.MsgType.FINISH, 13), E.DIGEST)
        refused(nl.encode(nl.MsgType.TEST_BOOT, 14), E.BAD_STATE)
        gw.link.close()
        assert node.error is None
    # The node, reset, still boots its own image.
    with node_on_pty(config, None) as node:
        running = node.node.running
        assert running is not None and running.version == "1.0.0"
        assert node.node.bootloader.image_bytes(Slot.PRIMARY) == imgs.old.payload
