"""The gateway agent's core against real nodes on ptys; the test plays the orchestrator."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.drivers import (
    BootOutcome,
    BootVerdict,
    NodeDriver,
    NodeInventory,
    ProgressFn,
    RunningImage,
    TransferOutcome,
    TransferReport,
)
from gateway_proxy.hooks import HooksConfig
from mcu_firmware_stub.node import SimulatedNode
from otaproto import cbor, fleet
from otaproto import topics as t
from otaproto.artifact import (
    VerifiedArtifact,
    build_delta_artifact,
    build_full_artifact,
    verify_artifact,
)
from otaproto.errors import InvalidInput
from otaproto.keys import SigningKey, TrustedKeys
from tests.hook_fixtures import write_hook
from tests.node_fixtures import (
    DEVICE,
    KEY,
    TRUST,
    Images,
    NodeThread,
    artifact_file,
    images,
    node_config,
    node_on_pty,
)

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
        self.inventories: list[list[dict[str, Any]]] = []

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
            elif kind.kind == "inventory":
                self.inventories.append(
                    fleet.decode_map(payload, fleet.INVENTORY, "inventory")["nodes"]
                )
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
    with node_on_pty(node_config(tmp_path / "node"), imgs.old) as thread:
        yield thread


def agent_for(
    tmp_path: Path, node: NodeThread, trusted: TrustedKeys = TRUST, hooks: HooksConfig | None = None
) -> GatewayAgent:
    config = GatewayConfig(
        gateway_id=GW, data_dir=tmp_path / "gw", trust=(), mqtt_host="-", mqtt_port=1,
        password="-", nodes=(NodePort("n1", node.path, 2_000_000),), hooks=hooks or HooksConfig(),
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


# -- state hooks: real executables in a hooks folder, a real node on a pty ----------------

FINAL_WORDS = {"succeeded", "failed", "rolled_back", "already_installed", "rejected", "aborted"}
BOUNDARIES = [
    f"{phase}_{when}"
    for phase in ("Download", "Flash", "Reboot", "Commit")
    for when in ("Enter", "Leave")
]


class CountingNode(SimulatedNode):
    """A simulated node that counts every byte the gateway sends it."""

    received_bytes = 0

    def handle_bytes(self, data: bytes) -> Iterator[bytes]:
        self.received_bytes += len(data)
        yield from super().handle_bytes(data)


@pytest.fixture
def counted(tmp_path: Path, imgs: Images) -> Iterator[NodeThread]:
    thread = NodeThread(CountingNode(node_config(tmp_path / "node"), initial=imgs.old))
    yield thread
    thread.stop()


@contextmanager
def hooked_agent(tmp_path: Path, node: NodeThread, hooks: HooksConfig) -> Iterator[GatewayAgent]:
    agent = agent_for(tmp_path, node, hooks=hooks)
    try:
        yield agent
    finally:
        agent.close()


def run_until(
    agent: GatewayAgent, orchestra: Orchestra, done: Callable[[], bool], timeout_s: float = 60
) -> None:
    """Tick the agent and answer it until ``done()``, pacing on an event."""
    pace = threading.Event()
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting; statuses: {orchestra.status}")
        orchestra.answer(agent.tick(), agent)
        pace.wait(0.02)


def deploy(agent: GatewayAgent, orchestra: Orchestra, tmp_path: Path, imgs: Images) -> None:
    new = full_bytes(artifact_file(tmp_path, imgs.new, "v2.art"))
    orchestra.answer(
        agent.handle(*orchestra.command(deployment="d1", node="n1", artifact=orchestra.ref(new))),
        agent,
    )


def states(orchestra: Orchestra) -> list[str]:
    return [str(s["state"]) for s in orchestra.status]


def finished(orchestra: Orchestra) -> bool:
    return bool(orchestra.status) and orchestra.final()["state"] in FINAL_WORDS


def test_a_hook_asking_to_retry_later_holds_the_flash_until_it_passes(
    tmp_path: Path, imgs: Images, counted: NodeThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SHOAL_* variable the gateway was started with does not reach the hooks.
    monkeypatch.setenv("SHOAL_DEPLOYMENT_FROM_OUTSIDE", "stale")
    hooks = tmp_path / "hooks"
    flag = tmp_path / "charged"
    write_hook(
        hooks, "Flash_Enter_10_battery",
        f"env | grep ^SHOAL_ > {tmp_path}/env.$SHOAL_ATTEMPT\n"
        f"[ -e {flag} ] && exit 0\necho 'battery at 12 %'\nexit 21",
    )  # fmt: skip
    node = counted.node
    assert isinstance(node, CountingNode)
    config = HooksConfig(hooks, retry_delay_s=0.05, max_attempts=1000)
    with hooked_agent(tmp_path, counted, config) as agent:
        agent.inventory()  # the gateway learns the node's device type
        before = node.received_bytes
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: states(orchestra).count("deferred") >= 3)
        deferred = [s for s in orchestra.status if s["state"] == "deferred"]
        assert deferred[0]["reason"] == (
            "hook Flash_Enter_10_battery asked to retry later (attempt 1 of 1000); "
            "next try in 0.05 s: battery at 12 %"
        )
        assert "(attempt 3 of 1000)" in str(deferred[2]["reason"])
        assert node.received_bytes == before  # nothing of the update reached the node
        assert agent.inventory()[1] == fleet.encode_map({"nodes": []})  # busy: not even HELLO
        assert node.received_bytes == before
        flag.touch()
        run_until(agent, orchestra, lambda: finished(orchestra))
    assert orchestra.final()["state"] == "succeeded", orchestra.final()
    seen = states(orchestra)
    assert seen[: seen.index("deferred")] == ["downloading", "downloaded"]
    # After the hold: the state it had before, then the flash.
    after = seen[len(seen) - seen[::-1].index("deferred") :]
    assert after[0] == "downloaded" and "flashing" in after and "rebooting" in after
    assert node.running is not None and node.running.version == "2.0.0"
    env = dict(
        line.split("=", 1) for line in (tmp_path / "env.1").read_text().splitlines()
    )  # fmt: skip
    assert env == {
        "SHOAL_GATEWAY": GW, "SHOAL_DEPLOYMENT": "d1", "SHOAL_NODE": "n1",
        "SHOAL_DRIVER": "shoal-serial", "SHOAL_PORT": counted.path, "SHOAL_DEVICE_TYPE": "nrf52840",
        "SHOAL_PHASE": "flash", "SHOAL_WHEN": "enter", "SHOAL_ATTEMPT": "1",
        "SHOAL_MAX_ATTEMPTS": "1000", "SHOAL_ERROR": "",
        "SHOAL_ARTIFACT_SHA256": hashlib.sha256(
            artifact_file(tmp_path, imgs.new, "v2.art").read_bytes()
        ).hexdigest(),
        "SHOAL_ARTIFACT_NAME": "app", "SHOAL_ARTIFACT_VERSION": "2.0.0",
        "SHOAL_ARTIFACT_SEQUENCE": "2",
        "SHOAL_IMAGE_SHA256": imgs.new.manifest.image_digest.hex(),
        "SHOAL_IMAGE_BYTES": str(imgs.new.manifest.image_size),
    }  # fmt: skip
    assert (tmp_path / "env.3").read_text().count("SHOAL_ATTEMPT=3") == 1


def test_a_hook_that_keeps_asking_to_retry_fails_the_deployment_at_the_cap(
    tmp_path: Path, imgs: Images, counted: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Flash_Enter_10_battery", "echo 'battery at 3 %'; exit 21")
    config = HooksConfig(hooks, retry_delay_s=0.01, max_attempts=3)
    with hooked_agent(tmp_path, counted, config) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: finished(orchestra))
    final = orchestra.final()
    assert final["state"] == "failed"
    assert final["reason"] == (
        "hook Flash_Enter_10_battery asked to retry later 3 times, the most "
        "hooks.max_attempts allows: giving up: battery at 3 %"
    )
    assert states(orchestra).count("deferred") == 2
    node = counted.node
    assert isinstance(node, CountingNode) and node.received_bytes == 0
    assert node.running is not None and node.running.version == "1.0.0"
    assert agent.jobs == {}


def test_a_failing_hook_fails_the_deployment_with_its_output_and_the_node_keeps_its_image(
    tmp_path: Path, imgs: Images, counted: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Flash_Enter_10_window", "echo 'outside the maintenance window' >&2; exit 3")
    write_hook(hooks, "Flash_Error_10_note", f'echo "$SHOAL_ERROR" > {tmp_path}/error')
    write_hook(hooks, "Download_Leave_10_note", f"touch {tmp_path}/downloaded")
    with hooked_agent(tmp_path, counted, HooksConfig(hooks)) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: finished(orchestra))
    final = orchestra.final()
    reason = "hook Flash_Enter_10_window failed (exit 3): outside the maintenance window"
    assert (final["state"], final["reason"]) == ("failed", reason)
    assert "deferred" not in states(orchestra)
    assert (tmp_path / "downloaded").exists()
    assert (tmp_path / "error").read_text().strip() == reason  # the Flash error hook saw why
    node = counted.node
    assert isinstance(node, CountingNode) and node.received_bytes == 0
    assert node.running is not None and node.running.version == "1.0.0"


def test_a_hook_that_hangs_is_killed_at_its_time_limit(
    tmp_path: Path, imgs: Images, counted: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Reboot_Enter_10_hang", "echo 'asking the app to park'; sleep 60")
    with hooked_agent(tmp_path, counted, HooksConfig(hooks, timeout_s=0.5)) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: finished(orchestra))
    final = orchestra.final()
    assert final["state"] == "failed"
    assert final["reason"] == (
        "hook Reboot_Enter_10_hang did not finish within 0.5 s and was killed: "
        "asking the app to park"
    )
    # Staged, never test-booted: the node still runs its old image.
    assert counted.node.running is not None and counted.node.running.version == "1.0.0"


def test_hooks_run_at_every_boundary_in_order(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    log = tmp_path / "log"
    for boundary in BOUNDARIES:
        write_hook(hooks, f"{boundary}_50_log", f'echo "$SHOAL_PHASE $SHOAL_WHEN" >> {log}')
    with hooked_agent(tmp_path, node, HooksConfig(hooks)) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: finished(orchestra))
    assert orchestra.final()["state"] == "succeeded"
    assert log.read_text().splitlines() == [
        f"{phase} {when}"
        for phase in ("download", "flash", "reboot", "commit")
        for when in ("enter", "leave")
    ]
    assert "confirming" in states(orchestra)


def test_a_download_held_by_its_enter_hook_fetches_nothing_until_it_passes(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    flag = tmp_path / "metered-link-off"
    write_hook(hooks, "Download_Enter_10_metered", f"[ -e {flag} ] && exit 0; exit 21")
    config = HooksConfig(hooks, retry_delay_s=0.05, max_attempts=1000)
    with hooked_agent(tmp_path, node, config) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: states(orchestra).count("deferred") >= 2)
        assert orchestra.fetched == []
        flag.touch()
        run_until(agent, orchestra, lambda: finished(orchestra))
    assert orchestra.final()["state"] == "succeeded"
    seen = states(orchestra)
    assert seen[:2] == ["downloading", "deferred"] and "downloaded" in seen
    assert orchestra.fetched


def test_a_deployment_held_before_flashing_can_be_cancelled(
    tmp_path: Path, imgs: Images, counted: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Flash_Enter_10_later", "exit 21")
    write_hook(hooks, "Flash_Error_10_note", f'echo "$SHOAL_ERROR" > {tmp_path}/error')
    with hooked_agent(tmp_path, counted, HooksConfig(hooks, retry_delay_s=30)) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: "deferred" in states(orchestra))
        cancel = orchestra.command(type="cancel", deployment="d1", node="n1")
        orchestra.answer(agent.handle(*cancel), agent)
        assert (orchestra.final()["state"], orchestra.final()["reason"]) == ("aborted", "cancelled")
        assert agent.jobs == {}
        # The worker wakes from its 30 s wait at once and runs the Flash error hook.
        run_until(agent, orchestra, (tmp_path / "error").exists, timeout_s=10)
    node = counted.node
    assert isinstance(node, CountingNode) and node.received_bytes == 0


def test_a_restarted_gateway_keeps_counting_a_hooks_retries(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Flash_Enter_10_later", "echo $SHOAL_ATTEMPT >> attempts; exit 21")
    config = HooksConfig(hooks, retry_delay_s=30, max_attempts=3)
    orchestra = Orchestra({})
    with hooked_agent(tmp_path, node, config) as first:
        deploy(first, orchestra, tmp_path, imgs)
        run_until(first, orchestra, lambda: "deferred" in states(orchestra))
    with hooked_agent(tmp_path, node, config) as second:
        assert second.jobs["d1/n1"].hook_attempts == {"Flash_Enter": 1}
        run_until(second, orchestra, lambda: states(orchestra).count("deferred") == 2)
    assert (hooks / "attempts").read_text().split() == ["1", "2"]


def test_a_commit_refused_after_the_node_confirmed_itself_says_the_node_keeps_it(
    tmp_path: Path, imgs: Images, node: NodeThread
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Commit_Enter_10_veto", "echo 'fleet freeze'; exit 1")
    with hooked_agent(tmp_path, node, HooksConfig(hooks)) as agent:
        orchestra = Orchestra({})
        deploy(agent, orchestra, tmp_path, imgs)
        run_until(agent, orchestra, lambda: finished(orchestra))
    assert orchestra.final()["reason"] == (
        "hook Commit_Enter_10_veto failed (exit 1): fleet freeze; "
        "the node had confirmed 2.0.0 itself and keeps it"
    )
    assert node.node.running is not None and node.node.running.version == "2.0.0"


class VersionOnlyDriver(NodeDriver):
    """A node whose protocol tells a version and a boot state only, as SMP/MCUboot does.

    Its flash is ``self.node_state`` (``version``, ``boot_state``), shared with the test.
    """

    def __init__(self, node: NodePort, node_state: dict[str, str]) -> None:
        super().__init__(node)
        self.node_state = node_state

    def inventory(self) -> NodeInventory:
        running = RunningImage(self.node_state["version"])
        return NodeInventory(DEVICE, self.node_state["boot_state"], running, "version-only")

    def transfer(
        self, artifact: VerifiedArtifact, image: bytes, progress: ProgressFn
    ) -> TransferReport:
        if self.node_state["version"] == artifact.manifest.version:
            return TransferReport(TransferOutcome.ALREADY_INSTALLED, "runs it", len(image))
        return TransferReport(TransferOutcome.STAGED, "", len(image), len(image))

    def test_boot(self, artifact: VerifiedArtifact, image: bytes) -> None:
        self.node_state.update(version=artifact.manifest.version, boot_state="testing")

    def await_boot(self, artifact: VerifiedArtifact) -> BootOutcome:
        return BootOutcome(BootVerdict.NEW_IMAGE, False, "the new image runs under test")

    def confirm(self, artifact: VerifiedArtifact) -> BootOutcome:
        self.node_state["boot_state"] = "confirmed"
        return BootOutcome(BootVerdict.NEW_IMAGE, True, "the new image runs and is confirmed")

    def reset(self) -> None:
        return None


def version_only_agent(tmp_path: Path, node_state: dict[str, str]) -> GatewayAgent:
    config = GatewayConfig(
        gateway_id=GW, data_dir=tmp_path / "gw", trust=(), mqtt_host="-", mqtt_port=1,
        password="-", nodes=(NodePort("n1", "/dev/null", driver="version-only"),),
    )  # fmt: skip
    return GatewayAgent(config, TRUST, drivers=lambda node: VersionOnlyDriver(node, node_state))


def inventory_of(agent: GatewayAgent) -> dict[str, Any]:
    found = fleet.decode_map(agent.inventory()[1], fleet.INVENTORY, "inventory")["nodes"]
    assert [n["node"] for n in found] == ["n1"]
    node: dict[str, Any] = found[0]
    return node


def test_a_driver_that_tells_only_a_version_reports_the_image_the_gateway_installed(
    tmp_path: Path, imgs: Images
) -> None:
    node_state = {"version": "1.0.0", "boot_state": "confirmed"}
    agent = version_only_agent(tmp_path, node_state)
    # An image the gateway did not install: no primary (Shoal's sequence is not known).
    assert inventory_of(agent) == {
        "node": "n1", "device_type": DEVICE, "boot_state": "confirmed", "primary": None,
    }  # fmt: skip
    orchestra = Orchestra({})
    deploy(agent, orchestra, tmp_path, imgs)
    assert run_until_final(agent, orchestra)["state"] == "succeeded"
    m = imgs.new.manifest
    installed = {
        "version": "2.0.0", "sequence": m.sequence, "digest": m.image_digest,
        "size": m.image_size,
    }  # fmt: skip
    # The inventory the gateway publishes right after the job reports it.
    run_until(agent, orchestra, lambda: bool(orchestra.inventories))
    assert [n["primary"] for n in orchestra.inventories[-1]] == [installed]
    assert inventory_of(agent)["primary"] == installed
    agent.close()
    # It is on disk: a restarted gateway still knows.
    agent = version_only_agent(tmp_path, node_state)
    assert inventory_of(agent)["primary"] == installed
    # The node runs something else (another tool flashed it, or a test boot runs):
    # nothing is claimed; back on that image, the record stands again.
    for version, boot_state in (("2.0.1", "confirmed"), ("2.0.0", "testing")):
        node_state.update(version=version, boot_state=boot_state)
        assert inventory_of(agent)["primary"] is None, (version, boot_state)
    node_state.update(version="2.0.0", boot_state="confirmed")
    assert inventory_of(agent)["primary"] == installed
    # The same node behind another port or driver is not taken for the same node.
    config = agent.config
    moved = GatewayAgent(
        replace(config, nodes=(replace(config.nodes[0], port="/dev/ttyUSB9"),)), TRUST,
        drivers=lambda node: VersionOnlyDriver(node, node_state),
    )  # fmt: skip
    assert inventory_of(moved)["primary"] is None
    agent.close()
    moved.close()
    # A damaged record is a damaged state file, refused like any other damage.
    state_file = tmp_path / "gw" / "agent.cbor"
    state = cbor.decode(state_file.read_bytes(), "agent state")
    state["installed"]["n1"]["slot"]["digest"] = "not bytes"
    state_file.write_bytes(cbor.encode(state))
    with pytest.raises(InvalidInput, match=r"agent\.cbor is damaged: installed\['n1'\]"):
        version_only_agent(tmp_path, node_state)
