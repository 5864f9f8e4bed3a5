"""A whole fleet in one test: orchestrator + embedded broker, gateways, simulated nodes.

The services run in one asyncio loop on a background thread; nodes run on
real ptys in their own threads. Everything is stopped and joined at the end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.service import run_gateway
from mcu_firmware_stub.node import SimulatedNode
from otaproto.artifact import VerifiedArtifact
from shoal.opsclient import OperatorLogin, call
from shoal.serve import ServeOptions, serve
from tests.node_fixtures import TRUST, NodeThread, node_config

START_TIMEOUT_S = 20.0


class LoopThread:
    """An asyncio loop on a thread, running services until stopped."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fleet-loop", daemon=True
        )
        self._thread.start()
        self._stops: list[asyncio.Event] = []
        self._futures: list[Any] = []

    def start(self, service: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> asyncio.Event:
        async def make_event() -> asyncio.Event:
            return asyncio.Event()

        stop = asyncio.run_coroutine_threadsafe(make_event(), self.loop).result(5)
        self._stops.append(stop)
        self._futures.append(asyncio.run_coroutine_threadsafe(service(stop), self.loop))
        return stop

    def stop_one(self, stop: asyncio.Event, timeout_s: float = 20) -> None:
        index = self._stops.index(stop)
        self.loop.call_soon_threadsafe(stop.set)
        self._futures[index].result(timeout_s)

    def close(self) -> None:
        for stop in self._stops:
            self.loop.call_soon_threadsafe(stop.set)
        errors = []
        for future in self._futures:
            try:
                future.result(20)
            except Exception as exc:
                errors.append(exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        if errors:
            raise errors[0]


@dataclass
class Fleet:
    loop: LoopThread
    data: Path
    port: int
    admin: OperatorLogin
    nodes: dict[str, NodeThread]
    orchestrator_stop: asyncio.Event

    def ops(self, op: str, **args: Any) -> Any:
        return call(self.admin, op, args, timeout_s=15)

    def add_gateway(
        self,
        gateway_id: str,
        nodes: list[str],
        folder: Path,
        initial: VerifiedArtifact | None = None,
        seed_images: tuple[bytes, ...] = (),
        node_overrides: dict[str, dict[str, Any]] | None = None,
    ) -> GatewayAgent:
        secret = self.ops("devices.add", id=gateway_id)
        secret = secret["secret"] if isinstance(secret, dict) else secret
        self.ops("devices.accept", id=gateway_id)
        ports = []
        for name in nodes:
            overrides = (node_overrides or {}).get(name, {})
            node_settings = node_config(folder / f"{gateway_id}-{name}", **overrides)
            thread = NodeThread(SimulatedNode(node_settings, initial=initial))
            self.nodes[f"{gateway_id}/{name}"] = thread
            ports.append(NodePort(name, thread.path, 2_000_000))
        config = GatewayConfig(
            gateway_id=gateway_id, data_dir=folder / gateway_id, trust=(), mqtt_host="127.0.0.1",
            mqtt_port=self.port, password=str(secret), nodes=tuple(ports),
        )  # fmt: skip
        agent = GatewayAgent(config, TRUST)
        import hashlib

        for image in seed_images:
            (config.data_dir / "images" / f"{hashlib.sha256(image).hexdigest()}.bin").write_bytes(
                image
            )
        self.loop.start(lambda stop: run_gateway(agent, stop))
        return agent


@contextmanager
def running_fleet(tmp_path: Path) -> Iterator[Fleet]:
    loop = LoopThread()
    data = tmp_path / "orchestrator"
    data.mkdir()
    ports: list[int] = []
    started = threading.Event()

    def ready(port: int) -> None:
        ports.append(port)
        started.set()

    options = ServeOptions(data_dir=data, trusted=TRUST, port=0)
    stop = loop.start(lambda s: serve(options, s, ready))
    fleet: Fleet | None = None
    try:
        assert started.wait(START_TIMEOUT_S), "orchestrator did not start"
        secret = (data / "admin.secret").read_text().strip()
        admin = OperatorLogin("127.0.0.1", ports[0], "admin", secret)
        fleet = Fleet(loop, data, ports[0], admin, {}, stop)
        yield fleet
    finally:
        try:
            loop.close()
        finally:
            if fleet is not None:
                for node in fleet.nodes.values():
                    node.stop()
