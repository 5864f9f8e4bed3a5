"""The serial link adapter: pyserial and ptys behind Shoal's error types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from otaio.serial_link import PtyLink, SerialLink
from otaproto.errors import LinkBroken, LinkClosed


def test_loop_url_round_trip() -> None:
    with SerialLink("loop://") as link:
        link.write(b"hello")
        assert link.read(100, 1.0) == b"hello"
        assert link.read(100, 0.0) == b""


def test_a_pty_carries_bytes_both_ways() -> None:
    node = PtyLink()
    try:
        with SerialLink(node.path) as gateway:
            gateway.write(b"\x00ping\x00")
            assert node.read(100, 2.0) == b"\x00ping\x00"
            node.write(b"pong")
            got = b""
            for _ in range(20):
                got += gateway.read(100, 0.1)
                if got == b"pong":
                    break
            assert got == b"pong"
    finally:
        node.close()


def test_a_missing_port_is_a_clear_link_error() -> None:
    with pytest.raises(LinkBroken, match="cannot open serial port /dev/does-not-exist"):
        SerialLink("/dev/does-not-exist")


def test_a_vanished_port_raises_link_broken() -> None:
    node = PtyLink()
    gateway = SerialLink(node.path)
    node.close()  # the device goes away under the gateway
    def read_until_it_breaks() -> None:
        for _ in range(50):
            gateway.read(100, 0.05)

    try:
        with pytest.raises(LinkBroken, match="failed"):
            read_until_it_breaks()
    finally:
        gateway.close()


def test_using_a_closed_link_is_link_closed() -> None:
    link = SerialLink("loop://")
    link.close()
    link.close()  # idempotent
    with pytest.raises(LinkClosed):
        link.write(b"x")


def test_shoal_flash_on_a_missing_port_exits_5_with_one_line(tmp_path: Path) -> None:
    from tests.node_fixtures import KEY, artifact_file, make_artifact

    art = artifact_file(tmp_path, make_artifact(b"\x01" * 64, "1", 1), "a.art")
    (tmp_path / "k.pub").write_bytes(KEY.public_key.to_pem())
    run = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "flash", "--port", "/dev/does-not-exist",
         "--artifact", str(art), "--trust", str(tmp_path / "k.pub")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 5
    assert run.stderr.strip().startswith("error: cannot open serial port /dev/does-not-exist")
    assert "Traceback" not in run.stderr
