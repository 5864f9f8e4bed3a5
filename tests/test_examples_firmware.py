"""The example Cortex-M firmware builds at both versions, and its delta is worth sending."""

from __future__ import annotations

import subprocess
from pathlib import Path

from otaproto.delta import apply_patch, make_patch
from tests.conftest import require_program

FIRMWARE = Path(__file__).resolve().parent.parent / "examples" / "firmware"


def test_firmware_builds_and_the_v1_to_v2_delta_is_small(tmp_path: Path) -> None:
    require_program("arm-none-eabi-gcc")
    subprocess.run(
        ["bash", str(FIRMWARE / "build.sh"), str(tmp_path)], check=True, capture_output=True
    )
    v1 = (tmp_path / "fw-v1.bin").read_bytes()
    v2 = (tmp_path / "fw-v2.bin").read_bytes()
    assert (tmp_path / "fw-v1.hex").read_bytes().startswith(b":")
    assert v1 != v2
    assert 16 * 1024 < len(v2) < 128 * 1024
    assert int.from_bytes(v2[:4], "little") >> 24 == 0x20  # initial stack pointer in RAM
    patch = make_patch(v1, v2)
    assert len(patch) < 0.2 * len(v2)
    assert apply_patch(v1, patch, len(v2)) == v2
