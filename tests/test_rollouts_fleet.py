"""Rollouts over a whole fleet: orchestrator + embedded broker, gateways, simulated nodes on ptys.

Each test drives the operator API over MQTT, as the CLI and ``mosquitto_pub``
do, and checks the nodes themselves at the end. Waiting is polling with a
deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.service import run_gateway
from mcu_firmware_stub.flash import FlashTiming
from mcu_firmware_stub.node import SimulatedNode
from otaproto.artifact import VerifiedArtifact
from otaproto.keys import SigningKey, TrustedKeys
from shoal.opsclient import OperatorError, OperatorLogin, call
from tests.fleet_fixtures import Fleet, running_fleet
from tests.node_fixtures import (
    DEVICE,
    TRUST,
    NodeThread,
    artifact_file,
    images,
    make_artifact,
    node_config,
)

DEADLINE_S = 45.0
OTHER_KEY = SigningKey.from_ed25519_seed(bytes(range(7, 39)))


def wait_for(what: str, check: Any, timeout_s: float = DEADLINE_S) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` at the deadline."""
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.1)):
        value = check()
        if value:
            return value
        pause.wait(0.1)
    raise AssertionError(f"{what}: not reached within {timeout_s:g} s")


@dataclass
class Gateway:
    """A gateway service of the in-process fleet that a test may stop and start again."""

    fleet: Fleet
    config: GatewayConfig
    stop: asyncio.Event | None = None

    def start(self) -> None:
        agent = GatewayAgent(self.config, TRUST)  # a restart: everything it knew is on disk
        self.stop = self.fleet.loop.start(lambda stop: run_gateway(agent, stop))

    def halt(self) -> None:
        assert self.stop is not None
        self.fleet.loop.stop_one(self.stop)  # a clean stop: it says it is offline
        self.stop = None


def add_gateway(
    fleet: Fleet, tmp_path: Path, gateway_id: str, nodes: list[str], initial: VerifiedArtifact,
    node_overrides: dict[str, dict[str, Any]] | None = None,
) -> Gateway:  # fmt: skip
    """Register, accept and start a gateway with simulated nodes (like Fleet.add_gateway)."""
    secret = fleet.ops("devices.add", id=gateway_id)["secret"]
    fleet.ops("devices.accept", id=gateway_id)
    ports = []
    for name in nodes:
        settings = node_config(
            tmp_path / f"{gateway_id}-{name}", **(node_overrides or {}).get(name, {})
        )
        thread = NodeThread(SimulatedNode(settings, initial=initial))
        fleet.nodes[f"{gateway_id}/{name}"] = thread
        ports.append(NodePort(name, thread.path, 2_000_000))
    config = GatewayConfig(
        gateway_id=gateway_id, data_dir=tmp_path / gateway_id, trust=(), mqtt_host="127.0.0.1",
        mqtt_port=fleet.port, password=str(secret), nodes=tuple(ports),
    )  # fmt: skip
    gateway = Gateway(fleet, config)
    gateway.start()
    return gateway


def inventoried(fleet: Fleet, count: int) -> bool:
    """True once ``count`` nodes have reported their device type."""
    gateways = fleet.ops("devices.list")["gateways"]
    return sum(1 for g in gateways for n in g["nodes"] if n["device_type"]) >= count


def settled(fleet: Fleet, rollout: str) -> dict[str, Any] | None:
    shown: dict[str, Any] = fleet.ops("rollout.show", id=rollout)
    return shown if shown["settled"] is not None else None


def node_states(shown: dict[str, Any]) -> dict[str, str]:
    return {n["target"]: n["state"] for n in shown["nodes"]}


def running_version(fleet: Fleet, target: str) -> str | None:
    running = fleet.nodes[target].node.running
    return None if running is None else running.version


def test_a_three_phase_rollout_completes_and_a_viewer_cannot_start_one(tmp_path: Path) -> None:
    imgs = images(24 * 1024)
    with running_fleet(tmp_path) as fleet:
        fleet.ops("artifact.upload", data=artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
        layout = {"gw-a": ["n1", "n2"], "gw-b": ["n1", "n2"], "gw-c": ["n1"]}
        for gateway_id, nodes in layout.items():
            add_gateway(fleet, tmp_path, gateway_id, nodes, imgs.old)
        wait_for("inventory of 5 nodes", lambda: inventoried(fleet, 5))
        viewer = fleet.ops("operators.add", id="val", role="viewer")
        login = OperatorLogin("127.0.0.1", fleet.port, "val", viewer["secret"])
        request = {
            "artifact": imgs.new.manifest.image_digest.hex(),
            "target": {"filter": {"device_type": DEVICE}}, "phases": "1,50%,100%",
        }  # fmt: skip
        with pytest.raises(OperatorError, match=r"operator val \(viewer\) may not rollout.create"):
            call(login, "rollout.create", request, timeout_s=15)
        assert call(login, "rollout.list", {}, timeout_s=15) == {"rollouts": []}
        created = fleet.ops("rollout.create", **request)
        assert [p["size"] for p in created["phases"]] == [1, 2, 2]
        shown = wait_for("the rollout settles", lambda: settled(fleet, created["id"]))
        assert shown["state"] == "completed", shown["reason"]
        assert set(node_states(shown).values()) == {"succeeded"}
        assert all(running_version(fleet, t) == "2.0.0" for t in fleet.nodes)
        # Each phase started only after the one before it had passed.
        passed_at = {e["event"]: e["at"] for e in shown["events"]}
        first_event = {
            n["target"]: fleet.ops("deploy.events", id=shown["deployment"], node=n["target"])[
                "events"][0]["at"]
            for n in shown["nodes"]
        }  # fmt: skip
        phase_of = {n["target"]: n["phase"] for n in shown["nodes"]}
        for target, at in first_event.items():
            if phase_of[target] > 1:
                assert at >= passed_at[f"phase {phase_of[target] - 1} passed"], target
        # The client asked operators.check first (the broker drops a viewer's write
        # request), so the refusal in the audit log is the check's, naming rollout.create.
        refused = fleet.ops("audit.list", operator="val")["entries"]
        assert [(e["op"], e["args"], e["ok"]) for e in refused] == [
            ("rollout.list", {"limit": None, "state": None}, True),
            ("operators.check", {"op": "rollout.create"}, False),
        ]  # fmt: skip


def test_a_failing_canary_pauses_the_rollout_before_phase_two_and_resuming_completes_it(
    tmp_path: Path,
) -> None:
    imgs = images(24 * 1024)
    with running_fleet(tmp_path) as fleet:
        fleet.ops("artifact.upload", data=artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
        bad = {"n1": {"fail_self_test": frozenset({"2.0.0"})}}
        add_gateway(fleet, tmp_path, "gw-a", ["n1", "n2"], imgs.old, node_overrides=bad)
        add_gateway(fleet, tmp_path, "gw-b", ["n1", "n2"], imgs.old)
        wait_for("inventory of 4 nodes", lambda: inventoried(fleet, 4))
        created = fleet.ops(
            "rollout.create", artifact=imgs.new.manifest.image_digest.hex(),
            target={"filter": {}}, phases="1,100%",
        )  # fmt: skip
        paused = wait_for(
            "the rollout pauses",
            lambda: (s := fleet.ops("rollout.show", id=created["id"]))["state"] == "paused" and s,
        )
        assert paused["reason"].startswith("failure threshold: 1 of 1 nodes of phase 1 failed")
        assert node_states(paused)["gw-a/n1"] == "rolled_back"
        assert paused["phases"][1]["counts"] == {"waiting": 3}  # phase two never started
        assert running_version(fleet, "gw-a/n1") == "1.0.0"
        assert [running_version(fleet, t) for t in ("gw-a/n2", "gw-b/n1", "gw-b/n2")] == [
            "1.0.0"
        ] * 3
        resumed = fleet.ops("rollout.resume", id=created["id"])
        assert resumed["state"] == "running"
        shown = wait_for("the rollout settles", lambda: settled(fleet, created["id"]))
        assert shown["state"] == "completed"
        assert shown["counts"] == {"succeeded": 3, "rolled_back": 1}
        assert [running_version(fleet, t) for t in ("gw-a/n2", "gw-b/n1", "gw-b/n2")] == [
            "2.0.0"
        ] * 3
        assert running_version(fleet, "gw-a/n1") == "1.0.0"


def test_an_aborted_rollout_leaves_every_node_on_a_valid_image(tmp_path: Path) -> None:
    imgs = images(24 * 1024)
    slow = {"timing": FlashTiming(page_erase_s=0.03, word_write_s=5e-6)}  # flashes take a while
    with running_fleet(tmp_path) as fleet:
        fleet.ops("artifact.upload", data=artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
        for gateway_id in ("gw-a", "gw-b"):
            nodes = ["n1", "n2", "n3"]
            add_gateway(fleet, tmp_path, gateway_id, nodes, imgs.old, {n: slow for n in nodes})
        wait_for("inventory of 6 nodes", lambda: inventoried(fleet, 6))
        created = fleet.ops(
            "rollout.create", artifact=imgs.new.manifest.image_digest.hex(),
            target={"filter": {}}, max_parallel=3,
        )  # fmt: skip
        installing = {"downloaded", "flashing", "verifying", "rebooting", "succeeded"}

        def being_flashed() -> set[str]:
            shown = fleet.ops("rollout.show", id=created["id"])
            return installing & set(node_states(shown).values())

        wait_for("a node is being flashed", being_flashed)
        aborted = fleet.ops("rollout.abort", id=created["id"])
        assert aborted["state"] == "aborted" and aborted["reason"] == "aborted by admin"
        shown = wait_for("the rollout settles", lambda: settled(fleet, created["id"]))
        ends = node_states(shown)
        assert set(ends.values()) <= {"succeeded", "aborted", "not_started"}, ends
        assert list(ends.values()).count("not_started") >= 3  # no new work after the abort
        assert "succeeded" in ends.values()  # a flash under way was allowed to finish
        expected = {"1.0.0": imgs.old, "2.0.0": imgs.new}
        for target, thread in fleet.nodes.items():
            running = thread.node.running  # valid: signature and image digest check out
            assert running is not None, f"{target} has no valid image"
            assert running.version == ("2.0.0" if ends[target] == "succeeded" else "1.0.0")
            image = thread.node.bootloader.image_bytes(running.slot)
            digest = expected[running.version].manifest.image_digest
            assert hashlib.sha256(image).digest() == digest, target


def test_an_offline_gateway_is_retried_and_a_rejected_artifact_is_not(tmp_path: Path) -> None:
    imgs = images(24 * 1024)
    # gw-rej's node trusts another release key: it runs v1 signed with that key and
    # refuses the real v2 (the node checks signatures itself), a rejection.
    distrustful = {"n1": {"trusted": TrustedKeys([OTHER_KEY.public_key])}}
    other_v1 = make_artifact(imgs.old.rebuild_image(), "1.0.0", 1, key=OTHER_KEY)
    with running_fleet(tmp_path) as fleet:
        fleet.ops("artifact.upload", data=artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
        away = add_gateway(fleet, tmp_path, "gw-away", ["n1"], imgs.old)
        add_gateway(fleet, tmp_path, "gw-rej", ["n1"], other_v1, node_overrides=distrustful)
        wait_for("inventory of 2 nodes", lambda: inventoried(fleet, 2))
        away.halt()
        wait_for(
            "gw-away offline",
            lambda: not fleet.ops("devices.show", id="gw-away")["online"],
        )
        created = fleet.ops(
            "rollout.create", artifact=imgs.new.manifest.image_digest.hex(),
            target={"nodes": ["gw-away/n1", "gw-rej/n1"]}, retries=5, timeouts={"pending": 1},
            success_threshold=50, failure_threshold={"percent": 100, "min_count": 2},
        )  # fmt: skip
        deployment = created["deployment"]

        def events(target: str) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = fleet.ops("deploy.events", id=deployment, node=target)[
                "events"
            ]
            return found

        wait_for(
            "gw-away/n1 times out",
            lambda: any(e["state"] == "timed_out" for e in events("gw-away/n1")),
        )
        away.start()
        shown = wait_for("the rollout settles", lambda: settled(fleet, created["id"]))
        assert shown["state"] == "completed", shown["reason"]
        nodes = {n["target"]: n for n in shown["nodes"]}
        assert nodes["gw-away/n1"]["state"] == "succeeded" and nodes["gw-away/n1"]["attempt"] >= 1
        assert running_version(fleet, "gw-away/n1") == "2.0.0"
        assert nodes["gw-rej/n1"]["state"] == "failed" and nodes["gw-rej/n1"]["attempt"] == 0
        assert "refused" in (nodes["gw-rej/n1"]["reason"] or "")
        assert [e["state"] for e in events("gw-rej/n1")].count("pending") == 1  # never retried
        assert "timed_out" in [e["state"] for e in events("gw-away/n1")]
