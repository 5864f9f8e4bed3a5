"""The artifact CLI: the contract's commands, exit codes and one-line errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shoal.cli import main
from tests.conftest import evolve, firmware_like


def run(*args: str | Path, ok: bool = True) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


@pytest.fixture
def release(tmp_path: Path) -> Path:
    run("keys", "generate", "--out", tmp_path / "keys")
    return tmp_path / "keys"


def build(tmp: Path, keys: Path, image: bytes, version: str, seq: int, name: str) -> Path:
    (tmp / f"{name}.bin").write_bytes(image)
    run(
        "artifact",
        "build",
        tmp / f"{name}.bin",
        "--version",
        version,
        "--seq",
        str(seq),
        "--device-type",
        "nrf52840",
        "--key",
        keys / "release.key",
        "-o",
        tmp / f"{name}.art",
    )
    return tmp / f"{name}.art"


def test_keys_generate_writes_a_private_key_only_its_owner_reads(release: Path) -> None:
    assert stat.S_IMODE((release / "release.key").stat().st_mode) == 0o600
    assert (release / "release.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    run("keys", "generate", "--out", release, ok=False)  # refuses to overwrite


def test_build_delta_verify_extract(tmp_path: Path, release: Path) -> None:
    v1 = firmware_like(40_000, seed=1)
    v2 = evolve(v1, seed=2)
    a1 = build(tmp_path, release, v1, "1.0", 1, "v1")
    a2 = build(tmp_path, release, v2, "1.1", 2, "v2")
    out = run(
        "artifact", "delta", a1, a2, "--key", release / "release.key", "-o", tmp_path / "d.art"
    )
    assert "delta 1.0 -> 1.1" in out
    pub = release / "release.pub"
    assert "rebuilt from 1.0" in run(
        "artifact", "verify", tmp_path / "d.art", "--trust", pub, "--base", tmp_path / "v1.bin"
    )
    run(
        "artifact",
        "extract",
        tmp_path / "d.art",
        "--trust",
        pub,
        "--base",
        a1,
        "-o",
        tmp_path / "o.bin",
    )
    assert (tmp_path / "o.bin").read_bytes() == v2
    info = json.loads(run("artifact", "inspect", tmp_path / "d.art", "--json"))
    assert info["payload_kind"] == "bsdiff4" and info["signature_checked"] is False
    assert info["base_version"] == "1.0"
    assert "signature NOT checked" in run("artifact", "inspect", tmp_path / "d.art")
    assert json.loads(run("artifact", "inspect", a1, "--json", "--trust", pub))["signature_checked"]


def test_delta_not_worth_it_says_so(tmp_path: Path, release: Path) -> None:
    a1 = build(tmp_path, release, firmware_like(4000, 1), "1", 1, "v1")
    a2 = build(tmp_path, release, firmware_like(4000, 99), "2", 2, "v2")
    out = run(
        "artifact", "delta", a1, a2, "--key", release / "release.key", "-o", tmp_path / "d.art"
    )
    assert "so this is the full artifact" in out


def test_verify_names_what_failed(tmp_path: Path, release: Path) -> None:
    a1 = build(tmp_path, release, firmware_like(4000, 1), "1", 1, "v1")
    pub = release / "release.pub"
    data = a1.read_bytes()
    (tmp_path / "trunc.art").write_bytes(data[:100])
    assert "truncated" in run(
        "artifact", "verify", tmp_path / "trunc.art", "--trust", pub, ok=False
    )
    flipped = bytearray(data)
    flipped[-10] ^= 1
    (tmp_path / "flip.art").write_bytes(bytes(flipped))
    assert "payload digest" in run(
        "artifact", "verify", tmp_path / "flip.art", "--trust", pub, ok=False
    )
    run("keys", "generate", "--out", tmp_path / "other")
    assert "unknown key id" in run(
        "artifact", "verify", a1, "--trust", tmp_path / "other" / "release.pub", ok=False
    )
    assert "not esp32" in run(
        "artifact", "verify", a1, "--trust", pub, "--device-type", "esp32", ok=False
    )
    assert "not newer" in run(
        "artifact", "verify", a1, "--trust", pub, "--installed-seq", "1", ok=False
    )
    assert "not a PEM" in run("artifact", "verify", a1, "--trust", a1, ok=False)


def test_verify_delta_against_the_wrong_base(tmp_path: Path, release: Path) -> None:
    v1 = firmware_like(20_000, seed=1)
    a1 = build(tmp_path, release, v1, "1", 1, "v1")
    a2 = build(tmp_path, release, evolve(v1, 2), "2", 2, "v2")
    run("artifact", "delta", a1, a2, "--key", release / "release.key", "-o", tmp_path / "d.art")
    out = run(
        "artifact",
        "verify",
        tmp_path / "d.art",
        "--trust",
        release / "release.pub",
        "--base",
        tmp_path / "v2.bin",
        ok=False,
    )
    assert "base image is not version 1" in out


def test_hex_input_with_bad_checksum(tmp_path: Path, release: Path) -> None:
    (tmp_path / "bad.hex").write_text(":0400000001020304F0\n:00000001FF\n")
    out = run(
        "artifact",
        "build",
        tmp_path / "bad.hex",
        "--version",
        "1",
        "--seq",
        "1",
        "--device-type",
        "t",
        "--key",
        release / "release.key",
        "-o",
        tmp_path / "x.art",
        ok=False,
    )
    assert "invalid checksum" in out


def test_a_real_process_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "junk.art").write_bytes(b"\x00" * 50)
    (tmp_path / "k.pub").write_bytes(b"junk")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "artifact",
            "verify",
            str(tmp_path / "junk.art"),
            "--trust",
            str(tmp_path / "k.pub"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: not a PEM public or private key"
    assert "Traceback" not in proc.stderr


def test_every_command_has_help() -> None:
    import click

    def walk(command: click.Command, path: list[str]) -> None:
        assert command.help, f"{' '.join(path)} has no help"
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(main, ["shoal"])
