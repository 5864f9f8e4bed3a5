"""``shoal bench serial``: goodput of Shoal's serial protocol through a paced line.

What is measured (the serial issue's definition): image bytes over the time
from opening the port to the node reporting the image verified (handshake,
signature check and the node's read-back digest included); the time to a
confirmed new image (test boot, swap, self-test) is printed beside it.

The limit each figure is compared to: the line rate (``baud / 10`` bytes a
second, 8N1) or, with the modeled flash timing, the larger of the line time
and the flash time (page erases plus word writes for the image), whichever is
slower; the report says which one bound the run.

Each run is real: a pacing relay between two ptys, the simulated node as its
own process (``shoal mcu-sim``) on one side, the gateway driver on the other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway_proxy.serial_driver import config_for_baud, flash_node
from mcu_firmware_stub.flash import FlashTiming
from otaio.serial_link import SerialLink
from otaio.wire import PacedWire, WireConfig, line_rate_bytes_per_s
from otaproto.artifact import build_full_artifact, verify_artifact
from otaproto.keys import SigningKey, TrustedKeys
from shoal.synthetic import evolve, firmware_like

PAGE_BYTES = 4096
#: The simulated node's advertised window: 4 chunks of 1 KiB.
WINDOW_BYTES = 4 * 1024
WORD_BYTES = 4
NODE_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SerialRun:
    """One row of the benchmark."""

    name: str
    baud: int
    flash_timing: bool
    bit_error_rate: float
    image_bytes: int
    state: str
    reason: str
    seconds_to_verified: float
    seconds_to_confirmed: float
    goodput_bytes_per_s: float
    limit_bytes_per_s: float
    limited_by: str
    ratio_to_limit: float
    resent_bytes: int
    image_intact: bool
    window_bytes: int


def flash_time_s(image_bytes: int, timing: FlashTiming) -> float:
    """Modeled time to erase and program ``image_bytes`` on the node."""
    pages = math.ceil(image_bytes / PAGE_BYTES)
    words = math.ceil(image_bytes / WORD_BYTES)
    return pages * timing.page_erase_s + words * timing.word_write_s


class NodeProcess:
    """A ``shoal mcu-sim`` process serving ``port``, stopped by its pid at the end.

    ``args`` are mcu-sim's options after ``--port``; the process is ready once
    it printed its port.
    """

    def __init__(self, port: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "shoal.cli", "mcu-sim", "--port", port, *args]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stdout is not None and self.process.stderr is not None
        if not self.process.stdout.readline():  # the port, once the node booted
            raise RuntimeError(f"mcu-sim did not start: {self.process.stderr.read()!r}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _shoal_node(port: str, state: Path, keys: Path, initial: Path, timing: bool) -> NodeProcess:
    return NodeProcess(port, [
        "--state-dir", str(state), "--device-type", "bench", "--trust", str(keys / "release.pub"),
        "--initial-artifact", str(initial), "--slot-kib", "512",
        "--flash-timing" if timing else "--no-flash-timing",
    ])  # fmt: skip


def run_one(
    name: str,
    *,
    baud: int,
    timing: bool,
    ber: float,
    image_kib: int,
    workdir: Path,
    drop_after_bytes: int | None = None,
    images: tuple[bytes, bytes] | None = None,
) -> SerialRun:
    """One update of a ``image_kib`` image at ``baud`` through the relay.

    With ``drop_after_bytes`` the line goes dead after that many bytes for
    :data:`DROP_S` seconds, then comes back: the resume figure. ``images``
    (old, new) replaces the synthetic pair.
    """
    key = SigningKey.from_ed25519_seed(bytes(range(32)))
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "release.pub").write_bytes(key.public_key.to_pem())
    if images is None:
        old = firmware_like(image_kib * 1024, seed=1)
        new = evolve(old, seed=2)[: image_kib * 1024]
    else:
        old, new = images
    common = {"name": "bench", "device_types": ("bench",), "key": key, "created_s": 0}
    initial = workdir / f"{name}-v1.art"
    initial.write_bytes(build_full_artifact(old, version="1", sequence=1, **common))  # type: ignore[arg-type]
    target = verify_artifact(
        build_full_artifact(new, version="2", sequence=2, **common),  # type: ignore[arg-type]
        TrustedKeys([key.public_key]),
    )
    state = workdir / f"{name}-node"
    wire_config = WireConfig(
        baud=baud, bit_error_rate=ber, seed=7, disconnect_after_bytes=drop_after_bytes
    )
    with PacedWire(wire_config) as wire:
        if drop_after_bytes is not None:
            threading.Thread(target=_bring_back, args=(wire,), daemon=True).start()
        node = _shoal_node(wire.b_path, state, keys, initial, timing)
        try:
            report = flash_node(
                lambda: SerialLink(wire.a_path, baud=baud),
                target,
                new,
                config=config_for_baud(baud),
            )
        finally:
            node.stop()
    intact = _primary_is(state, new) if report.state == "succeeded" else False
    verified_s = report.seconds_to_verified or float("nan")
    goodput = len(new) / verified_s
    line = line_rate_bytes_per_s(baud)
    limit, bound = line, "line"
    if timing:
        flash_rate = len(new) / flash_time_s(len(new), FlashTiming())
        if flash_rate < line:
            limit, bound = flash_rate, "flash"
    return SerialRun(
        name=name, baud=baud, flash_timing=timing, bit_error_rate=ber, image_bytes=len(new),
        state=str(report.state),
        reason=report.reason, seconds_to_verified=verified_s,
        seconds_to_confirmed=report.seconds_total, goodput_bytes_per_s=goodput,
        limit_bytes_per_s=limit, limited_by=bound, ratio_to_limit=goodput / limit,
        resent_bytes=report.resent_bytes, image_intact=intact,
        window_bytes=WINDOW_BYTES,
    )  # fmt: skip


def _bring_back(wire: PacedWire) -> None:
    if wire.disconnected.wait(timeout=300):
        time.sleep(DROP_S)  # the outage itself: a benchmark, not a test, may wait
        wire.reconnect(rearm=False)


def _primary_is(state: Path, image: bytes) -> bool:
    """Read the node's flash file back: is the new image in the primary slot?"""
    data = (state / "flash.bin").read_bytes()
    return data[PAGE_BYTES : PAGE_BYTES + len(image)] == image


DROP_S = 2.0
#: name, baud, flash timing, bit error rate, line dead after this many bytes
PLAN: list[tuple[str, int, bool, float, int | None]] = [
    ("115200", 115200, False, 0.0, None),
    ("115200 flash", 115200, True, 0.0, None),
    ("921600", 921600, False, 0.0, None),
    ("921600 flash", 921600, True, 0.0, None),
    ("115200 ber1e-5", 115200, False, 1e-5, None),
    ("921600 ber1e-5", 921600, False, 1e-5, None),
    ("115200 drop", 115200, True, 0.0, 100_000),
]


def run(*, image_kib: int, only: str | None, as_json: bool) -> list[SerialRun]:
    """Run the plan (or the runs whose name contains ``only``) and print the figures."""
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-serial-"))
    results = []
    try:
        for name, baud, timing, ber, drop in PLAN:
            if only and only not in name:
                continue
            started = time.monotonic()
            result = run_one(
                name.replace(" ", "-"),
                baud=baud,
                timing=timing,
                ber=ber,
                image_kib=image_kib,
                workdir=workdir,
                drop_after_bytes=drop,
            )
            results.append(result)
            if not as_json:
                r = result
                print(
                    f"{name:16} {r.state:10} goodput {r.goodput_bytes_per_s:8.0f} B/s"
                    f" = {r.ratio_to_limit:.3f} of the {r.limited_by} limit"
                    f" ({r.limit_bytes_per_s:.0f} B/s); verified {r.seconds_to_verified:.1f} s,"
                    f" confirmed {r.seconds_to_confirmed:.1f} s;"
                    f" resent {r.resent_bytes} B ({r.resent_bytes / r.window_bytes:.2f} windows);"
                    f" image intact: {r.image_intact} [{time.monotonic() - started:.0f} s]"
                    + ("" if r.state == "succeeded" else f" ({r.reason})"),
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":  # pragma: no cover
    run(image_kib=int(os.environ.get("IMAGE_KIB", "256")), only=None, as_json=False)
