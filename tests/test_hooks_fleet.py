"""State hooks in a rollout, over the real parts: orchestrator, broker, gateways, nodes on ptys.

The orchestrator (its SQLite file, its embedded amqtt broker) and the gateway
services run in one asyncio loop (``tests/fleet_fixtures.py``); each gateway
may have a hooks folder holding real executables, run as the gateway runs
them; the nodes are simulated on real ptys. The tests read the rollout as an
operator does (``rollout.show`` and ``deploy.events`` over MQTT) and look at
the nodes' flash themselves. Spec: ``docs/drivers-and-hooks.md`` §State
hooks, ``docs/rollouts.md`` (``deferred``, retries).

Nothing sleeps: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.hooks import RETRY_LATER_EXIT, HooksConfig
from gateway_proxy.service import run_gateway
from mcu_firmware_stub.node import SimulatedNode
from otaproto.artifact import VerifiedArtifact
from tests.fleet_fixtures import Fleet, running_fleet
from tests.fleet_process import OperatorSession, wait_for
from tests.hook_fixtures import write_hook
from tests.node_fixtures import TRUST, NodeThread, artifact_file, images, node_config

#: Every wait of these tests; each test takes a few seconds when all is well.
DEADLINE_S = 20.0
#: ``hooks.retry_delay_s`` of the tests: short, so that a hold is seen to repeat.
RETRY_DELAY_S = 0.2
#: Images small enough to flash in well under a second.
IMAGE_BYTES = 24 * 1024


@contextmanager
def operator(fleet: Fleet) -> Iterator[OperatorSession]:
    """The admin on one long-lived connection (polling with a connection per request loses
    replies on amqtt; see OperatorSession)."""
    session = OperatorSession(fleet.admin)
    try:
        yield session
    finally:
        session.close()


@dataclass
class Gateways:
    """The gateways a test started; :meth:`close` stops their job workers (held hooks too)."""

    fleet: Fleet
    ops: OperatorSession
    folder: Path
    agents: list[GatewayAgent]

    def start(
        self, gateway_id: str, nodes: list[str], initial: VerifiedArtifact,
        hooks: HooksConfig | None = None,
    ) -> None:  # fmt: skip
        """Register, accept and run a gateway whose nodes run ``initial``, with ``hooks``."""
        secret = self.ops.request("devices.add", {"id": gateway_id})["secret"]
        self.ops.request("devices.accept", {"id": gateway_id})
        ports = []
        for name in nodes:
            settings = node_config(self.folder / f"{gateway_id}-{name}")
            thread = NodeThread(SimulatedNode(settings, initial=initial))
            self.fleet.nodes[f"{gateway_id}/{name}"] = thread  # the fleet stops it at the end
            ports.append(NodePort(name, thread.path, 2_000_000))
        config = GatewayConfig(
            gateway_id=gateway_id, data_dir=self.folder / gateway_id, trust=(),
            mqtt_host="127.0.0.1", mqtt_port=self.fleet.port, password=str(secret),
            nodes=tuple(ports), hooks=hooks or HooksConfig(),
        )  # fmt: skip
        agent = GatewayAgent(config, TRUST)
        self.agents.append(agent)
        self.fleet.loop.start(lambda stop: run_gateway(agent, stop))

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


@contextmanager
def fleet_with_gateways(tmp_path: Path) -> Iterator[tuple[Fleet, OperatorSession, Gateways]]:
    """A running fleet, an operator session and a way to add gateways; all stopped at the end."""
    with running_fleet(tmp_path) as fleet, operator(fleet) as ops:
        gateways = Gateways(fleet, ops, tmp_path, [])
        try:
            yield fleet, ops, gateways
        finally:
            gateways.close()


def upload(ops: OperatorSession, tmp_path: Path, artifact: VerifiedArtifact) -> None:
    data = artifact_file(tmp_path, artifact, "v2.art").read_bytes()
    ops.request("artifact.upload", {"data": data})


def inventoried(ops: OperatorSession, count: int) -> bool:
    """True once ``count`` nodes have reported their device type."""
    gateways = ops.request("devices.list", {})["gateways"]
    return sum(1 for g in gateways for n in g["nodes"] if n["device_type"]) >= count


def show(ops: OperatorSession, rollout: str) -> dict[str, Any]:
    shown: dict[str, Any] = ops.request("rollout.show", {"id": rollout})
    return shown


def settles(ops: OperatorSession, rollout: str) -> dict[str, Any]:
    """Wait until the rollout has ended and none of its nodes runs; its last ``rollout.show``."""

    def diagnose() -> str:
        shown = show(ops, rollout)
        nodes = [(n["target"], n["state"], n["attempt"], n["reason"]) for n in shown["nodes"]]
        return f"rollout {shown['state']} ({shown['reason']}); nodes: {nodes}"

    def settled() -> dict[str, Any] | None:
        shown = show(ops, rollout)
        return shown if shown["settled"] is not None else None

    return wait_for(settled, DEADLINE_S, f"rollout {rollout} settles", diagnose)


def node_of(shown: dict[str, Any], target: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [n for n in shown["nodes"] if n["target"] == target]
    assert len(found) == 1, f"{target} in {shown['nodes']}"
    return found[0]


def event_states(ops: OperatorSession, deployment: str, target: str) -> list[str]:
    events = ops.request("deploy.events", {"id": deployment, "node": target})["events"]
    return [str(e["state"]) for e in events]


@dataclass(frozen=True)
class FlashMark:
    """What would change if anything were written to a node: its flash and its resets."""

    write_ops: int
    erases: int
    resets: int
    flash_sha256: str


def flash_mark(thread: NodeThread) -> FlashMark:
    node = thread.node
    return FlashMark(
        node.flash.total_write_ops, node.flash.total_erases, node.resets,
        hashlib.sha256(node.flash.path.read_bytes()).hexdigest(),
    )  # fmt: skip


def running_version(thread: NodeThread) -> str | None:
    running = thread.node.running
    return None if running is None else running.version


def test_a_hook_that_asks_to_retry_later_defers_the_flash_and_the_rollout_shows_it(
    tmp_path: Path,
) -> None:
    imgs = images(IMAGE_BYTES)
    hooks = tmp_path / "hooks-gw-a"
    charged = tmp_path / "charged"
    write_hook(
        hooks, "Flash_Enter_10_battery",
        f'[ -e "{charged}" ] && exit 0\necho "battery at 12 %"\nexit {RETRY_LATER_EXIT}',
    )  # fmt: skip
    held_for = re.compile(
        r"hook Flash_Enter_10_battery asked to retry later \(attempt (?P<attempt>[0-9]+) of "
        rf"1000\); next try in {RETRY_DELAY_S:g} s: battery at 12 %"
    )
    with fleet_with_gateways(tmp_path) as (fleet, ops, gateways):
        upload(ops, tmp_path, imgs.new)
        config = HooksConfig(hooks, retry_delay_s=RETRY_DELAY_S, max_attempts=1000)
        gateways.start("gw-a", ["n1"], imgs.old, config)
        wait_for(lambda: inventoried(ops, 1), DEADLINE_S, "inventory of gw-a/n1")
        node = fleet.nodes["gw-a/n1"]
        before = flash_mark(node)
        created = ops.request(
            "rollout.create",
            {"artifact": imgs.new.manifest.image_digest.hex(), "target": {"nodes": ["gw-a/n1"]}},
        )

        def held(min_attempt: int) -> dict[str, Any] | None:
            shown = show(ops, created["id"])
            found = held_for.fullmatch(node_of(shown, "gw-a/n1")["reason"] or "")
            if shown["counts"] == {"deferred": 1} and found:
                return shown if int(found["attempt"]) >= min_attempt else None
            return None

        # The rollout shows the node deferred with the hook's reason, and the hold
        # goes on: the gateway runs the hook again every retry_delay_s.
        shown = wait_for(lambda: held(3), DEADLINE_S, "gw-a/n1 deferred for the 3rd time")
        assert shown["state"] == "running" and shown["settled"] is None
        assert node_of(shown, "gw-a/n1")["attempt"] == 0  # a hold is not a failed attempt
        # Nothing of the update reached the node: no flash write, no erase, no reset.
        assert flash_mark(node) == before
        assert running_version(node) == "1.0.0"
        so_far = event_states(ops, shown["deployment"], "gw-a/n1")
        before_hold = so_far[: so_far.index("deferred")]
        assert set(before_hold) <= {"pending", "offered", "downloading", "downloaded"}, so_far
        assert "downloaded" in before_hold  # held at Flash_Enter, after the download
        assert not {"flashing", "verifying", "rebooting", "confirming"} & set(so_far), so_far

        charged.touch()  # the battery is charged: the next run of the hook passes
        done = settles(ops, created["id"])
        assert done["state"] == "completed", done["reason"]
        assert node_of(done, "gw-a/n1")["state"] == "succeeded"
        assert node_of(done, "gw-a/n1")["attempt"] == 0
        assert running_version(node) == "2.0.0"
        states = event_states(ops, done["deployment"], "gw-a/n1")
        after_hold = states[len(states) - states[::-1].index("deferred") :]
        # After the hold the gateway reports the state it had, then flashes.
        assert after_hold[0] == "downloaded", states
        assert {"flashing", "rebooting", "succeeded"} <= set(after_hold), states


def test_a_failing_hook_fails_its_nodes_deployment_with_its_output_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    imgs = images(IMAGE_BYTES)
    hooks = tmp_path / "hooks-gw-a"
    runs = tmp_path / "window-runs"
    # Fails for gw-a/n1 only, printing to stdout and to stderr; passes for gw-a/n2.
    write_hook(
        hooks, "Flash_Enter_10_window",
        f'echo "$SHOAL_NODE $SHOAL_DEPLOYMENT" >> "{runs}"\n'
        '[ "$SHOAL_NODE" = n1 ] || exit 0\n'
        'echo "checking the maintenance window of $SHOAL_NODE"\n'
        'echo "outside the maintenance window" >&2\n'
        "exit 3",
    )  # fmt: skip
    reason = (
        "hook Flash_Enter_10_window failed (exit 3): "
        "checking the maintenance window of n1\noutside the maintenance window"
    )
    with fleet_with_gateways(tmp_path) as (fleet, ops, gateways):
        upload(ops, tmp_path, imgs.new)
        gateways.start("gw-a", ["n1", "n2"], imgs.old, HooksConfig(hooks))
        gateways.start("gw-b", ["n1"], imgs.old)  # no hooks at all
        wait_for(lambda: inventoried(ops, 3), DEADLINE_S, "inventory of 3 nodes")
        refused = fleet.nodes["gw-a/n1"]
        before = {target: flash_mark(thread) for target, thread in fleet.nodes.items()}
        # No retries: one run of the hook decides (a retry would run it again as
        # deployment-r1). Two of three nodes succeeding is enough for the phase,
        # and one failure trips nothing: the rollout completes.
        created = ops.request("rollout.create", {
            "artifact": imgs.new.manifest.image_digest.hex(), "target": {"filter": {}},
            "retries": 0, "success_threshold": 60,
            "failure_threshold": {"percent": 50, "min_count": 2},
        })  # fmt: skip
        done = settles(ops, created["id"])
        assert done["state"] == "completed", done["reason"]
        assert done["counts"] == {"succeeded": 2, "failed": 1}
        failed = node_of(done, "gw-a/n1")
        assert (failed["state"], failed["reason"], failed["attempt"]) == ("failed", reason, 0)
        for target in ("gw-a/n2", "gw-b/n1"):
            assert node_of(done, target)["state"] == "succeeded", target
            assert running_version(fleet.nodes[target]) == "2.0.0", target
            assert flash_mark(fleet.nodes[target]) != before[target], target  # the mark sees it
        deployment = done["deployment"]
        states = event_states(ops, deployment, "gw-a/n1")
        assert states.count("failed") == 1, states
        assert not {"deferred", "flashing", "verifying", "rebooting"} & set(states), states
        # The hook ran once for each node of gw-a, never for gw-b's node.
        assert sorted(runs.read_text().splitlines()) == [f"n1 {deployment}", f"n2 {deployment}"]
        # The refused node was never written to and still runs its old image...
        assert flash_mark(refused) == before["gw-a/n1"]
        assert running_version(refused) == "1.0.0"
        state_dir = refused.node.config.state_dir
    # ... and boots it again after a power cycle (the fleet stopped every node).
    rebooted = SimulatedNode(node_config(state_dir))
    try:
        assert rebooted.running is not None and rebooted.running.version == "1.0.0"
        assert rebooted.running.image_digest == imgs.old.manifest.image_digest
    finally:
        rebooted.close()
