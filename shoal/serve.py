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
* A lost broker connection is not the end of the service: it reconnects,
  backing off from 0.5 s to 15 s, for as long as it runs (a broker restart, a
  network cut). Only refused credentials (:class:`AuthRefused`) end it, since
  trying them again cannot help. ``ready`` is called after the first connect
  only.
* On an external broker the orchestrator keeps a persistent session
  (``clean_session`` false, fixed client id): what gateways and operators
  publish while it is away is queued by the broker (and, with mosquitto's
  ``persistence``, survives a broker restart) and handled when it is back.
  After a broker restart the gateways are often back first: their HELLO and
  the status reports they were holding (a node's final one among them) go
  out at once, and without this queue they would reach nobody. The embedded
  broker lives and dies with this process, so its session stays clean.
* Messages are handled in batches: the receiver waits for one, takes up to
  :data:`BATCH_MESSAGES` - 1 more that have already arrived, hands them to
  :meth:`Orchestrator.handle_batch` (one transaction: one commit, one fsync,
  for all of them), and acknowledges them to the broker only after that
  returned, so nothing acknowledged can be lost and a crash makes the broker
  send the rest again. It does not wait for a batch to fill: under load
  messages queue up behind the one being handled, and a lone message is
  handled at once. The broker's in-flight window (``max_inflight_messages``,
  :mod:`broker.mosquitto`) bounds what is unacknowledged, and so the batch;
  everything beyond it waits in the broker's queue, not in this process.
* Effects are published in order without waiting for each PUBACK (up to the
  client's limit in flight); a publish that fails ends the session like a lost
  link, and the outbox sends again what was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from broker.embedded import EmbeddedBroker, TlsFiles
from orchestrator.core import Effects, Orchestrator, StorageUnavailable
from otaio.files import write_atomic
from otaio.mqtt import AuthRefused, MqttClient, MqttSettings
from otaio.mqtt_common import fresh
from otaproto import topics as t
from otaproto.errors import LinkBroken, LinkError
from otaproto.keys import TrustedKeys

log = logging.getLogger("shoal.serve")

TICK_S = 0.05
#: Most messages handled in one transaction (the broker's in-flight window bounds it too).
BATCH_MESSAGES = 500
#: A fleet's burst of status reports waits here rather than in a reconnect loop.
ORCHESTRATOR_QUEUE_MESSAGES = 250_000
#: Pauses between reconnect attempts; the last one repeats.
RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
#: Waits before handling messages again that the database could not store.
STORAGE_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


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
    """Stay connected until ``stop`` is set, one session after another (see the module rules)."""
    settings = MqttSettings(
        host=host, port=port, client_id="shoal-orchestrator", username="orchestrator",
        password=orchestrator.orchestrator_secret, tls_ca_file=tls_ca_file,
        clean_session=disconnect is not None,  # external broker: keep our queue while away
        manual_ack=True,  # a message is acknowledged once the database holds what it caused
        max_queued_messages=ORCHESTRATOR_QUEUE_MESSAGES,
    )  # fmt: skip
    sessions = 0
    attempt = 0
    while not stop.is_set():
        connected = asyncio.Event()
        try:
            await _session(
                orchestrator, settings, stop, ready if sessions == 0 else None, disconnect,
                connected,
            )  # fmt: skip
            return
        except AuthRefused:
            raise
        except LinkError as exc:
            if connected.is_set():
                sessions += 1
                attempt = 0
            delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
            attempt += 1
            log.warning("orchestrator: %s; reconnecting in %.1f s", exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


async def _session(
    orchestrator: Orchestrator,
    settings: MqttSettings,
    stop: asyncio.Event,
    ready: Callable[[int], Awaitable[None] | None] | None,
    disconnect: Callable[[str], Awaitable[None]] | None,
    connected: asyncio.Event,
) -> None:
    """One connection: subscribe, then move messages and ticks until ``stop`` or a lost link."""
    async with MqttClient(settings) as client:
        await client.subscribe(t.ALL_GATEWAY_UP)
        for requests in t.ALL_OPERATOR_REQUESTS:  # one filter per request channel
            await client.subscribe(requests)
        connected.set()
        log.info("orchestrator connected to %s:%d", settings.host, settings.port)
        if ready is not None:
            result = ready(settings.port)
            if result is not None:
                await result

        publisher = _Publisher(client)

        async def apply(effects: Effects) -> None:
            for message in effects.outgoing:
                await publisher.send(message.topic, message.payload)
            for username in effects.disconnect:
                if disconnect is not None:
                    await disconnect(username)

        async def ticker() -> None:
            while True:
                await apply(orchestrator.tick())
                await asyncio.sleep(TICK_S)

        async def receiver() -> None:
            stream = client.messages()
            while True:
                batch = [await anext(stream), *client.queued_messages(BATCH_MESSAGES - 1)]
                attempt = 0
                while batch:
                    try:
                        effects = orchestrator.handle_batch([(m.topic, m.payload) for m in batch])
                        stored, rest = batch, []
                    except StorageUnavailable as exc:
                        # The database cannot take them now (locked, full): keep the rest
                        # unacknowledged and try again, holding the broker's queue back.
                        effects, stored, rest = (
                            exc.effects,
                            batch[: exc.handled],
                            batch[exc.handled :],
                        )
                        delay = STORAGE_RETRY_S[min(attempt, len(STORAGE_RETRY_S) - 1)]
                        attempt += 1
                        log.error("orchestrator: %s; %d messages wait, again in %.1f s",
                                  exc, len(rest), delay)  # fmt: skip
                    # Committed: only now may the broker forget them, and before the
                    # effects go out (a publish that fails ends the session, and a
                    # request redelivered after its commit would run twice).
                    for message in stored:
                        client.ack(message)
                    await apply(effects)
                    batch = rest
                    if rest:
                        await asyncio.sleep(delay)  # a retry's backoff, not a wait for an event
                await asyncio.sleep(0)  # the ticker's turn between batches

        tasks = [
            asyncio.create_task(ticker(), name="orchestrator-ticker"),
            asyncio.create_task(receiver(), name="orchestrator-receiver"),
            asyncio.create_task(publisher.failure(), name="orchestrator-publisher"),
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


class _Publisher:
    """Publishes effects in order, many awaiting their PUBACK at once; remembers the first failure.

    Waiting for each PUBACK before the next publish held the orchestrator to
    one round trip per command (``shoal bench fanout``).
    """

    def __init__(self, client: MqttClient) -> None:
        self._client = client
        self._error: LinkError | None = None
        self._failed = asyncio.Event()

    async def send(self, topic: str, payload: bytes) -> None:
        """Start one publish (QoS 1). Raises LinkError (this one or an earlier one failed)."""
        if self._error is not None:
            raise fresh(self._error)
        done = await self._client.start_publish(topic, payload)
        done.add_done_callback(self._settled)

    async def failure(self) -> None:
        """Wait until a publish fails, then raise its LinkError (the session ends)."""
        await self._failed.wait()
        assert self._error is not None
        raise fresh(self._error)

    def _settled(self, done: asyncio.Future[None]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None or self._error is not None:
            return
        self._error = error if isinstance(error, LinkError) else LinkBroken(str(error))
        self._failed.set()
