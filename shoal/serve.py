"""``shoal serve``: the orchestrator on an MQTT connection, with the embedded broker by default.

Rules:

* The orchestrator core (:mod:`orchestrator`) decides; this loop moves its
  effects: messages to publish, in order, and sessions to drop (a revoked
  gateway is cut off at once, not at its next reconnect).
* With the embedded broker (amqtt), the broker asks the orchestrator's
  registry on every CONNECT, so accounts live in one place. With an external
  broker (mosquitto), ``shoal broker mosquitto-config`` writes its password
  and ACL files from the same registry.
* A first start creates the operator ``admin`` and writes its secret to
  ``DATA/admin.secret`` (mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from broker.embedded import EmbeddedBroker, TlsFiles
from orchestrator.core import Effects, Orchestrator
from otaio.files import write_atomic
from otaio.mqtt import MqttClient, MqttSettings
from otaproto import topics as t
from otaproto.keys import TrustedKeys

log = logging.getLogger("shoal.serve")

TICK_S = 0.05


@dataclass(frozen=True)
class ServeOptions:
    """Where the orchestrator keeps its data and how it reaches (or runs) the broker."""

    data_dir: Path
    trusted: TrustedKeys
    host: str = "127.0.0.1"
    port: int = 1883
    embedded: bool = True
    tls: TlsFiles | None = None
    websocket_port: int | None = None
    tls_ca_file: Path | None = None  #: external broker over TLS


def bootstrap_admin(orchestrator: Orchestrator, data_dir: Path) -> Path:
    """Create the ``admin`` operator once; its secret goes to ``admin.secret``."""
    path = data_dir / "admin.secret"
    if not path.exists():
        secret = orchestrator.add_operator("admin", "admin")
        write_atomic(path, (secret + "\n").encode(), mode=0o600)
    return path


async def serve(
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[int], Awaitable[None] | None] | None = None,
) -> None:
    """Run until ``stop`` is set. ``ready(port)`` is called once the broker accepts clients."""
    orchestrator = Orchestrator(options.data_dir, options.trusted)
    bootstrap_admin(orchestrator, options.data_dir)
    if options.embedded:
        async with EmbeddedBroker(
            orchestrator, host=options.host, port=options.port, tls=options.tls,
            websocket_port=options.websocket_port,
        ) as broker:  # fmt: skip
            await _run(
                orchestrator, options.host, broker.port, None, stop, ready, broker.disconnect
            )
    else:
        await _run(orchestrator, options.host, options.port, options.tls_ca_file, stop, ready, None)


async def _run(
    orchestrator: Orchestrator,
    host: str,
    port: int,
    tls_ca_file: Path | None,
    stop: asyncio.Event,
    ready: Callable[[int], Awaitable[None] | None] | None,
    disconnect: Callable[[str], Awaitable[None]] | None,
) -> None:
    settings = MqttSettings(
        host=host, port=port, client_id="shoal-orchestrator", username="orchestrator",
        password=orchestrator.orchestrator_secret, tls_ca_file=tls_ca_file,
    )  # fmt: skip
    async with MqttClient(settings) as client:
        await client.subscribe(t.ALL_GATEWAY_UP)
        await client.subscribe(t.ALL_OPERATOR_REQUESTS)
        log.info("orchestrator connected to %s:%d", host, port)
        if ready is not None:
            result = ready(port)
            if result is not None:
                await result

        async def apply(effects: Effects) -> None:
            for message in effects.outgoing:
                await client.publish(message.topic, message.payload)
            for username in effects.disconnect:
                if disconnect is not None:
                    await disconnect(username)

        async def ticker() -> None:
            while True:
                await apply(orchestrator.tick())
                await asyncio.sleep(TICK_S)

        async def receiver() -> None:
            async for message in client.messages():
                await apply(orchestrator.handle(message.topic, message.payload))

        tasks = [
            asyncio.create_task(ticker(), name="orchestrator-ticker"),
            asyncio.create_task(receiver(), name="orchestrator-receiver"),
            asyncio.create_task(stop.wait(), name="orchestrator-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
