"""``shoal gateway``: the agent on a live MQTT connection, reconnecting for as long as it runs.

Rules:

* The connection carries a will (``up/state {online: false}``), so the
  orchestrator learns of a dead gateway from the broker. A clean DISCONNECT
  makes the broker drop the will, so a gateway that is stopped says offline
  itself first: otherwise the orchestrator would take it for online and
  keep sending its commands to nobody.
* After every (re)connect: subscribe to our own ``down/#``, say online and
  HELLO (which brings every unacknowledged command again), then report the
  inventory.
* Reconnects back off from 1 s to 30 s, with jitter; a refused login is
  logged and retried as well (an operator may accept the gateway later).
* Serial work runs in threads; the event loop only moves messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from gateway_proxy.agent import GatewayAgent
from otaio.mqtt import MqttClient, MqttSettings
from otaproto.errors import LinkError

log = logging.getLogger("shoal.gateway")

TICK_S = 0.1
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def settings_for(agent: GatewayAgent) -> MqttSettings:
    """The MQTT connection of this gateway, with its will."""
    config = agent.config
    will_topic, will_payload = agent.will
    return MqttSettings(
        host=config.mqtt_host,
        port=config.mqtt_port,
        client_id=f"shoal-gw-{config.gateway_id}",
        username=config.mqtt_username,
        password=config.password,
        tls_ca_file=config.tls_ca_file,
        will_topic=will_topic,
        will_payload=will_payload,
        manual_ack=True,  # a command is acknowledged once the agent has persisted it
    )


async def run_gateway(agent: GatewayAgent, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, reconnecting whenever the connection drops."""
    attempt = 0
    while not stop.is_set():
        try:
            await _session(agent, stop)
            attempt = 0
        except LinkError as exc:
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)] * random.uniform(0.8, 1.2)
            log.warning("MQTT: %s; reconnecting in %.1f s", exc, delay)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)


async def _session(agent: GatewayAgent, stop: asyncio.Event) -> None:
    async with MqttClient(settings_for(agent)) as client:
        await client.subscribe(agent.subscription)
        for topic, payload in agent.connected():
            await client.publish(topic, payload)
        log.info("connected as %s", agent.config.gateway_id)
        topic, payload = await asyncio.to_thread(agent.inventory)
        await client.publish(topic, payload)

        async def ticker() -> None:
            while True:
                for out_topic, out_payload in agent.tick():
                    await client.publish(out_topic, out_payload)
                await asyncio.sleep(TICK_S)

        async def receiver() -> None:
            async for message in client.messages():
                for out_topic, out_payload in agent.handle(message.topic, message.payload):
                    await client.publish(out_topic, out_payload)
                client.ack(message)

        async def stopper() -> None:
            await stop.wait()

        tasks = [
            asyncio.create_task(ticker(), name="gateway-ticker"),
            asyncio.create_task(receiver(), name="gateway-receiver"),
            asyncio.create_task(stopper(), name="gateway-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stop.is_set():
            with contextlib.suppress(LinkError):
                await client.publish(*agent.will)
