"""otaio.mqtt: the asyncio MQTT client, on both real brokers and on a fake one that holds acks."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from otaio.mqtt import AuthRefused, Message, MqttClient, MqttSettings, SubscribeRefused
from otaproto.errors import LinkBroken, LinkClosed, UsageError
from otaproto.topics import ALL_GATEWAY_UP, Down, Up, gateway_down, gateway_up
from tests.brokers import (
    BROKER_KINDS,
    CONNACK,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBLISH,
    FleetAccounts,
    async_test,
    free_port,
    mqtt_packet,
    mqtt_string,
    next_message,
    publish_packet,
    read_packet,
    running_broker,
    running_embedded,
)

A_HELLO = gateway_up("gw-a", Up.HELLO)
A_COMMANDS = gateway_down("gw-a", Down.COMMAND)
A_DOWN = gateway_down("gw-a", Down.COMMAND).rsplit("/", 1)[0] + "/#"

each_broker = pytest.mark.parametrize("kind", BROKER_KINDS)


def paho_threads() -> list[str]:
    """Threads of MQTT clients still running (each gets a moment to finish returning)."""
    threads = [t for t in threading.enumerate() if t.name.startswith(("paho-", "shoal-mqtt-"))]
    for thread in threads:
        thread.join(timeout=2)
    return [t.name for t in threads if t.is_alive()]


class FakeBroker:
    """Just enough of an MQTT 3.1.1 broker for one client: answers CONNECT and PINGREQ,
    records every packet, and sends only what the test tells it to (no PUBACK by itself)."""

    def __init__(self, *, answer_connect: bool = True) -> None:
        self.answer_connect = answer_connect
        self.packets: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()
        self.port = 0
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeBroker]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            if self._writer is not None:
                self._writer.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writer = writer
        while (packet := await read_packet(reader)) is not None:
            await self.packets.put(packet)
            if packet[0] == 1 and self.answer_connect:
                writer.write(mqtt_packet(CONNACK << 4, b"\x00\x00"))
            elif packet[0] == PINGREQ:
                writer.write(mqtt_packet(PINGRESP << 4, b""))
        writer.close()

    def send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    async def expect(self, packet_type: int, timeout_s: float = 5.0) -> tuple[int, int, bytes]:
        """The next packet of ``packet_type`` the client sent (others are skipped)."""
        async with asyncio.timeout(timeout_s):
            while True:
                packet = await self.packets.get()
                if packet[0] == packet_type:
                    return packet


def fake_settings(port: int, **overrides: object) -> MqttSettings:
    return MqttSettings("127.0.0.1", port, client_id="fake-client", **overrides)  # type: ignore[arg-type]


# --- on both real brokers ---------------------------------------------------------------------


@each_broker
@async_test
async def test_connect_subscribe_publish_round_trip(kind: str, tmp_path: Path) -> None:
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        async with (
            MqttClient(broker.settings("orch")) as orch,
            MqttClient(broker.settings("gw-a")) as gateway,
        ):
            assert orch.connected and gateway.connected
            assert await orch.subscribe(ALL_GATEWAY_UP) == 1
            assert await gateway.subscribe(A_DOWN) == 1
            await gateway.publish(A_HELLO, b"hello")
            assert await next_message(orch.messages()) == Message(A_HELLO, b"hello", 1, False)
            await orch.publish(A_COMMANDS, b"deploy")
            assert await next_message(gateway.messages()) == Message(
                A_COMMANDS, b"deploy", 1, False
            )
        assert not gateway.connected
    assert paho_threads() == []


@each_broker
@async_test
async def test_256_kib_payload_round_trip(kind: str, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1024
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a")) as gateway,
    ):
        await gateway.subscribe(A_COMMANDS)
        await orch.publish(A_COMMANDS, payload)
        received = await next_message(gateway.messages())
        assert received.payload == payload


@each_broker
@pytest.mark.parametrize(
    ("username", "password"),
    [("gw-a", "wrong secret"), ("nobody", "secret-of-nobody"), (None, None)],
    ids=["bad-password", "unknown-account", "anonymous"],
)
@async_test
async def test_refused_credentials_raise_auth_refused(
    kind: str, username: str | None, password: str | None, tmp_path: Path
) -> None:
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        client = MqttClient(broker.settings(username, password=password))
        with pytest.raises(AuthRefused, match="refused the credentials"):
            async with client:
                pass
        assert not client.connected
        with pytest.raises(AuthRefused):
            await client.publish(A_HELLO, b"")
    assert paho_threads() == []


@each_broker
@async_test
async def test_a_dropped_connection_ends_messages_with_link_broken(
    kind: str, tmp_path: Path
) -> None:
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        client = MqttClient(broker.settings("gw-a"))
        await client.__aenter__()
    try:  # the broker is gone (embedded: stopped, mosquitto: terminated)
        with pytest.raises(LinkBroken, match="lost"):
            await next_message(client.messages())
        assert not client.connected
        with pytest.raises(LinkBroken):
            await client.publish(A_HELLO, b"too late")
    finally:
        await client.close()
    with pytest.raises(LinkBroken):  # the first reason stays, also after close
        await next_message(client.messages())
    assert paho_threads() == []


@async_test
async def test_subscribe_refused_leaves_the_connection_usable(tmp_path: Path) -> None:
    async with (
        running_broker("embedded", tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("gw-a")) as gateway,
        MqttClient(broker.settings("orch")) as orch,
    ):
        with pytest.raises(SubscribeRefused, match="'#'"):
            await gateway.subscribe("#")
        assert gateway.connected
        await orch.subscribe(ALL_GATEWAY_UP)
        await gateway.publish(A_HELLO, b"still here")
        assert (await next_message(orch.messages())).payload == b"still here"


@async_test
async def test_will_is_published_when_the_link_drops_but_not_on_a_clean_exit(
    tmp_path: Path,
) -> None:
    state = gateway_up("gw-a", Up.STATE)
    async with running_broker("embedded", tmp_path, FleetAccounts()) as broker:
        assert broker.embedded is not None
        async with MqttClient(broker.settings("orch")) as orch:
            await orch.subscribe(ALL_GATEWAY_UP)
            orch_messages = orch.messages()
            async with MqttClient(broker.settings("gw-a", will_topic=state, will_payload=b"gone")):
                pass  # a clean exit: the broker must drop the will
            async with MqttClient(
                broker.settings("gw-a", will_topic=state, will_payload=b"dropped")
            ) as gateway:
                await gateway.publish(A_HELLO, b"fence")
                assert (await next_message(orch_messages)).payload == b"fence"
                await broker.embedded.disconnect("gw-a")
                with pytest.raises(LinkBroken):
                    await next_message(gateway.messages())
            assert await next_message(orch_messages) == Message(state, b"dropped", 1, False)


@async_test
async def test_websocket_transport() -> None:
    accounts = FleetAccounts()
    async with running_embedded(accounts, websocket_port=0) as embedded:
        assert embedded.websocket_port not in (None, 0)
        assert embedded.websocket_port is not None
        ws = MqttSettings(
            "127.0.0.1",
            embedded.websocket_port,
            client_id="gw-a.ws",
            username="gw-a",
            password=accounts.secret("gw-a"),
            transport="websockets",
        )
        tcp = MqttSettings(
            "127.0.0.1",
            embedded.port,
            client_id="orch.tcp",
            username="orch",
            password=accounts.secret("orch"),
        )
        async with MqttClient(ws) as gateway, MqttClient(tcp) as orch:
            await gateway.subscribe(A_COMMANDS)
            await orch.subscribe(ALL_GATEWAY_UP)
            await gateway.publish(A_HELLO, b"over websockets")
            assert (await next_message(orch.messages())).payload == b"over websockets"
            await orch.publish(A_COMMANDS, b"x" * 100_000)
            assert len((await next_message(gateway.messages())).payload) == 100_000


# --- on a fake broker: what no real broker lets a test control ---------------------------------


@async_test
async def test_qos1_publish_returns_only_after_the_puback() -> None:
    async with FakeBroker().running() as fake, MqttClient(fake_settings(fake.port)) as client:
        publishing = asyncio.create_task(client.publish("t/held", b"payload", qos=1))
        _, flags, body = await fake.expect(PUBLISH)
        assert flags == 0b0010  # QoS 1, not retained, not a duplicate
        topic_length = int.from_bytes(body[:2], "big")
        assert body[2 : 2 + topic_length] == b"t/held"
        packet_id = body[2 + topic_length : 4 + topic_length]
        assert not publishing.done()
        fake.send(mqtt_packet(PUBACK << 4, packet_id))
        await asyncio.wait_for(publishing, 5)


@async_test
async def test_qos1_publish_without_puback_times_out_as_link_broken() -> None:
    async with FakeBroker().running() as fake, MqttClient(fake_settings(fake.port)) as client:
        started = time.monotonic()
        with pytest.raises(LinkBroken, match=r"acknowledged no publish for 0\.2 s"):
            await client.publish("t/never-acked", b"", timeout_s=0.2)
        assert time.monotonic() - started < 2
        assert client.connected  # a lost ack is not a lost link


@async_test
async def test_a_queued_publish_waits_while_the_broker_acknowledges_others() -> None:
    # A long queue drains through paho's window at the broker's pace: a publish
    # whose own ack comes later than timeout_s after its start is not lost while
    # acks for the others keep coming; silence for timeout_s is.
    timeout_s = 0.5
    async with FakeBroker().running() as fake, MqttClient(fake_settings(fake.port)) as client:
        first = await client.start_publish("t/a", b"a", timeout_s=timeout_s)
        second = await client.start_publish("t/b", b"b", timeout_s=timeout_s)
        ids = []
        for _ in range(2):
            _, _, body = await fake.expect(PUBLISH)
            length = int.from_bytes(body[:2], "big")
            ids.append(body[2 + length : 4 + length])
        # The broker's pace, part of the scenario: one ack 0.4 s in, the other 0.8 s in.
        await asyncio.sleep(0.4)
        fake.send(mqtt_packet(PUBACK << 4, ids[0]))
        await asyncio.wait_for(first, 5)
        await asyncio.sleep(0.4)
        fake.send(mqtt_packet(PUBACK << 4, ids[1]))
        await asyncio.wait_for(second, 5)  # 0.8 s after its start, past its timeout_s
        with pytest.raises(LinkBroken, match="acknowledged no publish"):
            await client.publish("t/c", b"c", timeout_s=timeout_s)


@async_test
async def test_qos0_publish_is_never_retained() -> None:
    async with FakeBroker().running() as fake, MqttClient(fake_settings(fake.port)) as client:
        await client.publish("t/zero", b"z", qos=0)
        _, flags, body = await fake.expect(PUBLISH)
        assert flags == 0 and body == mqtt_string("t/zero") + b"z"


@async_test
async def test_will_is_qos1_and_never_retained() -> None:
    async with FakeBroker().running() as fake:
        settings = fake_settings(fake.port, will_topic="t/will", will_payload=b"bye")
        async with MqttClient(settings):
            _, _, body = await fake.expect(1)
    connect_flags = body[len(mqtt_string("MQTT")) + 1]
    assert connect_flags & 0x04  # will
    assert (connect_flags >> 3) & 0x03 == 1  # will QoS 1
    assert not connect_flags & 0x20  # will retain


@async_test
async def test_no_connack_within_the_timeout_is_link_broken() -> None:
    async with FakeBroker(answer_connect=False).running() as fake:
        client = MqttClient(fake_settings(fake.port, connect_timeout_s=0.3))
        started = time.monotonic()
        with pytest.raises(LinkBroken, match="no CONNACK"):
            await client.__aenter__()
        assert time.monotonic() - started < 2
    assert paho_threads() == []


@async_test
async def test_a_refused_tcp_connection_is_link_broken() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(LinkBroken, match="cannot connect"):
        async with MqttClient(fake_settings(port, connect_timeout_s=2)):
            pass
    assert paho_threads() == []


@async_test
async def test_a_consumer_that_falls_behind_gets_its_messages_then_link_broken() -> None:
    async with (
        FakeBroker().running() as fake,
        MqttClient(dataclasses.replace(fake_settings(fake.port), max_queued_messages=5)) as client,
    ):
        fake.send(b"".join(publish_packet(f"t/{n}", b"", qos=0) for n in range(6)))
        await fake.expect(DISCONNECT)  # the client gave up on its consumer
        stream = client.messages()
        assert [(await next_message(stream)).topic for _ in range(5)] == [
            f"t/{n}" for n in range(5)
        ]
        with pytest.raises(LinkBroken, match="unread MQTT messages"):
            await next_message(stream)


@async_test
async def test_after_exit_everything_raises_link_closed() -> None:
    async with FakeBroker().running() as fake:
        async with MqttClient(fake_settings(fake.port)) as client:
            stream = client.messages()
        await fake.expect(DISCONNECT)
        assert not client.connected
        with pytest.raises(LinkClosed):
            await next_message(stream)
        with pytest.raises(LinkClosed):
            await next_message(client.messages())
        with pytest.raises(LinkClosed):
            await client.publish("t/x", b"")
        with pytest.raises(LinkClosed):
            await client.subscribe("t/x")
        await client.close()  # idempotent
    assert paho_threads() == []


# --- misuse ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 0},
        {"host": ""},
        {"client_id": ""},
        {"transport": "udp"},
        {"password": "secret"},
        {"connect_timeout_s": 0},
    ],
)
def test_settings_that_can_never_work_raise_usage_error(bad: dict[str, object]) -> None:
    values: dict[str, object] = {"host": "127.0.0.1", "port": 1883, "client_id": "c"} | bad
    with pytest.raises(UsageError):
        MqttSettings(**values)  # type: ignore[arg-type]


def test_the_password_stays_out_of_repr() -> None:
    settings = MqttSettings("h", 1, client_id="c", username="u", password="hunter2")
    assert "hunter2" not in repr(settings)


@async_test
async def test_using_a_client_before_entering_it_raises_usage_error() -> None:
    client = MqttClient(fake_settings(1883))
    with pytest.raises(UsageError):
        await client.publish("t/x", b"")
    with pytest.raises(UsageError):
        await client.subscribe("t/x")
    with pytest.raises(UsageError):
        client.messages()


@async_test
async def test_bad_topics_and_reentry_raise_usage_error() -> None:
    async with FakeBroker().running() as fake, MqttClient(fake_settings(fake.port)) as client:
        with pytest.raises(UsageError):
            await client.publish("t/+/wildcard", b"")
        with pytest.raises(UsageError):
            await client.publish("t/x", b"", qos=3)
        with pytest.raises(UsageError):
            await client.subscribe("t/#/not-last")
        with pytest.raises(UsageError):
            await client.__aenter__()
        assert client.connected
