"""The orchestrator's core, driven by function calls: registry, store, deployments, outbox, blocks.

Real SQLite files in tmp_path, real signed artifacts, an injected clock.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core import Effects, Orchestrator
from orchestrator.db import MIGRATIONS, open_database
from orchestrator.deployments import (
    ACTIVE,
    FINAL,
    REPORTED,
    TRANSITIONS,
    DeploymentState,
    IllegalTransition,
    check_transition,
)
from otaproto import fleet
from otaproto import topics as t
from otaproto.artifact import build_delta_artifact, build_full_artifact, verify_artifact
from otaproto.errors import InvalidInput, MalformedError, UnknownKeyError
from otaproto.keys import SigningKey, TrustedKeys
from shoal.synthetic import evolve, firmware_like

KEY = SigningKey.from_ed25519_seed(bytes(range(32)))
OTHER_KEY = SigningKey.from_ed25519_seed(bytes(range(1, 33)))
TRUSTED = TrustedKeys([KEY.public_key])
BLOCK = 1024
DEVICE = "nrf52"

IMG_V1 = firmware_like(12_000, seed=1)
IMG_V2 = evolve(IMG_V1, seed=2, insert_bytes=512)
IMG_OLD = firmware_like(12_000, seed=9)


def _full(image: bytes, version: str, sequence: int, key: SigningKey = KEY) -> bytes:
    return build_full_artifact(
        image, name="app", version=version, sequence=sequence, device_types=(DEVICE,),
        key=key, created_s=sequence,
    )  # fmt: skip


FULL_V1 = _full(IMG_V1, "1.0.0", 1)
FULL_V2 = _full(IMG_V2, "2.0.0", 2)
_outcome = build_delta_artifact(
    verify_artifact(FULL_V1, TRUSTED), verify_artifact(FULL_V2, TRUSTED), KEY, created_s=3
)
assert _outcome.used_delta
DELTA_1_2 = _outcome.artifact
WRONG_KEY_V2 = _full(IMG_V2, "2.0.0", 2, key=OTHER_KEY)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def slot(image: bytes, version: str = "1.0.0", sequence: int = 1) -> dict[str, Any]:
    return {"version": version, "sequence": sequence, "digest": sha(image), "size": len(image)}


def report(node: str, image: bytes | None = IMG_V1, *, sequence: int = 1,
           device_type: str = DEVICE) -> dict[str, Any]:  # fmt: skip
    body: dict[str, Any] = {"node": node, "device_type": device_type, "boot_state": "confirmed"}
    if image is not None:
        body["primary"] = slot(image, sequence=sequence)
    return body


class World:
    """An orchestrator on a real data folder, and helpers to talk to it as gateways do."""

    def __init__(self, data_dir: Path, **kwargs: Any) -> None:
        self.dir = data_dir
        self.clock = Clock()
        kwargs.setdefault("block_bytes", BLOCK)
        self.kwargs = kwargs
        self.o = Orchestrator(data_dir, TRUSTED, clock=self.clock, **kwargs)

    def restart(self) -> None:
        self.o.close()
        self.o = Orchestrator(self.dir, TRUSTED, clock=self.clock, **self.kwargs)

    def send(self, gw: str, kind: t.Up, body: dict[str, Any]) -> Effects:
        return self.o.handle(t.gateway_up(gw, kind), fleet.encode_map(body))

    def gateway(
        self, gw: str, reports: list[dict[str, Any]], *, accept: bool = True, handled: int = 0
    ) -> Effects:
        """Add (and accept) a gateway, bring it online and report its nodes."""
        self.o.add_gateway(gw)
        if accept:
            self.o.accept_gateway(gw)
        self.send(gw, t.Up.STATE, {"online": True})
        nodes = [r["node"] for r in reports]
        effects = self.send(
            gw, t.Up.HELLO, {"agent": "test", "nodes": nodes, "handled_seq": handled}
        )
        self.send(gw, t.Up.INVENTORY, {"nodes": reports})
        return effects

    def upload_all(self) -> None:
        for data in (FULL_V1, FULL_V2, DELTA_1_2):
            self.o.upload_artifact(data)

    def status(self, gw: str, dep: str, node: str, seq: int, state: str, **extra: Any) -> Effects:
        body = {"deployment": dep, "node": node, "seq": seq, "state": state, **extra}
        return self.send(gw, t.Up.STATUS, body)

    def node_state(self, dep: str, target: str) -> str:
        nodes = self.o.deployment_status(dep)["nodes"]
        return str(next(n["state"] for n in nodes if n["target"] == target))


def messages(effects: Effects, kind: t.Down, gw: str | None = None) -> list[dict[str, Any]]:
    """The decoded payloads of one kind of down message (to one gateway, if given)."""
    schema = {t.Down.COMMAND: fleet.COMMAND, t.Down.BLOCK: fleet.BLOCK, t.Down.ERROR: fleet.ERROR}
    out = []
    for message in effects.outgoing:
        parsed = t.parse(message.topic)
        assert parsed is not None, message.topic
        if parsed.direction == "down" and parsed.kind == kind and gw in (None, parsed.owner):
            limit = fleet.MAX_BLOCK_BYTES + 1024
            out.append(fleet.decode_map(message.payload, schema[kind], str(kind), limit=limit))
    return out


def seqs(effects: Effects, gw: str | None = None) -> list[int]:
    return [c["seq"] for c in messages(effects, t.Down.COMMAND, gw)]


def dump(data_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but ``audit``, through a connection of its own.

    The audit log records refused requests too (that is what it is for), so
    "changes nothing" means: nothing but the audit log.
    """
    con = sqlite3.connect(data_dir / "shoal.db")
    try:
        names = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if r[0] != "audit"
        ]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        con.close()


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path / "orch")
    yield world
    world.o.close()


# -- database ---------------------------------------------------------------------------


def test_schema_is_created_by_recorded_migrations_in_wal_mode(w: World) -> None:
    con = sqlite3.connect(w.dir / "shoal.db")
    rows = con.execute("SELECT version, name, applied_at FROM migrations").fetchall()
    assert rows == [(version, name, 1000.0) for version, name, _ in MIGRATIONS]
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {
        "migrations", "gateways", "nodes", "operators", "artifacts", "deployments",
        "deployment_nodes", "events", "commands", "groups", "rollouts", "rollout_nodes",
        "rollout_events", "audit",
    }  # fmt: skip
    con.close()
    w.restart()  # nothing more to apply
    assert len(dump(w.dir)["migrations"]) == len(MIGRATIONS)


def test_a_database_from_a_newer_orchestrator_is_refused(tmp_path: Path) -> None:
    db = open_database(tmp_path / "x.db", lambda: 0.0)
    db.execute("INSERT INTO migrations VALUES (99, 'from the future', 0)")
    db.close()
    with pytest.raises(InvalidInput, match="newer"):
        open_database(tmp_path / "x.db", lambda: 0.0)


# -- registry and authentication -----------------------------------------------------------


def test_gateway_lifecycle_and_authentication(w: World) -> None:
    token = w.o.add_gateway("gw-1")
    assert w.o.authenticate("gw-1", token) is t.Role.GATEWAY  # pending may connect
    assert w.o.authenticate("gw-1", token + "x") is None
    assert w.o.accept_gateway("gw-1") == Effects()
    assert w.o.accept_gateway("gw-1") == Effects()  # again: a no-op
    assert w.o.authenticate("gw-1", token) is t.Role.GATEWAY
    effects = w.o.decommission_gateway("gw-1")
    assert effects.disconnect == ["gw-1"] and effects.outgoing == []
    assert w.o.authenticate("gw-1", token) is None
    with pytest.raises(InvalidInput, match="from decommissioned to accepted"):
        w.o.accept_gateway("gw-1")
    with pytest.raises(InvalidInput, match="already a gateway"):
        w.o.add_gateway("gw-1")
    with pytest.raises(InvalidInput, match="unknown gateway"):
        w.o.accept_gateway("gw-2")
    with pytest.raises(MalformedError):
        w.o.add_gateway("Bad/Id")


def test_accounts_share_one_namespace_and_the_orchestrator_has_its_own(
    w: World, caplog: pytest.LogCaptureFixture
) -> None:
    secret = w.o.add_operator("alice", "deployer")
    assert w.o.authenticate("alice", secret) is t.Role.DEPLOYER  # the broker learns the role
    assert w.o.authenticate("viv", w.o.add_operator("viv", "viewer")) is t.Role.VIEWER
    assert w.o.authenticate("ada", w.o.add_operator("ada", "admin")) is t.Role.ADMIN
    with pytest.raises(InvalidInput, match="already an operator"):
        w.o.add_gateway("alice")
    with pytest.raises(InvalidInput, match="reserved"):
        w.o.add_gateway("orchestrator")
    with pytest.raises(MalformedError, match="role"):
        w.o.add_operator("bob", "root")
    assert w.o.authenticate("orchestrator", w.o.orchestrator_secret) is t.Role.ORCHESTRATOR
    assert w.o.authenticate("orchestrator", "guess") is None
    assert w.o.authenticate("nobody", "x") is None
    assert w.o.authenticate("alice", "x" * 100_000) is None
    assert w.o.authenticate("alice", "\ud800") is None  # never raises
    assert w.o.authenticate("orchestrator", "\ud800") is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    secret_file = w.dir / "orchestrator.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    before = w.o.orchestrator_secret
    w.restart()
    assert w.o.orchestrator_secret == before
    assert secret not in repr(dump(w.dir))  # only its hash is stored


def test_read_accounts_lists_who_may_connect_for_an_external_broker(w: World) -> None:
    from otaproto.credentials import verify_secret

    gw_secret = w.o.add_gateway("gw-1")
    w.o.add_gateway("gw-old")
    w.o.decommission_gateway("gw-old")
    op_secret = w.o.add_operator("alice", "viewer")
    w.o.add_operator("dee", "deployer")
    w.o.add_operator("ada", "admin")
    accounts = Orchestrator.read_accounts(w.dir)
    assert [(u, r) for u, _, r in accounts] == [
        ("orchestrator", t.Role.ORCHESTRATOR), ("gw-1", t.Role.GATEWAY),
        ("ada", t.Role.ADMIN), ("alice", t.Role.VIEWER), ("dee", t.Role.DEPLOYER),
    ]  # fmt: skip
    hashes = {u: h for u, h, _ in accounts}
    assert verify_secret(w.o.orchestrator_secret, hashes["orchestrator"])
    assert verify_secret(gw_secret, hashes["gw-1"])
    assert verify_secret(op_secret, hashes["alice"])
    with pytest.raises(InvalidInput, match="holds no orchestrator"):
        Orchestrator.read_accounts(w.dir / "nothing")


def test_hello_sets_membership_and_inventory_reports_what_nodes_run(w: World) -> None:
    w.gateway("gw-1", [report("n1"), report("n2", IMG_OLD)])
    devices = w.o.show_device("gw-1")
    assert devices["online"] is True and devices["agent"] == "test"
    n1 = devices["nodes"][0]
    assert (n1["gateway"], n1["node"], n1["target"]) == ("gw-1", "n1", "gw-1/n1")
    assert n1["present"] is True
    assert n1["primary"]["digest"] == sha(IMG_V1).hex() and n1["device_type"] == DEVICE
    # A one-node inventory (the gateway's after flashing) leaves the others alone.
    w.send("gw-1", t.Up.INVENTORY, {"nodes": [report("n2", IMG_V2, sequence=2)]})
    nodes = w.o.show_device("gw-1")["nodes"]
    assert [n["present"] for n in nodes] == [True, True]
    assert nodes[1]["primary"]["version"] == "1.0.0" and nodes[1]["primary"]["sequence"] == 2
    # A node that did not answer keeps what it said last, with the error.
    w.send("gw-1", t.Up.INVENTORY, {"nodes": [{"node": "n1", "error": "timeout"}]})
    n1 = w.o.show_device("gw-1/n1")
    assert n1["error"] == "timeout" and n1["device_type"] == DEVICE and n1["primary"] is not None
    # A HELLO without n2: absent, not deleted.
    w.send("gw-1", t.Up.HELLO, {"agent": "test 2", "nodes": ["n1"], "handled_seq": 0})
    nodes = w.o.show_device("gw-1")["nodes"]
    assert [(n["node"], n["present"]) for n in nodes] == [("n1", True), ("n2", False)]
    assert w.o.show_device("gw-1")["agent"] == "test 2"
    w.send("gw-1", t.Up.STATE, {"online": False})
    assert w.o.show_device("gw-1")["online"] is False


def test_a_pending_gateway_is_recorded_but_sent_nothing(w: World) -> None:
    w.gateway("gw-p", [report("n1")], accept=False)
    assert w.o.show_device("gw-p/n1")["present"] is True
    assert w.send("gw-p", t.Up.ACK, {"seq": 1}) == Effects()  # refused, silently
    assert w.o.handle(t.gateway_up("gw-p", t.Up.HELLO), b"\xff") == Effects()
    w.o.upload_artifact(FULL_V2)
    with pytest.raises(InvalidInput, match="pending, not accepted"):
        w.o.create_deployment(sha(FULL_V2).hex(), ["gw-p/n1"])


# -- artifact store ------------------------------------------------------------------------


def test_upload_verifies_dedupes_and_links_deltas(w: World) -> None:
    delta = w.o.upload_artifact(DELTA_1_2)  # before the fulls it links to
    assert delta.is_delta and delta.full_digest is None and delta.base_full_digest is None
    v2 = w.o.upload_artifact(FULL_V2)
    v1 = w.o.upload_artifact(FULL_V1)
    listed = {a["digest"]: a for a in w.o.list_artifacts()["artifacts"]}
    assert listed[delta.hex]["full_digest"] == v2.hex
    assert listed[delta.hex]["base_full_digest"] == v1.hex
    assert listed[delta.hex]["base_digest"] == sha(IMG_V1).hex()
    assert (w.dir / "artifacts" / v2.hex).read_bytes() == FULL_V2
    before = dump(w.dir)
    assert w.o.upload_artifact(FULL_V2) == v2  # the same bytes: a no-op
    assert dump(w.dir) == before
    with pytest.raises(UnknownKeyError):
        w.o.upload_artifact(WRONG_KEY_V2)
    with pytest.raises(MalformedError):
        w.o.upload_artifact(FULL_V2[:-10])
    assert dump(w.dir) == before
    assert sorted(p.name for p in (w.dir / "artifacts").iterdir()) == sorted(listed)


# -- deployments ----------------------------------------------------------------------------


def test_a_deployment_sends_the_delta_to_nodes_on_its_base_and_the_full_to_others(w: World) -> None:
    w.upload_all()
    w.gateway("gw-1", [report("n1"), report("n2", IMG_OLD)])
    dep = w.o.create_deployment(sha(FULL_V2).hex(), ["gw-1/n1", "gw-1/n2"])
    commands = messages(w.o.tick(), t.Down.COMMAND, "gw-1")
    assert [(c["seq"], c["type"], c["node"]) for c in commands] == [
        (1, "deploy", "n1"), (2, "deploy", "n2"),
    ]  # fmt: skip
    d1, d2 = commands
    assert d1["deployment"] == dep
    assert d1["artifact"] == {
        "digest": sha(DELTA_1_2), "size": len(DELTA_1_2), "block_bytes": BLOCK,
        "kind": "bsdiff4", "base_digest": sha(IMG_V1),
    }  # fmt: skip
    assert d1["full"] == {
        "digest": sha(FULL_V2),
        "size": len(FULL_V2),
        "block_bytes": BLOCK,
        "kind": "full",
    }
    assert d2["artifact"]["digest"] == sha(FULL_V2) and d2["full"] is None
    status = w.o.deployment_status(dep)
    assert status["state"] == "active" and status["counts"] == {"pending": 2}
    assert status["nodes"][0]["events"][0]["detail"]["kind"] == "bsdiff4"


def test_a_deployment_may_name_the_image_instead_of_the_full_artifact_file(w: World) -> None:
    w.upload_all()
    w.gateway("gw-1", [report("n1")])
    dep = w.o.create_deployment(sha(IMG_V2).hex(), ["gw-1/n1"])
    assert w.o.deployment_status(dep)["artifact"] == sha(FULL_V2).hex()
    assert messages(w.o.tick(), t.Down.COMMAND)[0]["artifact"]["kind"] == "bsdiff4"


def test_nodes_on_the_image_are_skipped_and_others_incompatible(w: World) -> None:
    w.upload_all()
    w.gateway("gw-1", [
        report("same", IMG_V2, sequence=2), report("esp", device_type="esp32"),
        report("newer", IMG_OLD, sequence=7),
    ])  # fmt: skip
    dep = w.o.create_deployment(sha(FULL_V2).hex(), ["gw-1/same", "gw-1/esp", "gw-1/newer"])
    assert seqs(w.o.tick()) == []
    status = w.o.deployment_status(dep)
    assert status["state"] == "finished"
    assert [(n["target"], n["state"]) for n in status["nodes"]] == [
        ("gw-1/esp", "incompatible"), ("gw-1/newer", "incompatible"), ("gw-1/same", "skipped"),
    ]  # fmt: skip
    assert "esp32" in status["nodes"][0]["reason"]
    assert "anti-rollback" in status["nodes"][1]["reason"]


def test_a_deployment_request_with_any_bad_target_is_refused_whole(w: World) -> None:
    w.upload_all()
    w.gateway("gw-1", [report("n1"), report("n2")])
    w.gateway("gw-p", [report("n1")], accept=False)
    w.send("gw-1", t.Up.INVENTORY, {"nodes": [{"node": "n3", "error": "no answer"}]})
    full = sha(FULL_V2).hex()
    w.o.create_deployment(full, ["gw-1/n2"])
    before = dump(w.dir)
    cases = [
        (full, ["gw-1/n1", "gw-1/nope"], "unknown node gw-1/nope"),
        (full, ["gw-1/n1", "gw-x/n1"], "unknown gateway gw-x"),
        (full, ["gw-p/n1"], "gw-p is pending"),
        (full, ["gw-1/n1", "gw-1/n1"], "listed twice"),
        (full, ["gw-1/n1", "gw-1/n2"], "still in deployment"),
        (full, ["gw-1/n3"], "has not reported its device type"),
        (full, ["gw-1"], "not 'gateway/node'"),
        (full, [], "non-empty"),
        (full, "gw-1/n1", "non-empty list"),
        (sha(DELTA_1_2).hex(), ["gw-1/n1"], "is a delta"),
        ("00" * 32, ["gw-1/n1"], "unknown artifact"),
        ("xyz", ["gw-1/n1"], "hex"),
    ]
    for artifact, nodes, why in cases:
        with pytest.raises(InvalidInput, match=why):
            w.o.create_deployment(artifact, nodes)  # type: ignore[arg-type]
    assert dump(w.dir) == before


def test_the_transition_table_keeps_final_states_final() -> None:
    assert set(TRANSITIONS) == set(DeploymentState)
    assert set(REPORTED.values()) <= set(DeploymentState) - {
        DeploymentState.PENDING, DeploymentState.OFFERED, DeploymentState.INCOMPATIBLE,
    }  # fmt: skip
    for state in FINAL:
        assert TRANSITIONS[state] <= {DeploymentState.PENDING}  # only an operator's retry
    for state in ACTIVE:
        assert {DeploymentState.SUCCEEDED, DeploymentState.FAILED} <= TRANSITIONS[state]
        assert DeploymentState.PENDING not in TRANSITIONS[state]
    with pytest.raises(IllegalTransition, match="cannot go from succeeded to downloading"):
        check_transition(DeploymentState.SUCCEEDED, DeploymentState.DOWNLOADING, "x")


# -- commands and the outbox -------------------------------------------------------------------


def _deployed(w: World, gw: str = "gw-1", nodes: tuple[str, ...] = ("n1",)) -> str:
    w.upload_all()
    w.gateway(gw, [report(n) for n in nodes])
    return w.o.create_deployment(sha(FULL_V2).hex(), [f"{gw}/{n}" for n in nodes])


def test_unacked_commands_are_resent_after_the_interval_only_while_online(w: World) -> None:
    _deployed(w, nodes=("n1", "n2"))
    assert seqs(w.o.tick()) == [1, 2]  # never sent: due at once
    w.clock.advance(9.9)
    assert seqs(w.o.tick()) == []
    w.clock.advance(0.1)
    assert seqs(w.o.tick()) == [1, 2]
    w.send("gw-1", t.Up.ACK, {"seq": 1})
    w.clock.advance(10)
    assert seqs(w.o.tick()) == [2]
    w.send("gw-1", t.Up.STATE, {"online": False})  # the will
    w.clock.advance(100)
    assert seqs(w.o.tick()) == []
    w.send("gw-1", t.Up.STATE, {"online": True})
    assert seqs(w.o.tick()) == [2]
    rows = dump(w.dir)["commands"]
    assert [(r[1], r[8]) for r in rows] == [(1, 2), (2, 4)]  # (seq, send_count)


def test_hello_acks_through_handled_seq_and_resends_the_rest_in_order(w: World) -> None:
    dep = _deployed(w, nodes=("n1", "n2", "n3"))
    w.o.tick()
    effects = w.send("gw-1", t.Up.HELLO, {"agent": "a", "nodes": ["n1", "n2", "n3"],
                                         "handled_seq": 1})  # fmt: skip
    assert seqs(effects) == [2, 3]
    assert w.node_state(dep, "gw-1/n1") == "offered"
    assert w.node_state(dep, "gw-1/n2") == "pending"
    effects = w.send("gw-1", t.Up.HELLO, {"agent": "a", "nodes": ["n1", "n2", "n3"],
                                         "handled_seq": 3})  # fmt: skip
    assert seqs(effects) == []
    w.clock.advance(60)
    assert seqs(w.o.tick()) == []


def test_acks_are_idempotent_and_an_ack_for_a_number_never_sent_is_refused(w: World) -> None:
    dep = _deployed(w)
    w.o.tick()
    assert w.send("gw-1", t.Up.ACK, {"seq": 1}) == Effects()
    events = len(dump(w.dir)["events"])
    assert w.send("gw-1", t.Up.ACK, {"seq": 1}) == Effects()
    assert len(dump(w.dir)["events"]) == events
    assert w.node_state(dep, "gw-1/n1") == "offered"
    errors = messages(w.send("gw-1", t.Up.ACK, {"seq": 7}), t.Down.ERROR, "gw-1")
    assert errors == [{"topic": "shoal/v1/gw/gw-1/up/ack",
                       "reason": "ack for command 7, which was never sent to gw-1"}]  # fmt: skip


def test_every_valid_message_is_a_sign_of_life_and_refused_ones_are_not(w: World) -> None:
    dep = _deployed(w)
    w.o.tick()
    w.send("gw-1", t.Up.STATE, {"online": False})
    bodies: list[tuple[t.Up, dict[str, Any]]] = [
        (t.Up.ACK, {"seq": 1}),
        (t.Up.STATUS, {"deployment": dep, "node": "n1", "seq": 1, "state": "downloading"}),
        (t.Up.FETCH, {"artifact": sha(DELTA_1_2), "blocks": [0]}),
        (t.Up.INVENTORY, {"nodes": [report("n1")]}),
        (t.Up.STATUS, {"deployment": dep, "node": "n1", "seq": 1, "state": "downloading"}),
    ]
    for kind, body in bodies:
        w.send("gw-1", t.Up.STATE, {"online": False})
        w.clock.advance(1)
        w.send("gw-1", kind, body)
        shown = w.o.show_device("gw-1")
        assert (shown["online"], shown["last_seen"]) == (True, w.clock.now), kind
    w.clock.advance(1)
    w.send("gw-1", t.Up.ACK, {"seq": 9})  # refused
    assert w.o.show_device("gw-1")["last_seen"] == w.clock.now - 1


def test_a_gateway_ahead_of_a_restored_database_moves_the_counter_past_it(w: World) -> None:
    w.upload_all()
    w.gateway("gw-1", [report("n1")], handled=41)
    w.o.create_deployment(sha(FULL_V2).hex(), ["gw-1/n1"])
    assert seqs(w.o.tick()) == [42]


def test_a_restarted_orchestrator_resends_unacked_commands_and_keeps_counting(
    tmp_path: Path,
) -> None:
    w = World(tmp_path / "orch")
    dep = _deployed(w, nodes=("n1", "n2"))
    assert seqs(w.o.tick()) == [1, 2]
    w.send("gw-1", t.Up.ACK, {"seq": 1})
    w.status("gw-1", dep, "n1", 1, "downloading")
    w.restart()
    assert seqs(w.o.tick()) == []  # sent 0 s ago
    w.clock.advance(10)
    assert seqs(w.o.tick()) == [2]
    assert w.node_state(dep, "gw-1/n1") == "downloading"
    w.status("gw-1", dep, "n1", 1, "flashing")  # a replay, still recognised as one
    assert w.node_state(dep, "gw-1/n1") == "downloading"
    assert seqs(w.o.cancel_deployment(dep)) == [3, 4]
    hello = w.send("gw-1", t.Up.HELLO, {"agent": "a", "nodes": ["n1", "n2"], "handled_seq": 0})
    assert seqs(hello) == [2, 3, 4]
    w.o.close()


# -- status reports --------------------------------------------------------------------------


def test_a_node_goes_through_its_states_and_every_report_is_an_event(w: World) -> None:
    dep = _deployed(w)
    w.o.tick()
    w.send("gw-1", t.Up.ACK, {"seq": 1})
    w.status("gw-1", dep, "n1", 1, "downloading")
    w.status("gw-1", dep, "n1", 2, "downloaded", mqtt_bytes=len(FULL_V2))
    w.status("gw-1", dep, "n1", 3, "flashing", bytes=0, total=len(IMG_V2))
    w.status("gw-1", dep, "n1", 4, "flashing", bytes=4096, total=len(IMG_V2))
    w.status("gw-1", dep, "n1", 5, "rebooting")
    w.status("gw-1", dep, "n1", 6, "succeeded", serial_bytes=len(IMG_V2), mqtt_bytes=len(FULL_V2))
    status = w.o.deployment_status(dep)
    node = status["nodes"][0]
    assert status["state"] == "finished" and node["state"] == "succeeded"
    assert node["mqtt_bytes"] == len(FULL_V2) and node["serial_bytes"] == len(IMG_V2)
    assert [e["state"] for e in node["events"]] == [
        "pending", "offered", "downloading", "downloaded", "flashing", "flashing", "rebooting",
        "succeeded",
    ]  # fmt: skip
    assert node["events"][5]["detail"] == {"seq": 4, "bytes": 4096, "total": len(IMG_V2)}


def test_replayed_and_overtaken_reports_are_ignored(w: World) -> None:
    dep = _deployed(w)
    w.status("gw-1", dep, "n1", 2, "downloaded")
    before = dump(w.dir)
    assert w.status("gw-1", dep, "n1", 2, "downloaded") == Effects()  # a replay
    assert w.status("gw-1", dep, "n1", 1, "downloading") == Effects()  # overtaken
    after = dump(w.dir)
    assert after["deployment_nodes"] == before["deployment_nodes"]
    assert after["events"] == before["events"]
    assert w.node_state(dep, "gw-1/n1") == "downloaded"


def test_refused_reports_get_an_error_and_change_nothing(w: World) -> None:
    dep = _deployed(w)
    w.gateway("gw-2", [report("n1")])
    w.status("gw-1", dep, "n1", 5, "succeeded")
    before = dump(w.dir)
    cases = [
        ("gw-1", dep, "n1", 6, "downloading", f"deployment {dep} of gw-1/n1 cannot go from "
                                              "succeeded to downloading"),
        ("gw-1", "dep-nope", "n1", 1, "downloading", "unknown deployment 'dep-nope'"),
        ("gw-2", dep, "n1", 1, "downloading", "node 'n1' of gateway gw-2 is not in deployment"),
        ("gw-1", dep, "n1", 7, "exploded", "unknown state 'exploded'"),
    ]  # fmt: skip
    for gw, d, node, seq, state, why in cases:
        errors = messages(w.status(gw, d, node, seq, state), t.Down.ERROR, gw)
        assert len(errors) == 1 and why in errors[0]["reason"], errors
        assert errors[0]["topic"] == f"shoal/v1/gw/{gw}/up/status"
    assert w.status("gw-1", dep, "n1", 8, "succeeded") == Effects()  # a repeated final: ignored
    assert dump(w.dir) == before


def test_the_gateways_words_map_onto_states(w: World) -> None:
    dep = _deployed(w, nodes=("a", "b", "c", "d"))
    w.status("gw-1", dep, "a", 1, "already_installed")
    w.status("gw-1", dep, "b", 1, "rejected")
    w.status("gw-1", dep, "c", 1, "flashing")
    w.status("gw-1", dep, "c", 2, "rolled_back", reason="did not confirm")
    w.status("gw-1", dep, "d", 1, "flashing")
    w.status("gw-1", dep, "d", 2, "downloaded")  # a restarted gateway resumes from its download
    nodes = {n["target"]: n for n in w.o.deployment_status(dep)["nodes"]}
    assert nodes["gw-1/a"]["state"] == "skipped"
    assert (nodes["gw-1/b"]["state"], nodes["gw-1/b"]["reason"]) == ("failed", "rejected")
    c = nodes["gw-1/c"]
    assert (c["state"], c["reason"]) == ("rolled_back", "did not confirm")
    assert nodes["gw-1/d"]["state"] == "downloaded"
    assert nodes["gw-1/a"]["events"][-1]["detail"]["reported"] == "already_installed"


def test_decommissioning_aborts_running_deployments_and_silences_the_gateway(w: World) -> None:
    dep = _deployed(w)
    w.o.tick()
    w.o.decommission_gateway("gw-1")
    assert w.node_state(dep, "gw-1/n1") == "aborted"
    before = dump(w.dir)
    assert w.status("gw-1", dep, "n1", 1, "downloading") == Effects()
    assert w.send("gw-1", t.Up.HELLO, {"agent": "a", "nodes": [], "handled_seq": 0}) == Effects()
    w.clock.advance(100)
    assert w.o.tick() == Effects()
    assert dump(w.dir) == before


def test_cancel_sends_cancel_commands_once_and_the_gateway_reports_aborted(w: World) -> None:
    dep = _deployed(w, nodes=("n1", "n2"))
    w.o.tick()
    w.status("gw-1", dep, "n2", 1, "succeeded")
    effects = w.o.cancel_deployment(dep)
    assert [(c["seq"], c["type"], c["node"]) for c in messages(effects, t.Down.COMMAND)] == [
        (3, "cancel", "n1")
    ]
    assert w.o.cancel_deployment(dep) == Effects()
    w.status("gw-1", dep, "n1", 1, "aborted", reason="cancelled")
    status = w.o.deployment_status(dep)
    assert status["cancelled"] is not None and status["counts"] == {"aborted": 1, "succeeded": 1}


# -- blocks --------------------------------------------------------------------------------------


def _fetch(w: World, gw: str, artifact: bytes, blocks: list[int]) -> Effects:
    return w.send(gw, t.Up.FETCH, {"artifact": sha(artifact), "blocks": blocks})


def test_blocks_are_served_only_for_offered_artifacts_and_rebuild_the_file(w: World) -> None:
    dep = _deployed(w)  # n1 runs v1: offered the delta, with the full v2 as fallback
    count = -(-len(DELTA_1_2) // BLOCK)
    assert _fetch(w, "gw-1", DELTA_1_2, list(range(count))) == Effects()
    blocks = messages(w.o.tick(), t.Down.BLOCK, "gw-1")
    assert [b["index"] for b in blocks] == list(range(count))
    assert b"".join(b["data"] for b in blocks) == DELTA_1_2
    assert _fetch(w, "gw-1", FULL_V2, [0]) == Effects()  # the fallback is offered too
    errors = messages(_fetch(w, "gw-1", FULL_V1, [0]), t.Down.ERROR)
    assert "not offered" in errors[0]["reason"]
    errors = messages(_fetch(w, "gw-1", DELTA_1_2, [0, count]), t.Down.ERROR)
    assert f"block {count} is past the end" in errors[0]["reason"]
    w.status("gw-1", dep, "n1", 1, "failed", reason="flash error")
    w.o.tick()
    errors = messages(_fetch(w, "gw-1", DELTA_1_2, [0]), t.Down.ERROR)
    assert "not offered" in errors[0]["reason"]  # the deployment is over


def test_a_gateway_queues_at_most_two_fetches_of_blocks(w: World) -> None:
    big = _full(firmware_like(100 * BLOCK, seed=5), "3.0.0", 3)
    w.o.upload_artifact(big)
    w.gateway("gw-1", [report("n1")])
    w.o.create_deployment(sha(big).hex(), ["gw-1/n1"])
    limit = fleet.MAX_BLOCKS_PER_FETCH
    assert _fetch(w, "gw-1", big, list(range(limit))) == Effects()
    assert _fetch(w, "gw-1", big, list(range(limit))) == Effects()  # already queued: no-ops
    assert _fetch(w, "gw-1", big, list(range(limit, 2 * limit))) == Effects()
    errors = messages(_fetch(w, "gw-1", big, list(range(2 * limit - 2, 2 * limit + 3))),
                      t.Down.ERROR)  # fmt: skip
    assert "queue full" in errors[0]["reason"] and "refused 3 of 5" in errors[0]["reason"]
    assert len(messages(w.o.tick(), t.Down.BLOCK)) == 2 * limit


def test_blocks_are_served_round_robin_across_gateways(tmp_path: Path) -> None:
    w = World(tmp_path / "orch", blocks_per_tick=5)
    w.upload_all()
    w.gateway("gw-a", [report("n1", IMG_OLD)])
    w.gateway("gw-b", [report("n1", IMG_OLD)])
    w.o.create_deployment(sha(FULL_V2).hex(), ["gw-a/n1", "gw-b/n1"])
    _fetch(w, "gw-a", FULL_V2, [0, 1, 2, 3, 4, 5])
    _fetch(w, "gw-b", FULL_V2, [0, 1, 2])

    def served(effects: Effects) -> list[tuple[str, int]]:
        out = []
        for message in effects.outgoing:
            parsed = t.parse(message.topic)
            if parsed is not None and parsed.kind == t.Down.BLOCK:
                out.append(
                    (parsed.owner, fleet.decode_map(message.payload, fleet.BLOCK, "b")["index"])
                )
        return out

    assert served(w.o.tick()) == [("gw-a", 0), ("gw-b", 0), ("gw-a", 1), ("gw-b", 1), ("gw-a", 2)]
    assert served(w.o.tick()) == [("gw-b", 2), ("gw-a", 3), ("gw-a", 4), ("gw-a", 5)]
    assert served(w.o.tick()) == []
    _fetch(w, "gw-a", FULL_V2, [6])
    w.send("gw-a", t.Up.STATE, {"online": False})  # gone: its queue with it
    assert served(w.o.tick()) == []
    w.o.close()


# -- batches: many messages, one transaction ---------------------------------------------------


def _up(gw: str, kind: t.Up, body: dict[str, Any]) -> tuple[str, bytes]:
    return t.gateway_up(gw, kind), fleet.encode_map(body)


def _status(gw: str, dep: str, node: str, seq: int, state: str) -> tuple[str, bytes]:
    return _up(gw, t.Up.STATUS, {"deployment": dep, "node": node, "seq": seq, "state": state})


def _node_events(w: World, dep: str) -> dict[str, list[str]]:
    return {
        n["target"]: [e["state"] for e in n["events"]] for n in w.o.deployment_status(dep)["nodes"]
    }


def test_a_batch_takes_the_good_messages_and_refuses_the_bad_ones_alone(w: World) -> None:
    """Every message of a batch takes effect exactly as it would alone: a refused one changes
    nothing and gets its ERROR, in its place among the effects, and the others stand."""
    dep = _deployed(w, nodes=("n1", "n2"))
    w.o.tick()
    batch = [
        _up("gw-1", t.Up.ACK, {"seq": 1}),
        _status("gw-1", dep, "n1", 1, "downloading"),
        (t.gateway_up("gw-1", t.Up.STATUS), b"\xff"),  # not CBOR
        _up("gw-1", t.Up.ACK, {"seq": 7}),  # never sent
        _status("gw-1", dep, "n2", 1, "downloading"),
        _status("gw-1", dep, "n1", 2, "succeeded"),
        _status("gw-1", dep, "n1", 3, "downloading"),  # succeeded is final
    ]
    effects = w.o.handle_batch(batch)
    errors = messages(effects, t.Down.ERROR, "gw-1")
    wanted = ["malformed status", "ack for command 7", "cannot go from succeeded to downloading"]
    assert len(errors) == len(wanted), errors
    assert all(why in e["reason"] for why, e in zip(wanted, errors, strict=True)), errors
    assert _node_events(w, dep) == {
        "gw-1/n1": ["pending", "offered", "downloading", "succeeded"],
        "gw-1/n2": ["pending", "downloading"],  # its ack (seq 2) was not in the batch
    }
    assert [(r[1], r[9] is not None) for r in dump(w.dir)["commands"]] == [(1, True), (2, False)]


def test_a_bug_in_one_message_rolls_back_that_message_only(
    w: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that wrote and then failed leaves nothing behind; the batch goes on."""
    dep = _deployed(w, nodes=("n1", "n2"))
    w.o.tick()
    deployments = w.o._deployments
    real = deployments.apply_status

    def buggy(gateway: str, m: Any) -> Any:
        row = real(gateway, m)  # the move and its event are written ...
        if m["node"] == "n2":
            raise RuntimeError("a bug after the writes")  # ... and must be rolled back
        return row

    monkeypatch.setattr(deployments, "apply_status", buggy)
    batch = [
        _status("gw-1", dep, "n1", 1, "downloading"),
        _status("gw-1", dep, "n2", 1, "downloading"),
        _status("gw-1", dep, "n1", 2, "downloaded"),
    ]
    with caplog.at_level(logging.ERROR, logger="shoal.orchestrator"):
        assert w.o.handle_batch(batch) == Effects()
    assert ["internal error" in r.getMessage() for r in caplog.records] == [True]
    assert _node_events(w, dep) == {
        "gw-1/n1": ["pending", "downloading", "downloaded"],
        "gw-1/n2": ["pending"],
    }


def test_a_batch_whose_transaction_sqlite_ended_is_handled_again_one_by_one(
    w: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error like SQLITE_FULL rolls the whole transaction back under the batch: the
    messages before it are gone too, so all of them are handled again, each alone, and
    none counts twice (acks carry their command number, reports their seq)."""
    dep = _deployed(w, nodes=("n1", "n2"))
    w.o.tick()
    registry = w.o._registry
    real = registry.seen
    failures = iter([True])

    def disk_full(gateway_id: str, *, online: bool = True) -> None:
        if next(failures, False):
            w.o._db.conn.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")
        real(gateway_id, online=online)

    batch = [
        _up("gw-1", t.Up.ACK, {"seq": 1}),
        _status("gw-1", dep, "n1", 1, "downloading"),
        _up("gw-1", t.Up.ACK, {"seq": 2}),
        _status("gw-1", dep, "n1", 2, "downloaded"),
    ]
    monkeypatch.setattr(registry, "seen", disk_full)
    first, second = w.o.handle_batch(batch[:2]), w.o.handle_batch(batch[2:])
    assert first == second == Effects()
    assert any("handling them one by one" in r.getMessage() for r in caplog.records)
    assert _node_events(w, dep) == {
        "gw-1/n1": ["pending", "offered", "downloading", "downloaded"],
        "gw-1/n2": ["pending", "offered"],
    }


def test_an_operator_request_in_a_batch_runs_after_the_messages_before_it_committed(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = _deployed(w, nodes=("n1",))
    w.o.tick()
    w.o.add_operator("alice")
    operators = w.o._operators
    real = operators.handle
    seen_by_request: list[list[tuple[Any, ...]]] = []

    def handle(operator: str, channel: t.Channel, payload: bytes) -> Effects:
        seen_by_request.append(dump(w.dir)["events"])  # another connection: committed rows only
        return real(operator, channel, payload)

    monkeypatch.setattr(operators, "handle", handle)
    request = fleet.encode_map({"id": "r1", "op": "devices.list", "args": {}})
    effects = w.o.handle_batch([
        _up("gw-1", t.Up.ACK, {"seq": 1}),
        _status("gw-1", dep, "n1", 1, "downloading"),
        (t.op_request("alice", "devices.list"), request),
        _status("gw-1", dep, "n1", 2, "downloaded"),
    ])  # fmt: skip
    assert [e[5] for e in seen_by_request[0]] == ["pending", "offered", "downloading"]
    assert [m.topic for m in effects.outgoing] == ["shoal/v1/ops/alice/resp"]
    assert _node_events(w, dep)["gw-1/n1"][-1] == "downloaded"


def test_the_timer_re_sends_at_most_commands_per_tick_in_order(tmp_path: Path) -> None:
    w = World(tmp_path / "orch", commands_per_tick=3)
    _deployed(w, nodes=("n1", "n2", "n3", "n4", "n5"))
    assert seqs(w.o.tick()) == [1, 2, 3]
    assert seqs(w.o.tick()) == [4, 5]
    w.clock.advance(10)
    assert seqs(w.o.tick()) == [1, 2, 3]
    assert seqs(w.o.tick()) == [4, 5]
    assert seqs(w.o.flush()) == []  # flush sends only what was never sent, uncapped
    w.o.close()


def test_a_capped_re_send_pass_goes_on_where_it_stopped_so_every_gateway_gets_its_turn(
    tmp_path: Path,
) -> None:
    w = World(tmp_path / "orch", commands_per_tick=3)
    _deployed(w, "gw-1", nodes=("n1", "n2", "n3"))
    _deployed(w, "gw-2", nodes=("n1", "n2", "n3"))
    # Neither gateway ever acknowledges (a full disk, say), and ticks come slower than
    # the re-send interval (a loaded orchestrator): gw-1's commands are due again at
    # every tick, and taking gateways from the first id on would never reach gw-2.
    for _ in range(3):
        first = w.o.tick()
        w.clock.advance(10)
        second = w.o.tick()
        w.clock.advance(10)
        assert (seqs(first, "gw-1"), seqs(first, "gw-2")) == ([1, 2, 3], [])
        assert (seqs(second, "gw-1"), seqs(second, "gw-2")) == ([], [1, 2, 3])
    w.o.close()


def test_a_batch_the_database_cannot_store_raises_and_says_how_much_was_stored(
    tmp_path: Path,
) -> None:
    from orchestrator.core import StorageUnavailable

    w = World(tmp_path / "orch")
    dep = _deployed(w, nodes=("n1", "n2"))
    w.o.tick()
    w.o._db.conn.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(w.dir / "shoal.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    batch = [
        _up("gw-1", t.Up.ACK, {"seq": 1}),
        _status("gw-1", dep, "n1", 1, "downloading"),
        _status("gw-1", dep, "n1", 2, "downloaded"),
    ]
    try:
        with pytest.raises(StorageUnavailable) as caught:
            w.o.handle_batch(batch)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert caught.value.handled == 0  # nothing stored: nothing may be acknowledged
    assert _node_events(w, dep)["gw-1/n1"] == ["pending"]
    # Once the lock is gone the same messages go through, once.
    w.o.handle_batch(batch)
    w.o.handle_batch(batch)
    assert _node_events(w, dep)["gw-1/n1"] == ["pending", "offered", "downloading", "downloaded"]
