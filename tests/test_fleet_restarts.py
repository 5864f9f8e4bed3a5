"""A fleet whose processes crash and come back: every deployment still ends, and nothing twice.

The orchestrator (with its embedded broker), gateways and nodes run as the
processes an operator starts (:mod:`tests.fleet_process`); the tests kill them
with SIGKILL where a crash or power cut would, and check what a user relies
on: the deployment finishes by itself once the process is back, every node
runs the new image, no command is carried out twice, and a restarted gateway
fetches only what it lacks.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from tests.fleet_process import ProcessFleet, process_fleet
from tests.node_fixtures import artifact_file, images

#: At 115200 baud a 48 KiB image takes about 5 s over the serial line: a
#: deployment long enough to crash the orchestrator in the middle of it.
SLOW_BAUD = 115_200
FAST_BAUD = 2_000_000
IMAGE_BYTES = 48 * 1024
#: 17 blocks of 16 KiB: enough to stop a download in the middle.
BIG_IMAGE_BYTES = 256 * 1024
BIG_SLOT_KIB = 320
FINAL = {"succeeded", "failed", "rolled_back", "skipped", "incompatible", "aborted"}
SERIAL_STATES = {"flashing", "verifying", "rebooting"}
#: What ``mcu-sim`` logs once it booted the new image and confirmed it.
CONFIRMED = "self-test of 2.0.0 passed: confirmed"


def finished(fleet: ProcessFleet, deployment: str) -> dict[str, dict[str, Any]] | None:
    """The deployment's nodes once every one is in a final state."""
    nodes = fleet.deployment(deployment)
    return nodes if all(n["state"] in FINAL for n in nodes.values()) else None


def status_seqs(node: dict[str, Any]) -> list[int]:
    """The gateway's status numbers the orchestrator accepted for one node, in order."""
    return [e["detail"]["seq"] for e in node["events"] if "seq" in e["detail"]]


def runs(fleet: ProcessFleet, gateway_id: str, image_digest: str) -> bool:
    """True once every node of the gateway reports that it runs the image ``image_digest``."""
    nodes = fleet.gateway_info(gateway_id)["nodes"]
    running = [n["primary"]["digest"] for n in nodes if n["primary"] is not None]
    expected = len(fleet.gateways[gateway_id].nodes)
    return len(running) == expected and set(running) == {image_digest}


def test_an_orchestrator_killed_mid_deployment_finishes_it_after_a_restart(
    tmp_path: Path,
) -> None:
    imgs = images(IMAGE_BYTES)
    v1 = artifact_file(tmp_path, imgs.old, "v1.art")
    v2 = artifact_file(tmp_path, imgs.new, "v2.art")
    new_digest = imgs.new.manifest.image_digest.hex()
    with process_fleet(tmp_path) as fleet:
        a_nodes = [fleet.start_node("gw-a", n, v1, SLOW_BAUD) for n in ("n1", "n2")]
        b_nodes = [fleet.start_node("gw-b", "n1", v1, FAST_BAUD)]
        fleet.add_gateway("gw-a", a_nodes)
        gw_b = fleet.add_gateway("gw-b", b_nodes)
        gw_a_process = fleet.start_gateway("gw-a")
        fleet.start_gateway("gw-b")
        fleet.ops("artifact.upload", data=v2.read_bytes())
        fleet.wait_inventory("gw-a")
        fleet.wait_inventory("gw-b")
        # gw-b goes away before the deployment: its command stays unacknowledged
        # in the orchestrator's database through the crash.
        assert gw_b.service is not None
        gw_b.service.stop()
        fleet.wait_online("gw-b", online=False)
        deployment = fleet.ops(
            "deploy.create", artifact=new_digest, nodes=["gw-a/n1", "gw-a/n2", "gw-b/n1"]
        )["id"]
        # Both nodes of gw-a share one download, so they flash together; the
        # crash comes while they do, with nothing left to fetch.
        fleet.wait(
            lambda: all(
                n["state"] in SERIAL_STATES
                for target, n in fleet.deployment(deployment).items()
                if target.startswith("gw-a/")
            ),
            "the nodes of gw-a flashing",
        )
        assert fleet.orchestrator is not None
        fleet.orchestrator.kill()
        # The nodes finish while the orchestrator is down, so their last word has
        # to cross the gateway's reconnect.
        for node in a_nodes:
            fleet.wait(partial(node.said, CONFIRMED), f"gw-a/{node.name} to confirm 2.0.0")

        fleet.start_orchestrator()  # the same data folder and port
        assert fleet.gateway_info("gw-b")["unacked_commands"] == 1
        fleet.start_gateway("gw-b")
        nodes = fleet.wait(lambda: finished(fleet, deployment), "the deployment to finish")

        assert {target: n["state"] for target, n in nodes.items()} == {
            "gw-a/n1": "succeeded",
            "gw-a/n2": "succeeded",
            "gw-b/n1": "succeeded",
        }
        # gw-a came back by itself: the same process, reconnected.
        assert gw_a_process.running
        assert fleet.gateway_info("gw-a")["online"] is True
        for gateway_id in ("gw-a", "gw-b"):
            fleet.wait(partial(runs, fleet, gateway_id, new_digest), f"{gateway_id} on 2.0.0")
        # Every command carried out once: the gateways handled exactly the
        # commands issued to them (gw-b's reached it only after the restart) and
        # none is left unacknowledged; reports repeated across the reconnect
        # were taken once.
        for gateway_id, issued in (("gw-a", 2), ("gw-b", 1)):
            state = fleet.gateways[gateway_id].agent_state()
            assert (state["handled_seq"], state["jobs"]) == (issued, [])
            assert fleet.gateway_info(gateway_id)["unacked_commands"] == 0
        for target, status in nodes.items():
            seqs = status_seqs(status)
            assert seqs == sorted(set(seqs)), (target, seqs)
            assert [e["state"] for e in status["events"]].count("succeeded") == 1, target


def test_a_gateway_killed_mid_download_fetches_only_the_blocks_it_lacked(tmp_path: Path) -> None:
    imgs = images(BIG_IMAGE_BYTES)
    v1 = artifact_file(tmp_path, imgs.old, "v1.art")
    v2 = artifact_file(tmp_path, imgs.new, "v2.art").read_bytes()
    with process_fleet(tmp_path) as fleet:
        node = fleet.start_node("gw-a", "n1", v1, FAST_BAUD, slot_kib=BIG_SLOT_KIB)
        relay = fleet.relay()
        gateway = fleet.add_gateway("gw-a", [node], port=relay.port)
        fleet.start_gateway("gw-a")
        stored = fleet.ops("artifact.upload", data=v2)
        blocks = -(-len(v2) // stored["block_bytes"])
        fleet.wait_inventory("gw-a")
        # The broker's bytes stop after two and a half blocks: the download stalls
        # in the middle, however fast this machine is.
        relay.hold_after(stored["block_bytes"] * 5 // 2)
        deployment = fleet.ops("deploy.create", artifact=stored["digest"], nodes=["gw-a/n1"])["id"]
        fleet.wait(lambda: gateway.blocks_on_disk(v2)[0] > 0, "the first blocks on the gateway")
        assert gateway.service is not None
        gateway.service.kill()
        had, total = gateway.blocks_on_disk(v2)
        assert 0 < had < total == blocks
        fleet.wait_online("gw-a", online=False)
        served_before = fleet.deployment(deployment)["gw-a/n1"]["blocks_served"]

        relay.release()
        fleet.start_gateway("gw-a")
        nodes = fleet.wait(lambda: finished(fleet, deployment), "the deployment to finish")

        result = nodes["gw-a/n1"]
        assert result["state"] == "succeeded", result["reason"]
        # Only the blocks missing from the bitmap crossed MQTT again, and the
        # gateway counts every block of the artifact once.
        assert result["blocks_served"] - served_before == blocks - had
        assert result["mqtt_bytes"] == len(v2)
        new_digest = imgs.new.manifest.image_digest.hex()
        fleet.wait(lambda: runs(fleet, "gw-a", new_digest), "gw-a/n1 on 2.0.0")


def test_a_gateway_that_was_offline_gets_its_command_when_it_returns(tmp_path: Path) -> None:
    imgs = images(IMAGE_BYTES)
    v1 = artifact_file(tmp_path, imgs.old, "v1.art")
    v2 = artifact_file(tmp_path, imgs.new, "v2.art")
    new_digest = imgs.new.manifest.image_digest.hex()
    with process_fleet(tmp_path) as fleet:
        fleet.add_gateway("gw-on", [fleet.start_node("gw-on", "n1", v1, FAST_BAUD)])
        away = fleet.add_gateway("gw-away", [fleet.start_node("gw-away", "n1", v1, FAST_BAUD)])
        fleet.start_gateway("gw-on")
        away_process = fleet.start_gateway("gw-away")
        fleet.ops("artifact.upload", data=v2.read_bytes())
        fleet.wait_inventory("gw-on")
        fleet.wait_inventory("gw-away")
        away_process.stop()  # a clean shutdown: it says it is offline
        fleet.wait_online("gw-away", online=False)

        deployment = fleet.ops(
            "deploy.create", artifact=new_digest, nodes=["gw-on/n1", "gw-away/n1"]
        )["id"]
        # gw-on's part finishing shows the orchestrator sent every command it
        # could; the one for the absent gateway waits, unsent and unacknowledged.
        fleet.wait(
            lambda: fleet.deployment(deployment)["gw-on/n1"]["state"] == "succeeded",
            "gw-on/n1 to succeed",
        )
        waiting = fleet.deployment(deployment)["gw-away/n1"]
        assert waiting["state"] == "pending"
        assert [e["state"] for e in waiting["events"]] == ["pending"]
        info = fleet.gateway_info("gw-away")
        assert (info["online"], info["unacked_commands"]) == (False, 1)

        fleet.start_gateway("gw-away")
        nodes = fleet.wait(lambda: finished(fleet, deployment), "the deployment to finish")

        assert {t: n["state"] for t, n in nodes.items()} == {
            "gw-on/n1": "succeeded",
            "gw-away/n1": "succeeded",
        }
        assert away.agent_state()["handled_seq"] == 1
        assert fleet.gateway_info("gw-away")["unacked_commands"] == 0
        fleet.wait(lambda: runs(fleet, "gw-away", new_digest), "gw-away/n1 on 2.0.0")
