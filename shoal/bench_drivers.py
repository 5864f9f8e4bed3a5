"""``shoal bench serial --driver ...``: the node drivers side by side on one paced line.

Three ways to put the same 256 KiB MCUboot image onto a node through the same
115200-baud pacing relay (``otaio.wire``), each into a fresh node process
(``shoal mcu-sim``), once without and once with the modeled nRF52840 flash
timing:

* ``smpclient``: the third-party mcumgr client (PyPI), uploading into the
  SMP-mode node, as a Zephyr user would today;
* ``shoal-smp``: Shoal's SMP driver (:mod:`gateway_proxy.smp_driver`) into
  the same SMP-mode node, with its defaults (one request at a time, as every
  SMP client); ``shoal-smp-window2`` the same with its ``window = 2`` option
  (the next request sent before the last is answered: for servers that can
  take it, as the simulated node can);
* ``shoal-serial``: Shoal's own protocol into the simulated node
  (:mod:`gateway_proxy.serial_driver`).

Goodput is image bytes over the time from opening the port to the node
holding the whole image, checked: for SMP the last upload reply (the node
compared the upload with its SHA-256), for Shoal's protocol the node's
read-back digest. The limit is the line rate (``baud / 10`` bytes a second);
each figure is printed with its ratio to it and to smpclient's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from otaio.wire import PacedWire, WireConfig, line_rate_bytes_per_s
from otaproto.errors import InvalidInput, UsageError
from shoal.bench_serial import NodeProcess
from shoal.synthetic import evolve, firmware_like

DRIVERS = ("smpclient", "shoal-smp", "shoal-smp-window2", "shoal-serial")
BAUD = 115200
HEADER_BYTES = 0x200
SLOT_KIB = 512
#: What the SMP-mode node advertises in mcumgr params (Zephyr's smp_svr sample uses 2048).
SMP_BUF_SIZE = 2048


@dataclass(frozen=True)
class DriverRun:
    """One row: one driver, one flash model."""

    driver: str
    flash_timing: bool
    image_bytes: int
    ok: bool
    detail: str
    seconds: float
    goodput_bytes_per_s: float
    ratio_to_line: float
    ratio_to_smpclient: float | None


def mcuboot_images(image_kib: int, workdir: Path) -> tuple[bytes, bytes, Path]:
    """An old and a new MCUboot image of ``image_kib`` KiB in all, signed by a new
    Ed25519 key with ``imgtool``; and that key's file (which the node trusts).

    Raises UsageError when imgtool is not installed (it comes with ``shoal[test]``).
    """
    try:
        import imgtool  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        raise UsageError("this benchmark needs imgtool: pip install 'shoal[test]'") from exc
    imgtool_cmd = [sys.executable, "-m", "imgtool.main"]
    key = workdir / "mcuboot-ed25519.pem"
    subprocess.run([*imgtool_cmd, "keygen", "-k", str(key), "-t", "ed25519"], check=True)
    # Header and TLVs (hash, key hash, signature) take 512 + 144 bytes.
    body_bytes = image_kib * 1024 - HEADER_BYTES - 144
    old = firmware_like(body_bytes, seed=1)
    new = evolve(old, seed=2)[:body_bytes]
    images = []
    for version, body in (("1.0.0", old), ("2.0.0", new)):
        raw, signed = workdir / f"app-{version}.bin", workdir / f"app-{version}.signed.bin"
        raw.write_bytes(body)
        subprocess.run(
            [*imgtool_cmd, "sign", "-k", str(key), "--header-size", hex(HEADER_BYTES),
             "--pad-header", "--align", "4", "--version", version,
             "--slot-size", hex(SLOT_KIB * 1024), str(raw), str(signed)],
            check=True, capture_output=True,
        )  # fmt: skip
        images.append(signed.read_bytes())
    return images[0], images[1], key


def _smp_node(port: str, state: Path, key: Path, initial: Path, timing: bool) -> NodeProcess:
    """``shoal mcu-sim --protocol smp`` on a pty path."""
    return NodeProcess(port, [
        "--protocol", "smp", "--state-dir", str(state), "--trust-key", str(key),
        "--initial-image", str(initial), "--slot-kib", str(SLOT_KIB),
        "--smp-buf-size", str(SMP_BUF_SIZE), "--flash-timing" if timing else "--no-flash-timing",
    ])  # fmt: skip


def _smpclient_upload(port: str, image: bytes) -> tuple[float, str]:
    """smpclient's upload as its users run it; (seconds, detail)."""
    from smpclient import SMPClient
    from smpclient.transport.serial import SMPSerialTransport

    async def upload() -> tuple[float, str]:
        started = time.monotonic()
        client = SMPClient(SMPSerialTransport(baudrate=BAUD), port)
        await client.connect()
        last = 0
        try:
            async for offset in client.upload(image, first_timeout_s=40.0):
                last = offset
        finally:
            await client.disconnect()
        return time.monotonic() - started, f"last offset {last}"

    return asyncio.run(upload())


def _shoal_smp_upload(port: str, image: bytes, window: int = 1) -> tuple[float, str]:
    """Shoal's SMP driver's transfer step; (seconds, detail)."""
    from gateway_proxy.config import NodePort
    from gateway_proxy.drivers import TransferOutcome
    from gateway_proxy.smp_driver import SmpDriver
    from otaproto.artifact import build_full_artifact, verify_artifact
    from otaproto.keys import SigningKey, TrustedKeys

    key = SigningKey.from_ed25519_seed(bytes(range(32)))
    artifact = verify_artifact(
        build_full_artifact(
            image, name="bench", version="2.0.0", sequence=2, device_types=("bench",),
            key=key, created_s=0,
        ),
        TrustedKeys([key.public_key]),
    )  # fmt: skip
    options = {"device_type": "bench", "window": window}
    driver = SmpDriver(NodePort("bench", port, BAUD, "smp", options))
    started = time.monotonic()
    report = driver.transfer(artifact, image, lambda progress: None)
    seconds = time.monotonic() - started
    if report.outcome is not TransferOutcome.STAGED:
        raise InvalidInput(f"shoal-smp: {report.outcome}: {report.reason}")
    return seconds, f"{report.bytes_sent} image bytes sent"


def run_smp(driver: str, timing: bool, old: bytes, new: bytes, key: Path, workdir: Path) -> float:
    """One SMP upload through the relay into a fresh SMP-mode node; the seconds it took."""
    state = workdir / f"{driver}-{'flash' if timing else 'fast'}"
    initial = workdir / "initial.signed.bin"
    initial.write_bytes(old)
    with PacedWire(WireConfig(baud=BAUD)) as wire:
        node = _smp_node(wire.b_path, state, key, initial, timing)
        try:
            if driver == "smpclient":
                seconds, _ = _smpclient_upload(wire.a_path, new)
            else:
                window = 2 if driver == "shoal-smp-window2" else 1
                seconds, _ = _shoal_smp_upload(wire.a_path, new, window)
        finally:
            node.stop()
    return seconds


def run_shoal_serial(timing: bool, old: bytes, new: bytes, workdir: Path) -> tuple[float, str]:
    """Shoal's own protocol, through the same kind of relay (``shoal.bench_serial``)."""
    from shoal.bench_serial import run_one

    result = run_one(
        f"drivers-{'flash' if timing else 'fast'}", baud=BAUD, timing=timing, ber=0.0,
        image_kib=0, workdir=workdir, images=(old, new),
    )  # fmt: skip
    if result.state != "succeeded":
        raise InvalidInput(f"shoal-serial: {result.state}: {result.reason}")
    return result.seconds_to_verified, f"limit {result.limited_by}"


def run(*, image_kib: int, drivers: tuple[str, ...], as_json: bool) -> list[DriverRun]:
    """Every driver, without and with flash timing; prints the table."""
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-drivers-"))
    line = line_rate_bytes_per_s(BAUD)
    rows: list[DriverRun] = []
    try:
        old, new, key = mcuboot_images(image_kib, workdir)
        for timing in (False, True):
            reference: float | None = None
            for driver in DRIVERS:
                if driver not in drivers:
                    continue
                try:
                    if driver == "shoal-serial":
                        seconds, detail = run_shoal_serial(timing, old, new, workdir)
                    else:
                        seconds, detail = run_smp(driver, timing, old, new, key, workdir), ""
                    ok = True
                except (InvalidInput, OSError, RuntimeError, TimeoutError) as exc:
                    seconds, detail, ok = float("nan"), str(exc)[:200], False
                goodput = len(new) / seconds if ok else 0.0
                if driver == "smpclient" and ok:
                    reference = goodput
                row = DriverRun(
                    driver=driver, flash_timing=timing, image_bytes=len(new), ok=ok,
                    detail=detail, seconds=seconds, goodput_bytes_per_s=goodput,
                    ratio_to_line=goodput / line,
                    ratio_to_smpclient=goodput / reference if reference else None,
                )  # fmt: skip
                rows.append(row)
                if not as_json:
                    _print(row, line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


def _print(row: DriverRun, line: float) -> None:
    flash = "flash timing" if row.flash_timing else "no flash timing"
    if not row.ok:
        print(f"{row.driver:17} {flash:15} FAILED: {row.detail}", flush=True)
        return
    versus = f"{row.ratio_to_smpclient:.2f} x smpclient" if row.ratio_to_smpclient else "reference"
    print(
        f"{row.driver:17} {flash:15} {row.image_bytes} B in {row.seconds:6.1f} s:"
        f" goodput {row.goodput_bytes_per_s:7.0f} B/s = {row.ratio_to_line:.3f} of the line"
        f" ({line:.0f} B/s), {versus}" + (f"; {row.detail}" if row.detail else ""),
        flush=True,
    )
