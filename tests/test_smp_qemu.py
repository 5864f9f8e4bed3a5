"""Shoal's SMP driver against a real Zephyr + MCUboot SMP server under qemu-system-arm.

The board (``tests/qemu_fixtures.py``) runs MCUboot and Zephyr's ``smp_svr``
sample at version 0.0.0; the tests give the same application a new version
with ``imgtool``, wrap it in a signed Shoal artifact, and let the driver take
the node through upload (broken once and resumed), test boot, revert and
confirm, all judged by what MCUboot and Zephyr report over SMP. (One thing
this board cannot show, permanence across a later reset, is explained at the
end of the test.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_proxy.config import NodePort
from gateway_proxy.drivers import (
    BootVerdict,
    InstallProgress,
    NoHooks,
    TransferOutcome,
    UpdateOutcome,
)
from gateway_proxy.smp_driver import SmpDriver
from otaio.serial_link import Link, SerialLink
from otaproto.artifact import VerifiedArtifact, build_full_artifact, verify_artifact
from otaproto.errors import LinkBroken
from otaproto.keys import SigningKey, TrustedKeys
from tests.conftest import skip_inside_readme_run
from tests.qemu_fixtures import MAX_REQUEST_BYTES, QemuBoard, qemu_smp_server, resigned_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEVICE_TYPE = "qemu-microbit"


@pytest.fixture
def board() -> Iterator[QemuBoard]:
    skip_inside_readme_run()
    with qemu_smp_server() as running:
        yield running


def _artifact(image: bytes, version: str, key: SigningKey) -> VerifiedArtifact:
    data = build_full_artifact(
        image, name="smp-svr", version=version, sequence=1, device_types=(DEVICE_TYPE,),
        key=key, created_s=1_790_000_000,
    )  # fmt: skip
    return verify_artifact(data, TrustedKeys([key.public_key]), device_type=DEVICE_TYPE)


class BreaksOnce:
    """A real link that breaks (as an unplugged USB adapter does) after ``after_bytes`` written."""

    def __init__(self, url: str, after_bytes: int) -> None:
        self.url = url
        self.after_bytes = after_bytes
        self.broke = False

    def open(self) -> Link:
        link = SerialLink(self.url)
        if self.broke:
            return link
        outer = self

        class Breaking:
            written = 0

            def read(self, max_bytes: int, timeout_s: float) -> bytes:
                return link.read(max_bytes, timeout_s)

            def write(self, data: bytes) -> None:
                if not outer.broke and self.written + len(data) > outer.after_bytes:
                    outer.broke = True
                    link.close()
                    raise LinkBroken("test: the port vanished")
                self.written += len(data)
                link.write(data)

            def close(self) -> None:
                link.close()

        return Breaking()


def test_the_smp_driver_updates_reverts_and_confirms_a_zephyr_mcuboot_node(
    board: QemuBoard, tmp_path: Path, ed_key: SigningKey
) -> None:
    image = resigned_image(board.booted_image, "1.2.3", tmp_path)
    artifact = _artifact(image, "1.2.3", ed_key)
    breaker = BreaksOnce(board.url, after_bytes=len(image) // 2)
    node = NodePort(
        "zephyr-1", board.url, driver="smp",
        options={"device_type": DEVICE_TYPE, "max_request_bytes": MAX_REQUEST_BYTES},
    )  # fmt: skip
    driver = SmpDriver(node, open_link=breaker.open)

    before = driver.inventory()
    assert before.running is not None and before.running.version == "0.0.0"
    assert before.boot_state == "confirmed"

    # The upload: the port breaks half-way; the driver reopens it and the server's
    # offset says where to go on.
    seen: list[InstallProgress] = []
    report = driver.transfer(artifact, image, seen.append)
    assert report.outcome is TransferOutcome.STAGED, report.reason
    assert breaker.broke
    assert report.resumed_from_bytes == 0  # the node held nothing when it began
    # After the reopening only the request at 0 (which asks where the node is) repeats
    # bytes: the rest of the image goes once.
    assert len(image) <= report.bytes_sent < len(image) + MAX_REQUEST_BYTES
    assert seen[-1].bytes_done == len(image)

    # Test boot: MCUboot swaps and boots 1.2.3, unconfirmed.
    driver.test_boot(artifact, image)
    boot = driver.await_boot(artifact)
    assert boot.verdict is BootVerdict.NEW_IMAGE and not boot.confirmed, boot.reason
    testing = driver.inventory()
    assert testing.running is not None and testing.running.version == "1.2.3"
    assert testing.boot_state == "testing"

    # A reset without a confirm: the node runs 0.0.0 again and the driver calls it a
    # revert. (On this board QEMU's loader also rewrites slot 0 at the reset, see
    # below, so this shows the driver's verdict, not MCUboot's revert swap.)
    driver.reset()
    assert driver.await_boot(artifact).verdict is BootVerdict.REVERTED
    reverted = driver.inventory()
    assert reverted.running is not None and reverted.running.version == "0.0.0"

    # The whole update again, through the template: upload, test boot, confirm.
    result = driver.run_update(artifact, image, hooks=NoHooks(), progress=lambda p: None)
    assert result.outcome is UpdateOutcome.SUCCEEDED, result.reason
    after = driver.inventory()
    assert after.running is not None and after.running.version == "1.2.3"
    assert after.boot_state == "confirmed"
    assert driver.transfer(artifact, image, seen.append).outcome is (
        TransferOutcome.ALREADY_INSTALLED
    )
    # Not checked here: that the confirmed image survives another reset. QEMU's
    # generic loader writes the merged hex (MCUboot and the 0.0.0 application in
    # slot 0) back into the emulated flash at every reset (the nRF51's flash is a
    # ROM device, which QEMU's loader rewrites), so after one more reset MCUboot
    # finds 0.0.0 in slot 0 whatever was confirmed. The simulated node's SMP tests
    # (tests/test_smp_node.py) check permanence and MCUboot's revert instead.
