"""Whatever arrives on any topic, the orchestrator refuses it cleanly and changes nothing.

And the operator API, in JSON and in CBOR, with its error replies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.core import Effects
from otaproto import cbor, fleet
from otaproto import topics as t
from tests.test_orchestrator import (
    DELTA_1_2,
    FULL_V2,
    World,
    dump,
    messages,
    report,
    seqs,
    sha,
)

GW = "gw-1"


class Collect(logging.Handler):
    """Records of the orchestrator's logger at ERROR and above (bugs, not bad input)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def bugs() -> Iterator[list[logging.LogRecord]]:
    handler = Collect()
    logger = logging.getLogger("shoal.orchestrator")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[World, str]]:
    """An accepted, online gateway with a deployment running on its node n1."""
    w = World(tmp_path / "orch")
    w.upload_all()
    w.gateway(GW, [report("n1"), report("n2")])
    dep = w.o.create_deployment(sha(FULL_V2).hex(), [f"{GW}/n1"])
    w.o.tick()
    w.o.add_operator("alice")
    yield w, dep
    w.o.close()


def valid(kind: t.Up, dep: str) -> dict[str, Any]:
    """A body the orchestrator would accept on ``kind``."""
    bodies: dict[t.Up, dict[str, Any]] = {
        t.Up.HELLO: {"agent": "a", "nodes": ["n1", "n2"], "handled_seq": 0},
        t.Up.STATE: {"online": True},
        t.Up.INVENTORY: {"nodes": [report("n1")]},
        t.Up.ACK: {"seq": 1},
        t.Up.STATUS: {"deployment": dep, "node": "n1", "seq": 1, "state": "downloading"},
        t.Up.FETCH: {"artifact": sha(DELTA_1_2), "blocks": [0]},
    }
    return bodies[kind]


#: Per kind, bodies with the right keys and wrong values.
WRONG_VALUES: dict[t.Up, list[dict[str, Any]]] = {
    t.Up.HELLO: [
        {"handled_seq": "0"}, {"handled_seq": -1}, {"handled_seq": 2**64 - 1},
        {"nodes": "n1"}, {"nodes": [1]}, {"nodes": ["N/1"]}, {"nodes": ["n1", "n1"]},
        {"nodes": [f"n{i}" for i in range(300)]}, {"agent": ""}, {"agent": "x" * 300},
    ],
    t.Up.STATE: [{"online": 1}, {"online": "true"}],
    t.Up.INVENTORY: [
        {"nodes": {}}, {"nodes": [{"node": "n1", "primary": {"version": "1"}}]},
        {"nodes": [{"node": "n1", "primary": {**report("n1")["primary"], "digest": b"x" * 31}}]},
        {"nodes": [{"node": "n1", "primary": {**report("n1")["primary"], "sequence": 2**63}}]},
        {"nodes": [report("n1"), report("n1")]}, {"nodes": [{"node": "n1", "colour": "red"}]},
        {"nodes": [report(f"n{i}") for i in range(300)]}, {"nodes": [{"device_type": "x"}]},
    ],
    t.Up.ACK: [{"seq": -1}, {"seq": "1"}, {"seq": True}, {"seq": 2**64 - 1}, {"seq": 99}],
    t.Up.STATUS: [
        {"seq": 2**63}, {"bytes": 10, "total": 5}, {"state": 5}, {"state": "pending"},
        {"state": "offered"}, {"deployment": "x" * 257}, {"node": "n2"}, {"mqtt_bytes": -5},
    ],
    t.Up.FETCH: [
        {"blocks": []}, {"blocks": list(range(33))}, {"blocks": [-1]}, {"blocks": ["0"]},
        {"artifact": b"x" * 31}, {"artifact": sha(FULL_V2)[:16].hex()}, {"blocks": [10**6]},
        {"artifact": b"\x00" * 32},
    ],
}  # fmt: skip


def bad_payloads(kind: t.Up, dep: str) -> list[tuple[str, bytes]]:
    good = valid(kind, dep)
    encoded = fleet.encode_map(good)
    cases = [
        ("empty", b""),
        ("garbage", b"\xff\xfe\x00garbage"),
        ("truncated", encoded[:-1]),
        ("trailing bytes", encoded + b"\x00"),
        ("not a map", cbor.encode([1, 2, 3])),
        ("text keys only", cbor.encode({1: 2})),
        ("unknown key", fleet.encode_map({**good, "extra": 1})),
        ("missing key", fleet.encode_map(dict(list(good.items())[1:]))),
        ("oversized", encoded + b"\x00" * fleet.MAX_MESSAGE_BYTES),
        ("deep", b"\x81" * 100 + b"\x00"),
        ("indefinite", b"\xbf\xff"),
        ("json", json.dumps({"online": True}).encode()),
    ]
    for i, wrong in enumerate(WRONG_VALUES[kind]):
        cases.append((f"wrong value {i}", cbor2.dumps({**good, **wrong})))
    return cases


ALL_KINDS = list(t.Up)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
def test_bad_input_on_every_gateway_topic_gets_an_error_and_changes_nothing(
    world: tuple[World, str], kind: t.Up, bugs: list[logging.LogRecord]
) -> None:
    w, dep = world
    topic = t.gateway_up(GW, kind)
    before = dump(w.dir)
    for name, payload in bad_payloads(kind, dep):
        effects = w.o.handle(topic, payload)
        errors = messages(effects, t.Down.ERROR, GW)
        assert len(effects.outgoing) == 1 and len(errors) == 1, (name, effects)
        assert errors[0]["topic"] == topic and "\n" not in errors[0]["reason"], name
        assert dump(w.dir) == before, name
    assert w.o.tick() == Effects()  # nothing was queued either
    assert bugs == []


def test_unknown_message_types_and_foreign_topics_are_refused(
    world: tuple[World, str], bugs: list[logging.LogRecord]
) -> None:
    w, _ = world
    before = dump(w.dir)
    errors = messages(w.o.handle(f"shoal/v1/gw/{GW}/up/reboot", b"\xa0"), t.Down.ERROR, GW)
    assert "unknown message type 'reboot'" in errors[0]["reason"]
    topic = f"shoal/v1/gw/{GW}/up/" + "é" * 300  # the ERROR's topic is clipped to fit
    assert len(messages(w.o.handle(topic, b""), t.Down.ERROR, GW)) == 1
    for topic in (
        "shoal/v1/gw/gw-9/up/hello",  # an unknown gateway: dropped
        f"shoal/v1/gw/{GW}/down/cmd",  # our own direction
        "shoal/v1/ops/alice/resp",
        "shoal/v2/gw/gw-1/up/hello",
        "elsewhere",
        "shoal/v1/gw/GW/up/hello",
        "shoal/v1/gw/gw-1/up/status/extra",
    ):
        assert w.o.handle(topic, b"\xa0") == Effects(), topic
    assert dump(w.dir) == before
    assert bugs == []


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from([*ALL_KINDS, *t.Channel]), payload=st.binary(max_size=300))
def test_random_bytes_on_any_topic_never_crash_or_change_state(
    world: tuple[World, str], bugs: list[logging.LogRecord], kind: str, payload: bytes
) -> None:
    w, _ = world
    before = dump(w.dir)
    if kind in set(t.Channel):
        topic = t.operator_request("alice", t.Channel(kind))
    else:
        topic = t.gateway_up(GW, t.Up(kind))
    w.o.handle(topic, payload)
    assert dump(w.dir) == before
    assert bugs == []


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(ALL_KINDS),
    body=st.dictionaries(
        st.sampled_from(["agent", "nodes", "handled_seq", "online", "seq", "deployment", "node",
                         "state", "bytes", "total", "reason", "artifact", "blocks", "x"]),
        _values, max_size=6,
    ),
)  # fmt: skip
def test_structured_nonsense_never_crashes(
    world: tuple[World, str], bugs: list[logging.LogRecord], kind: t.Up, body: dict[str, Any]
) -> None:
    w, _ = world
    try:
        payload = cbor2.dumps(body)
    except (ValueError, TypeError, cbor2.CBOREncodeError):
        return
    w.o.handle(t.gateway_up(GW, kind), payload)
    w.o.tick()
    assert bugs == []


# -- operator API ------------------------------------------------------------------------


def ask(w: World, op: str, args: dict[str, Any] | None = None, *, as_json: bool = True,
        operator: str = "alice", channel: t.Channel | None = None,
        ) -> tuple[dict[str, Any], Effects]:  # fmt: skip
    """Send a request on the op's channel (or ``channel``); the decoded reply (which must come
    first) and all effects. No broker here: any channel reaches the orchestrator."""
    request: dict[str, Any] = {"id": "r1", "op": op}
    if args is not None:
        request["args"] = args
    payload = json.dumps(request).encode() if as_json else cbor.encode(request)
    topic = t.op_request(operator, op) if channel is None else t.operator_request(operator, channel)
    effects = w.o.handle(topic, payload)
    reply = effects.outgoing[0]
    assert reply.topic == t.operator_response(operator)
    assert reply.payload[:1] == b"{" if as_json else reply.payload[:1] != b"{"
    decoded = fleet.decode_response(reply.payload)
    assert decoded["id"] == "r1"
    return decoded, effects


def test_operators_manage_gateways_in_json(world: tuple[World, str]) -> None:
    w, _ = world
    reply, _ = ask(w, "devices.add", {"id": "gw-new"})
    assert reply["ok"] and w.o.authenticate("gw-new", reply["result"]["secret"]) is t.Role.GATEWAY
    reply, _ = ask(w, "devices.accept", {"id": "gw-new"})
    assert reply == {"id": "r1", "ok": True, "result": {"id": "gw-new", "state": "accepted"}}
    reply, _ = ask(w, "devices.list")
    gateways = {g["id"]: g for g in reply["result"]["gateways"]}
    assert gateways["gw-new"]["state"] == "accepted"
    assert [n["target"] for n in gateways[GW]["nodes"]] == ["gw-1/n1", "gw-1/n2"]
    reply, _ = ask(w, "devices.show", {"id": f"{GW}/n1"})
    assert reply["result"]["deployments"][0]["state"] == "pending"
    assert reply["result"]["primary"]["digest"] == report("n1")["primary"]["digest"].hex()
    reply, effects = ask(w, "devices.decommission", {"id": "gw-new"})
    assert reply["ok"] and effects.disconnect == ["gw-new"]


def test_operators_upload_in_cbor_and_deploy(world: tuple[World, str]) -> None:
    w, _ = world
    reply, _ = ask(w, "artifact.upload", {"data": FULL_V2}, as_json=False)
    assert reply["ok"] and reply["result"]["digest"] == sha(FULL_V2).hex()
    reply, _ = ask(w, "artifact.upload", {"data": FULL_V2.hex()})
    assert not reply["ok"] and "CBOR" in reply["error"]
    reply, _ = ask(w, "artifact.list")
    assert len(reply["result"]["artifacts"]) == 3
    reply, effects = ask(
        w, "deploy.create", {"artifact": sha(FULL_V2).hex(), "nodes": [f"{GW}/n2"]}
    )
    assert reply["ok"] and seqs(effects, GW) == [2]  # published with the reply, not at the tick
    dep = reply["result"]["id"]
    reply, _ = ask(w, "deploy.status", {"id": dep}, as_json=False)
    assert reply["result"]["nodes"][0]["state"] == "pending"
    reply, effects = ask(w, "deploy.cancel", {"id": dep})
    assert reply["ok"] and reply["result"]["cancelled"] is not None
    assert [c["type"] for c in messages(effects, t.Down.COMMAND)] == ["cancel"]


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "cbor"])
def test_operator_errors_are_one_line_replies_and_change_nothing(
    world: tuple[World, str], as_json: bool, bugs: list[logging.LogRecord]
) -> None:
    w, _ = world
    before = dump(w.dir)
    cases: list[tuple[str, dict[str, Any] | None, str]] = [
        ("devices.reboot", None, "unknown op 'devices.reboot'"),
        ("devices.show", None, "missing id"),
        ("devices.show", {"id": "gw-9"}, "unknown gateway 'gw-9'"),
        ("devices.show", {"id": f"{GW}/n9"}, "unknown node"),
        ("devices.show", {"id": 5}, "must be text"),
        ("devices.list", {"verbose": True}, "unknown key 'verbose'"),
        ("devices.add", {"id": GW}, "already a gateway"),
        ("devices.add", {"id": "Bad Id"}, "malformed gateway id"),
        ("devices.accept", {"id": "gw-9"}, "unknown gateway"),
        ("deploy.create", {"artifact": "00" * 32, "nodes": [f"{GW}/n1"]}, "unknown artifact"),
        ("deploy.create", {"artifact": sha(FULL_V2).hex(), "nodes": [f"{GW}/n1"]},
         "still in deployment"),
        ("deploy.status", {"id": "dep-nope"}, "unknown deployment"),
        ("deploy.cancel", {"id": "dep-nope"}, "unknown deployment"),
    ]  # fmt: skip
    if not as_json:
        cases.append(("artifact.upload", {"data": b"\xd9\xd9\xf7junk"}, "malformed artifact"))
    for op, args, why in cases:
        reply, effects = ask(w, op, args, as_json=as_json)
        assert reply["ok"] is False and why in reply["error"], (op, reply)
        assert "\n" not in reply["error"] and len(effects.outgoing) == 1
    reply, _ = ask(w, "devices.list", as_json=as_json, operator="mallory")
    assert reply == {"id": "r1", "ok": False, "error": "unknown operator mallory"}
    assert dump(w.dir) == before
    assert bugs == []


def test_requests_without_a_readable_id_are_dropped_others_get_an_error(
    world: tuple[World, str], bugs: list[logging.LogRecord]
) -> None:
    w, _ = world
    topic = t.operator_request("alice")
    before = dump(w.dir)
    for payload in (
        b"", b"{", b"\xff\xff", b"[1, 2]", b'{"op": "devices.list"}', b'{"id": 5, "op": "x"}',
        cbor.encode({"op": "devices.list"}), b"{" + b" " * fleet.MAX_MESSAGE_BYTES + b"}",
        b"\xa0" * (fleet.MAX_OPERATOR_MESSAGE_BYTES + 1),
    ):  # fmt: skip
        assert w.o.handle(topic, payload) == Effects(), payload[:20]
    for payload, as_json in (
        (b'{"id": "r1", "op": 7}', True),
        (b'{"id": "r1", "op": "devices.list", "colour": 1}', True),
        (b'{"id": "r1", "op": "devices.list", "args": [1]}', True),
        (b'{"id": "r1", "op": "\\ud800"}', True),
        (cbor.encode({"id": "r1", "op": "devices.list", "args": "x"}), False),
    ):
        effects = w.o.handle(topic, payload)
        reply = fleet.decode_response(effects.outgoing[0].payload)
        assert reply["id"] == "r1" and reply["ok"] is False, reply
        assert (effects.outgoing[0].payload[:1] == b"{") == as_json
    assert dump(w.dir) == before
    assert bugs == []
