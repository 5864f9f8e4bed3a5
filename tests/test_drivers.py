"""Node drivers: the run_update template, the shoal-serial steps on a real node, and
third-party drivers found through a real entry point.

The third-party driver is the example of ``docs/drivers-and-hooks.md``, put on
``sys.path`` as an installed distribution would be (a module plus a
``.dist-info`` with ``entry_points.txt``), so that the documented way to add
a driver is the tested one.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway_proxy import drivers
from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort, load_config
from gateway_proxy.drivers import (
    BootOutcome,
    BootVerdict,
    DriverLoadError,
    DriverNotFound,
    DriverOptionError,
    HookFailed,
    InstallProgress,
    InstallState,
    NodeDriver,
    NodeInventory,
    Phase,
    ProgressFn,
    TransferOutcome,
    TransferReport,
    UpdateOutcome,
    load_driver,
    make_driver,
    registered_drivers,
)
from gateway_proxy.serial_driver import ShoalSerialDriver
from otaproto import fleet
from otaproto.artifact import VerifiedArtifact
from otaproto.errors import UsageError
from tests.hook_fixtures import write_hook
from tests.node_fixtures import (
    TRUST,
    Images,
    NodeThread,
    artifact_file,
    images,
    node_config,
    node_on_pty,
    write_keys,
)
from tests.test_gateway_agent import FINAL_WORDS, GW, Orchestra, run_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "drivers-and-hooks.md"


# -- the template, with a scripted driver -------------------------------------------------


@dataclass
class RecordingHooks:
    """PhaseHooks that record every call; ``refuse`` makes one boundary raise HookFailed."""

    calls: list[str] = field(default_factory=list)
    refuse: str = ""

    def enter(self, phase: Phase) -> None:
        self._call(f"{phase}_Enter")

    def leave(self, phase: Phase) -> None:
        self._call(f"{phase}_Leave")

    def error(self, phase: Phase, reason: str) -> None:
        self.calls.append(f"{phase}_Error: {reason}")

    def _call(self, boundary: str) -> None:
        self.calls.append(boundary)
        if boundary == self.refuse:
            raise HookFailed(f"hook {boundary}_10_x failed (exit 1)")


class ScriptedDriver(NodeDriver):
    """A driver whose steps answer what the test says and record that they ran."""

    def __init__(self, transfer: TransferOutcome, boot: BootOutcome, after: BootOutcome) -> None:
        super().__init__(NodePort("n1", "-", driver="scripted"))
        self._transfer, self._boot, self._after = transfer, boot, after
        self.steps: list[str] = []

    def inventory(self) -> NodeInventory:
        return NodeInventory("dev", "confirmed", None, "scripted")

    def transfer(
        self, artifact: VerifiedArtifact, image: bytes, progress: ProgressFn
    ) -> TransferReport:
        self.steps.append("transfer")
        progress(InstallProgress(InstallState.FLASHING, len(image), len(image)))
        return TransferReport(self._transfer, f"transfer {self._transfer}", len(image), 100)

    def test_boot(self, artifact: VerifiedArtifact, image: bytes) -> None:
        self.steps.append("test_boot")

    def await_boot(self, artifact: VerifiedArtifact) -> BootOutcome:
        self.steps.append("await_boot")
        return self._boot

    def confirm(self, artifact: VerifiedArtifact) -> BootOutcome:
        self.steps.append("confirm")
        return self._after

    def reset(self) -> None:
        self.steps.append("reset")


TESTING = BootOutcome(BootVerdict.NEW_IMAGE, False, "runs 2.0.0 under test")
CONFIRMED = BootOutcome(BootVerdict.NEW_IMAGE, True, "runs 2.0.0, confirmed")
REVERTED = BootOutcome(BootVerdict.REVERTED, True, "reverted to 1.0.0")
ALL_BOUNDARIES = [
    "Flash_Enter", "Flash_Leave", "Reboot_Enter", "Reboot_Leave", "Commit_Enter", "Commit_Leave",
]  # fmt: skip


def run(driver: ScriptedDriver, hooks: RecordingHooks) -> tuple[UpdateOutcome, str, list[str]]:
    imgs = images(8 * 1024)
    progress: list[str] = []
    result = driver.run_update(
        imgs.new, imgs.new.payload, hooks=hooks, progress=lambda p: progress.append(str(p.state))
    )
    return result.outcome, result.reason, progress


def test_a_staged_image_is_test_booted_confirmed_with_hooks_at_every_boundary() -> None:
    driver, hooks = ScriptedDriver(TransferOutcome.STAGED, TESTING, CONFIRMED), RecordingHooks()
    outcome, reason, progress = run(driver, hooks)
    assert (outcome, reason) == (UpdateOutcome.SUCCEEDED, "runs 2.0.0, confirmed")
    assert driver.steps == ["transfer", "test_boot", "await_boot", "confirm"]
    assert hooks.calls == ALL_BOUNDARIES
    assert progress == ["flashing", "rebooting", "confirming"]


def test_a_node_already_testing_the_image_is_not_test_booted_again() -> None:
    driver, hooks = ScriptedDriver(TransferOutcome.TESTING, CONFIRMED, CONFIRMED), RecordingHooks()
    assert run(driver, hooks)[0] is UpdateOutcome.SUCCEEDED
    assert driver.steps == ["transfer", "await_boot"]  # confirmed by the node: no confirm
    assert hooks.calls == ALL_BOUNDARIES


@pytest.mark.parametrize(
    ("transfer", "outcome", "calls"),
    [
        (TransferOutcome.REJECTED, UpdateOutcome.REJECTED,
         ["Flash_Enter", "Flash_Error: transfer rejected"]),
        (TransferOutcome.FAILED, UpdateOutcome.FAILED,
         ["Flash_Enter", "Flash_Error: transfer failed"]),
        (TransferOutcome.ALREADY_INSTALLED, UpdateOutcome.ALREADY_INSTALLED,
         ["Flash_Enter", "Flash_Leave"]),
    ],
)  # fmt: skip
def test_a_transfer_that_ends_the_update_ends_it_after_flash(
    transfer: TransferOutcome, outcome: UpdateOutcome, calls: list[str]
) -> None:
    driver, hooks = ScriptedDriver(transfer, CONFIRMED, CONFIRMED), RecordingHooks()
    assert run(driver, hooks)[0] is outcome
    assert driver.steps == ["transfer"]
    assert hooks.calls == calls


def test_a_reverted_test_boot_is_rolled_back_with_the_reboot_error_hooks() -> None:
    driver, hooks = ScriptedDriver(TransferOutcome.STAGED, REVERTED, CONFIRMED), RecordingHooks()
    assert run(driver, hooks)[:2] == (UpdateOutcome.ROLLED_BACK, "reverted to 1.0.0")
    assert hooks.calls == ["Flash_Enter", "Flash_Leave", "Reboot_Enter",
                           "Reboot_Error: reverted to 1.0.0"]  # fmt: skip


def test_a_node_that_reverted_before_the_confirm_is_rolled_back() -> None:
    driver, hooks = ScriptedDriver(TransferOutcome.STAGED, TESTING, REVERTED), RecordingHooks()
    assert run(driver, hooks)[0] is UpdateOutcome.ROLLED_BACK
    assert hooks.calls[-1] == "Commit_Error: reverted to 1.0.0"


def test_a_refused_flash_enter_sends_nothing_and_runs_the_flash_error_hooks() -> None:
    driver = ScriptedDriver(TransferOutcome.STAGED, TESTING, CONFIRMED)
    hooks = RecordingHooks(refuse="Flash_Enter")
    with pytest.raises(HookFailed, match="Flash_Enter_10_x failed"):
        run(driver, hooks)
    assert driver.steps == []
    assert hooks.calls == ["Flash_Enter", "Flash_Error: hook Flash_Enter_10_x failed (exit 1)"]


def test_a_refused_commit_resets_a_node_whose_new_image_is_unconfirmed() -> None:
    driver = ScriptedDriver(TransferOutcome.STAGED, TESTING, CONFIRMED)
    hooks = RecordingHooks(refuse="Commit_Enter")
    with pytest.raises(HookFailed) as refused:
        run(driver, hooks)
    assert str(refused.value) == (
        "hook Commit_Enter_10_x failed (exit 1); the node was reset to revert to its previous image"
    )
    assert driver.steps == ["transfer", "test_boot", "await_boot", "reset"]
    assert hooks.calls[-1] == f"Commit_Error: {refused.value}"


# -- shoal-serial, step by step, on a real node ---------------------------------------------


@pytest.fixture
def imgs() -> Images:
    return images(40 * 1024)


def serial_driver(thread: NodeThread, **options: object) -> ShoalSerialDriver:
    return ShoalSerialDriver(NodePort("n1", thread.path, 2_000_000, "shoal-serial", options))


def test_the_serial_driver_stages_test_boots_and_reports_the_verdict(
    tmp_path: Path, imgs: Images
) -> None:
    with node_on_pty(node_config(tmp_path / "node"), imgs.old) as thread:
        driver = serial_driver(thread)
        found = driver.inventory()
        assert (found.device_type, found.boot_state, found.protocol) == (
            "nrf52840", "confirmed", "shoal-serial/1",
        )  # fmt: skip
        assert found.running is not None and found.running.version == "1.0.0"
        seen: list[InstallProgress] = []
        report = driver.transfer(imgs.new, imgs.new.payload, seen.append)
        assert report.outcome is TransferOutcome.STAGED
        assert report.bytes_sent == imgs.new.manifest.image_size
        assert {p.state for p in seen} == {InstallState.FLASHING, InstallState.VERIFYING}
        # Staged, not booted: the node still runs 1.0.0, and a second transfer sends nothing.
        assert thread.node.running is not None and thread.node.running.version == "1.0.0"
        again = driver.transfer(imgs.new, imgs.new.payload, seen.append)
        assert (again.outcome, again.bytes_sent) == (TransferOutcome.STAGED, 0)
        with pytest.raises(UsageError):
            driver.await_boot(imgs.new)
        driver.test_boot(imgs.new, imgs.new.payload)
        boot = driver.await_boot(imgs.new)
        assert boot == BootOutcome(BootVerdict.NEW_IMAGE, True, "node runs 2.0.0, confirmed")
        assert driver.confirm(imgs.new).verdict is BootVerdict.NEW_IMAGE  # CONFIRM is idempotent
        running = driver.inventory().running
        assert running is not None and running.image_sha256 == imgs.new.manifest.image_digest
        last = driver.transfer(imgs.new, imgs.new.payload, seen.append)
        assert last.outcome is TransferOutcome.ALREADY_INSTALLED


def test_the_serial_driver_reports_a_revert(tmp_path: Path, imgs: Images) -> None:
    config = node_config(tmp_path / "node", fail_self_test=frozenset({"2.0.0"}))
    with node_on_pty(config, imgs.old) as thread:
        driver = serial_driver(thread, reboot_timeout_s=30)
        assert driver.transfer(imgs.new, imgs.new.payload, lambda _: None).outcome is (
            TransferOutcome.STAGED
        )
        driver.test_boot(imgs.new, imgs.new.payload)
        boot = driver.await_boot(imgs.new)
        assert boot.verdict is BootVerdict.REVERTED
        assert boot.reason == "node reverted to 1.0.0 after a failed self-test"


def test_the_serial_driver_refuses_unknown_options() -> None:
    with pytest.raises(DriverOptionError, match=r"nodes.n1.options: unknown option mtu"):
        make_driver(NodePort("n1", "/dev/null", options={"mtu": 512}))
    with pytest.raises(DriverOptionError, match=r"nodes.n1.options.reboot_timeout_s must be"):
        make_driver(NodePort("n1", "/dev/null", options={"reboot_timeout_s": "soon"}))


# -- third-party drivers through a real entry point ------------------------------------------


def doc_example() -> str:
    """The example driver module of docs/drivers-and-hooks.md."""
    text = DOC.read_text()
    found = re.search(r"<!-- example: acme_folder_driver.py -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/drivers-and-hooks.md lost its example driver"
    return found.group(1)


def install(site: Path, dist: str, module: str, code: str, entry_points: str) -> None:
    """What ``pip install`` leaves: a module and a .dist-info naming its entry points."""
    (site / f"{module}.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[shoal.node_drivers]\n{entry_points}\n")


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Two third-party driver packages on sys.path: one good, one that cannot import."""
    site = tmp_path / "site"
    site.mkdir()
    install(site, "acme-folder-driver", "acme_folder_driver", doc_example(),
            "acme-folder = acme_folder_driver:FolderDriver")  # fmt: skip
    install(site, "acme-broken-driver", "acme_broken_driver",
            "raise RuntimeError('this driver needs libacme.so')\n",
            "acme-broken = acme_broken_driver:Driver\nacme-not-a-driver = json:dumps")  # fmt: skip
    monkeypatch.setattr(drivers, "_loaded", {})
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in ("acme_folder_driver", "acme_broken_driver"):
        sys.modules.pop(module, None)


def test_registered_drivers_are_listed_without_importing_them(acme: Path) -> None:
    names = registered_drivers()
    assert {"shoal-serial", "smp", "acme-folder", "acme-broken", "acme-not-a-driver"} <= set(names)
    assert "acme_broken_driver" not in sys.modules and "acme_folder_driver" not in sys.modules
    assert load_driver("acme-folder").__name__ == "FolderDriver"
    assert "acme_broken_driver" not in sys.modules
    with pytest.raises(DriverLoadError) as broken:
        load_driver("acme-broken")
    assert str(broken.value) == (
        "node driver 'acme-broken' (acme_broken_driver:Driver) cannot be loaded: "
        "RuntimeError: this driver needs libacme.so"
    )
    with pytest.raises(DriverLoadError, match=r"'acme-not-a-driver' .* is not a NodeDriver class"):
        load_driver("acme-not-a-driver")
    with pytest.raises(DriverNotFound, match="no node driver 'acme-missing' is registered"):
        load_driver("acme-missing")


def gateway_toml(folder: Path, port: str, site_node: str) -> Path:
    write_keys(folder / "keys")
    write_hook(
        folder / "hooks", "Flash_Enter_10_log",
        f'echo "$SHOAL_NODE $SHOAL_DRIVER $SHOAL_DEVICE_TYPE" >> {folder}/log',
    )  # fmt: skip
    path = folder / "gateway.toml"
    path.write_text(
        f"[gateway]\nid = '{GW}'\ndata_dir = 'gw'\ntrust = ['keys/release.pub']\n"
        "[mqtt]\nhost = '127.0.0.1'\npassword = 'p'\n"
        "[hooks]\ndir = 'hooks'\n"
        f"[nodes.n1]\nport = '{port}'\nbaud = 2000000\n"
        f"{site_node}"
    )
    return path


def finals(orchestra: Orchestra) -> dict[str, dict[str, object]]:
    return {str(s["node"]): s for s in orchestra.status if s["state"] in FINAL_WORDS}


def deploy_both(agent: GatewayAgent, orchestra: Orchestra, artifact: bytes) -> None:
    ref = orchestra.ref(artifact)
    for node in ("n1", "n2"):
        command = orchestra.command(deployment="d1", node=node, artifact=ref)
        orchestra.answer(agent.handle(*command), agent)
    run_until(agent, orchestra, lambda: len(finals(orchestra)) == 2)


def test_a_third_party_driver_registered_by_entry_point_is_picked_per_node(
    tmp_path: Path, imgs: Images, acme: Path
) -> None:
    flash = tmp_path / "n2-flash"
    flash.mkdir()
    path = gateway_toml(
        tmp_path, "PORT",
        f"[nodes.n2]\nport = 'none'\ndriver = 'acme-folder'\n"
        f"[nodes.n2.options]\nfolder = '{flash}'\ndevice_type = 'nrf52840'\n",
    )  # fmt: skip
    with node_on_pty(node_config(tmp_path / "node"), imgs.old) as thread:
        path.write_text(path.read_text().replace("PORT", thread.path))
        agent = GatewayAgent(load_config(path), TRUST)
        try:
            assert type(agent.driver("n1")) is ShoalSerialDriver
            assert type(agent.driver("n2")).__name__ == "FolderDriver"
            orchestra = Orchestra({})
            orchestra.answer([agent.inventory()], agent)
            deploy_both(agent, orchestra, artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
            assert {n: s["state"] for n, s in finals(orchestra).items()} == {
                "n1": "succeeded", "n2": "succeeded",
            }  # fmt: skip
            assert thread.node.running is not None and thread.node.running.version == "2.0.0"
            assert hashlib.sha256((flash / "firmware.bin").read_bytes()).digest() == (
                imgs.new.manifest.image_digest
            )
            assert sorted((tmp_path / "log").read_text().splitlines()) == [
                "n1 shoal-serial nrf52840", "n2 acme-folder nrf52840",
            ]  # fmt: skip
            inventory = fleet.decode_map(agent.inventory()[1], fleet.INVENTORY, "inventory")
            by_node = {n["node"]: n for n in inventory["nodes"]}
            assert by_node["n2"]["primary"]["version"] == "2.0.0"
            assert by_node["n2"]["boot_state"] == "confirmed"
        finally:
            agent.close()


def test_a_driver_that_cannot_load_fails_only_its_own_nodes(
    tmp_path: Path, imgs: Images, acme: Path
) -> None:
    path = gateway_toml(tmp_path, "PORT", "[nodes.n2]\nport = 'none'\ndriver = 'acme-broken'\n")
    with node_on_pty(node_config(tmp_path / "node"), imgs.old) as thread:
        path.write_text(path.read_text().replace("PORT", thread.path))
        config = load_config(path)  # registered: accepted without importing it
        agent = GatewayAgent(config, TRUST)
        try:
            inventory = fleet.decode_map(agent.inventory()[1], fleet.INVENTORY, "inventory")
            by_node = {n["node"]: n for n in inventory["nodes"]}
            assert by_node["n1"]["primary"]["version"] == "1.0.0"
            broken = (
                "node driver 'acme-broken' (acme_broken_driver:Driver) cannot be loaded: "
                "RuntimeError: this driver needs libacme.so"
            )
            assert by_node["n2"]["error"] == broken
            orchestra = Orchestra({})
            deploy_both(agent, orchestra, artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
            result = finals(orchestra)
            assert result["n1"]["state"] == "succeeded"
            assert (result["n2"]["state"], result["n2"]["reason"]) == (
                "failed", f"cannot drive node n2: {broken}",
            )  # fmt: skip
        finally:
            agent.close()


class CrashingDriver(ScriptedDriver):
    """A driver with a bug: its transfer and inventory raise what no driver should."""

    def inventory(self) -> NodeInventory:
        raise KeyError("slot")

    def transfer(
        self, artifact: VerifiedArtifact, image: bytes, progress: ProgressFn
    ) -> TransferReport:
        raise ZeroDivisionError("division by zero")


def test_a_driver_that_crashes_fails_its_job_and_the_gateway_carries_on(
    tmp_path: Path, imgs: Images
) -> None:
    config = GatewayConfig(
        gateway_id=GW, data_dir=tmp_path / "gw", trust=(), mqtt_host="-", mqtt_port=1,
        password="-", nodes=(NodePort("n1", "-", driver="scripted"),),
    )  # fmt: skip
    agent = GatewayAgent(
        config,
        TRUST,
        drivers=lambda _node: CrashingDriver(TransferOutcome.STAGED, TESTING, TESTING),
    )
    try:
        inventory = fleet.decode_map(agent.inventory()[1], fleet.INVENTORY, "inventory")
        assert inventory["nodes"] == [{"node": "n1", "error": "driver crashed: KeyError: 'slot'"}]
        orchestra = Orchestra({})
        ref = orchestra.ref(artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
        orchestra.answer(
            agent.handle(*orchestra.command(deployment="d1", node="n1", artifact=ref)), agent
        )
        run_until(agent, orchestra, lambda: "n1" in finals(orchestra))
        assert finals(orchestra)["n1"]["reason"] == (
            "node driver 'scripted' crashed: ZeroDivisionError: division by zero"
        )
        assert agent.jobs == {}
    finally:
        agent.close()
