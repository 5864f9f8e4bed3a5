"""A real Zephyr + MCUboot SMP server under ``qemu-system-arm``, for the SMP driver's tests.

The server images are not ours and are not committed: the source release of
``smpclient`` (PyPI) ships prebuilt Zephyr SMP servers for its own tests. The
first test that needs one downloads that release from PyPI (pinned by version
and SHA-256), checks each image against the release's ``SHA256SUMS``, and
keeps the few files it needs in a cache folder (``$SHOAL_TEST_CACHE``, else
``~/.cache/shoal-tests``) for later runs.

The fixture used is ``qemu_cortex_m0`` (a BBC micro:bit, nRF51822, 256 KiB of
flash emulated by QEMU): MCUboot in the first 32 KiB, Zephyr's ``smp_svr``
sample in slot 0, an empty slot 1, console-framed SMP on the UART with
Zephyr's log output interleaved. MCUboot there takes hash-only images (SHA-256
TLV, no signature), and swaps with the "offset" algorithm, so a test swap, a
revert and a confirm are the real MCUboot code paths.

QEMU's UART goes to a TCP socket (``-chardev socket``), reached with pyserial's
``socket://`` URL. Two facts measured on this emulated board: requests longer
than one console line now and then lose a line in the emulated UART (Zephyr
logs "uart_mcumgr: Insufficient buffers, fragment dropped": QEMU hands over a
whole request at once, where a real UART at 115200 would take 11 ms a line,
and the server has two line buffers), and after that the server answers
nothing more until it resets. Three-line requests failed alone, two-line ones
when the machine was loaded, so the driver is given one-line requests (89
bytes) here. And
the board answers a reset request before it resets (the driver waits out its
reset delay and judges by the image state).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require_program

SMPCLIENT_VERSION = "7.3.0"
SMPCLIENT_SDIST = f"smpclient-{SMPCLIENT_VERSION}.tar.gz"
SMPCLIENT_SDIST_SHA256 = "86aa4bc1c621805d97f449793a4077f049aa88a98a1e916bf59423d072bd2a3b"
INDEX_URL = "https://pypi.org/simple/smpclient/"
FIXTURE_DIR = f"smpclient-{SMPCLIENT_VERSION}/tests/fixtures/smp-server/"
MERGED_HEX = "zephyr_4.4.0_smp_server_0eae053d_qemu_cortex_m0_serial.merged.hex"
SIGNED_BIN = "zephyr_4.4.0_smp_server_0eae053d_qemu_cortex_m0_serial.signed.bin"
#: MCUboot's image header size in this build, and the slot size of the nRF51's partitions.
HEADER_BYTES = 0x200
SLOT_BYTES = 0x1E000
#: Requests of one console line (93 bytes less length and CRC) pass QEMU's nRF51 UART intact.
MAX_REQUEST_BYTES = 89
DOWNLOAD_TIMEOUT_S = 120.0
BOOT_TIMEOUT_S = 30.0


def _cache_dir() -> Path:
    root = os.environ.get("SHOAL_TEST_CACHE") or str(Path.home() / ".cache" / "shoal-tests")
    return Path(root) / f"smp-server-{SMPCLIENT_VERSION}"


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _download_sdist(into: Path) -> Path:
    """The smpclient source release from PyPI's simple index, checked against its pin."""
    request = urllib.request.Request(
        INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as answer:
        index = json.load(answer)
    urls = [f["url"] for f in index["files"] if f["filename"] == SMPCLIENT_SDIST]
    if not urls:
        raise OSError(f"{SMPCLIENT_SDIST} is not on {INDEX_URL}")
    target = into / SMPCLIENT_SDIST
    digest = hashlib.sha256()
    with (
        urllib.request.urlopen(urls[0], timeout=DOWNLOAD_TIMEOUT_S) as answer,
        target.open("wb") as out,
    ):
        while chunk := answer.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SMPCLIENT_SDIST_SHA256:
        target.unlink()
        raise OSError(f"{SMPCLIENT_SDIST} from PyPI does not match its pinned SHA-256")
    return target


def _extract(sdist: Path, into: Path) -> None:
    """Take the two images and SHA256SUMS out of the release; check the images' digests."""
    wanted = {FIXTURE_DIR + name: name for name in (MERGED_HEX, SIGNED_BIN, "SHA256SUMS")}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            source = archive.extractfile(member)
            assert source is not None
            (into / name).write_bytes(source.read())
    sums = {}
    for line in (into / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        sums[name.lstrip("*")] = digest
    for name in (MERGED_HEX, SIGNED_BIN):
        actual = hashlib.sha256((into / name).read_bytes()).hexdigest()
        if sums.get(name) != actual:
            raise OSError(f"{name} does not match the release's SHA256SUMS")


def smp_server_files() -> Path:
    """The folder holding the server images; skips (fails under CI) when they cannot be had."""
    cache = _cache_dir()
    if all((cache / name).is_file() for name in (MERGED_HEX, SIGNED_BIN)):
        return cache
    staging = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _extract(_download_sdist(staging), staging)
        (staging / SMPCLIENT_SDIST).unlink()
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _unavailable(f"cannot fetch the Zephyr SMP server images from PyPI: {exc}")
    return cache


def _free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class QemuBoard:
    """A running emulated board: where its UART is, and the image it booted."""

    url: str
    process: subprocess.Popen[bytes]
    booted_image: Path


@contextmanager
def qemu_smp_server() -> Iterator[QemuBoard]:
    """Boot MCUboot + Zephyr's SMP server on an emulated micro:bit; stop it (by pid) after."""
    qemu = require_program("qemu-system-arm")
    files = smp_server_files()
    port = _free_port()
    argv = [
        qemu, "-cpu", "cortex-m0", "-machine", "microbit", "-nographic", "-monitor", "none",
        "-chardev", f"socket,id=con,host=127.0.0.1,port={port},server=on,wait=off",
        "-serial", "chardev:con", "-device", f"loader,file={files / MERGED_HEX}",
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise AssertionError(f"qemu exited with {process.returncode}: {stderr[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("qemu's serial socket never opened") from None
                # Not listening yet: QEMU is still starting. Wait on its exit, briefly.
                with suppress(subprocess.TimeoutExpired):
                    process.wait(0.02)
        yield QemuBoard(f"socket://127.0.0.1:{port}", process, files / SIGNED_BIN)
    finally:
        process.kill()
        with suppress(subprocess.TimeoutExpired):
            process.wait(10)


def resigned_image(original: Path, version: str, into: Path) -> bytes:
    """The booted application again, as a new MCUboot image of ``version`` made by ``imgtool``.

    The release's MCUboot takes hash-only images, so a new version needs no key:
    the body is cut out of the signed image (header and TLVs dropped) and
    ``imgtool sign`` gives it a new header and SHA-256 TLV.
    """
    data = original.read_bytes()
    body_bytes = int.from_bytes(data[12:16], "little")
    body = into / "app.bin"
    body.write_bytes(data[HEADER_BYTES : HEADER_BYTES + body_bytes])
    out = into / f"app-{version}.signed.bin"
    subprocess.run(
        [sys.executable, "-m", "imgtool.main", "sign", "--header-size", hex(HEADER_BYTES),
         "--pad-header", "--align", "4", "--version", version, "--slot-size", hex(SLOT_BYTES),
         str(body), str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out.read_bytes()
