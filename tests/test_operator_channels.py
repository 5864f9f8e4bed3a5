"""Operator roles on the request channels: the broker's ACL and the orchestrator agree.

Each op has one channel (``req`` viewer, ``write`` deployer, ``admin``
admin). Why these tests: the broker enforces roles only through the
channels, so the clients' table (``otaproto.topics.OP_CHANNELS``), the
orchestrator's (``orchestrator.operators.OPS``) and the ACL must say the
same thing; and an operator whose role may not use an op must still get a
clear error reply, although the broker drops its request on the op's channel.

The in-process tests hand the orchestrator any topic (no broker), as a
misconfigured broker would. The fleet tests run the real thing on the
embedded broker and on mosquitto: a viewer's ``rollout.create`` sent
straight to ``write`` never reaches the orchestrator (no reply, no audit
row), while through ``req`` (and through ``shoal.opsclient``) it gets the
role refusal, audited.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.operators import OPS, channel_mismatches, channel_of
from otaio.mqtt import MqttClient, MqttSettings
from otaproto import fleet
from otaproto import topics as t
from shoal.opsclient import OperatorError, OperatorLogin, call
from tests.brokers import next_message
from tests.fleet_fixtures import running_fleet
from tests.test_fleet_mosquitto import fleet_on_mosquitto, login_works, wait_until
from tests.test_orchestrator import World, dump
from tests.test_orchestrator_input import ask

ROLE_REFUSAL = "operator val (viewer) may not rollout.create: it needs deployer"
ROLLOUT = {"artifact": "00" * 32, "target": {"nodes": ["gw-a/n1"]}}


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    """An orchestrator with a pending gateway and one operator of each role."""
    world = World(tmp_path / "orch")
    world.o.add_gateway("gw-new")
    world.o.add_operator("alice", "admin")
    world.o.add_operator("dee", "deployer")
    world.o.add_operator("val", "viewer")
    yield world
    world.o.close()


def test_the_clients_channel_table_and_the_orchestrators_ops_agree_exactly() -> None:
    assert {name: channel_of(op.role) for name, op in OPS.items()} == dict(t.OP_CHANNELS)
    assert channel_mismatches() == []
    # The check can fail: each way the two tables can drift is named.
    drifted = {**t.OP_CHANNELS, "devices.accept": t.Channel.WRITE, "devices.reboot": t.Channel.READ}
    del drifted["rollout.create"]
    assert sorted(channel_mismatches(table=drifted)) == [
        "devices.accept: channel write, but it needs admin",
        "devices.reboot: in the channel table, not an op",
        "rollout.create: missing from the channel table",
    ]


def test_the_channels_docs_topics_md_names_are_the_ops_channels() -> None:
    """The hand-written op table of the topic spec says which topic each op goes to."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "topics.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `(req|write|admin)` \|", text, re.MULTILINE)
    assert len(rows) >= 10
    assert [(op, channel) for op, channel in rows] == [
        (op, str(t.OP_CHANNELS[op])) for op, _ in rows
    ]


def test_an_op_on_another_channel_than_its_own_is_refused_naming_the_right_topic(
    w: World,
) -> None:
    before = dump(w.dir)
    cases = [
        ("devices.accept", {"id": "gw-new"}, t.Channel.READ, "shoal/v1/ops/alice/admin"),
        ("devices.accept", {"id": "gw-new"}, t.Channel.WRITE, "shoal/v1/ops/alice/admin"),
        ("groups.delete", {"name": "x"}, t.Channel.ADMIN, "shoal/v1/ops/alice/write"),
        ("devices.list", None, t.Channel.ADMIN, "shoal/v1/ops/alice/req"),
    ]
    for op, args, channel, right in cases:
        reply, effects = ask(w, op, args, channel=channel)
        wrong = t.operator_request("alice", channel)
        assert reply["error"] == f"{op} must be sent on {right}, not {wrong}", op
        assert len(effects.outgoing) == 1
    assert dump(w.dir) == before  # the gateway is still pending
    entries = w.o.list_audit(10, "alice", None)["entries"]
    assert [(e["op"], e["ok"]) for e in entries] == [(op, False) for op, *_ in reversed(cases)]
    reply, _ = ask(w, "devices.accept", {"id": "gw-new"}, channel=t.Channel.ADMIN)
    assert reply["result"] == {"id": "gw-new", "state": "accepted"}


def test_the_role_is_checked_before_the_channel(w: World) -> None:
    """A viewer is told about its role whichever channel the request came on (were a broker
    to let it through), not sent to a channel it cannot use."""
    for channel in t.Channel:
        reply, _ = ask(w, "rollout.create", ROLLOUT, operator="val", channel=channel)
        assert reply["error"] == ROLE_REFUSAL, channel
    reply, _ = ask(w, "devices.decommission", {"id": "gw-new"}, operator="dee")
    assert reply["error"] == "operator dee (deployer) may not devices.decommission: it needs admin"


def test_operators_check_answers_what_the_op_itself_would(w: World) -> None:
    reply, _ = ask(w, "operators.check", {"op": "rollout.create"}, operator="val")
    assert reply["error"] == ROLE_REFUSAL
    reply, _ = ask(w, "operators.check", {"op": "devices.list"}, operator="val")
    assert reply["result"] == {
        "operator": "val", "role": "viewer", "op": "devices.list",
        "topic": "shoal/v1/ops/val/req",
    }  # fmt: skip
    reply, _ = ask(w, "operators.check", {"op": "devices.accept"}, operator="dee")
    assert reply["error"] == "operator dee (deployer) may not devices.accept: it needs admin"
    reply, _ = ask(w, "operators.check", {"op": "devices.accept"})
    assert reply["result"]["topic"] == "shoal/v1/ops/alice/admin"
    reply, _ = ask(w, "operators.check", {"op": "devices.reboot"})
    assert reply["error"].startswith("unknown op 'devices.reboot'")
    entries = w.o.list_audit(10, "val", None)["entries"]
    assert [(e["op"], e["args"], e["ok"]) for e in entries] == [
        ("operators.check", {"op": "devices.list"}, True),
        ("operators.check", {"op": "rollout.create"}, False),
    ]
    assert w.o.list_audit(10, "alice", "devices.")["entries"] == []  # checked, not run


# --- the whole fleet, on each broker -------------------------------------------------------


async def _straight_then_through_req(host: str, port: int, secret: str) -> list[dict[str, Any]]:
    """As the viewer ``val`` with a plain MQTT client: ``rollout.create`` on ``write``, then
    the same on ``req``; every reply that came before the one to the second request."""
    settings = MqttSettings(host, port, client_id="val-raw", username="val", password=secret)
    async with MqttClient(settings) as client:
        await client.subscribe(t.operator_response("val"))
        for request_id, channel in (("straight", t.Channel.WRITE), ("via-req", t.Channel.READ)):
            body = {"id": request_id, "op": "rollout.create", "args": ROLLOUT}
            await client.publish(t.operator_request("val", channel), json.dumps(body).encode())
        replies: list[dict[str, Any]] = []
        stream = client.messages()
        while not replies or replies[-1]["id"] != "via-req":
            replies.append(fleet.decode_response((await next_message(stream, 15)).payload))
        return replies


def _the_viewer_is_stopped_by_the_broker_and_refused_by_the_orchestrator(
    host: str, port: int, ops: Callable[..., Any], secret: str
) -> None:
    """What both fleet tests check, with ``ops`` the admin's request function."""
    replies = asyncio.run(_straight_then_through_req(host, port, secret))
    # The orchestrator answers in order: had the write request reached it, its reply came first.
    assert replies == [{"id": "via-req", "ok": False, "error": ROLE_REFUSAL}]
    entries = ops("audit.list", operator="val")["entries"]
    assert [(e["op"], e["role"], e["ok"], e["error"]) for e in entries] == [
        ("rollout.create", "viewer", False, ROLE_REFUSAL),
    ]  # only the request through req: the other never reached the orchestrator
    # shoal's client asks operators.check first, so the viewer gets the refusal, not silence.
    login = OperatorLogin(host, port, "val", secret)
    with pytest.raises(OperatorError, match=r"^operator val \(viewer\) may not rollout.create"):
        call(login, "rollout.create", ROLLOUT, timeout_s=15)
    newest = ops("audit.list", operator="val", limit=1)["entries"]
    assert [(e["op"], e["args"], e["ok"]) for e in newest] == [
        ("operators.check", {"op": "rollout.create"}, False)
    ]


def test_on_the_embedded_broker_a_viewers_write_request_never_reaches_the_orchestrator(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        secret = fleet.ops("operators.add", id="val", role="viewer")["secret"]
        _the_viewer_is_stopped_by_the_broker_and_refused_by_the_orchestrator(
            "127.0.0.1", fleet.port, fleet.ops, secret
        )


def test_on_mosquitto_a_viewers_write_request_never_reaches_the_orchestrator(
    tmp_path: Path,
) -> None:
    with fleet_on_mosquitto(tmp_path) as fleet:
        secret = fleet.ops("operators.add", id="val", role="viewer")["secret"]
        fleet.broker.reload()  # the ACL written from the registry now has val's viewer block
        port = fleet.broker.port
        wait_until(lambda: login_works(port, "val", secret), "mosquitto lets val in", 20)
        assert (
            "topic write shoal/v1/ops/val/req\ntopic read"
            in (fleet.broker.folder / "config" / "acl").read_text()
        )
        _the_viewer_is_stopped_by_the_broker_and_refused_by_the_orchestrator(
            "127.0.0.1", port, fleet.ops, secret
        )
