"""Images in: raw, Intel HEX, and MCUboot images passed through untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from otaproto.artifact import build_full_artifact, verify_artifact
from otaproto.errors import ImageFormatError, LimitExceeded
from otaproto.images import is_hex_name, load_image
from otaproto.keys import SigningKey, TrustedKeys
from otaproto.limits import Limits


def hex_record(address: int, data: bytes, record_type: int = 0) -> str:
    body = bytes([len(data), address >> 8 & 0xFF, address & 0xFF, record_type]) + data
    return ":" + (body + bytes([-sum(body) & 0xFF])).hex().upper()


def hex_file(chunks: list[tuple[int, bytes]]) -> bytes:
    lines = [hex_record(a, d) for a, d in chunks] + [":00000001FF"]
    return ("\n".join(lines) + "\n").encode()


def test_hex_becomes_the_bytes_it_describes_with_gaps_erased() -> None:
    image = load_image(hex_file([(0x100, b"\x01\x02"), (0x108, b"\x03")]), intel_hex=True)
    assert image == b"\x01\x02" + b"\xff" * 6 + b"\x03"


def test_hex_with_a_bad_checksum() -> None:
    text = hex_file([(0, b"\x01\x02\x03\x04")]).replace(b"\n:00000001FF", b"")
    broken = text[:-3] + (b"00" if text[-3:-1] != b"00" else b"11") + b"\n"
    with pytest.raises(
        ImageFormatError, match="bad Intel HEX: Record at line 1 has invalid checksum"
    ):
        load_image(broken, intel_hex=True)


def test_hex_that_is_not_text_or_not_hex() -> None:
    with pytest.raises(ImageFormatError, match="not ASCII"):
        load_image(b":\xff\xfe", intel_hex=True)
    with pytest.raises(ImageFormatError, match="bad Intel HEX"):
        load_image(b"hello\n", intel_hex=True)
    with pytest.raises(ImageFormatError, match="no data records"):
        load_image(b":00000001FF\n", intel_hex=True)


def test_hex_spanning_more_than_a_slot_is_refused_before_padding() -> None:
    sparse = (
        hex_file([(0, b"\x01")]).replace(b":00000001FF", b"")
        + (
            hex_record(0, b"\x10\x00", record_type=4)
            + "\n"
            + hex_record(0, b"\x02")
            + "\n:00000001FF\n"
        ).encode()
    )
    with pytest.raises(LimitExceeded, match="image from Intel HEX is 268435457 bytes"):
        load_image(sparse, intel_hex=True)


def test_raw_images_are_taken_byte_for_byte_even_starting_with_a_colon() -> None:
    assert load_image(b":not hex", intel_hex=False) == b":not hex"
    with pytest.raises(ImageFormatError, match="empty"):
        load_image(b"", intel_hex=False)
    with pytest.raises(LimitExceeded):
        load_image(b"\x00" * 11, intel_hex=False, limits=Limits(max_image_bytes=10))
    assert is_hex_name("fw.HEX") and is_hex_name("a.ihex") and not is_hex_name("fw.bin")


def test_mcuboot_image_from_imgtool_goes_through_untouched(
    tmp_path: Path, ed_key: SigningKey
) -> None:
    pytest.importorskip("imgtool", reason="imgtool is in the test extra")
    raw = tmp_path / "app.bin"
    raw.write_bytes(bytes(range(256)) * 64)
    key = tmp_path / "mcuboot.pem"
    signed = tmp_path / "app.signed.bin"
    imgtool = [sys.executable, "-m", "imgtool.main"]
    subprocess.run([*imgtool, "keygen", "-k", str(key), "-t", "ed25519"], check=True)
    subprocess.run(
        [
            *imgtool,
            "sign",
            "-k",
            str(key),
            "--header-size",
            "0x200",
            "--align",
            "4",
            "--slot-size",
            "0x20000",
            "--version",
            "1.2.3+4",
            "--pad-header",
            str(raw),
            str(signed),
        ],
        check=True,
    )
    mcuboot = signed.read_bytes()
    assert mcuboot[:4] == bytes.fromhex("3db8f396")  # MCUboot magic 0x96f3b83d, little-endian
    artifact = build_full_artifact(
        load_image(mcuboot, intel_hex=False),
        name="zephyr-app",
        version="1.2.3+4",
        sequence=1,
        device_types=("mps2-an385",),
        key=ed_key,
        created_s=0,
    )
    verified = verify_artifact(artifact, TrustedKeys([ed_key.public_key]))
    assert verified.rebuild_image() == mcuboot
    subprocess.run([*imgtool, "verify", "-k", str(key), str(signed)], check=True)
