"""otaio.mqtt_lite: the codec alone, then the client on both real brokers and on a fake one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otaio.mqtt_lite import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBSCRIBE,
    AuthRefused,
    LiteClient,
    LiteSettings,
    Message,
    Packet,
    PacketDecoder,
    SubscribeRefused,
    encode_connect,
    encode_packet,
    encode_publish,
    parse_publish,
)
from otaproto.errors import LimitExceeded, LinkBroken, LinkClosed, MalformedError, UsageError
from otaproto.topics import ALL_GATEWAY_UP, Down, Up, gateway_down, gateway_up
from tests.brokers import (
    BROKER_KINDS,
    FleetAccounts,
    RunningBroker,
    async_test,
    connect_packet,
    free_port,
    mqtt_packet,
    publish_packet,
    read_packet,
    running_broker,
)

A_HELLO = gateway_up("gw-a", Up.HELLO)
A_STATE = gateway_up("gw-a", Up.STATE)
A_COMMANDS = gateway_down("gw-a", Down.COMMAND)
A_DOWN = A_COMMANDS.rsplit("/", 1)[0] + "/#"

each_broker = pytest.mark.parametrize("kind", BROKER_KINDS)


def lite(broker: RunningBroker, username: str, **overrides: Any) -> LiteSettings:
    """Settings for ``username`` of the test accounts, with its right secret by default."""
    overrides.setdefault("password", broker.accounts.secret(username))
    overrides.setdefault("client_id", f"lite-{username}-{os.urandom(4).hex()}")
    return LiteSettings(broker.host, broker.port, username=username, **overrides)


async def next_message(stream: AsyncIterator[Message], timeout_s: float = 5.0) -> Message:
    async with asyncio.timeout(timeout_s):
        return await anext(stream)


# --- the codec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_golden_vectors(length: int, encoded: bytes) -> None:
    """The examples of MQTT 3.1.1 table 2.4, boundaries included."""
    header = encode_packet(PUBLISH, 0, bytes(length))[: 1 + len(encoded)]
    assert header == bytes([PUBLISH << 4]) + encoded


def test_connect_and_publish_bytes_match_an_independent_encoder() -> None:
    """tests.brokers builds the same packets by hand: both must agree byte for byte."""
    ours = encode_connect(
        "gw-a.1", username="gw-a", password="pw", keepalive_s=30, clean_session=True,
        will_topic=A_STATE, will_payload=b"\xa1fonline\xf4",
    )  # fmt: skip
    theirs = connect_packet(
        "gw-a.1", username="gw-a", password="pw", will_topic=A_STATE,
        will_payload=b"\xa1fonline\xf4", keepalive_s=30,
    )  # fmt: skip
    assert ours == theirs
    assert encode_publish(A_HELLO, b"hi", 1, 7) == publish_packet(A_HELLO, b"hi", packet_id=7)
    assert encode_publish(A_HELLO, b"hi", 0, None) == publish_packet(A_HELLO, b"hi", qos=0)


def test_decoder_returns_whole_packets_from_any_split() -> None:
    stream = (
        encode_packet(CONNACK, 0, b"\x00\x00")
        + encode_publish("t/a", b"x" * 300, 1, 9)
        + encode_packet(PINGRESP, 0, b"")
    )
    for step in (1, 2, 3, 7, len(stream)):
        decoder = PacketDecoder()
        packets: list[Packet] = []
        for at in range(0, len(stream), step):
            decoder.feed(stream[at : at + step])
            while (packet := decoder.next_packet()) is not None:
                packets.append(packet)
        assert [p.type for p in packets] == [CONNACK, PUBLISH, PINGRESP]
        incoming = parse_publish(packets[1])
        assert incoming.message == Message("t/a", b"x" * 300, 1, False)
        assert incoming.packet_id == 9
        assert decoder.buffered_bytes == 0


def test_an_oversized_packet_is_refused_from_its_header_alone() -> None:
    decoder = PacketDecoder(max_packet_bytes=1024)
    decoder.feed(encode_packet(PUBLISH, 0, bytes(1025))[:4])  # the header and two body bytes
    with pytest.raises(LimitExceeded, match="1025 bytes, over the limit of 1024"):
        decoder.next_packet()


def test_a_remaining_length_of_five_bytes_is_malformed() -> None:
    decoder = PacketDecoder(max_packet_bytes=268_435_455)
    decoder.feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(MalformedError, match="four bytes"):
        decoder.next_packet()


@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_raises_only_invalid_input(data: bytes) -> None:
    decoder = PacketDecoder(max_packet_bytes=256)
    decoder.feed(data)
    with contextlib.suppress(MalformedError, LimitExceeded):
        while (packet := decoder.next_packet()) is not None:
            if packet.type == PUBLISH:
                with contextlib.suppress(MalformedError):
                    parse_publish(packet)


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 0},
        {"client_id": ""},
        {"username": None, "password": "x"},
        {"keepalive_s": 70_000},
        {"connect_timeout_s": 0},
        {"max_packet_bytes": 0},
        {"max_queued_messages": 0},
        {"will_topic": "a/#"},
    ],
)
def test_settings_that_can_never_work_raise_usage_error(bad: dict[str, Any]) -> None:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 1883, "client_id": "c", "username": "u"}
    with pytest.raises(UsageError):
        LiteSettings(**{**values, **bad})


def test_the_password_stays_out_of_repr() -> None:
    settings = LiteSettings("h", 1, "c", username="u", password="hunter2")
    assert "hunter2" not in repr(settings)


# --- on both real brokers ---------------------------------------------------------------------


@each_broker
@async_test
async def test_round_trips_with_qos_0_and_1(kind: str, tmp_path: Path) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        LiteClient(lite(broker, "orch")) as orch,
        LiteClient(lite(broker, "gw-a")) as gateway,
    ):
        assert orch.connected and gateway.connected
        assert await orch.subscribe(ALL_GATEWAY_UP) == 1
        assert await gateway.subscribe(A_DOWN, qos=1) == 1
        await gateway.publish(A_HELLO, b"hello")
        assert await next_message(orch.messages()) == Message(A_HELLO, b"hello", 1, False)
        await gateway.publish(A_HELLO, b"zero", qos=0)
        delivered_qos = 1 if kind == "embedded" else 0  # amqtt: the subscription's (notes §9)
        assert await next_message(orch.messages()) == Message(
            A_HELLO, b"zero", delivered_qos, False
        )
        block = bytes(range(256)) * 256  # a 64 KiB block message
        await orch.publish(A_COMMANDS, block)
        assert await next_message(gateway.messages()) == Message(A_COMMANDS, block, 1, False)
        await gateway.ping()
    assert not gateway.connected


@each_broker
@async_test
async def test_many_publishes_in_flight_are_all_acknowledged(kind: str, tmp_path: Path) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        LiteClient(lite(broker, "orch")) as orch,
        LiteClient(lite(broker, "gw-a")) as gateway,
    ):
        await orch.subscribe(ALL_GATEWAY_UP)
        await asyncio.gather(*(gateway.publish(A_HELLO, b"%d" % n) for n in range(500)))
        stream = orch.messages()
        received = [(await next_message(stream)).payload for _ in range(500)]
        assert received == [b"%d" % n for n in range(500)]  # one publisher: in order


@each_broker
@pytest.mark.parametrize("password", ["wrong secret", None], ids=["bad-password", "no-password"])
@async_test
async def test_refused_credentials_raise_auth_refused(
    kind: str, password: str | None, tmp_path: Path
) -> None:
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        client = LiteClient(lite(broker, "gw-a", password=password))
        with pytest.raises(AuthRefused, match="refused the connection of 'gw-a'"):
            async with client:
                pass
        assert not client.connected
        with pytest.raises(AuthRefused):
            await client.publish(A_HELLO, b"")


@each_broker
@async_test
async def test_the_will_comes_after_an_abort_but_not_after_a_clean_close(
    kind: str, tmp_path: Path
) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        LiteClient(lite(broker, "orch")) as orch,
    ):
        await orch.subscribe(ALL_GATEWAY_UP)
        stream = orch.messages()
        will = {"will_topic": A_STATE, "will_payload": b"gone"}
        async with LiteClient(lite(broker, "gw-a", **will)):
            pass  # DISCONNECT: the broker drops the will
        async with LiteClient(lite(broker, "gw-b")) as other:
            await other.publish(gateway_up("gw-b", Up.HELLO), b"fence")
        assert (await next_message(stream)).payload == b"fence"
        crashing = LiteClient(lite(broker, "gw-a", **will))
        await crashing.__aenter__()
        await crashing.abort()
        assert await next_message(stream) == Message(A_STATE, b"gone", 1, False)
        with pytest.raises(LinkClosed):
            await crashing.publish(A_HELLO, b"after abort")


@async_test
async def test_a_refused_subscription_leaves_the_connection_usable(tmp_path: Path) -> None:
    """The embedded broker answers 0x80 (mosquitto grants all and filters at delivery)."""
    async with (
        running_broker("embedded", tmp_path, FleetAccounts()) as broker,
        LiteClient(lite(broker, "gw-a")) as gateway,
    ):
        with pytest.raises(SubscribeRefused, match="'#'"):
            await gateway.subscribe("#")
        assert gateway.connected
        await gateway.ping()


@each_broker
@async_test
async def test_a_broker_that_goes_away_ends_messages_with_link_broken(
    kind: str, tmp_path: Path
) -> None:
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        client = LiteClient(lite(broker, "gw-a"))
        await client.__aenter__()
    try:
        with pytest.raises(LinkBroken, match=r"closed the connection|lost"):
            await next_message(client.messages())
        assert not client.connected
        with pytest.raises(LinkBroken):
            await client.publish(A_HELLO, b"too late")
    finally:
        await client.close()
    with pytest.raises(LinkBroken):  # the first reason stays, also after close
        await next_message(client.messages())


@pytest.fixture
def high_file_descriptors() -> Iterator[None]:
    """About 1,100 open files, so that the next sockets get numbers past 1024 (select()'s end)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit of open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("high_file_descriptors")
@async_test
async def test_sockets_past_descriptor_1024_work(tmp_path: Path) -> None:
    """What paho's select() loop cannot do: the reason this client exists."""
    async with (
        running_broker("mosquitto", tmp_path, FleetAccounts()) as broker,
        LiteClient(lite(broker, "orch")) as orch,
        LiteClient(lite(broker, "gw-a")) as gateway,
    ):
        assert gateway._writer is not None
        assert gateway._writer.transport.get_extra_info("socket").fileno() > 1024
        await orch.subscribe(ALL_GATEWAY_UP)
        await gateway.publish(A_HELLO, b"from past 1024")
        assert (await next_message(orch.messages())).payload == b"from past 1024"


# --- on a fake broker: what no real broker lets a test control ---------------------------------


class FakeBroker:
    """One connection at a time: answers CONNECT (unless told not to) and nothing else by
    itself; records every packet the client sends and sends what the test tells it to."""

    def __init__(self, *, answer_connect: bool = True, answer_ping: bool = True) -> None:
        self.answer_connect = answer_connect
        self.answer_ping = answer_ping
        self.packets: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()
        self.port = 0
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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
            if packet[0] == CONNECT and self.answer_connect:
                writer.write(mqtt_packet(CONNACK << 4, b"\x00\x00"))
            elif packet[0] == PINGREQ and self.answer_ping:
                writer.write(mqtt_packet(PINGRESP << 4, b""))
        writer.close()

    def send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    def hang_up(self) -> None:
        assert self._writer is not None
        self._writer.close()

    async def expect(self, packet_type: int, timeout_s: float = 5.0) -> tuple[int, int, bytes]:
        """The next packet of ``packet_type`` the client sent (others are skipped)."""
        async with asyncio.timeout(timeout_s):
            while True:
                packet = await self.packets.get()
                if packet[0] == packet_type:
                    return packet


def fake(port: int, **overrides: Any) -> LiteSettings:
    return LiteSettings("127.0.0.1", port, client_id="fake-client", **overrides)


@async_test
async def test_qos1_publish_returns_only_after_the_puback() -> None:
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        publishing = asyncio.create_task(client.publish("t/held", b"payload"))
        _, flags, body = await broker.expect(PUBLISH)
        assert flags == 0b0010  # QoS 1, not retained, not a duplicate
        packet_id = body[2 + len(b"t/held") : 4 + len(b"t/held")]
        assert not publishing.done()
        broker.send(mqtt_packet(PUBACK << 4, packet_id))
        await asyncio.wait_for(publishing, 5)


@async_test
async def test_qos1_publish_without_puback_times_out_as_link_broken() -> None:
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        with pytest.raises(LinkBroken, match="did not acknowledge"):
            await client.publish("t/never-acked", b"", timeout_s=0.2)
        assert client.connected  # a lost ack is not a lost link


@async_test
async def test_an_incoming_qos1_message_is_acknowledged_with_its_packet_id() -> None:
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        broker.send(publish_packet("t/in", b"cmd", qos=1, packet_id=0x1234))
        assert await next_message(client.messages()) == Message("t/in", b"cmd", 1, False)
        assert (await broker.expect(PUBACK))[2] == b"\x12\x34"


@async_test
async def test_subscribe_sends_the_fixed_flags_and_returns_the_granted_qos() -> None:
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        subscribing = asyncio.create_task(client.subscribe("t/#", qos=1))
        _, flags, body = await broker.expect(SUBSCRIBE)
        assert flags == 0b0010 and body[2:] == b"\x00\x03t/#\x01"
        broker.send(mqtt_packet(0x90, body[:2] + b"\x00"))  # SUBACK: granted QoS 0
        assert await asyncio.wait_for(subscribing, 5) == 0


@async_test
async def test_an_oversized_packet_breaks_the_link() -> None:
    async with FakeBroker().running() as broker:
        settings = fake(broker.port, max_packet_bytes=1024)
        async with LiteClient(settings) as client:
            broker.send(publish_packet("t/big", bytes(2000), qos=0))
            with pytest.raises(LinkBroken, match="over the limit of 1024"):
                await next_message(client.messages())


@async_test
async def test_a_packet_a_broker_never_sends_breaks_the_link() -> None:
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        broker.send(mqtt_packet(SUBSCRIBE << 4 | 2, b"\x00\x01\x00\x01t\x01"))
        with pytest.raises(LinkBroken, match="bad packet"):
            await next_message(client.messages())


@async_test
async def test_a_consumer_that_falls_behind_gets_its_messages_then_link_broken() -> None:
    async with (
        FakeBroker().running() as broker,
        LiteClient(fake(broker.port, max_queued_messages=5)) as client,
    ):
        broker.send(b"".join(publish_packet(f"t/{n}", b"", qos=0) for n in range(6)))
        stream = client.messages()
        topics = [(await next_message(stream)).topic for _ in range(5)]
        assert topics == [f"t/{n}" for n in range(5)]
        with pytest.raises(LinkBroken, match="unread MQTT messages"):
            await next_message(stream)


@async_test
async def test_keepalive_sends_pingreq_and_an_unanswered_one_breaks_the_link() -> None:
    async with (
        FakeBroker(answer_ping=False).running() as broker,
        LiteClient(fake(broker.port, keepalive_s=1)) as client,
    ):
        await broker.expect(PINGREQ, timeout_s=3)
        with pytest.raises(LinkBroken, match="did not answer PINGREQ"):
            await next_message(client.messages(), timeout_s=3)


@async_test
async def test_ping_waits_for_pingresp() -> None:
    async with (
        FakeBroker(answer_ping=False).running() as broker,
        LiteClient(fake(broker.port)) as client,
    ):
        with pytest.raises(LinkBroken, match="did not answer PINGREQ"):
            await client.ping(timeout_s=0.2)
        pinging = asyncio.create_task(client.ping())
        await broker.expect(PINGREQ)
        broker.send(mqtt_packet(PINGRESP << 4, b""))
        await asyncio.wait_for(pinging, 5)


@async_test
async def test_no_connack_within_the_timeout_is_link_broken() -> None:
    async with FakeBroker(answer_connect=False).running() as broker:
        client = LiteClient(fake(broker.port, connect_timeout_s=0.3))
        with pytest.raises(LinkBroken, match="no CONNACK"):
            await client.__aenter__()
        with pytest.raises(LinkBroken):
            await client.publish("t/x", b"")


@async_test
async def test_a_refused_tcp_connection_is_link_broken() -> None:
    with pytest.raises(LinkBroken, match="cannot connect"):
        async with LiteClient(fake(free_port(), connect_timeout_s=2)):
            pass


@async_test
async def test_a_hang_up_ends_messages_with_link_broken() -> None:
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        broker.hang_up()
        with pytest.raises(LinkBroken, match="closed the connection"):
            await next_message(client.messages())


@async_test
async def test_close_sends_disconnect_and_then_everything_raises_link_closed() -> None:
    async with FakeBroker().running() as broker:
        async with LiteClient(fake(broker.port)) as client:
            pass
        await broker.expect(DISCONNECT)
        assert not client.connected
        with pytest.raises(LinkClosed):
            await client.publish("t/x", b"")
        with pytest.raises(LinkClosed):
            await client.subscribe("t/x")
        with pytest.raises(LinkClosed):
            await next_message(client.messages())
        await client.close()  # idempotent


@async_test
async def test_misuse_raises_usage_error() -> None:
    client = LiteClient(fake(1883))
    with pytest.raises(UsageError):
        await client.publish("t/x", b"")
    with pytest.raises(UsageError):
        client.messages()
    async with FakeBroker().running() as broker, LiteClient(fake(broker.port)) as client:
        for topic in ("", "t/+", "t/#"):
            with pytest.raises(UsageError):
                await client.publish(topic, b"")
        with pytest.raises(UsageError):
            await client.publish("t/x", b"", qos=2)
        with pytest.raises(UsageError):
            await client.subscribe("")
        with pytest.raises(UsageError):
            await client.__aenter__()
