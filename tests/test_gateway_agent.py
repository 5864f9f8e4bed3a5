"""The gateway agent's core against real nodes on ptys; the test plays the orchestrator."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from mcu_firmware_stub.node import SimulatedNode
from otaproto import fleet
from otaproto import topics as t
from otaproto.artifact import build_delta_artifact, build_full_artifact, verify_artifact
from otaproto.keys import SigningKey, TrustedKeys
from tests.node_fixtures import KEY, TRUST, Images, NodeThread, artifact_file, images, node_config

GW = "gw-1"
BLOCK = 4096


class Orchestra:
    """The orchestrator's side of the conversation, played by the test."""

    def __init__(self, artifacts: dict[bytes, bytes]) -> None:
        self.artifacts = artifacts
        self.seq = 0
        self.status: list[dict[str, object]] = []
        self.fetched: list[int] = []
        self.acks: list[int] = []

    def ref(self, data: bytes, kind: str = "full", base: bytes | None = None) -> dict[str, object]:
        digest = hashlib.sha256(data).digest()
        self.artifacts[digest] = data
        return fleet.ArtifactRef(digest, len(data), BLOCK, kind, base).to_map()

    def command(self, **fields: object) -> tuple[str, bytes]:
        self.seq += 1
        body = {"seq": self.seq, "type": "deploy", **fields}
        return t.gateway_down(GW, t.Down.COMMAND), fleet.encode_map(body)

    def answer(
        self, outgoing: list[tuple[str, bytes]], agent: GatewayAgent, drop: set[int] | None = None
    ) -> None:
        """Answer the agent's messages, recursively, as the orchestrator would."""
        pending = list(outgoing)
        while pending:
            topic, payload = pending.pop(0)
            kind = t.parse(topic)
            assert kind is not None and kind.owner == GW
            if kind.kind == "status":
                self.status.append(fleet.decode_map(payload, fleet.STATUS, "status"))
            elif kind.kind == "ack":
                self.acks.append(fleet.decode_map(payload, fleet.ACK, "ack")["seq"])
            elif kind.kind == "fetch":
                digest, blocks = fleet.decode_fetch(payload)
                data = self.artifacts[digest]
                for index in blocks:
                    self.fetched.append(index)
                    if drop and index in drop:
                        drop.discard(index)
                        continue
                    block = {"artifact": digest, "index": index,
                             "data": data[index * BLOCK : (index + 1) * BLOCK]}  # fmt: skip
                    pending.extend(
                        agent.handle(t.gateway_down(GW, t.Down.BLOCK), fleet.encode_map(block))
                    )

    def final(self) -> dict[str, object]:
        return self.status[-1]


@pytest.fixture
def imgs() -> Images:
    return images(40 * 1024)


@pytest.fixture
def node(tmp_path: Path, imgs: Images) -> Iterator[NodeThread]:
    thread = NodeThread(SimulatedNode(node_config(tmp_path / "node"), initial=imgs.old))
    yield thread
    thread.stop()


def agent_for(tmp_path: Path, node: NodeThread, trusted: TrustedKeys = TRUST) -> GatewayAgent:
    config = GatewayConfig(
        gateway_id=GW, data_dir=tmp_path / "gw", trust=(), mqtt_host="-", mqtt_port=1,
        password="-", nodes=(NodePort("n1", node.path, 2_000_000),),
    )  # fmt: skip
    return GatewayAgent(config, trusted)


def run_until_final(
    agent: GatewayAgent, orchestra: Orchestra, timeout_s: float = 60
) -> dict[str, object]:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        orchestra.answer(agent.tick(), agent)
        if orchestra.status and orchestra.final()["state"] in (
            "succeeded", "failed", "rolled_back", "already_installed", "rejected", "aborted",
        ):  # fmt: skip
            return orchestra.final()
        done.wait(0.05)
    raise AssertionError(f"no final state: {orchestra.status}")


def full_bytes(art_path: Path) -> bytes:
    return art_path.read_bytes()


def test_a_deploy_command_downloads_verifies_and_flashes(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    agent = agent_for(tmp_path, node)
    hello = dict(fleet.decode_map(agent.connected()[1][1], fleet.HELLO, "hello"))
    assert hello["handled_seq"] == 0 and hello["nodes"] == ["n1"]
    inventory = fleet.decode_map(agent.inventory()[1], fleet.INVENTORY, "inventory")
    assert inventory["nodes"][0]["primary"]["version"] == "1.0.0"
    orchestra = Orchestra({})
    new = full_bytes(artifact_file(tmp_path, imgs.new, "v2.art"))
    deploy = orchestra.command(deployment="d1", node="n1", artifact=orchestra.ref(new))
    orchestra.answer(agent.handle(*deploy), agent)
    assert orchestra.acks == [1]
    final = run_until_final(agent, orchestra)
    assert final["state"] == "succeeded", final
    states = [s["state"] for s in orchestra.status]
    assert states[0] == "downloading" and "downloaded" in states and "flashing" in states
    assert [s["seq"] for s in orchestra.status] == list(range(1, len(states) + 1))
    assert final["mqtt_bytes"] == len(new)
    assert node.node.running is not None and node.node.running.version == "2.0.0"
    # A repeated command is acknowledged again and not done again.
    orchestra.answer(agent.handle(*deploy), agent)
    assert orchestra.acks == [1, 1]
    assert agent.jobs == {}


def test_a_restarted_gateway_fetches_only_the_missing_blocks(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    new = full_bytes(artifact_file(tmp_path, imgs.new, "v2.art"))
    blocks = -(-len(new) // BLOCK)
    first = agent_for(tmp_path, node)
    orchestra = Orchestra({})
    ref = orchestra.ref(new)
    orchestra.answer(
        first.handle(*orchestra.command(deployment="d1", node="n1", artifact=ref)), first
    )
    # The first FETCH asks for 8 blocks; half of them get lost, then the gateway dies.
    orchestra.answer(first.tick(), first, drop={4, 5, 6, 7})
    got_before = set(orchestra.fetched) - {4, 5, 6, 7}
    del first
    second = agent_for(tmp_path, node)
    assert second.handled_seq == 1 and list(second.jobs) == ["d1/n1"]
    orchestra.fetched.clear()
    final = run_until_final(second, orchestra)
    assert final["state"] == "succeeded"
    assert set(orchestra.fetched) == set(range(blocks)) - got_before


def test_a_delta_is_used_when_the_base_is_here_else_the_full_artifact(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    delta = build_delta_artifact(imgs.old, imgs.new, KEY, created_s=0).artifact
    assert verify_artifact(delta, TRUST).manifest.is_delta
    full = full_bytes(artifact_file(tmp_path, imgs.new, "v2.art"))
    agent = agent_for(tmp_path, node)
    orchestra = Orchestra({})
    d_ref = orchestra.ref(delta, "bsdiff4", imgs.old.manifest.image_digest)
    f_ref = orchestra.ref(full)
    orchestra.answer(
        agent.handle(*orchestra.command(deployment="d1", node="n1", artifact=d_ref, full=f_ref)),
        agent,
    )
    assert run_until_final(agent, orchestra)["state"] == "succeeded"
    assert orchestra.final()["mqtt_bytes"] == len(full)  # no base on this gateway: the full one
    # What it flashed is now a base for the next delta.
    assert agent.image_digest_ok(imgs.new.manifest.image_digest)


def test_an_artifact_from_an_unknown_key_is_refused_before_flashing(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    stranger = SigningKey.from_ed25519_seed(bytes(range(9, 41)))
    evil = build_full_artifact(
        imgs.new.payload, name="x", version="9", sequence=9, device_types=("nrf52840",),
        key=stranger, created_s=0,
    )  # fmt: skip
    agent = agent_for(tmp_path, node)
    orchestra = Orchestra({})
    orchestra.answer(
        agent.handle(*orchestra.command(deployment="d1", node="n1", artifact=orchestra.ref(evil))),
        agent,
    )
    final = run_until_final(agent, orchestra)
    assert final["state"] == "failed"
    assert "unknown key id" in str(final["reason"])
    assert node.node.running is not None and node.node.running.version == "1.0.0"


@pytest.mark.parametrize("kind", ["cmd", "block", "error"])
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",
        b"garbage",
        fleet.encode_map({"seq": "x"}),
        fleet.encode_map({"unknown": 1}),
        b"\xa1\x63seq" + b"\x1b" + b"\xff" * 8,
        b"\x00" * 200_000,
    ],
)
def test_garbage_on_every_down_topic_changes_nothing(
    tmp_path: Path, node: NodeThread, kind: str, payload: bytes
) -> None:
    agent = agent_for(tmp_path, node)
    before = (agent.handled_seq, dict(agent.jobs))
    assert agent.handle(f"shoal/v1/gw/{GW}/down/{kind}", payload) == []
    assert (agent.handled_seq, dict(agent.jobs)) == before
    assert agent.handle(f"shoal/v1/gw/other/down/{kind}", payload) == []
