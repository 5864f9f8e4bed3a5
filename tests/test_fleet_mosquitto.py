"""The whole fleet on a real mosquitto 2.0, set up the way a production install is.

In order: the orchestrator's data folder (its broker secret and the ``admin``
operator), mosquitto's ``mosquitto.conf``/``passwd``/``acl`` written from its
registry (what ``shoal broker mosquitto-config`` does), mosquitto itself, the
orchestrator on it (``shoal serve --external``); gateways are added and
accepted through the operator API, the config is written again and mosquitto
reloaded with SIGHUP, and only then do the gateways connect.

The services run in one asyncio loop on a thread (:class:`LoopThread`), nodes
in their own threads on ptys (behind a pacing relay where the transfer must
take a while). mosquitto is stopped and started again by its own process id,
on the port it was given, with a persistence folder.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from broker.mosquitto import Account, write_mosquitto_config
from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.service import run_gateway
from mcu_firmware_stub.node import NodeThread as ServingNode
from mcu_firmware_stub.node import SimulatedNode
from orchestrator.core import Orchestrator
from otaio.mqtt import AuthRefused, Message, MqttClient, MqttSettings, SubscribeRefused
from otaio.serial_link import SerialLink
from otaio.wire import PacedWire, WireConfig
from otaproto import fleet as f
from otaproto import topics as t
from otaproto.artifact import VerifiedArtifact
from otaproto.errors import LinkBroken
from shoal.opsclient import OperatorLogin, call
from shoal.serve import ServeOptions, bootstrap_admin, serve
from tests.brokers import free_port
from tests.conftest import require_program
from tests.fleet_fixtures import LoopThread
from tests.node_fixtures import TRUST, Images, NodeThread, artifact_file, images, node_config

T = TypeVar("T")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


HOST = "127.0.0.1"
POLL_S = 0.05
START_TIMEOUT_S = 20.0
DEPLOY_TIMEOUT_S = 60.0
#: A real UART's pace: 32 KiB take about three seconds to cross it.
SLOW_BAUD = 115_200
#: Started as root, mosquitto drops to the user 'mosquitto' (when there is one) before it reads
#: its password file, as in production; without that account it is told to stay root.
RUN_AS = "root" if os.geteuid() == 0 and not _user_exists("mosquitto") else None
FINAL = {"succeeded", "failed", "rolled_back", "skipped", "incompatible", "aborted"}


def wait_until(check: Callable[[], T | None], what: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> T:
    """The first truthy value of ``check()``, asked every POLL_S; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:g} s")
        pause.wait(POLL_S)


@contextmanager
def broker_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder for mosquitto's files that mosquitto's own user can reach.

    Started as root (as a service manager does), mosquitto drops to the user
    ``mosquitto`` before it reads its password file and writes its database,
    and pytest's folders are private to root; ``/etc/mosquitto`` is
    world-traversable, and so is this.
    """
    if os.geteuid() != 0:
        yield tmp_path / "broker"
        return
    folder = Path(tempfile.mkdtemp(prefix="shoal-broker-"))
    try:
        folder.chmod(0o755)
        yield folder / "broker"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mosquitto_program() -> str:
    """mosquitto lives in /usr/sbin on Debian, which a user's PATH may lack."""
    return (
        shutil.which("mosquitto")
        or shutil.which("mosquitto", path="/usr/sbin")
        or require_program("mosquitto")
    )


class Mosquitto:
    """mosquitto serving the accounts of an orchestrator's data folder, on one port for good.

    ``start`` after ``stop`` brings it back on the same port with the same
    config and persistence folder, as a service manager restarting it would.
    """

    def __init__(self, folder: Path, data: Path) -> None:
        self.program = mosquitto_program()
        self.folder = folder
        self.data = data
        self.port = free_port(HOST)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def configure(self) -> Path:
        """Write the config from the registry as it is now (``shoal broker mosquitto-config``)."""
        accounts = [Account(*row) for row in Orchestrator.read_accounts(self.data)]
        return write_mosquitto_config(
            self.folder / "config", accounts=accounts, port=self.port, host=HOST,
            persistence_dir=self.folder / "persistence", run_as_user=RUN_AS,
        )  # fmt: skip

    def start(self) -> None:
        """Start it; return once it accepts connections.

        Only the first start may move to another port (it lost the race for a
        free one); a restart must come back where the clients look for it.
        """
        assert self.process is None, "mosquitto is running already"
        first = self.starts == 0
        for _ in range(5):
            config = self.configure()
            self.starts += 1
            log_path = self.folder / f"mosquitto-{self.starts}.log"
            with log_path.open("wb") as log_file:
                self.process = subprocess.Popen(
                    [self.program, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
                )
            if self._listening(self.process):
                return
            self.stop()
            output = log_path.read_text(errors="replace")
            if not first or "Address already in use" not in output:
                raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{output}")
            self.port = free_port(HOST)
        raise RuntimeError("mosquitto lost the race for a free port five times")

    def _listening(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.5):
                return process.poll() is None
            with suppress(subprocess.TimeoutExpired):  # a pause that ends at once if it exits
                process.wait(timeout=0.02)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} in time")

    def reload(self) -> None:
        """Write the config again from the registry and make mosquitto re-read it (SIGHUP)."""
        assert self.process is not None and self.process.poll() is None
        self.configure()
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM (mosquitto then saves its persistence file), SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class NodeLike(Protocol):
    node: SimulatedNode
    path: str

    def stop(self) -> None: ...


class PacedNode(ServingNode):
    """A SimulatedNode behind a pacing relay at ``baud``: the gateway opens ``path``."""

    def __init__(self, node: SimulatedNode, baud: int) -> None:
        self.wire = PacedWire(WireConfig(baud=baud))
        self.wire.start()
        self.path = self.wire.a_path
        super().__init__(node, SerialLink(self.wire.b_path, baud=baud), name="paced-node")

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        self.wire.close()


async def _try_login(settings: MqttSettings) -> bool:
    try:
        async with MqttClient(settings):
            return True
    except AuthRefused:
        return False


def login_works(port: int, username: str | None, password: str | None) -> bool:
    """True when mosquitto lets ``username`` in with ``password``; False on CONNACK 4/5."""
    settings = MqttSettings(
        HOST, port, client_id=f"probe-{username}-{time.monotonic_ns()}", username=username,
        password=password,
    )  # fmt: skip
    return asyncio.run(_try_login(settings))


@dataclass
class MosquittoFleet:
    """The orchestrator, mosquitto, and the gateways and nodes added so far."""

    loop: LoopThread
    broker: Mosquitto
    data: Path
    folder: Path
    admin: OperatorLogin
    nodes: dict[str, NodeLike] = field(default_factory=dict)
    agents: dict[str, GatewayAgent] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def ops(self, op: str, **args: Any) -> Any:
        return call(self.admin, op, args, timeout_s=15)

    def add_gateways(
        self, layout: dict[str, list[str]], initial: VerifiedArtifact, baud: int | None = None
    ) -> None:
        """Register and accept gateways, reload mosquitto, then start them and their nodes.

        ``baud`` puts each node behind a pacing relay at that rate; without it
        the nodes sit on bare ptys (as fast as the gateway writes).
        """
        for gateway in layout:
            self.secrets[gateway] = self.ops("devices.add", id=gateway)["secret"]
            self.ops("devices.accept", id=gateway)
        for gateway in layout:  # the registry knows them, the running broker does not yet
            assert not login_works(self.broker.port, gateway, self.secrets[gateway])
        self.broker.reload()
        for gateway in layout:
            secret = self.secrets[gateway]
            wait_until(
                lambda: login_works(self.broker.port, gateway, secret),  # noqa: B023 - called here
                f"mosquitto lets {gateway} in after SIGHUP", START_TIMEOUT_S,
            )  # fmt: skip
        for gateway, names in layout.items():
            ports = []
            for name in names:
                node = SimulatedNode(
                    node_config(self.folder / f"{gateway}-{name}"), initial=initial
                )
                runner: NodeLike = NodeThread(node) if baud is None else PacedNode(node, baud)
                self.nodes[f"{gateway}/{name}"] = runner
                ports.append(NodePort(name, runner.path, baud or 2_000_000))
            config = GatewayConfig(
                gateway_id=gateway, data_dir=self.folder / gateway, trust=(), mqtt_host=HOST,
                mqtt_port=self.broker.port, password=self.secrets[gateway], nodes=tuple(ports),
            )  # fmt: skip
            agent = GatewayAgent(config, TRUST)
            self.agents[gateway] = agent
            self.loop.start(lambda stop: run_gateway(agent, stop))  # noqa: B023 - called now
        wait_until(
            lambda: all(
                n.get("primary")
                for g in layout
                for n in self.ops("devices.show", id=g)["nodes"]
            ),
            "every node reported in the inventory", START_TIMEOUT_S,
        )  # fmt: skip

    def upload(self, imgs: Images) -> str:
        """Upload v1 and v2; the hex image digest of v2 (what a deployment names)."""
        for artifact, name in ((imgs.old, "v1.art"), (imgs.new, "v2.art")):
            self.ops(
                "artifact.upload", data=artifact_file(self.folder, artifact, name).read_bytes()
            )
        return imgs.new.manifest.image_digest.hex()

    def deploy(self, artifact: str, targets: list[str]) -> str:
        created = self.ops("deploy.create", artifact=artifact, nodes=targets)
        deployment: str = created["id"]
        return deployment

    def finished(self, deployment: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict[str, str]:
        """Wait until every node of ``deployment`` is in a final state; target -> state."""

        def states() -> dict[str, str] | None:
            status = self.ops("deploy.status", id=deployment)
            found = {n["target"]: n["state"] for n in status["nodes"]}
            return found if set(found.values()) <= FINAL else None

        return wait_until(states, f"deployment {deployment} finished", timeout_s)


@contextmanager
def fleet_on_mosquitto(tmp_path: Path) -> Iterator[MosquittoFleet]:
    """The orchestrator's data first, mosquitto on its accounts, then the orchestrator on it."""
    data = tmp_path / "orchestrator"
    with Orchestrator(data, TRUST) as orchestrator:  # creates orchestrator.secret and shoal.db
        admin_secret = bootstrap_admin(orchestrator, data).read_text().strip()
    with broker_folder(tmp_path) as folder:
        broker = Mosquitto(folder, data)
        broker.start()
        try:
            with _services(tmp_path, data, broker, admin_secret) as fleet:
                yield fleet
        finally:
            broker.stop()


@contextmanager
def _services(
    tmp_path: Path, data: Path, broker: Mosquitto, admin_secret: str
) -> Iterator[MosquittoFleet]:
    """The orchestrator on ``broker`` (and later gateways and nodes), all stopped at the end."""
    loop: LoopThread | None = None
    fleet: MosquittoFleet | None = None
    try:
        loop = LoopThread()
        started = threading.Event()
        options = ServeOptions(data_dir=data, trusted=TRUST, port=broker.port, embedded=False)
        loop.start(lambda stop: serve(options, stop, lambda _port: started.set()))
        assert started.wait(START_TIMEOUT_S), "the orchestrator did not connect to mosquitto"
        admin = OperatorLogin(HOST, broker.port, "admin", admin_secret)
        fleet = MosquittoFleet(loop, broker, data, tmp_path, admin)
        yield fleet
    finally:
        try:
            if loop is not None:
                loop.close()  # raises if a service died (the orchestrator must outlive restarts)
        finally:
            if fleet is not None:
                for node in fleet.nodes.values():
                    node.stop()


@pytest.fixture(scope="module")
def imgs() -> Images:
    return images(32 * 1024)


def test_a_deployment_on_mosquitto_reaches_nodes_on_two_gateways(
    tmp_path: Path, imgs: Images
) -> None:
    with fleet_on_mosquitto(tmp_path) as fleet:
        target = fleet.upload(imgs)
        fleet.add_gateways({"gw-a": ["n1", "n2"], "gw-b": ["n1"]}, imgs.old)
        deployment = fleet.deploy(target, ["gw-a/n1", "gw-a/n2", "gw-b/n1"])
        assert fleet.finished(deployment) == {
            "gw-a/n1": "succeeded",
            "gw-a/n2": "succeeded",
            "gw-b/n1": "succeeded",
        }
        for name, node in fleet.nodes.items():
            running = node.node.running
            assert running is not None and running.version == "2.0.0", name
            assert running.image_digest == imgs.new.manifest.image_digest, name

        # The gateway reports a node's inventory after its final status: wait for it.
        def versions() -> dict[str, str] | None:
            shown = fleet.ops("devices.show", id="gw-a")
            found = {n["node"]: (n.get("primary") or {}).get("version") for n in shown["nodes"]}
            return found if found == {"n1": "2.0.0", "n2": "2.0.0"} else None

        assert wait_until(versions, "the inventory to show 2.0.0") == {"n1": "2.0.0", "n2": "2.0.0"}


def test_a_broker_restart_mid_deployment_loses_nothing(tmp_path: Path, imgs: Images) -> None:
    with fleet_on_mosquitto(tmp_path) as fleet:
        target = fleet.upload(imgs)
        fleet.add_gateways({"gw-a": ["n1", "n2"], "gw-b": ["n1"]}, imgs.old, baud=SLOW_BAUD)
        targets = ["gw-a/n1", "gw-a/n2", "gw-b/n1"]
        deployment = fleet.deploy(target, targets)

        def jobs() -> dict[str, str]:
            return {
                f"{gw}/{job.node}": job.state
                for gw, agent in fleet.agents.items()
                for job in list(agent.jobs.values())
                if job.deployment == deployment
            }

        # Every node is mid-transfer on its slow line: the broker goes down now...
        wait_until(lambda: jobs() == dict.fromkeys(targets, "flashing"), "every node flashing")
        fleet.broker.stop()
        # ...and stays down until every gateway has finished its jobs, so that
        # each node's last word was said while nobody could hear it.
        wait_until(lambda: not jobs(), "every job finished at its gateway")
        fleet.broker.start()  # same port, same config, same persistence folder

        # The gateways and the orchestrator reconnect on their own and nothing is lost.
        assert fleet.finished(deployment) == dict.fromkeys(targets, "succeeded")
        for name, node in fleet.nodes.items():
            running = node.node.running
            assert running is not None and running.version == "2.0.0", name
        listed = fleet.ops("devices.list")["gateways"]
        assert {g["id"]: g["online"] for g in listed} == {"gw-a": True, "gw-b": True}


@dataclass
class Spy:
    """An MQTT client that records every message it is delivered.

    mosquitto grants every SUBSCRIBE and filters at delivery; a broker that
    refuses one instead is as good: what counts is what is delivered.
    """

    settings: MqttSettings
    filters: list[str]
    received: list[Message] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    async def run(self, stop: asyncio.Event) -> None:
        async with MqttClient(self.settings) as client:
            for topic_filter in self.filters:
                with suppress(SubscribeRefused):
                    await client.subscribe(topic_filter)
            self.subscribed.set()

            async def collect() -> None:
                async for message in client.messages():
                    self.received.append(message)

            collector = asyncio.create_task(collect())
            try:
                await stop.wait()
            finally:
                collector.cancel()
                with suppress(asyncio.CancelledError):
                    await collector

    def topics(self) -> list[str]:
        return [m.topic for m in list(self.received)]


def publish_as(port: int, username: str, password: str, messages: list[tuple[str, bytes]]) -> None:
    """Connect as ``username`` and publish ``messages`` in order (QoS 1: each one PUBACKed)."""

    async def run() -> None:
        settings = MqttSettings(
            HOST, port, client_id=f"publisher-{username}-{time.monotonic_ns()}",
            username=username, password=password,
        )  # fmt: skip
        async with MqttClient(settings) as client:
            for topic, payload in messages:
                await client.publish(topic, payload)

    asyncio.run(run())


def cut_off_by_reload(broker: Mosquitto, username: str, password: str) -> bool:
    """Connect as ``username``, reload mosquitto: True once the broker drops that connection."""

    async def run() -> bool:
        settings = MqttSettings(
            HOST, broker.port, client_id=f"{username}-victim", username=username,
            password=password,
        )  # fmt: skip
        async with MqttClient(settings) as client:
            broker.reload()
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    async for _ in client.messages():
                        pass
            except LinkBroken:
                return True
            except TimeoutError:
                return False
        return False

    return asyncio.run(run())


def start_spy(loop: LoopThread, spy: Spy) -> None:
    service: Callable[[asyncio.Event], Coroutine[Any, Any, None]] = spy.run
    loop.start(service)
    assert spy.subscribed.wait(START_TIMEOUT_S), "the spy did not subscribe"


def test_gateway_credentials_reach_only_their_own_gateway_until_decommissioned(
    tmp_path: Path, imgs: Images
) -> None:
    with fleet_on_mosquitto(tmp_path) as fleet:
        target = fleet.upload(imgs)
        fleet.add_gateways({"gw-a": ["n1"], "gw-b": ["n1"]}, imgs.old)
        port, secret_a = fleet.broker.port, fleet.secrets["gw-a"]

        # Another gateway's name with my secret, or no credentials at all: refused at CONNECT.
        assert not login_works(port, "gw-b", secret_a)
        assert not login_works(port, None, None)
        assert login_works(port, "gw-a", secret_a)

        orchestrator_secret = (fleet.data / "orchestrator.secret").read_text().strip()
        gw_b_down = f"{t.ROOT}/gw/gw-b/down"
        thief = Spy(
            MqttSettings(HOST, port, "thief", username="gw-a", password=secret_a),
            [f"{gw_b_down}/#", t.gateway_down("gw-b", t.Down.COMMAND),
             t.gateway_down("gw-b", t.Down.BLOCK), f"{t.ROOT}/gw/+/down/#", f"{t.ROOT}/#", "#"],
        )  # fmt: skip
        # The control: the orchestrator's account may read everything gw-b is sent.
        control = Spy(
            MqttSettings(
                HOST, port, "control", username="orchestrator", password=orchestrator_secret
            ),
            [f"{gw_b_down}/#", f"{t.ROOT}/gw/gw-b/up/#", t.gateway_up("gw-a", t.Up.STATE)],
        )
        start_spy(fleet.loop, thief)
        start_spy(fleet.loop, control)

        # gw-a's credentials cannot speak for gw-b either: a forged inventory is dropped.
        forged = f.encode_map({"nodes": [{"node": "n1", "error": "forged by gw-a"}]})
        publish_as(port, "gw-a", secret_a, [
            (t.gateway_up("gw-b", t.Up.INVENTORY), forged),
            (t.gateway_up("gw-a", t.Up.STATE), f.encode_map({"online": True})),
        ])  # fmt: skip
        wait_until(
            lambda: t.gateway_up("gw-a", t.Up.STATE) in control.topics(),
            "the control heard gw-a's own message", START_TIMEOUT_S,
        )  # fmt: skip
        assert forged not in [m.payload for m in list(control.received)]

        # The traffic: a deployment to gw-b's node, which gw-b gets and carries out.
        deployment = fleet.deploy(target, ["gw-b/n1"])
        assert fleet.finished(deployment) == {"gw-b/n1": "succeeded"}
        heard = [m.topic for m in list(control.received) if m.topic.startswith(gw_b_down)]
        assert t.gateway_down("gw-b", t.Down.COMMAND) in heard
        assert t.gateway_down("gw-b", t.Down.BLOCK) in heard

        # A marker on gw-a's own down topic, sent after all of that: once the
        # thief has it, anything of gw-b's it was going to get it has got.
        marker = t.gateway_down("gw-a", t.Down.ERROR)
        publish_as(port, "orchestrator", orchestrator_secret, [
            (marker, f.encode_map({"topic": marker, "reason": "marker of the ACL test"})),
        ])  # fmt: skip
        wait_until(lambda: marker in thief.topics(), "the thief got the marker", START_TIMEOUT_S)
        own = f"{t.ROOT}/gw/gw-a/down/"
        foreign = [topic for topic in thief.topics() if not topic.startswith(own)]
        assert foreign == [], f"gw-a's credentials were delivered {foreign}"

        # Decommissioned, then the config written again and mosquitto reloaded:
        # gw-b's live connection is dropped and its secret no longer lets it in.
        fleet.ops("devices.decommission", id="gw-b")
        assert cut_off_by_reload(fleet.broker, "gw-b", fleet.secrets["gw-b"])
        assert not login_works(port, "gw-b", fleet.secrets["gw-b"])
        assert login_works(port, "gw-a", secret_a)
