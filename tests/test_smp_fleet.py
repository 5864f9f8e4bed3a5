"""One gateway, two node drivers, the whole system: the driver named per node in gateway.toml.

The orchestrator (its SQLite file, its embedded broker) and a gateway loaded
from a real ``gateway.toml`` run in one asyncio loop (``tests/fleet_fixtures.py``).
The gateway has two nodes on real ptys: ``sensor`` speaks Shoal's serial
protocol (the default driver, ``shoal-serial``), ``motor`` is the simulated
node in SMP mode (``driver = "smp"``) trusting one ``imgtool`` Ed25519 key.
Each node gets its own Shoal artifact (signed with Shoal's release key); the
motor's carries an ``imgtool``-signed MCUboot image. The tests act as an
operator does (artifact upload, rollouts, ``rollout.show``, ``deploy.events``,
``devices.show`` over MQTT) and look at the nodes' flash themselves, then
power-cycle the SMP node (a new SmpNode on the same state folder).

Spec: ``docs/drivers-and-hooks.md`` (gateway.toml, the ``smp`` driver's steps),
``docs/smp.md`` §7 (the simulated node), ``docs/rollouts.md`` (retries).
Nothing sleeps: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import load_config
from gateway_proxy.service import run_gateway
from mcu_firmware_stub.bootloader import BootState
from mcu_firmware_stub.flash import FlashTiming
from mcu_firmware_stub.node import SimulatedNode
from mcu_firmware_stub.smp_node import SmpNode, SmpNodeConfig, SmpNodeThread
from otaio.serial_link import PtyLink
from otaproto import mcuboot, smp
from otaproto.artifact import VerifiedArtifact, build_delta_artifact
from shoal.synthetic import evolve, firmware_like
from tests.fleet_fixtures import Fleet, running_fleet
from tests.fleet_process import OperatorSession, wait_for
from tests.node_fixtures import (
    DEVICE,
    KEY,
    TRUST,
    NodeThread,
    artifact_file,
    images,
    make_artifact,
    node_config,
    write_keys,
)
from tests.test_mcuboot import SLOT_BYTES, ImgtoolKeys, sign

#: Every wait; each test takes a few seconds when all is well.
DEADLINE_S = 20.0
#: The SMP node's device type: SMP has no such field, the gateway.toml options give it.
SMP_DEVICE = "stm32f4-motor"
GATEWAY = "gw-mixed"
SENSOR, MOTOR = f"{GATEWAY}/sensor", f"{GATEWAY}/motor"
PAGE_BYTES = 4096
FIRMWARE_BYTES = 24 * 1024


@dataclass(frozen=True)
class McubootImages:
    """imgtool image files (bytes) for the motor."""

    old: bytes  #: 1.0.0, the key the node trusts (its factory image)
    new: bytes  #: 2.0.0, the key the node trusts
    newer: bytes  #: 3.0.0, the key the node trusts
    untrusted: bytes  #: 2.0.0, a key the node does not trust


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ImgtoolKeys:
    return ImgtoolKeys(tmp_path_factory.mktemp("smp-fleet-keys"))


@pytest.fixture(scope="module")
def mcuboot_images(keys: ImgtoolKeys, tmp_path_factory: pytest.TempPathFactory) -> McubootImages:
    work = tmp_path_factory.mktemp("smp-fleet-images")
    old = firmware_like(FIRMWARE_BYTES, seed=31)
    new = evolve(old, seed=32, insert_bytes=512)
    newer = evolve(new, seed=33, insert_bytes=256)
    trusted = keys.path("trusted")
    return McubootImages(
        old=sign(work, old, "1.0.0", trusted),
        new=sign(work, new, "2.0.0", trusted),
        newer=sign(work, newer, "3.0.0", trusted),
        untrusted=sign(work, new, "2.0.0", keys.path("stranger")),
    )


def shoal_artifact(image: bytes, version: str, sequence: int) -> VerifiedArtifact:
    """A Shoal artifact for the motor (signed with Shoal's release key) carrying ``image``."""
    return make_artifact(image, version, sequence, name="motor-app", device_type=SMP_DEVICE)


def smp_config(state_dir: Path, keys: ImgtoolKeys) -> SmpNodeConfig:
    return SmpNodeConfig(
        state_dir=state_dir,
        trust=mcuboot.ImageTrust((keys.trusted("trusted"),)),
        slot_bytes=SLOT_BYTES,
        page_bytes=PAGE_BYTES,
        timing=FlashTiming.off(),
    )


@contextmanager
def smp_node(config: SmpNodeConfig, initial: bytes) -> Iterator[tuple[SmpNodeThread, str]]:
    """The motor on a new pty; yields its thread and the gateway's end of the pty."""
    link = PtyLink()
    thread = SmpNodeThread(SmpNode(config, initial_image=initial), link, name="smp-motor")
    try:
        yield thread, link.path
    finally:
        thread.stop()
        assert thread.error is None, thread.error


def write_gateway_toml(folder: Path, secret: str, port: int, sensor: str, motor: str) -> Path:
    """The gateway's configuration, as an operator writes it: one node per driver."""
    write_keys(folder / "keys")
    path = folder / "gateway.toml"
    path.write_text(
        f"""\
[gateway]
id = "{GATEWAY}"
data_dir = "{GATEWAY}"
trust = ["keys/release.pub"]

[mqtt]
host = "127.0.0.1"
port = {port}
password = {json.dumps(secret)}

[nodes.sensor]              # driver "shoal-serial", the default
port = "{sensor}"
baud = 2000000

[nodes.motor]
port = "{motor}"
driver = "smp"

[nodes.motor.options]
device_type = "{SMP_DEVICE}"
reset_delay_s = 0.05         # the simulated node resets at once
reboot_timeout_s = 10
"""
    )
    return path


@dataclass
class Mixed:
    """The running fleet of a test: its operator session and both nodes."""

    fleet: Fleet
    ops: OperatorSession
    agent: GatewayAgent
    sensor: NodeThread
    motor: SmpNodeThread


@contextmanager
def mixed_fleet(
    tmp_path: Path, keys: ImgtoolKeys, motor_image: bytes, sensor_image: VerifiedArtifact
) -> Iterator[Mixed]:
    """Orchestrator, broker, the gateway of gateway.toml and its two nodes; all stopped after.

    Yields once both nodes have reported their device types. The motor stops
    last (after the gateway that talks to it).
    """
    config = smp_config(tmp_path / "motor", keys)
    with smp_node(config, motor_image) as (motor, motor_path), running_fleet(tmp_path) as fleet:
        ops = OperatorSession(fleet.admin)
        agent: GatewayAgent | None = None
        try:
            secret = ops.request("devices.add", {"id": GATEWAY})["secret"]
            ops.request("devices.accept", {"id": GATEWAY})
            settings = node_config(tmp_path / "sensor")
            sensor = NodeThread(SimulatedNode(settings, initial=sensor_image))
            fleet.nodes[SENSOR] = sensor  # the fleet stops it at the end
            toml = write_gateway_toml(tmp_path, str(secret), fleet.port, sensor.path, motor_path)
            agent = GatewayAgent(load_config(toml), TRUST)
            running = agent
            fleet.loop.start(lambda stop: run_gateway(running, stop))
            wait_for(
                lambda: device_types(ops) == {SENSOR: DEVICE, MOTOR: SMP_DEVICE},
                DEADLINE_S, "the inventory of both nodes", lambda: json.dumps(device_types(ops)),
            )  # fmt: skip
            yield Mixed(fleet, ops, agent, sensor, motor)
        finally:
            if agent is not None:
                agent.close()
            ops.close()


def nodes_shown(ops: OperatorSession) -> dict[str, dict[str, Any]]:
    """``devices.show`` of the gateway, per target."""
    shown = ops.request("devices.show", {"id": GATEWAY})
    return {n["target"]: n for n in shown["nodes"]}


def device_types(ops: OperatorSession) -> dict[str, str | None]:
    return {target: n["device_type"] for target, n in nodes_shown(ops).items()}


def upload(ops: OperatorSession, tmp_path: Path, artifact: VerifiedArtifact, name: str) -> None:
    ops.request("artifact.upload", {"data": artifact_file(tmp_path, artifact, name).read_bytes()})


def rollout_to(ops: OperatorSession, artifact: VerifiedArtifact, device_type: str) -> str:
    """A rollout of ``artifact`` to every node of ``device_type``, without retries; its id."""
    created = ops.request("rollout.create", {
        "artifact": artifact.manifest.image_digest.hex(),
        "target": {"filter": {"device_type": device_type}}, "retries": 0,
    })  # fmt: skip
    return str(created["id"])


def settles(ops: OperatorSession, rollout: str) -> dict[str, Any]:
    """Wait until the rollout has ended and none of its nodes runs; its last ``rollout.show``."""

    def diagnose() -> str:
        shown = ops.request("rollout.show", {"id": rollout})
        nodes = [(n["target"], n["state"], n["attempt"], n["reason"]) for n in shown["nodes"]]
        return f"rollout {shown['state']} ({shown['reason']}); nodes: {nodes}"

    def settled() -> dict[str, Any] | None:
        shown: dict[str, Any] = ops.request("rollout.show", {"id": rollout})
        return shown if shown["settled"] is not None else None

    return wait_for(settled, DEADLINE_S, f"rollout {rollout} settles", diagnose)


def deploys(ops: OperatorSession, artifact: VerifiedArtifact, target: str) -> dict[str, Any]:
    """``deploy.create`` of ``artifact`` to one node; that node's ``deploy.status`` once final."""
    deployment = ops.request(
        "deploy.create", {"artifact": artifact.manifest.image_digest.hex(), "nodes": [target]}
    )["id"]

    def finished() -> dict[str, Any] | None:
        status = ops.request("deploy.status", {"id": deployment})
        return None if status["state"] != "finished" else only_node(status, target)

    return wait_for(finished, DEADLINE_S, f"deployment {deployment} finishes")


def inventoried_since(ops: OperatorSession, deployment: str, target: str) -> bool:
    """True once the orchestrator has recorded an inventory of ``target`` newer than its
    last event in ``deployment`` (the gateway reports one after every job that reached
    the node; until then the gateway may still be talking to it)."""
    events = ops.request("deploy.events", {"id": deployment, "node": target})["events"]
    last_event: float = max(e["at"] for e in events)
    return bool(nodes_shown(ops)[target]["last_seen"] > last_event)


def only_node(shown: dict[str, Any], target: str) -> dict[str, Any]:
    assert [n["target"] for n in shown["nodes"]] == [target], shown["nodes"]
    node: dict[str, Any] = shown["nodes"][0]
    return node


def event_states(ops: OperatorSession, deployment: str, target: str) -> list[str]:
    events = ops.request("deploy.events", {"id": deployment, "node": target})["events"]
    return [str(e["state"]) for e in events]


def slots(node: SmpNode) -> dict[int, smp.ImageSlotState]:
    """The image state the node would answer a client with, per slot."""
    return {s.slot: s for s in node.server.image_states().images}


def image_hash(image: bytes) -> bytes:
    return mcuboot.parse_image(image).hash


def test_one_gateway_updates_a_shoal_serial_node_and_an_smp_node_each_through_its_driver(
    tmp_path: Path, keys: ImgtoolKeys, mcuboot_images: McubootImages
) -> None:
    sensor_images = images(FIRMWARE_BYTES)
    motor_v2 = shoal_artifact(mcuboot_images.new, "2.0.0", 2)
    with mixed_fleet(tmp_path, keys, mcuboot_images.old, sensor_images.old) as mixed:
        ops, motor = mixed.ops, mixed.motor.node
        before = nodes_shown(ops)[MOTOR]
        assert (before["device_type"], before["boot_state"]) == (SMP_DEVICE, "confirmed")
        upload(ops, tmp_path, sensor_images.new, "sensor-v2.art")
        upload(ops, tmp_path, motor_v2, "motor-v2.art")
        # One rollout per device type: the device type the smp driver's options give
        # is what the orchestrator's filter sees.
        rollouts = {
            SENSOR: rollout_to(ops, sensor_images.new, DEVICE),
            MOTOR: rollout_to(ops, motor_v2, SMP_DEVICE),
        }
        for target, rollout in rollouts.items():
            done = settles(ops, rollout)
            assert done["state"] == "completed", (target, done["reason"])
            node = only_node(done, target)
            assert (node["state"], node["attempt"]) == ("succeeded", 0), node
            states = event_states(ops, done["deployment"], target)
            assert {"downloading", "downloaded", "flashing", "rebooting", "succeeded"} <= set(
                states
            ), (target, states)
            if target == MOTOR:  # the smp driver confirms: Shoal's serial node confirms itself
                assert "confirming" in states, states

        # The orchestrator's device list shows what the gateway's inventory says the
        # motor runs: the version, sequence and digest of the artifact it installed.
        def motor_runs_v2() -> dict[str, Any] | None:
            shown = nodes_shown(ops)[MOTOR]
            return shown if shown["primary"] is not None else None

        shown = wait_for(motor_runs_v2, DEADLINE_S, "the motor's inventory after its update")
        assert (shown["device_type"], shown["boot_state"]) == (SMP_DEVICE, "confirmed")
        assert shown["primary"] == {
            "version": "2.0.0", "sequence": 2,
            "digest": hashlib.sha256(mcuboot_images.new).hexdigest(),
            "size": len(mcuboot_images.new),
        }  # fmt: skip
        listed = {
            n["target"]: n for g in ops.request("devices.list", {})["gateways"] for n in g["nodes"]
        }
        assert listed[MOTOR]["primary"] == shown["primary"]
        assert listed[MOTOR]["device_type"] == SMP_DEVICE
        assert listed[SENSOR]["primary"]["version"] == "2.0.0"
        assert listed[SENSOR]["device_type"] == DEVICE

        # The nodes themselves: the sensor runs 2.0.0 (Shoal's bootloader), the motor
        # the new MCUboot image, confirmed, with the old one in slot 1 and nothing pending.
        running = mixed.sensor.node.running
        assert running is not None and running.version == "2.0.0"
        assert running.image_digest == sensor_images.new.manifest.image_digest
        assert motor.bootloader.state is BootState.CONFIRMED
        assert motor.running is not None and str(motor.running.version) == "2.0.0"
        now = slots(motor)
        assert now[0].hash == image_hash(mcuboot_images.new)
        assert (now[0].active, now[0].confirmed, now[0].version) == (True, True, "2.0.0")
        assert now[1].hash == image_hash(mcuboot_images.old)
        assert not (now[1].pending or now[1].confirmed or now[1].active)
        config = motor.config
    # A power cycle (every node was stopped with the fleet): MCUboot boots the new
    # image again, confirmed; no revert.
    rebooted = SmpNode(config)
    try:
        assert rebooted.bootloader.state is BootState.CONFIRMED
        assert rebooted.running is not None and str(rebooted.running.version) == "2.0.0"
        after = slots(rebooted)
        assert after[0].hash == image_hash(mcuboot_images.new)
        assert after[0].active and after[0].confirmed
    finally:
        rebooted.close()


def test_an_mcuboot_image_signed_by_a_key_the_smp_node_does_not_trust_fails_for_good(
    tmp_path: Path, keys: ImgtoolKeys, mcuboot_images: McubootImages
) -> None:
    # Shoal's signature on the artifact is good (the gateway accepts it); the MCUboot
    # image inside is signed by a key the node was not built with.
    stranger = shoal_artifact(mcuboot_images.untrusted, "2.0.0", 2)
    with mixed_fleet(tmp_path, keys, mcuboot_images.old, images(FIRMWARE_BYTES).old) as mixed:
        ops, motor = mixed.ops, mixed.motor.node
        upload(ops, tmp_path, stranger, "motor-stranger.art")
        # A retry is allowed, and nothing trips the rollout: whether the failure is
        # retried is the orchestrator's reading of the gateway's report.
        created = ops.request("rollout.create", {
            "artifact": stranger.manifest.image_digest.hex(), "target": {"nodes": [MOTOR]},
            "retries": 1, "success_threshold": 0,
            "failure_threshold": {"percent": 100, "min_count": 2},
        })  # fmt: skip
        done = settles(ops, created["id"])
        node = only_node(done, MOTOR)
        assert node["state"] == "failed", node
        reason = node["reason"] or ""
        assert "refused the test boot" in reason and "EACCESSDENIED" in reason, reason
        states = event_states(ops, done["deployment"], MOTOR)
        assert "rebooting" in states and "succeeded" not in states, states
        wait_for(
            lambda: inventoried_since(ops, done["deployment"], MOTOR), DEADLINE_S,
            "the motor's inventory after its deployment",
        )  # fmt: skip
        # The node never ran the stranger's image (it was not even reset): it runs its
        # own, confirmed; the upload sits in slot 1, not pending.
        assert motor.resets == 1
        assert motor.bootloader.state is BootState.CONFIRMED
        assert motor.running is not None and str(motor.running.version) == "1.0.0"
        now = slots(motor)
        assert now[0].hash == image_hash(mcuboot_images.old)
        assert now[0].active and now[0].confirmed
        assert now[1].hash == image_hash(mcuboot_images.untrusted) and not now[1].pending
        retried = node["attempt"] != 0 or states.count("pending") != 1
        config = motor.config
    rebooted = SmpNode(config)
    try:
        assert rebooted.bootloader.state is BootState.CONFIRMED
        assert rebooted.running is not None and str(rebooted.running.version) == "1.0.0"
        assert slots(rebooted)[0].hash == image_hash(mcuboot_images.old)
    finally:
        rebooted.close()
    # The refusal is about the image itself, so it is reported "rejected": not retried.
    assert not retried, states


def test_once_the_gateway_installed_an_smp_nodes_image_skips_deltas_and_anti_rollback_apply(
    tmp_path: Path, keys: ImgtoolKeys, mcuboot_images: McubootImages
) -> None:
    # MCUboot tells the smp driver a version and its own hash; Shoal's sequence and
    # the image file's digest the gateway knows only for an image it installed.
    motor_v1 = shoal_artifact(mcuboot_images.old, "1.0.0", 1)
    motor_v2 = shoal_artifact(mcuboot_images.new, "2.0.0", 2)
    motor_v3 = shoal_artifact(mcuboot_images.newer, "3.0.0", 3)
    delta = build_delta_artifact(motor_v2, motor_v3, KEY, created_s=0)
    assert delta.used_delta
    full_v2 = artifact_file(tmp_path, motor_v2, "motor-v2.art").read_bytes()
    with mixed_fleet(tmp_path, keys, mcuboot_images.old, images(FIRMWARE_BYTES).old) as mixed:
        ops, motor = mixed.ops, mixed.motor.node
        for artifact, name in ((motor_v1, "v1"), (motor_v2, "v2"), (motor_v3, "v3")):
            upload(ops, tmp_path, artifact, f"motor-{name}.art")
        ops.request("artifact.upload", {"data": delta.artifact})
        assert nodes_shown(ops)[MOTOR]["primary"] is None  # the factory image: not Shoal's
        first = deploys(ops, motor_v2, MOTOR)
        assert (first["state"], first["mqtt_bytes"]) == ("succeeded", len(full_v2)), first
        wait_for(
            lambda: (nodes_shown(ops)[MOTOR]["primary"] or {}).get("sequence") == 2,
            DEADLINE_S, "the motor's inventory after its update",
        )  # fmt: skip
        mark = (motor.flash.total_write_ops, motor.resets)
        # The same image again: the orchestrator skips the node, nothing is sent.
        again = deploys(ops, motor_v2, MOTOR)
        assert (again["state"], again["reason"]) == ("skipped", "already runs 2.0.0"), again
        assert [e["state"] for e in again["events"]] == ["skipped"]
        # An older sequence: the orchestrator's anti-rollback check refuses it.
        older = deploys(ops, motor_v1, MOTOR)
        assert older["state"] == "incompatible", older
        assert "anti-rollback" in (older["reason"] or ""), older
        assert (motor.flash.total_write_ops, motor.resets) == mark
        # The next version travels as a delta from the image the gateway installed;
        # the gateway rebuilds the whole MCUboot image, the node gets all of it.
        third = deploys(ops, motor_v3, MOTOR)
        assert (third["state"], third["mqtt_bytes"]) == ("succeeded", len(delta.artifact)), third
        assert len(delta.artifact) < len(full_v2) // 4
        shown = wait_for(
            lambda: (p := nodes_shown(ops)[MOTOR]["primary"]) and p["sequence"] == 3 and p,
            DEADLINE_S, "the motor's inventory after its second update",
        )  # fmt: skip
        assert shown["version"] == "3.0.0"
        assert shown["digest"] == hashlib.sha256(mcuboot_images.newer).hexdigest()
        assert motor.bootloader.state is BootState.CONFIRMED
        assert slots(motor)[0].hash == image_hash(mcuboot_images.newer)
        assert slots(motor)[0].confirmed
