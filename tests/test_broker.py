"""Both brokers keep otaproto.topics' policy: no device ever gets or forges another's messages.

How these tests prove that something was *not* delivered, without sleeping:
a fence. After the forbidden traffic, an allowed message is sent along the
same path (same publisher, same broker queue) to the same receiver; brokers
keep the order of one publisher's messages to one subscriber, so when the
receiver's *first* message is the fence, nothing forbidden came before it.

Also here: the amqtt bugs of field notes §9 as the embedded broker meets
them, the gate in front of amqtt, revocation, TLS, and the mosquitto config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from broker.mosquitto import Account, acl_text, write_mosquitto_config
from otaio.mqtt import AuthRefused, Message, MqttClient, MqttSettings, SubscribeRefused
from otaproto.credentials import hash_secret
from otaproto.errors import InvalidInput, LinkBroken, MalformedError, UsageError
from otaproto.topics import (
    ALL_GATEWAY_UP,
    ALL_OPERATOR_REQUESTS,
    Channel,
    Down,
    Role,
    Up,
    gateway_down,
    gateway_up,
    operator_request,
    operator_response,
)
from tests.brokers import (
    BROKER_KINDS,
    PUBACK,
    FleetAccounts,
    RawClient,
    RunningBroker,
    async_test,
    next_message,
    publish_packet,
    running_broker,
    running_embedded,
    self_signed_tls,
)

each_broker = pytest.mark.parametrize("kind", BROKER_KINDS)

A_DOWN_ALL = "shoal/v1/gw/gw-a/down/#"
B_DOWN_ALL = "shoal/v1/gw/gw-b/down/#"
CONNACK_ACCEPTED, CONNACK_NOT_AUTHORIZED = 0, 5


async def try_subscribe(broker: RunningBroker, client: MqttClient, topic_filter: str) -> None:
    """Subscribe to a filter the policy forbids: amqtt must refuse it, mosquitto may grant it
    (its ACL file does not check SUBSCRIBE; delivery is checked instead)."""
    if broker.kind == "embedded":
        with pytest.raises(SubscribeRefused):
            await client.subscribe(topic_filter)
    else:
        with contextlib.suppress(SubscribeRefused):
            await client.subscribe(topic_filter)


# --- the ACL matrix, on both brokers ----------------------------------------------------------


@each_broker
@async_test
async def test_a_gateway_uses_every_topic_of_its_own(kind: str, tmp_path: Path) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a")) as gateway,
    ):
        assert await orch.subscribe("shoal/v1/#") == 1
        for kind_down in Down:
            assert await gateway.subscribe(gateway_down("gw-a", kind_down)) == 1
        for kind_up in Up:
            await gateway.publish(gateway_up("gw-a", kind_up), kind_up.value.encode())
        orch_messages = orch.messages()
        for kind_up in Up:
            message = await next_message(orch_messages)
            assert (message.topic, message.payload) == (
                gateway_up("gw-a", kind_up),
                kind_up.value.encode(),
            )
        for kind_down in Down:
            await orch.publish(gateway_down("gw-a", kind_down), kind_down.value.encode())
        gateway_messages = gateway.messages()
        topics = [(await next_message(gateway_messages)).topic for _ in Down]
        assert topics == [gateway_down("gw-a", kind_down) for kind_down in Down]


@each_broker
@async_test
async def test_overlapping_subscriptions(kind: str, tmp_path: Path) -> None:
    """amqtt delivers a message once per matching subscription, mosquitto once: handlers
    must be idempotent (they are, end to end) and should not subscribe twice."""
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a")) as gateway,
    ):
        await gateway.subscribe(A_DOWN_ALL)
        await gateway.subscribe(gateway_down("gw-a", Down.COMMAND))
        await orch.publish(gateway_down("gw-a", Down.COMMAND), b"once")
        await orch.publish(gateway_down("gw-a", Down.BLOCK), b"fence")
        stream = gateway.messages()
        payloads = [
            (await next_message(stream)).payload for _ in range(2 if kind == "mosquitto" else 3)
        ]
        assert payloads == (
            [b"once", b"fence"] if kind == "mosquitto" else [b"once", b"once", b"fence"]
        )


FORBIDDEN_GATEWAY_FILTERS = [
    "#",
    "+/#",
    "shoal/#",
    "shoal/v1/#",
    "shoal/v1/gw/#",
    "shoal/v1/gw/+/down/cmd",
    "shoal/v1/gw/+/down/#",
    "shoal/v1/gw/+/+/+",
    "shoal/v1/gw/gw-b/#",
    "shoal/v1/gw/gw-b/down/#",
    "shoal/v1/gw/gw-b/down/cmd",
    "shoal/v1/gw/gw-b/down/+",
    "shoal/v1/gw/+/up/#",
    "shoal/v1/gw/gw-a/#",
    "shoal/v1/gw/gw-a/up/#",
    "shoal/v1/gw/gw-a/+/cmd",
    "shoal/v1/ops/#",
    "shoal/v1/ops/+/resp",
    "shoal/v1/ops/op-x/resp",
    "+/+/+/+/+/+",
    "$SYS/#",
]


@each_broker
@async_test
async def test_no_subscription_of_a_gateway_reaches_another_device(
    kind: str, tmp_path: Path
) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a")) as gateway,
    ):
        await gateway.subscribe(A_DOWN_ALL)
        for topic_filter in FORBIDDEN_GATEWAY_FILTERS:
            await try_subscribe(broker, gateway, topic_filter)
        for topic in [
            gateway_down("gw-b", Down.COMMAND),
            gateway_down("gw-b", Down.BLOCK),
            gateway_up("gw-b", Up.HELLO),
            gateway_up("gw-a", Up.STATUS),  # its own up topic: only the orchestrator reads it
            operator_response("op-x"),
            operator_request("op-x"),
            "shoal/v1/gw/gw-a/down/unknown-kind",  # not in the tree: nobody but the orchestrator
        ]:
            await orch.publish(topic, b"not for gw-a")
        await orch.publish(gateway_down("gw-a", Down.COMMAND), b"fence")
        first = await next_message(gateway.messages())
        assert (first.topic, first.payload) == (gateway_down("gw-a", Down.COMMAND), b"fence")


@each_broker
@async_test
async def test_a_gateway_cannot_publish_for_anyone_else(kind: str, tmp_path: Path) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a")) as gateway,
        MqttClient(broker.settings("gw-b")) as other,
        MqttClient(broker.settings("op-x")) as operator,
    ):
        await orch.subscribe("shoal/v1/#")
        await other.subscribe(B_DOWN_ALL)
        await operator.subscribe(operator_response("op-x"))
        for topic in [
            gateway_down("gw-b", Down.COMMAND),  # a forged command
            gateway_up("gw-b", Up.STATUS),  # posing as gw-b
            gateway_down("gw-a", Down.COMMAND),  # down is the orchestrator's direction
            "shoal/v1/gw/gw-a/up/unknown-kind",
            "shoal/v1/gw/gw-a/up/hello/extra",
            operator_response("op-x"),
            operator_request("op-x"),
            "shoal/v1",
            "elsewhere/topic",
        ]:
            await gateway.publish(topic, b"forged")  # acknowledged and dropped
        assert gateway.connected
        await gateway.publish(gateway_up("gw-a", Up.HELLO), b"fence")
        first = await next_message(orch.messages())
        assert (first.topic, first.payload) == (gateway_up("gw-a", Up.HELLO), b"fence")
        await orch.publish(gateway_down("gw-b", Down.COMMAND), b"fence")
        await orch.publish(operator_response("op-x"), b"fence")
        assert (await next_message(other.messages())).payload == b"fence"
        assert (await next_message(operator.messages())).payload == b"fence"


@each_broker
@async_test
async def test_operators_only_reach_their_own_requests_and_responses(
    kind: str, tmp_path: Path
) -> None:
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("op-x")) as x,
        MqttClient(broker.settings("op-y")) as y,
    ):
        for requests in ALL_OPERATOR_REQUESTS:
            await orch.subscribe(requests)
        await orch.subscribe(ALL_GATEWAY_UP)
        assert await x.subscribe(operator_response("op-x")) == 1
        assert await y.subscribe(operator_response("op-y")) == 1
        for topic_filter in [
            operator_response("op-y"),
            "shoal/v1/ops/+/resp",
            "shoal/v1/ops/#",
            "#",
            "shoal/v1/gw/+/down/#",
            "shoal/v1/gw/op-x/down/#",  # the gateway patterns do not apply to operators
        ]:
            await try_subscribe(broker, x, topic_filter)
        for topic in [
            operator_request("op-y"),  # posing as op-y
            operator_request("op-y", Channel.ADMIN),
            operator_response("op-x"),  # answering itself
            operator_response("op-y"),
            gateway_up("op-x", Up.HELLO),  # a gateway id equal to its own name
            gateway_down("gw-a", Down.COMMAND),
        ]:
            await x.publish(topic, b"forged")
        await x.publish(operator_request("op-x"), b"fence")
        first = await next_message(orch.messages())
        assert (first.topic, first.payload) == (operator_request("op-x"), b"fence")
        await orch.publish(gateway_down("op-x", Down.COMMAND), b"not for an operator")
        await orch.publish(operator_response("op-y"), b"for y")
        await orch.publish(operator_response("op-x"), b"for x")
        assert await next_message(x.messages()) == Message(
            operator_response("op-x"), b"for x", 1, False
        )
        assert (await next_message(y.messages())).payload == b"for y"


#: The request channels each operator of FleetAccounts may publish on, in Channel order.
CHANNELS_BY_ACCOUNT = {
    "op-v": [Channel.READ],  # viewer
    "op-d": [Channel.READ, Channel.WRITE],  # deployer
    "op-x": [Channel.READ, Channel.WRITE, Channel.ADMIN],  # admin
}


@each_broker
@async_test
async def test_an_operator_publishes_only_on_the_request_channels_of_its_role(
    kind: str, tmp_path: Path
) -> None:
    """The broker's half of role enforcement: a viewer's write and admin requests and a
    deployer's admin requests never reach the orchestrator; an admin's reach it on every
    channel. Each operator's fence (on ``req``) comes after its other requests."""
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
    ):
        for requests in ALL_OPERATOR_REQUESTS:
            assert await orch.subscribe(requests) == 1
        heard = orch.messages()
        for operator, allowed in CHANNELS_BY_ACCOUNT.items():
            async with MqttClient(broker.settings(operator)) as client:
                for channel in Channel:
                    await client.publish(operator_request(operator, channel), channel.encode())
                assert client.connected  # refused publishes are acknowledged and dropped
                await client.publish(operator_request(operator), b"fence")
                arrived: list[tuple[str, bytes]] = []
                while (message := await next_message(heard)).payload != b"fence":
                    arrived.append((message.topic, message.payload))
            expected = [(operator_request(operator, c), c.encode()) for c in allowed]
            assert arrived == expected, operator


@each_broker
@async_test
async def test_a_will_on_another_devices_topic_never_arrives(kind: str, tmp_path: Path) -> None:
    """amqtt publishes wills without a PUBLISH check; the gate refuses such a CONNECT.
    mosquitto accepts it and drops the will when it would publish it."""
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-b")) as victim,
    ):
        await orch.subscribe(ALL_GATEWAY_UP)
        await victim.subscribe(B_DOWN_ALL)
        credentials = {"username": "gw-a", "password": broker.accounts.secret("gw-a")}
        evil, code = await RawClient.connect(
            broker.host,
            broker.port,
            "gw-a.evil",
            will_topic=gateway_down("gw-b", Down.COMMAND),
            will_payload=b"forged will",
            **credentials,
        )
        assert code == (CONNACK_NOT_AUTHORIZED if kind == "embedded" else CONNACK_ACCEPTED)
        evil.abort()
        state = gateway_up("gw-a", Up.STATE)
        fence, code = await RawClient.connect(
            broker.host, broker.port, "gw-a.fence", will_topic=state, will_payload=b"fence",
            **credentials,
        )  # fmt: skip
        assert code == CONNACK_ACCEPTED
        fence.abort()
        assert await next_message(orch.messages()) == Message(state, b"fence", 1, False)
        await orch.publish(gateway_down("gw-b", Down.COMMAND), b"fence")
        assert (await next_message(victim.messages())).payload == b"fence"


@each_broker
@async_test
async def test_another_account_never_inherits_a_persistent_session(
    kind: str, tmp_path: Path
) -> None:
    """gw-a takes the client id of gw-b's offline session, which holds a queued command."""
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        session: dict[str, Any] = {"client_id": "gw-b.main", "clean_session": False}
        async with MqttClient(broker.settings("gw-b", **session)) as victim:
            await victim.subscribe(B_DOWN_ALL)
        async with MqttClient(broker.settings("orch")) as orch:
            await orch.publish(gateway_down("gw-b", Down.COMMAND), b"queued for gw-b")
            if kind == "embedded":
                with pytest.raises(LinkBroken, match="refused the connection") as refused:
                    async with MqttClient(broker.settings("gw-a", **session)):
                        pass
                assert not isinstance(refused.value, AuthRefused)
                # gw-b's session is untouched: its queued command is still there.
                async with MqttClient(broker.settings("gw-b", **session)) as victim:
                    assert (await next_message(victim.messages())).payload == b"queued for gw-b"
            else:
                # mosquitto lets the takeover happen but starts a clean session for gw-a.
                async with MqttClient(broker.settings("gw-a", **session)) as thief:
                    await thief.subscribe(A_DOWN_ALL)
                    await orch.publish(gateway_down("gw-a", Down.COMMAND), b"fence")
                    assert (await next_message(thief.messages())).payload == b"fence"


@each_broker
@async_test
async def test_a_refused_connect_cannot_silence_a_connected_client(
    kind: str, tmp_path: Path
) -> None:
    """amqtt acts on a CONNECT's client id before it authenticates; the gate stops that."""
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a", client_id="gw-a.main")) as victim,
    ):
        await victim.subscribe(A_DOWN_ALL)
        attempts: list[dict[str, Any]] = [
            {"username": "gw-a", "password": "wrong"},
            {"username": "gw-a", "password": "wrong", "clean_session": False},
            {},
            {"username": "nobody", "password": "x"},
        ]
        for options in attempts:
            attacker, code = await RawClient.connect(
                broker.host, broker.port, "gw-a.main", **options
            )
            assert code == CONNACK_NOT_AUTHORIZED
            await attacker.close()
        await orch.publish(gateway_down("gw-a", Down.COMMAND), b"still heard")
        assert (await next_message(victim.messages())).payload == b"still heard"
        assert victim.connected


@each_broker
@async_test
async def test_no_device_can_plant_a_retained_message(kind: str, tmp_path: Path) -> None:
    """amqtt bug 1: a new client gets retained messages matching *any* subscription.

    The embedded broker delivers the message live without the retain flag and
    keeps nothing; mosquitto (retain_available false) disconnects the sender.
    """
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
    ):
        await orch.subscribe(ALL_GATEWAY_UP)  # matches what gw-a plants
        planter, code = await RawClient.connect(
            broker.host, broker.port, "gw-a.planter", username="gw-a",
            password=broker.accounts.secret("gw-a"),
        )  # fmt: skip
        assert code == CONNACK_ACCEPTED
        status = gateway_up("gw-a", Up.STATUS)
        await planter.send(publish_packet(status, b"planted", qos=1, retain=True))
        answer = await planter.read()
        if kind == "embedded":
            assert answer is not None and answer[0] == PUBACK
            assert await next_message(orch.messages()) == Message(status, b"planted", 1, False)
        else:
            assert answer is None  # disconnected
        await planter.close()
        async with (
            MqttClient(broker.settings("gw-b")) as newcomer,
            MqttClient(broker.settings("orch")) as new_orch,
            MqttClient(broker.settings("gw-a")) as gateway,
        ):
            await newcomer.subscribe(B_DOWN_ALL)
            await new_orch.subscribe(ALL_GATEWAY_UP)
            await gateway.publish(gateway_up("gw-a", Up.HELLO), b"fence")
            assert (await next_message(new_orch.messages())).payload == b"fence"
            await orch.publish(gateway_down("gw-b", Down.COMMAND), b"fence")
            assert (await next_message(newcomer.messages())).payload == b"fence"


@each_broker
@async_test
async def test_delivery_qos(kind: str, tmp_path: Path) -> None:
    """What Shoal relies on: QoS 1 published and subscribed arrives as QoS 1 on both.

    amqtt bug 2, pinned here so that a fix shows up: it delivers at the
    subscription's QoS, not min(publish, subscribe) as mosquitto does.
    """
    async with (
        running_broker(kind, tmp_path, FleetAccounts()) as broker,
        MqttClient(broker.settings("orch")) as orch,
        MqttClient(broker.settings("gw-a")) as gateway,
    ):
        await orch.subscribe(ALL_GATEWAY_UP, qos=1)
        await gateway.publish(gateway_up("gw-a", Up.HELLO), b"one", qos=1)
        await gateway.publish(gateway_up("gw-a", Up.HELLO), b"zero", qos=0)
        stream = orch.messages()
        assert (await next_message(stream)).qos == 1
        assert (await next_message(stream)).qos == (1 if kind == "embedded" else 0)


@each_broker
@async_test
async def test_a_persistent_session_gets_what_was_queued_while_offline(
    kind: str, tmp_path: Path
) -> None:
    """The anonymous plugin (amqtt bug 6) would disable offline queues; it is not loaded.

    amqtt bug 5, pinned: the queued message arrives with RETAIN set on amqtt.
    """
    async with running_broker(kind, tmp_path, FleetAccounts()) as broker:
        session: dict[str, Any] = {"client_id": "gw-a.main", "clean_session": False}
        async with MqttClient(broker.settings("gw-a", **session)) as gateway:
            await gateway.subscribe(A_DOWN_ALL)
        async with MqttClient(broker.settings("orch")) as orch:
            await orch.publish(gateway_down("gw-a", Down.COMMAND), b"while away")
        async with MqttClient(broker.settings("gw-a", **session)) as gateway:
            message = await next_message(gateway.messages())
        assert (message.payload, message.qos) == (b"while away", 1)
        assert message.retain == (kind == "embedded")


@each_broker
@async_test
async def test_tls_listener_with_a_self_signed_certificate(kind: str, tmp_path: Path) -> None:
    tls = self_signed_tls(tmp_path / "tls")
    stranger = self_signed_tls(tmp_path / "other", name="stranger")
    async with running_broker(kind, tmp_path, FleetAccounts(), tls=tls) as broker:
        async with (
            MqttClient(broker.settings("orch")) as orch,
            MqttClient(broker.settings("gw-a")) as gateway,
        ):
            await orch.subscribe(ALL_GATEWAY_UP)
            await gateway.publish(gateway_up("gw-a", Up.HELLO), b"over TLS")
            assert (await next_message(orch.messages())).payload == b"over TLS"
        with pytest.raises(LinkBroken, match="not trusted"):
            async with MqttClient(broker.settings("gw-a", tls_ca_file=stranger.cert_file)):
                pass
        with pytest.raises(LinkBroken):
            async with MqttClient(
                broker.settings("gw-a", tls_ca_file=None, connect_timeout_s=2)
            ):  # plaintext to a TLS port
                pass


# --- the embedded broker only -----------------------------------------------------------------


@async_test
async def test_revocation_refuses_new_connects_and_drops_live_sessions(tmp_path: Path) -> None:
    accounts = FleetAccounts()
    async with (
        running_broker("embedded", tmp_path, accounts) as broker,
        MqttClient(broker.settings("orch")) as orch,
    ):
        assert broker.embedded is not None
        gateway = MqttClient(broker.settings("gw-a", client_id="gw-a.main", clean_session=False))
        async with gateway:
            await gateway.subscribe(A_DOWN_ALL)
            accounts.revoke("gw-a")
            with pytest.raises(AuthRefused):
                async with MqttClient(broker.settings("gw-a")):
                    pass
            assert gateway.connected  # until the broker is told
            await broker.embedded.disconnect("gw-a")
            with pytest.raises(LinkBroken):
                await next_message(gateway.messages())
        await broker.embedded.disconnect("gw-a")  # nothing connected: no error
        # Its persistent session keeps nothing for it any more.
        await orch.publish(gateway_down("gw-a", Down.COMMAND), b"after revocation")
        accounts.revoked.clear()
        async with MqttClient(
            broker.settings("gw-a", client_id="gw-a.main", clean_session=False)
        ) as returning:
            await returning.subscribe(A_DOWN_ALL)
            await orch.publish(gateway_down("gw-a", Down.COMMAND), b"fence")
            assert (await next_message(returning.messages())).payload == b"fence"


@async_test
async def test_port_zero_binds_a_real_port_and_stop_releases_it_and_all_tasks() -> None:
    accounts = FleetAccounts()
    async with running_embedded(accounts, websocket_port=0) as embedded:
        port, websocket_port = embedded.port, embedded.websocket_port
        assert port != 0 and websocket_port not in (0, None)
        gateway = MqttClient(
            MqttSettings(
                "127.0.0.1", port, client_id="gw-a.1", username="gw-a",
                password=accounts.secret("gw-a"),
            )
        )  # fmt: skip
        await gateway.__aenter__()  # still connected when the broker stops
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        for closed_port in (port, websocket_port):
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", closed_port)
        assert await silent_reader.read() == b""  # never sent a CONNECT; closed at stop
        with pytest.raises(LinkBroken):
            await next_message(gateway.messages())
    finally:
        silent_writer.close()
        await gateway.close()


@async_test
async def test_a_connection_that_never_sends_connect_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import broker.embedded

    monkeypatch.setattr(broker.embedded, "CONNECT_TIMEOUT_S", 0.2)
    async with running_embedded(FleetAccounts()) as embedded:
        reader, writer = await asyncio.open_connection("127.0.0.1", embedded.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


@async_test
async def test_tls_files_that_cannot_be_loaded_raise_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    from broker.embedded import EmbeddedBroker, TlsFiles

    broker = EmbeddedBroker(
        FleetAccounts(), tls=TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem")
    )
    with pytest.raises(InvalidInput):
        await broker.__aenter__()


# --- the mosquitto config, without mosquitto ------------------------------------------------


ACCOUNTS = [
    Account("gw-a", hash_secret("a"), Role.GATEWAY),
    Account("op-x", hash_secret("x"), Role.ADMIN),
    Account("op-v", hash_secret("v"), Role.VIEWER),
    Account("op-d", hash_secret("d"), Role.DEPLOYER),
    Account("orch", hash_secret("o"), Role.ORCHESTRATOR),
]


def test_mosquitto_config_files(tmp_path: Path) -> None:
    tls = self_signed_tls(tmp_path / "tls")
    config = write_mosquitto_config(
        tmp_path / "conf", accounts=ACCOUNTS, port=8883, tls=tls, persistence_dir=tmp_path / "db"
    )
    assert config == (tmp_path / "conf" / "mosquitto.conf").resolve()
    text = config.read_text().splitlines()
    for line in [
        "allow_anonymous false",
        "listener 8883 127.0.0.1",
        f"password_file {(tmp_path / 'conf' / 'passwd').resolve()}",
        f"acl_file {(tmp_path / 'conf' / 'acl').resolve()}",
        f"certfile {tls.cert_file.resolve()}",
        f"keyfile {tls.key_file.resolve()}",
        "retain_available false",
        "max_queued_messages 100000",
        "persistence true",
        f"persistence_location {(tmp_path / 'db').resolve()}/",
    ]:
        assert line in text
    passwd = tmp_path / "conf" / "passwd"
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o600
    assert passwd.read_text() == "".join(f"{a.username}:{a.secret_hash}\n" for a in ACCOUNTS)
    assert "user" not in " ".join(line.split()[0] for line in text if line)
    no_persistence = write_mosquitto_config(tmp_path / "plain", accounts=ACCOUNTS, port=1883)
    assert "persistence false" in no_persistence.read_text().splitlines()


def test_mosquitto_acl_follows_the_topic_policy() -> None:
    lines = acl_text(ACCOUNTS).splitlines()
    assert "pattern write shoal/v1/gw/%u/up/hello" in lines
    assert "pattern read shoal/v1/gw/%u/down/cmd" in lines
    assert not [line for line in lines if line.startswith("pattern") and "/ops/" in line]
    blocks = {name: _user_block(lines, name) for name in ("op-v", "op-d", "op-x")}
    assert blocks["op-v"] == [
        "topic deny shoal/v1/gw/#",
        "topic write shoal/v1/ops/op-v/req",
        "topic read shoal/v1/ops/op-v/resp",
    ]
    assert blocks["op-d"] == [
        "topic deny shoal/v1/gw/#",
        "topic write shoal/v1/ops/op-d/req",
        "topic write shoal/v1/ops/op-d/write",
        "topic read shoal/v1/ops/op-d/resp",
    ]
    assert blocks["op-x"] == [
        "topic deny shoal/v1/gw/#",
        "topic write shoal/v1/ops/op-x/req",
        "topic write shoal/v1/ops/op-x/write",
        "topic write shoal/v1/ops/op-x/admin",
        "topic read shoal/v1/ops/op-x/resp",
    ]
    comment = "# operator op-v, role viewer: the deny line keeps the gateway patterns away from it"
    assert lines[lines.index("user op-v") - 1] == comment
    orchestrator = lines.index("user orch")
    assert lines[orchestrator + 1 : orchestrator + 3] == [
        "topic deny shoal/v1",
        "topic readwrite shoal/v1/#",
    ]
    assert "user gw-a" not in lines  # gateways are covered by the patterns alone


def _user_block(lines: list[str], name: str) -> list[str]:
    """The lines of ``user name``'s block, up to the blank line that ends it."""
    start = lines.index(f"user {name}") + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return lines[start:end]


@pytest.mark.parametrize(
    ("accounts", "error"),
    [
        ([Account("GW-A", hash_secret("a"), Role.GATEWAY)], MalformedError),
        ([Account("gw/a", hash_secret("a"), Role.GATEWAY)], MalformedError),
        ([Account("gw-a", "plain-text", Role.GATEWAY)], MalformedError),
        ([Account("gw-a", hash_secret("a") + "\nuser x", Role.GATEWAY)], MalformedError),
        ([ACCOUNTS[0], ACCOUNTS[0]], UsageError),
    ],
)
def test_mosquitto_config_refuses_what_it_cannot_write(
    tmp_path: Path, accounts: list[Account], error: type[Exception]
) -> None:
    with pytest.raises(error):
        write_mosquitto_config(tmp_path, accounts=accounts, port=1883)
