"""The MQTT path end to end: orchestrator + embedded broker, a gateway, simulated nodes on ptys."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from otaproto.artifact import build_delta_artifact
from tests.fleet_fixtures import running_fleet
from tests.node_fixtures import KEY, artifact_file, images

FINAL = {"succeeded", "failed", "rolled_back", "skipped", "incompatible", "aborted"}


def wait_for(check: Any, timeout_s: float = 60.0) -> Any:
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.2)):
        value = check()
        if value:
            return value
        pause.wait(0.2)
    raise AssertionError("condition not reached in time")


def node_states(status: Any) -> dict[str, str]:
    nodes = status["nodes"] if isinstance(status, dict) else status
    return {f"{n['gateway']}/{n['node']}": n["state"] for n in nodes}


def test_a_deployment_reaches_every_node_using_deltas_where_the_base_is_known(
    tmp_path: Path,
) -> None:
    imgs = images(40 * 1024)
    delta = build_delta_artifact(imgs.old, imgs.new, KEY, created_s=0).artifact
    full_new = artifact_file(tmp_path, imgs.new, "v2.art").read_bytes()
    full_old = artifact_file(tmp_path, imgs.old, "v1.art").read_bytes()
    with running_fleet(tmp_path) as fleet:
        for data in (full_old, full_new, delta):
            fleet.ops("artifact.upload", data=data)
        # gw-a flashed v1 itself before (it has the base); gw-b did not.
        fleet.add_gateway("gw-a", ["n1", "n2"], tmp_path, imgs.old, seed_images=(imgs.old.payload,))
        fleet.add_gateway("gw-b", ["n1"], tmp_path, imgs.old)
        wait_for(lambda: all(
            n.get("primary")
            for g in ("gw-a", "gw-b")
            for n in fleet.ops("devices.show", id=g)["nodes"]
        ))  # fmt: skip
        target = imgs.new.manifest.image_digest.hex()
        deployment = fleet.ops(
            "deploy.create", artifact=target, nodes=["gw-a/n1", "gw-a/n2", "gw-b/n1"]
        )
        deployment_id = deployment["id"] if isinstance(deployment, dict) else deployment
        status = wait_for(lambda: (s := fleet.ops("deploy.status", id=deployment_id))
                          and set(node_states(s).values()) <= FINAL and s)  # fmt: skip
        assert node_states(status) == {
            "gw-a/n1": "succeeded",
            "gw-a/n2": "succeeded",
            "gw-b/n1": "succeeded",
        }
        for node in fleet.nodes.values():
            assert node.node.running is not None and node.node.running.version == "2.0.0"


def deployment_nodes(status: Any) -> dict[str, dict[str, Any]]:
    nodes = status["nodes"] if isinstance(status, dict) else status
    return {f"{n['gateway']}/{n['node']}": n for n in nodes}


def test_deltas_cross_mqtt_only_where_the_gateway_has_the_base(tmp_path: Path) -> None:
    imgs = images(56 * 1024)
    delta = build_delta_artifact(imgs.old, imgs.new, KEY, created_s=0).artifact
    full_new = artifact_file(tmp_path, imgs.new, "v2.art").read_bytes()
    with running_fleet(tmp_path) as fleet:
        for data in (artifact_file(tmp_path, imgs.old, "v1.art").read_bytes(), full_new, delta):
            fleet.ops("artifact.upload", data=data)
        fleet.add_gateway("gw-a", ["n1"], tmp_path, imgs.old, seed_images=(imgs.old.payload,))
        fleet.add_gateway("gw-b", ["n1"], tmp_path, imgs.old)
        wait_for(lambda: all(
            n.get("primary")
            for g in ("gw-a", "gw-b")
            for n in fleet.ops("devices.show", id=g)["nodes"]
        ))  # fmt: skip
        created = fleet.ops("deploy.create", artifact=imgs.new.manifest.image_digest.hex(),
                            nodes=["gw-a/n1", "gw-b/n1"])  # fmt: skip
        deployment_id = created["id"] if isinstance(created, dict) else created
        status = wait_for(lambda: (s := fleet.ops("deploy.status", id=deployment_id))
                          and set(node_states(s).values()) <= FINAL and s)  # fmt: skip
        nodes = deployment_nodes(status)
        assert {k: v["state"] for k, v in nodes.items()} == {
            "gw-a/n1": "succeeded",
            "gw-b/n1": "succeeded",
        }
        assert nodes["gw-a/n1"]["mqtt_bytes"] == len(delta) < len(full_new) // 4
        assert nodes["gw-b/n1"]["mqtt_bytes"] == len(full_new)


def test_one_nodes_failure_does_not_stop_the_others(tmp_path: Path) -> None:
    imgs = images(24 * 1024)
    with running_fleet(tmp_path) as fleet:
        fleet.ops("artifact.upload", data=artifact_file(tmp_path, imgs.new, "v2.art").read_bytes())
        fleet.add_gateway(
            "gw-a", ["good", "bad"], tmp_path, imgs.old,
            node_overrides={"bad": {"fail_self_test": frozenset({"2.0.0"})}},
        )  # fmt: skip
        wait_for(
            lambda: all(n.get("primary") for n in fleet.ops("devices.show", id="gw-a")["nodes"])
        )
        created = fleet.ops("deploy.create", artifact=imgs.new.manifest.image_digest.hex(),
                            nodes=["gw-a/good", "gw-a/bad"])  # fmt: skip
        deployment_id = created["id"] if isinstance(created, dict) else created
        status = wait_for(lambda: (s := fleet.ops("deploy.status", id=deployment_id))
                          and set(node_states(s).values()) <= FINAL and s)  # fmt: skip
        nodes = deployment_nodes(status)
        assert nodes["gw-a/good"]["state"] == "succeeded"
        assert nodes["gw-a/bad"]["state"] == "rolled_back"
        assert "self-test" in nodes["gw-a/bad"]["reason"]
        bad = fleet.nodes["gw-a/bad"].node.running
        assert bad is not None and bad.version == "1.0.0"

