"""Shoal's services as real processes, for tests that kill them.

What survives a SIGKILL (the SQLite file, a gateway's ``agent.cbor`` and block
bitmaps) and what does not (the embedded broker's sessions, blocks in flight)
can only be tested on processes: a thread in the test's own process cannot be
killed like that. So this module runs ``shoal serve``, ``shoal gateway`` and
``shoal mcu-sim`` (behind a :class:`~otaio.wire.PacedWire`, the UART stand-in)
exactly as an operator would, and talks to them only as an operator does:
through the operator API, the files a service keeps in its data folder, and
its output.

Rules:

* Every process writes stdout and stderr to files under ``logs/``, never to a
  pipe: nobody reads a pipe while a test waits, and a chatty service blocks
  once one is full. What a test needs from stdout (the broker port, a pty
  path) is polled from the file with a deadline, so a process that hangs or
  dies fails the test with its log instead of hanging it.
* Every process is ended by its own pid: SIGTERM, then SIGKILL after a grace
  period. :class:`ProcessFleet` ends all it started, whatever the test did.
* Nothing waits by sleeping: :func:`wait_for` polls a condition until a
  deadline.
* No fixed ports: the first ``shoal serve --port 0`` picks one and prints it;
  a restart reuses it, as a real deployment's configuration would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from otaio.mqtt import MqttClient, MqttSettings
from otaio.wire import PacedWire, WireConfig
from otaproto import cbor, fleet
from otaproto import topics as t
from otaproto.errors import LinkBroken, LinkError
from shoal.opsclient import OperatorError, OperatorLogin
from tests.node_fixtures import DEVICE, shoal, write_keys

T = TypeVar("T")

#: How long a service may take to print its first line (a cold Python start is slow on CI).
START_TIMEOUT_S = 30.0
#: How long SIGTERM is given before SIGKILL.
STOP_GRACE_S = 10.0
POLL_S = 0.05
_PORT_LINE = re.compile(r"MQTT on [^ ]+:(\d+);")


def wait_for(
    check: Callable[[], T | None],
    timeout_s: float,
    what: str,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something true, and return that.

    Raises AssertionError naming ``what`` (and, with ``diagnose``, the logs
    that explain it) when the deadline passes first.
    """
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = "" if diagnose is None else "\n" + diagnose()
            raise AssertionError(f"{what}: not reached within {timeout_s:g} s{detail}")
        pause.wait(POLL_S)


class Service:
    """One process with its output in files; see the module rules."""

    def __init__(self, name: str, argv: list[str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def running(self) -> bool:
        """True until the process has exited."""
        return self.proc.poll() is None

    def first_line(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """The first line the process printed; fails with its log if it dies or stays silent."""

        def line() -> str | None:
            text = self.out_path.read_text(errors="replace")
            if "\n" in text:
                return text.split("\n", 1)[0]
            if not self.running:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            return None

        return wait_for(line, timeout_s, f"{self.name} to start", self.log)

    def log(self, lines: int = 40) -> str:
        """The end of its stderr, for failure messages (without amqtt's state-machine chatter)."""
        text = self.err_path.read_text(errors="replace").splitlines()
        wanted = [line for line in text if " transitions.core " not in line][-lines:]
        return f"--- {self.err_path} ---\n" + "\n".join(wanted)

    def kill(self) -> None:
        """SIGKILL: a crash or a power cut, nothing is flushed or said goodbye."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not end in time."""
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class OperatorSession:
    """One long-lived operator connection for all of a test's requests; reconnects as needed.

    Why not :func:`shoal.opsclient.call` (a connection per request): amqtt
    0.12's broadcast loop walks the subscriber list of a topic while it awaits
    its ACL plugin, and a client disconnecting meanwhile is popped from that
    same list, so the next subscriber is skipped. A test polling
    ``deploy.status`` opens hundreds of short connections on one response
    topic and loses about one reply in a hundred. A single subscriber has no
    neighbour to be skipped for. When the orchestrator (and so its broker)
    restarts, the next request connects again.
    """

    def __init__(self, login: OperatorLogin) -> None:
        self.login = login
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="operator", daemon=True)
        self._thread.start()
        self._client: MqttClient | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def request(self, op: str, args: dict[str, Any], timeout_s: float = 15.0) -> Any:
        """One request; its result. Raises OperatorError (refused) and LinkError."""
        future = asyncio.run_coroutine_threadsafe(self._request(op, args, timeout_s), self._loop)
        return future.result(timeout_s + 15)

    def close(self) -> None:
        """Disconnect and stop the session's event loop."""
        asyncio.run_coroutine_threadsafe(self._disconnect(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _request(self, op: str, args: dict[str, Any], timeout_s: float) -> Any:
        request_id = secrets.token_hex(8)
        body = cbor.encode({"id": request_id, "op": op, "args": args})
        reply = self._loop.create_future()
        self._waiting[request_id] = reply
        try:
            for attempt in range(2):  # a stale connection (the broker restarted) is noticed here
                client = await self._connect()
                try:
                    await client.publish(t.op_request(self.login.operator, op), body)
                    break
                except LinkError:
                    await self._disconnect()
                    if attempt:
                        raise
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await reply
            except TimeoutError as exc:
                raise LinkBroken(f"no reply to {op} within {timeout_s:g} s") from exc
        finally:
            self._waiting.pop(request_id, None)
        if not answer["ok"]:
            raise OperatorError(str(answer.get("error", "refused")))
        return answer.get("result")

    async def _connect(self) -> MqttClient:
        if self._client is not None and self._client.connected:
            return self._client
        await self._disconnect()
        login = self.login
        settings = MqttSettings(
            host=login.host, port=login.port, client_id=f"test-op-{secrets.token_hex(4)}",
            username=login.operator, password=login.password,
        )  # fmt: skip
        client = MqttClient(settings)
        await client.__aenter__()
        self._client = client
        await client.subscribe(t.operator_response(login.operator))
        self._reader = self._loop.create_task(self._read(client))
        return client

    async def _read(self, client: MqttClient) -> None:
        with contextlib.suppress(LinkError):
            async for message in client.messages():
                reply = fleet.decode_response(message.payload)
                waiter = self._waiting.get(str(reply.get("id")))
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(LinkError):
                await client.close()


class TcpRelay:
    """A TCP relay in front of the broker whose broker-to-client direction can be held.

    Held bytes stay in the relay: the client sees a slow network, nothing is
    lost or reordered, and the next connection starts clean. It makes "kill
    the gateway in the middle of a download" exact instead of a race against
    a fast localhost: :meth:`hold_after` lets a known number of bytes through,
    then the download stalls until the test kills the gateway.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self._down_bytes = 0
        self._limit: int | None = None
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept, "relay-accept")

    def hold_after(self, n_bytes: int) -> None:
        """Let ``n_bytes`` more bytes reach clients, then hold the rest until :meth:`release`."""
        with self._cond:
            self._limit = self._down_bytes + n_bytes

    def release(self) -> None:
        """Stop holding."""
        with self._cond:
            self._limit = None
            self._cond.notify_all()

    def close(self) -> None:
        """Drop every connection, stop listening and join the relay's threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in [self._listener, *self._sockets]:
            sock.close()

    def _start(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._cond:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            link = _Link(client, upstream)
            self._start(self._pump, "relay-up", link, False)
            self._start(self._pump, "relay-down", link, True)

    def _pump(self, link: _Link, down: bool) -> None:
        src, dst = (link.upstream, link.client) if down else (link.client, link.upstream)
        try:
            while data := src.recv(65536):
                view = memoryview(data)
                while view:
                    allowed = self._allowance(len(view), link) if down else len(view)
                    if allowed == 0:
                        return
                    dst.sendall(view[:allowed])
                    view = view[allowed:]
        except OSError:
            pass
        finally:
            # One side gone means the connection is gone, as it would be on a real network.
            with self._cond:
                link.ended = True
                self._cond.notify_all()
            for sock in (link.client, link.upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _allowance(self, wanted: int, link: _Link) -> int:
        """Bytes that may go on now (0: the connection ended); blocks while held."""
        with self._cond:
            while (
                self._limit is not None
                and self._down_bytes >= self._limit
                and not (self._closed or link.ended)
            ):
                self._cond.wait()
            if self._closed or link.ended:
                return 0
            allowed = wanted if self._limit is None else min(wanted, self._limit - self._down_bytes)
            self._down_bytes += allowed
            return allowed


@dataclass
class _Link:
    """One relayed connection; ``ended`` once either side closed it."""

    client: socket.socket
    upstream: socket.socket
    ended: bool = False


@dataclass
class Node:
    """A ``shoal mcu-sim`` process on one end of a paced serial line."""

    name: str  #: the node's id on its gateway
    wire: PacedWire
    service: Service
    state_dir: Path

    def said(self, text: str) -> bool:
        """True once the node's log has a line containing ``text``."""
        return text in self.service.err_path.read_text(errors="replace")


@dataclass
class Gateway:
    """A registered gateway: its ``gateway.toml`` and the process running it, if any."""

    id: str
    config: Path
    data_dir: Path
    nodes: list[Node]
    service: Service | None = None

    def agent_state(self) -> dict[str, Any]:
        """What the agent persisted: ``handled_seq`` and its unfinished ``jobs``."""
        raw = cbor.decode((self.data_dir / "agent.cbor").read_bytes(), "agent state")
        assert isinstance(raw, dict)
        return raw

    def blocks_on_disk(self, artifact: bytes) -> tuple[int, int]:
        """(blocks held, blocks in all) of the download of ``artifact``, from its bitmap file."""
        path = self.data_dir / "downloads" / f"{hashlib.sha256(artifact).hexdigest()}.map"
        try:
            bitmap = path.read_bytes()
        except FileNotFoundError:
            return 0, 0
        return sum(1 for b in bitmap if b), len(bitmap)


class ProcessFleet:
    """An orchestrator, gateways and nodes as processes under ``root``; ends them all on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.trust = write_keys(root / "keys") / "release.pub"
        self.data = root / "orchestrator"
        self.port = 0
        self.orchestrator: Service | None = None
        self.gateways: dict[str, Gateway] = {}
        self._operator: OperatorSession | None = None
        self._stack = ExitStack()
        self._names: Counter[str] = Counter()
        self._services: list[Service] = []

    def __enter__(self) -> ProcessFleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._operator is not None:
                self._operator.close()
        finally:
            try:
                # Gateways first (they would only retry), then the broker, then the nodes.
                gateways = [g.service for g in self.gateways.values() if g.service is not None]
                for service in [*gateways, *reversed(self._services)]:
                    service.stop()
            finally:
                self._stack.close()

    # -- processes -----------------------------------------------------------------

    def start(self, name: str, argv: list[str]) -> Service:
        """Start a process logged as ``name`` (numbered from its second start on)."""
        self._names[name] += 1
        count = self._names[name]
        service = Service(name if count == 1 else f"{name}.{count}", argv, self.logs)
        self._services.append(service)
        return service

    def diagnose(self) -> str:
        """The end of every log, newest process first: what a failed wait prints."""
        return "\n".join(s.log(15) for s in reversed(self._services))

    def wait(self, check: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
        """:func:`wait_for` with this fleet's logs as the diagnosis."""
        return wait_for(check, timeout_s, what, self.diagnose)

    def relay(self) -> TcpRelay:
        """A :class:`TcpRelay` to the broker, closed with the fleet."""
        relay = TcpRelay(self.port)
        self._stack.callback(relay.close)
        return relay

    # -- the orchestrator ------------------------------------------------------------

    def start_orchestrator(self) -> Service:
        """``shoal serve`` on the fleet's data folder: a free port the first time, then the same."""
        argv = shoal(
            "serve", "--data", str(self.data), "--trust", str(self.trust), "--port", str(self.port)
        )
        service = self.start("orchestrator", argv)
        match = _PORT_LINE.search(service.first_line())
        assert match is not None, f"no port in the first line of:\n{service.log()}"
        self.port = int(match.group(1))
        if self._operator is None:
            secret = (self.data / "admin.secret").read_text().strip()
            self._operator = OperatorSession(OperatorLogin("127.0.0.1", self.port, "admin", secret))
        self.orchestrator = service
        return service

    def ops(self, op: str, **args: Any) -> Any:
        """One operator request as ``admin``."""
        assert self._operator is not None, "start the orchestrator first"
        return self._operator.request(op, args)

    def gateway_info(self, gateway_id: str) -> dict[str, Any]:
        """``devices.show`` of a gateway."""
        info = self.ops("devices.show", id=gateway_id)
        assert isinstance(info, dict)
        return info

    def deployment(self, deployment_id: str) -> dict[str, dict[str, Any]]:
        """``deploy.status`` per target ``gateway/node``."""
        status = self.ops("deploy.status", id=deployment_id)
        return {n["target"]: n for n in status["nodes"]}

    # -- nodes and gateways ----------------------------------------------------------

    def start_node(
        self, gateway_id: str, name: str, initial: Path, baud: int, slot_kib: int = 64
    ) -> Node:
        """An ``mcu-sim`` node provisioned with ``initial``, behind a line paced at ``baud``."""
        wire = self._stack.enter_context(PacedWire(WireConfig(baud=baud)))
        label = f"{gateway_id}-{name}"
        state_dir = self.root / "nodes" / label
        argv = shoal(
            "mcu-sim", "--port", wire.b_path, "--state-dir", str(state_dir), "--device-type",
            DEVICE, "--trust", str(self.trust), "--initial-artifact", str(initial),
            "--slot-kib", str(slot_kib), "--no-flash-timing",
        )  # fmt: skip
        return Node(name, wire, self.start(f"node-{label}", argv), state_dir)

    def add_gateway(self, gateway_id: str, nodes: list[Node], port: int | None = None) -> Gateway:
        """Register and accept a gateway and write its ``gateway.toml`` (MQTT on ``port``)."""
        for node in nodes:
            assert node.service.first_line() == node.wire.b_path, node.service.log()
        secret = self.ops("devices.add", id=gateway_id)["secret"]
        self.ops("devices.accept", id=gateway_id)
        data_dir = self.root / gateway_id
        lines = [
            "[gateway]",
            f"id = {json.dumps(gateway_id)}",
            f"data_dir = {json.dumps(str(data_dir))}",
            f"trust = [{json.dumps(str(self.trust))}]",
            "[mqtt]",
            'host = "127.0.0.1"',
            f"port = {self.port if port is None else port}",
            f"password = {json.dumps(secret)}",
        ]
        for node in nodes:
            lines += [
                f"[nodes.{node.name}]",
                f"port = {json.dumps(node.wire.a_path)}",
                f"baud = {node.wire.config.baud}",
            ]
        config = self.root / f"{gateway_id}.toml"
        config.write_text("\n".join(lines) + "\n")
        gateway = Gateway(gateway_id, config, data_dir, nodes)
        self.gateways[gateway_id] = gateway
        return gateway

    def start_gateway(self, gateway_id: str) -> Service:
        """``shoal gateway --config`` for a registered gateway."""
        gateway = self.gateways[gateway_id]
        assert gateway.service is None or not gateway.service.running, "already running"
        gateway.service = self.start(gateway_id, shoal("gateway", "--config", str(gateway.config)))
        return gateway.service

    def wait_inventory(self, gateway_id: str) -> dict[str, Any]:
        """Wait until every node of a gateway has reported the image it runs; its devices.show."""

        def reported() -> dict[str, Any] | None:
            info = self.gateway_info(gateway_id)
            nodes = info["nodes"]
            if nodes and all(n["primary"] is not None for n in nodes):
                return info
            return None

        return self.wait(reported, f"the inventory of {gateway_id}")

    def wait_online(self, gateway_id: str, online: bool) -> None:
        """Wait until the orchestrator sees a gateway online (or offline)."""
        state = "online" if online else "offline"
        self.wait(
            lambda: self.gateway_info(gateway_id)["online"] == online, f"{gateway_id} {state}"
        )


@contextlib.contextmanager
def process_fleet(root: Path) -> Iterator[ProcessFleet]:
    """A :class:`ProcessFleet` with its orchestrator started."""
    with ProcessFleet(root) as fleet:
        fleet.start_orchestrator()
        yield fleet
