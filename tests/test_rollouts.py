"""The rollout engine, groups, roles and the audit log, driven by function calls.

Real SQLite files in tmp_path, real signed artifacts, an injected clock; the
gateways are played by hand (acks and status reports on their topics).
"""

from __future__ import annotations

import copy
import json
import math
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import deployments, diagrams, rollouts
from orchestrator.core import Effects
from orchestrator.db import MIGRATIONS, applied_versions, open_database
from orchestrator.deployments import DeploymentState, split_wire_id, wire_id
from orchestrator.rollouts import (
    REPEATS,
    TRANSITIONS,
    IllegalRolloutMove,
    PhaseSpec,
    RolloutEvent,
    RolloutOptions,
    RolloutState,
    Timeouts,
    next_state,
)
from otaproto import topics as t
from otaproto.errors import InvalidInput, MalformedError
from tests.test_orchestrator import (
    DELTA_1_2,
    FULL_V1,
    FULL_V2,
    IMG_V2,
    World,
    messages,
    report,
    sha,
)
from tests.test_orchestrator import dump as dump_all
from tests.test_orchestrator_input import ask

TARGET_ALL: dict[str, Any] = {"filter": {}}


def dump(data_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table but the audit log, which records refused requests too (on purpose)."""
    return {name: rows for name, rows in dump_all(data_dir).items() if name != "audit"}


class Gateways:
    """Plays the gateways: acknowledges commands and reports, with per-job sequence numbers."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.seq: Counter[tuple[str, str, str]] = Counter()

    def deploys(self, effects: Effects) -> list[tuple[str, str, str]]:
        """(gateway, wire deployment id, node) of every deploy command in ``effects``; acked."""
        out = []
        for message in effects.outgoing:
            parsed = t.parse(message.topic)
            if parsed is None or parsed.kind != t.Down.COMMAND:
                continue
            for command in messages(Effects([message]), t.Down.COMMAND):
                self.w.send(parsed.owner, t.Up.ACK, {"seq": command["seq"]})
                if command["type"] == "deploy":
                    out.append((parsed.owner, command["deployment"], command["node"]))
        return out

    def cancels(self, effects: Effects) -> list[tuple[str, str, str]]:
        out = []
        for message in effects.outgoing:
            parsed = t.parse(message.topic)
            if parsed is not None and parsed.kind == t.Down.COMMAND:
                for c in messages(Effects([message]), t.Down.COMMAND):
                    if c["type"] == "cancel":
                        out.append((parsed.owner, c["deployment"], c["node"]))
        return out

    def report(self, job: tuple[str, str, str], state: str, **extra: Any) -> Effects:
        gw, wire, node = job
        self.seq[job] += 1
        return self.w.status(gw, wire, node, self.seq[job], state, **extra)

    def finish(
        self, jobs: list[tuple[str, str, str]], state: str = "succeeded", **extra: Any
    ) -> None:
        for job in jobs:
            self.report(job, "downloading")
            self.report(job, state, **extra)


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path / "orch")
    world.upload_all()
    world.o.add_operator("alice", "admin")
    yield world
    world.o.close()


def fleet(w: World, gateways: dict[str, list[str]]) -> Gateways:
    for gw, nodes in gateways.items():
        w.gateway(gw, [report(n) for n in nodes])
    return Gateways(w)


def create(w: World, operator: str = "alice", **args: Any) -> tuple[dict[str, Any], Effects]:
    """rollout.create of FULL_V2 over every node unless told otherwise; the reply must be ok."""
    body = {"artifact": sha(FULL_V2).hex(), "target": TARGET_ALL, **args}
    reply, effects = ask(w, "rollout.create", body, operator=operator)
    assert reply["ok"], reply
    return reply["result"], effects


def show(w: World, rollout: str) -> dict[str, Any]:
    reply, _ = ask(w, "rollout.show", {"id": rollout})
    assert reply["ok"], reply
    return dict(reply["result"])


def states(shown: dict[str, Any]) -> dict[str, str]:
    return {n["target"]: n["state"] for n in shown["nodes"]}


def later(w: World, seconds: float = 1.0) -> Effects:
    """Move the clock on (past the engine's full-pass interval) and tick."""
    w.clock.advance(seconds)
    return w.o.tick()


# -- tables and diagrams -------------------------------------------------------------------


def test_rollout_table_refuses_illegal_events_naming_state_and_event() -> None:
    assert next_state("ro-1", RolloutState.RUNNING, RolloutEvent.HALT) is RolloutState.PAUSED
    for state in rollouts.FINAL:
        assert not [e for (s, e) in TRANSITIONS if s is state]  # final stays final
    with pytest.raises(IllegalRolloutMove, match="rollout ro-1 is completed: cannot resume it"):
        next_state("ro-1", RolloutState.COMPLETED, RolloutEvent.RESUME)
    assert all(pair not in TRANSITIONS for pair in REPEATS)


def test_diagrams_stand_for_exactly_the_tables() -> None:
    table = {(str(a), str(b)) for a, bs in deployments.TRANSITIONS.items() for b in bs}
    assert diagrams.drawn_pairs(deployments.diagram()) == table
    text = deployments.mermaid()
    assert text.startswith("stateDiagram-v2\n") and "timed_out --> pending : retry" in text
    assert "install --> download" in text and "active --> timed_out : timeout" in text
    rollout_text = rollouts.mermaid()
    for (state, event), new in TRANSITIONS.items():
        start = f"{state} --> {new} :"
        line = next(x for x in rollout_text.splitlines() if x.strip().startswith(start))
        assert str(event) in line
    with pytest.raises(ValueError, match="not in the drawing order"):
        diagrams.cover([("a", "b")], ["a"], [], lambda a, b: None)


def test_wire_ids_of_retries_round_trip_and_odd_ids_stay_whole() -> None:
    assert wire_id("dep-ab", 0) == "dep-ab" and wire_id("dep-ab", 3) == "dep-ab-r3"
    assert split_wire_id("dep-ab-r3") == ("dep-ab", 3)
    for odd in ("dep-ab", "dep-ab-r0", "dep-ab-r03", "dep-ab-rx", "x-r999999", "-r1"):
        assert split_wire_id(odd) == (odd, 0) or odd == "-r1"


def test_options_parse_and_refuse_with_clear_errors() -> None:
    assert PhaseSpec.parse("1,10%,100%").sizes(25) == [1, 2, 22]
    assert PhaseSpec.parse("1, 10% ,100%").sizes(5) == [1, 0, 4]  # 10% of 5 rounds up to 1
    assert PhaseSpec.parse("2,5").sizes(4) == [2, 2]
    assert PhaseSpec.parse("100%").sizes(0) == [0]
    with pytest.raises(InvalidInput, match="reach 3 of 25 nodes: end them with 100%"):
        PhaseSpec.parse("1,10%").sizes(25)
    for bad, why in [
        ("", "must be text"), ("1,x", "not a count"), ("0", "counts from 1"),
        ("150%", "1..100%"), ("10%,5%", "further than the last"), (",".join(["1"] * 21), "1..20"),
    ]:  # fmt: skip
        with pytest.raises(MalformedError, match=why):
            PhaseSpec.parse(bad)
    o = RolloutOptions.parse(
        {"timeouts": {"pending": 2.5}, "failure_threshold": {"scope": "rollout"}}
    )
    assert o.timeouts.pending == 2.5 and o.timeouts.flashing == Timeouts().flashing
    assert o.failure_scope == "rollout" and o.on_failure == "pause"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"success_threshold": 101}, "success_threshold"),
        ({"timeouts": {"flashing": 0}}, "above 0"),
        ({"timeouts": {"succeeded": 5}}, "unknown state 'succeeded'"),
        ({"failure_threshold": {"percent": 5, "colour": 1}}, "unknown key 'colour'"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"retries": 11}, "retries"),
        ({"max_parallel": 0}, "max_parallel"),
    ]
    for args, why in cases:
        with pytest.raises(MalformedError, match=why):
            RolloutOptions.parse(args)
    with pytest.raises(Exception, match="final"):
        Timeouts().for_state(DeploymentState.SUCCEEDED)


def test_a_version_1_database_is_migrated_and_keeps_its_deployments(tmp_path: Path) -> None:
    db = open_database.__globals__["Database"](tmp_path / "old.db")
    db.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
               " applied_at REAL NOT NULL) STRICT")  # fmt: skip
    MIGRATIONS[0][2](db)
    db.execute("INSERT INTO migrations VALUES (1, 'initial schema', 0)")
    db.execute("INSERT INTO gateways (id, state, secret_hash, created) VALUES ('g', 'accepted',"
               " 'x', 0)")  # fmt: skip
    db.execute("INSERT INTO artifacts (digest, name, version, sequence, device_types,"
               " payload_kind, image_digest, image_size, size, block_bytes, created)"
               " VALUES ('a', 'n', '1', 1, '[]', 'full', 'i', 1, 1, 1, 0)")  # fmt: skip
    db.execute("INSERT INTO deployments (id, artifact, created) VALUES ('dep-1', 'a', 0)")
    db.execute("INSERT INTO deployment_nodes (deployment, gateway, node, state, updated)"
               " VALUES ('dep-1', 'g', 'n', 'flashing', 42)")  # fmt: skip
    db.conn.commit()
    db.close()
    db = open_database(tmp_path / "old.db", lambda: 1.0)
    assert applied_versions(db) == [v for v, _, _ in MIGRATIONS]
    row = next(db.query("SELECT attempt, entered, retryable FROM deployment_nodes"))
    assert row == {"attempt": 0, "entered": 42.0, "retryable": 0}
    db.close()


# -- phases ----------------------------------------------------------------------------------


def test_a_three_phase_rollout_starts_each_phase_after_the_last_passed(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"], "gw-b": ["n1", "n2"], "gw-c": ["n1", "n2"]})
    ro, effects = create(w, phases="1,50%,100%")
    assert ro["state"] == "running" and [p["size"] for p in ro["phases"]] == [1, 2, 3]
    dep = ro["deployment"]
    first = gws.deploys(effects)
    assert first == [("gw-a", dep, "n1")]  # the canary; its command goes out with the reply
    assert gws.deploys(later(w)) == []
    gws.finish(first)
    second = gws.deploys(w.o.tick())  # the report marked the rollout: evaluated at once
    assert second == [("gw-b", dep, "n1"), ("gw-c", dep, "n1")]  # one per gateway in turn
    gws.finish(second[:1])
    assert gws.deploys(later(w)) == []  # phase 2 is at 1 of 2
    gws.finish(second[1:])
    third = gws.deploys(w.o.tick())
    assert sorted(third) == [("gw-a", dep, "n2"), ("gw-b", dep, "n2"), ("gw-c", dep, "n2")]
    shown = show(w, ro["id"])
    assert [p["state"] for p in shown["phases"]] == ["passed", "passed", "running"]
    assert shown["phases"][2]["counts"] == {"offered": 3}
    gws.finish(third)
    w.o.tick()
    shown = show(w, ro["id"])
    assert shown["state"] == "completed" and shown["counts"] == {"succeeded": 6}
    assert shown["settled"] is not None and shown["ended"] is not None
    events = [e["event"] for e in shown["events"]]
    assert events == [
        "create", "start", "phase 1 passed", "phase 2 started", "phase 2 passed",
        "phase 3 started", "phase 3 passed", "complete",
    ]  # fmt: skip


def test_the_next_phase_waits_phase_wait_s_after_the_last_passed(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"]})
    ro, effects = create(w, phases="1,100%", phase_wait_s=60)
    gws.finish(gws.deploys(effects))
    assert gws.deploys(w.o.tick()) == []
    assert gws.deploys(later(w, 59)) == []
    assert gws.deploys(later(w, 1)) == [("gw-a", ro["deployment"], "n2")]


def test_nodes_on_the_image_are_skipped_and_others_incompatible_outside_the_phases(
    w: World,
) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"]})
    w.send("gw-a", t.Up.INVENTORY, {"nodes": [
        report("same", IMG_V2, sequence=2), report("esp", device_type="esp32"),
        {"node": "mute", "error": "no answer"},
    ]})  # fmt: skip
    w.send("gw-a", t.Up.HELLO, {"agent": "a", "nodes": ["n1", "n2", "same", "esp", "mute"],
                                "handled_seq": 0})  # fmt: skip
    ro, effects = create(w, phases="1,100%")
    assert [p["size"] for p in ro["phases"]] == [1, 1]  # two eligible nodes
    shown = show(w, ro["id"])
    assert states(shown) == {
        "gw-a/n1": "pending", "gw-a/n2": "waiting", "gw-a/same": "skipped",
        "gw-a/esp": "incompatible", "gw-a/mute": "incompatible",
    }  # fmt: skip
    assert {n["target"]: n["phase"] for n in shown["nodes"]}["gw-a/same"] is None
    reasons = {n["target"]: n["reason"] for n in shown["nodes"]}
    assert "esp32" in reasons["gw-a/esp"] and "device type" in reasons["gw-a/mute"]
    jobs = gws.deploys(effects)
    gws.finish(jobs)
    gws.finish(gws.deploys(w.o.tick()))
    w.o.tick()
    assert show(w, ro["id"])["state"] == "completed"


def test_a_target_without_eligible_nodes_completes_at_once(w: World) -> None:
    w.gateway("gw-a", [report("n1", IMG_V2, sequence=2)])
    ro, _ = create(w, phases="1,100%")
    assert ro["state"] == "completed" and ro["counts"] == {"skipped": 1}


# -- thresholds, pause, resume, abort ------------------------------------------------------


def test_a_failing_canary_pauses_before_phase_two_and_a_resume_completes(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"], "gw-b": ["n1", "n2"]})
    ro, effects = create(w, phases="1,100%")
    canary = gws.deploys(effects)
    gws.finish(canary, "rolled_back", reason="node reverted to 1.0.0 after a failed self-test")
    assert gws.deploys(later(w)) == []
    shown = show(w, ro["id"])
    assert shown["state"] == "paused"
    assert shown["reason"].startswith("failure threshold: 1 of 1 nodes of phase 1 failed")
    assert "gw-a/n1 rolled_back" in shown["reason"]
    assert shown["phases"][1]["counts"] == {"waiting": 3}
    assert shown["events"][-1]["event"] == "halt"
    assert gws.deploys(later(w, 100)) == []  # paused: nothing starts, whatever the time
    reply, effects = ask(w, "rollout.resume", {"id": ro["id"]})
    assert reply["ok"] and reply["result"]["state"] == "running"
    assert "1 failed nodes accepted" in reply["result"]["reason"]
    rest = gws.deploys(effects)  # phase 1 counts as passed now: phase 2 starts at once
    assert len(rest) == 3
    gws.finish(rest)
    w.o.tick()
    shown = show(w, ro["id"])
    assert shown["state"] == "completed"
    assert shown["counts"] == {"succeeded": 3, "rolled_back": 1}
    assert [n["excused"] for n in shown["nodes"] if n["target"] == "gw-a/n1"] == [True]


def test_on_failure_abort_ends_the_rollout_failed_and_cancels_running_nodes(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2", "n3", "n4"]})
    ro, effects = create(
        w, phases="100%", max_parallel=2, on_failure="abort",
        failure_threshold={"percent": 0, "min_count": 1},
    )  # fmt: skip
    jobs = gws.deploys(effects)
    assert len(jobs) == 2
    gws.report(jobs[1], "flashing")
    gws.report(jobs[0], "rejected", reason="node refused: signature")
    effects = w.o.tick()
    assert gws.cancels(effects) == [jobs[1]]
    shown = show(w, ro["id"])
    assert shown["state"] == "failed" and "failure threshold" in shown["reason"]
    assert states(shown)["gw-a/n3"] == "not_started" and shown["settled"] is None
    gws.report(jobs[1], "succeeded")  # it was flashing: it finishes
    later(w)
    shown = show(w, ro["id"])
    assert shown["settled"] is not None
    assert shown["counts"] == {"failed": 1, "succeeded": 1, "not_started": 2}


def test_a_phase_that_ends_below_its_success_threshold_halts(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2", "n3"]})
    ro, effects = create(
        w, phases="2,100%", success_threshold=100,
        failure_threshold={"percent": 100, "min_count": 5},
    )  # fmt: skip
    jobs = gws.deploys(effects)
    gws.finish(jobs[:1])
    gws.finish(jobs[1:], "rejected")
    w.o.tick()
    shown = show(w, ro["id"])
    assert shown["state"] == "paused"
    assert shown["reason"] == (
        "phase 1 ended with 1 of 2 nodes on the image, below the 100% success threshold"
    )


def test_a_rollout_scope_threshold_counts_failures_across_phases(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2", "n3", "n4"]})
    ro, effects = create(
        w, phases="2,100%", success_threshold=50,
        failure_threshold={"percent": 50, "min_count": 1, "scope": "rollout"},
    )  # fmt: skip
    jobs = gws.deploys(effects)
    gws.finish(jobs[:1])
    gws.finish(jobs[1:], "rolled_back")  # 1 of 4: under 50% of the rollout
    later_jobs = gws.deploys(w.o.tick())
    assert len(later_jobs) == 2
    gws.finish(later_jobs[:1], "rolled_back")  # 2 of 4: trips
    w.o.tick()
    shown = show(w, ro["id"])
    assert shown["state"] == "paused" and "2 of 4 nodes of the rollout" in shown["reason"]


def test_operator_pause_holds_new_work_and_repeats_are_harmless(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2", "n3"]})
    ro, effects = create(w, max_parallel=1)
    jobs = gws.deploys(effects)
    for _ in range(2):
        reply, _ = ask(w, "rollout.pause", {"id": ro["id"]})
        assert reply["ok"] and reply["result"]["state"] == "paused"
        assert reply["result"]["reason"] == "paused by alice"
    gws.finish(jobs)  # a running node goes on while paused
    assert gws.deploys(later(w)) == []
    assert states(show(w, ro["id"]))["gw-a/n1"] == "succeeded"
    reply, effects = ask(w, "rollout.resume", {"id": ro["id"]})
    assert gws.deploys(effects) == [("gw-a", ro["deployment"], "n2")]
    reply, _ = ask(w, "rollout.resume", {"id": ro["id"]})
    assert reply["ok"]
    events = [(e["event"], e["operator"]) for e in show(w, ro["id"])["events"]]
    assert events.count(("pause", "alice")) == 1 and events.count(("resume", "alice")) == 1


def test_abort_stops_new_work_and_lets_flashing_nodes_finish(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2", "n3", "n4"]})
    ro, effects = create(w, max_parallel=3)
    jobs = gws.deploys(effects)
    gws.report(jobs[0], "flashing")
    gws.report(jobs[1], "downloading")
    reply, effects = ask(w, "rollout.abort", {"id": ro["id"]})
    assert reply["ok"] and reply["result"]["state"] == "aborted"
    assert reply["result"]["reason"] == "aborted by alice"
    assert sorted(gws.cancels(effects)) == sorted(jobs)  # every running node is asked to stop
    gws.report(jobs[0], "succeeded")  # it was flashing: the gateway lets it finish
    gws.report(jobs[1], "aborted", reason="cancelled")
    gws.report(jobs[2], "aborted", reason="cancelled")
    assert gws.deploys(later(w)) == []
    shown = show(w, ro["id"])
    assert states(shown) == {
        "gw-a/n1": "succeeded", "gw-a/n2": "aborted", "gw-a/n3": "aborted",
        "gw-a/n4": "not_started",
    }  # fmt: skip
    assert shown["settled"] is not None
    reply, _ = ask(w, "rollout.abort", {"id": ro["id"]})
    assert reply["ok"]  # a repeat: a no-op
    for op in ("rollout.pause", "rollout.resume"):
        reply, _ = ask(w, op, {"id": ro["id"]})
        verb = op.split(".")[1]
        assert reply["error"] == f"rollout {ro['id']} is aborted: cannot {verb} it"


# -- retries and timeouts ------------------------------------------------------------------


def test_transient_failures_are_retried_as_new_attempts_rejections_never(w: World) -> None:
    gws = fleet(w, {"gw-a": ["link", "rej", "rb", "bad"]})
    ro, effects = create(w, retries=2, success_threshold=0,
                         failure_threshold={"percent": 100, "min_count": 10})  # fmt: skip
    dep = ro["deployment"]
    jobs = {node: (gw, wire, node) for gw, wire, node in gws.deploys(effects)}
    gws.finish([jobs["link"]], "failed", reason="flashing failed: link lost")
    gws.finish([jobs["rej"]], "rejected", reason="node refused: signature")
    gws.finish([jobs["rb"]], "rolled_back", reason="node reverted to 1.0.0")
    gws.finish([jobs["bad"]], "failed", reason="artifact refused by the gateway: bad digest")
    again = gws.deploys(w.o.tick())
    assert again == [("gw-a", f"{dep}-r1", "link")]  # only the lost link is tried again
    gws.seq[jobs["link"]] += 1
    w.status("gw-a", dep, "link", gws.seq[jobs["link"]], "failed", reason="flashing failed: x")
    assert states(show(w, ro["id"]))["gw-a/link"] == "offered"  # the old attempt is ignored
    gws.finish(again, "failed", reason="link lost: nothing from the node for 5 s")
    third = gws.deploys(w.o.tick())
    assert third == [("gw-a", f"{dep}-r2", "link")]
    gws.finish(third, "failed", reason="link lost: again")
    assert gws.deploys(later(w)) == []  # two retries used up
    shown = show(w, ro["id"])
    node = {n["target"]: n for n in shown["nodes"]}
    assert (node["gw-a/link"]["state"], node["gw-a/link"]["attempt"]) == ("failed", 2)
    assert all(node[f"gw-a/{n}"]["attempt"] == 0 for n in ("rej", "rb", "bad"))
    assert shown["state"] == "completed"
    events = ask(w, "deploy.events", {"id": dep, "node": "gw-a/link"})[0]["result"]["events"]
    assert [e["state"] for e in events].count("pending") == 3
    assert events[-1]["detail"]["attempt"] == 2


def test_a_node_whose_gateway_is_offline_times_out_retries_and_then_stays_timed_out(
    w: World,
) -> None:
    gws = fleet(w, {"gw-on": ["n1"], "gw-off": ["n1"]})
    w.send("gw-off", t.Up.STATE, {"online": False})
    ro, effects = create(w, retries=1, timeouts={"pending": 30}, success_threshold=50,
                         failure_threshold={"percent": 100, "min_count": 2})  # fmt: skip
    dep = ro["deployment"]
    gws.finish(gws.deploys(effects))  # only the online gateway got its command
    assert gws.deploys(later(w, 29)) == []
    effects = later(w, 1)
    assert states(show(w, ro["id"]))["gw-off/n1"] == "pending"  # timed out, then retried
    events = ask(w, "deploy.events", {"id": dep, "node": "gw-off/n1"})[0]["result"]["events"]
    assert [e["state"] for e in events] == ["pending", "timed_out", "pending"]
    assert events[1]["detail"]["reason"] == "no progress for 30 s in pending"
    later(w, 30)
    shown = show(w, ro["id"])
    assert states(shown)["gw-off/n1"] == "timed_out" and shown["state"] == "completed"
    # Back online: it gets every command it missed, the cancels included, in order.
    back = w.send("gw-off", t.Up.HELLO, {"agent": "a", "nodes": ["n1"], "handled_seq": 0})
    got = [(c["type"], c["deployment"]) for c in messages(back, t.Down.COMMAND)]
    assert got == [("deploy", dep), ("cancel", dep), ("deploy", f"{dep}-r1"),
                   ("cancel", f"{dep}-r1")]  # fmt: skip


def test_a_retry_after_a_timeout_succeeds_when_the_gateway_returns(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1"]})
    w.send("gw-a", t.Up.STATE, {"online": False})
    ro, _ = create(w, retries=3, timeouts={"pending": 10})
    later(w, 10)
    back = w.send("gw-a", t.Up.HELLO, {"agent": "a", "nodes": ["n1"], "handled_seq": 0})
    jobs = gws.deploys(back)
    assert jobs == [("gw-a", ro["deployment"], "n1"), ("gw-a", f"{ro['deployment']}-r1", "n1")]
    gws.report(jobs[0], "aborted", reason="cancelled")  # the first attempt's end: ignored
    gws.finish(jobs[1:])
    w.o.tick()
    shown = show(w, ro["id"])
    assert shown["state"] == "completed" and shown["nodes"][0]["attempt"] == 1


def test_per_state_timeouts_cancel_the_attempt_on_the_gateway(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1"]})
    ro, effects = create(w, retries=0, timeouts={"downloading": 100},
                         failure_threshold={"percent": 100, "min_count": 1})  # fmt: skip
    job = gws.deploys(effects)[0]
    gws.report(job, "downloading", bytes=10, total=100)
    later(w, 60)
    gws.report(job, "downloading", bytes=50, total=100)  # progress does not restart the clock
    effects = later(w, 40)
    assert gws.cancels(effects) == [job]
    shown = show(w, ro["id"])
    assert states(shown) == {"gw-a/n1": "timed_out"} and shown["state"] == "paused"


# -- caps and busy nodes -------------------------------------------------------------------


def test_caps_limit_nodes_at_once_overall_and_per_gateway(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2", "n3", "n4"], "gw-b": ["n1", "n2"]})
    ro, effects = create(w, max_parallel=3, max_per_gateway=2)
    first = gws.deploys(effects)
    assert sorted(first) == sorted(
        [("gw-a", ro["deployment"], "n1"), ("gw-b", ro["deployment"], "n1"),
         ("gw-a", ro["deployment"], "n2")]
    )  # fmt: skip
    gws.finish([j for j in first if j[0] == "gw-b"])
    assert [j[0] for j in gws.deploys(w.o.tick())] == ["gw-b"]  # gw-a is at its cap
    gws.finish([j for j in first if j[0] == "gw-a"][:1])
    assert [j[2] for j in gws.deploys(w.o.tick())] == ["n3"]


def test_a_node_busy_in_another_deployment_waits_for_it(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"]})
    other = w.o.create_deployment(sha(FULL_V2).hex(), ["gw-a/n1"])
    plain = gws.deploys(w.o.tick())
    ro, effects = create(w)
    assert [j[2] for j in gws.deploys(effects)] == ["n2"]
    assert states(show(w, ro["id"]))["gw-a/n1"] == "waiting"
    gws.finish(plain)
    w.send("gw-a", t.Up.INVENTORY, {"nodes": [report("n1", IMG_V2, sequence=2)]})
    later(w)
    assert states(show(w, ro["id"]))["gw-a/n1"] == "skipped"  # the other one put it there
    assert other != ro["deployment"]
    reply, _ = ask(w, "deploy.cancel", {"id": ro["deployment"]})
    assert f"belongs to rollout {ro['id']}: abort that" in reply["error"]


# -- targets, groups, scheduling ------------------------------------------------------------


def test_groups_static_and_dynamic_resolve_to_present_nodes_of_accepted_gateways(
    w: World,
) -> None:
    fleet(w, {"gw-a": ["n1", "n2"], "gw-b": ["n1"]})
    w.gateway("gw-p", [report("n1")], accept=False)
    w.send("gw-b", t.Up.INVENTORY, {"nodes": [report("n2", IMG_V2, sequence=2)]})
    reply, _ = ask(w, "devices.set_attributes", {"id": "gw-a", "attributes": {"site": "berlin"}})
    assert reply["result"] == {"id": "gw-a", "attributes": {"site": "berlin"}}
    ask(w, "devices.set_attributes", {"id": "gw-a/n2", "attributes": {"site": "paris"}})
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"site": "berlin"}, ["gw-a/n1"]),  # the node's own attribute wins
        ({}, ["gw-a/n1", "gw-a/n2", "gw-b/n1", "gw-b/n2"]),  # not gw-p: pending
    ]
    for attributes, members in cases:
        name = f"g{len(attributes)}"
        reply, _ = ask(w, "groups.create", {"name": name, "filter": {"attributes": attributes}})
        assert reply["ok"] and reply["result"]["members"] == members, reply
    by_version = {"version": "1.0.0", "gateway": ["gw-b"]}
    reply, _ = ask(w, "groups.create", {"name": "v2", "filter": by_version})
    assert reply["result"]["members"] == ["gw-b/n1", "gw-b/n2"]  # both report 1.0.0
    reply, _ = ask(w, "groups.create", {"name": "fixed", "nodes": ["gw-b/n1", "gw-p/n1"]})
    assert reply["result"]["kind"] == "static" and reply["result"]["members"] == ["gw-b/n1"]
    pending = {"target": "gw-p/n1", "reason": "gateway gw-p is pending"}
    assert reply["result"]["excluded"] == [pending]
    reply, _ = ask(w, "groups.list")
    assert [g["name"] for g in reply["result"]["groups"]] == ["fixed", "g0", "g1", "v2"]
    before = dump(w.dir)
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"name": "fixed", "nodes": ["gw-a/n1"]}, "group fixed exists"),
        ({"name": "x", "nodes": ["gw-a/n9"]}, "unknown node gw-a/n9"),
        ({"name": "x", "nodes": ["gw-a/n1"], "filter": {}}, "either nodes"),
        ({"name": "x"}, "either nodes"),
        ({"name": "x", "filter": {"colour": "red"}}, "unknown key 'colour'"),
        ({"name": "x", "filter": {"gateway": "Bad"}}, "filter.gateway"),
        ({"name": "Bad Name", "nodes": ["gw-a/n1"]}, "group name"),
        ({"name": "x", "nodes": ["gw-a/n1", "gw-a/n1"]}, "listed twice"),
    ]
    for args, why in refusals:
        reply, _ = ask(w, "groups.create", args)
        assert not reply["ok"] and why in reply["error"], (args, reply)
    assert dump(w.dir) == before
    reply, _ = ask(w, "groups.delete", {"name": "g0"})
    assert reply["ok"]
    reply, _ = ask(w, "groups.show", {"name": "g0"})
    assert reply["error"] == "unknown group 'g0'"


def test_a_scheduled_rollout_resolves_its_group_when_it_starts(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1"]})
    ask(w, "groups.create", {"name": "site", "filter": {"attributes": {"site": "x"}}})
    ask(w, "devices.set_attributes", {"id": "gw-a/n1", "attributes": {"site": "x"}})
    ro, effects = create(w, target={"group": "site"}, start_at=int(w.clock.now) + 100)
    assert ro["state"] == "scheduled" and gws.deploys(effects) == []
    reply, _ = ask(w, "groups.delete", {"name": "site"})
    assert reply["error"] == f"group site is the target of scheduled rollout {ro['id']}"
    w.gateway("gw-b", [report("n1")])  # joins before the start: it is in
    ask(w, "devices.set_attributes", {"id": "gw-b", "attributes": {"site": "x"}})
    assert gws.deploys(later(w, 50)) == []
    jobs = gws.deploys(later(w, 50))
    assert sorted(j[0] for j in jobs) == ["gw-a", "gw-b"]
    w.gateway("gw-c", [report("n1")])  # joins after the start: not in this rollout
    ask(w, "devices.set_attributes", {"id": "gw-c", "attributes": {"site": "x"}})
    gws.finish(jobs)
    later(w)
    shown = show(w, ro["id"])
    assert shown["state"] == "completed" and sorted(states(shown)) == ["gw-a/n1", "gw-b/n1"]


def test_a_scheduled_rollout_whose_target_is_empty_at_start_fails_with_the_reason(
    w: World,
) -> None:
    fleet(w, {"gw-a": ["n1"]})
    ro, _ = create(w, target={"filter": {"device_type": "esp32", "gateway": "gw-a"}},
                   start_at=int(w.clock.now) + 10)  # fmt: skip
    later(w, 10)
    shown = show(w, ro["id"])
    assert shown["state"] == "failed" and shown["reason"].startswith("cannot start: the target")
    assert shown["settled"] is not None


def test_bad_rollout_requests_get_one_line_errors_and_store_nothing(w: World) -> None:
    fleet(w, {"gw-a": ["n1", "n2"]})
    before = dump(w.dir)
    full = sha(FULL_V2).hex()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"artifact": "00" * 32, "target": TARGET_ALL}, "unknown artifact"),
        ({"artifact": sha(DELTA_1_2).hex(), "target": TARGET_ALL}, "is a delta"),
        ({"artifact": full, "target": {}}, "exactly one of group, filter or nodes"),
        ({"artifact": full, "target": {"group": "nope"}}, "unknown group 'nope'"),
        ({"artifact": full, "target": {"nodes": ["gw-a/zz"]}}, "unknown node gw-a/zz"),
        ({"artifact": full, "target": {"filter": {"device_type": "esp32"}}}, "holds no nodes"),
        ({"artifact": full, "target": TARGET_ALL, "phases": "1"}, "reach 1 of 2 nodes"),
        ({"artifact": full, "target": TARGET_ALL, "phases": "x"}, "not a count"),
        ({"artifact": full, "target": TARGET_ALL, "retries": -1}, "must be uint"),
        ({"artifact": full, "target": TARGET_ALL, "colour": 1}, "unknown key 'colour'"),
        ({"artifact": full, "target": TARGET_ALL, "timeouts": {"pending": "soon"}}, "seconds"),
    ]
    for args, why in cases:
        reply, effects = ask(w, "rollout.create", args)
        assert not reply["ok"] and why in reply["error"], (args, reply)
        assert "\n" not in reply["error"] and len(effects.outgoing) == 1
    for op, args, why in [
        ("rollout.show", {"id": "ro-nope"}, "unknown rollout 'ro-nope'"),
        ("rollout.pause", {"id": "ro-nope"}, "unknown rollout"),
        ("rollout.list", {"state": "sideways"}, "unknown rollout state"),
        ("deploy.events", {"id": "dep-nope", "node": "gw-a/n1"}, "unknown deployment"),
    ]:
        reply, _ = ask(w, op, args)
        assert reply["error"].startswith(why) or why in reply["error"], reply
    assert dump(w.dir) == before


def test_rollout_list_shows_the_newest_first_with_counts(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1"], "gw-b": ["n1"]})
    first, effects = create(w, target={"nodes": ["gw-a/n1"]})
    gws.finish(gws.deploys(effects))
    w.o.tick()
    w.clock.advance(1)
    second, _ = create(w, target={"nodes": ["gw-b/n1"]})
    reply, _ = ask(w, "rollout.list")
    listed = reply["result"]["rollouts"]
    assert [r["id"] for r in listed] == [second["id"], first["id"]]
    assert listed[1]["counts"] == {"succeeded": 1} and listed[1]["state"] == "completed"
    reply, _ = ask(w, "rollout.list", {"state": "running", "limit": 5})
    assert [r["id"] for r in reply["result"]["rollouts"]] == [second["id"]]


# -- roles and audit -----------------------------------------------------------------------


def test_roles_are_enforced_on_every_request_and_every_request_is_audited(w: World) -> None:
    fleet(w, {"gw-a": ["n1"]})
    reply, _ = ask(w, "operators.add", {"id": "val", "role": "viewer"})
    assert reply["result"]["role"] == "viewer" and len(reply["result"]["secret"]) > 20
    ask(w, "operators.add", {"id": "dee", "role": "deployer"})
    body = {"artifact": sha(FULL_V2).hex(), "target": TARGET_ALL}
    before = dump(w.dir)
    reply, _ = ask(w, "rollout.create", body, operator="val")
    assert reply["error"] == "operator val (viewer) may not rollout.create: it needs deployer"
    admin_only = [("devices.add", {"id": "gw-x"}), ("operators.add", {"id": "x", "role": "admin"})]
    for op, args in admin_only:
        reply, _ = ask(w, op, args, operator="dee")
        assert reply["error"] == f"operator dee (deployer) may not {op}: it needs admin"
    assert dump(w.dir) == before
    for op in ("rollout.list", "devices.list", "groups.list", "audit.list", "artifact.list"):
        assert ask(w, op, operator="val")[0]["ok"], op
    reply, _ = ask(w, "rollout.create", body, operator="dee")
    assert reply["ok"]
    reply, _ = ask(w, "artifact.upload", {"data": FULL_V1}, as_json=False, operator="dee")
    assert reply["ok"]
    reply, _ = ask(w, "operators.list")
    assert [(o["id"], o["role"]) for o in reply["result"]["operators"]] == [
        ("alice", "admin"), ("dee", "deployer"), ("val", "viewer"),
    ]  # fmt: skip
    entries = ask(w, "audit.list", {"limit": 50}, operator="val")[0]["result"]["entries"]
    assert [(e["operator"], e["op"], e["ok"]) for e in entries[:5]] == [
        ("alice", "operators.list", True), ("dee", "artifact.upload", True),
        ("dee", "rollout.create", True), ("val", "artifact.list", True),
        ("val", "audit.list", True),
    ]  # fmt: skip
    refused = [e for e in entries if not e["ok"]]
    assert [(e["operator"], e["role"], e["op"]) for e in refused] == [
        ("dee", "deployer", "operators.add"), ("dee", "deployer", "devices.add"),
        ("val", "viewer", "rollout.create"),
    ]  # fmt: skip
    assert refused[-1]["error"].startswith("operator val (viewer) may not")
    upload = entries[1]["args"]["data"]
    assert upload == {"bytes": len(FULL_V1), "sha256": sha(FULL_V1).hex()}  # never the bytes
    assert "secret" not in json.dumps(entries).replace('"op": "operators', "")
    only = ask(w, "audit.list", {"operator": "val", "op": "rollout."})[0]["result"]["entries"]
    assert [(e["op"], e["ok"]) for e in only] == [("rollout.list", True), ("rollout.create", False)]


def test_unreadable_requests_are_audited_as_question_marks(w: World) -> None:
    w.o.handle(t.operator_request("alice"), b"\xff\xff")
    w.o.handle(t.operator_request("alice"), b'{"id": "r1", "op": "\\ud800"}')
    entries = ask(w, "audit.list", {"limit": 3})[0]["result"]["entries"]  # not itself: in flight
    assert [(e["operator"], e["op"], e["ok"]) for e in entries] == [
        ("alice", "?", False), ("alice", "?", False),
    ]  # fmt: skip
    assert "text" in entries[0]["error"] and entries[1]["args"] == {"bytes": 2}


def test_the_audit_log_keeps_its_newest_rows_only(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import audit

    monkeypatch.setattr(audit, "MAX_ROWS", 5)
    for _ in range(8):
        ask(w, "devices.list")
    con = sqlite3.connect(w.dir / "shoal.db")
    assert con.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM audit").fetchone() == (5, 4, 8)
    con.close()
    long_args = {"nodes": [f"gw/n{i}" for i in range(100)], "secret": "hush", "x": "y" * 5000}
    assert audit.summarize(long_args) == {
        "nodes": [f"gw/n{i}" for i in range(20)] + ["... (80 more)"], "secret": "***",
        "x": "y" * 200 + "...",
    }  # fmt: skip


def test_a_paused_rollout_retries_nothing_until_it_is_resumed(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"]})
    ro, effects = create(w, retries=1)
    jobs = gws.deploys(effects)
    ask(w, "rollout.pause", {"id": ro["id"]})
    gws.finish(jobs[:1], "failed", reason="link lost: nothing from the node for 5 s")
    assert gws.deploys(later(w)) == []
    assert states(show(w, ro["id"]))["gw-a/n1"] == "failed"
    reply, effects = ask(w, "rollout.resume", {"id": ro["id"]})
    assert "accepted" not in reply["result"]["reason"]  # due a retry: not a failure yet
    assert gws.deploys(effects) == [("gw-a", f"{ro['deployment']}-r1", "n1")]


def test_a_restarted_orchestrator_carries_on_with_its_rollouts(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"]})
    ro, effects = create(w, phases="1,100%")
    gws.finish(gws.deploys(effects))
    w.restart()  # the status marked the rollout in memory only: the first tick looks at all
    w.o.add_operator("bob", "viewer")
    assert [j[2] for j in gws.deploys(w.o.tick())] == ["n2"]
    assert show(w, ro["id"])["phase"] == 2


def test_decommissioning_a_gateway_mid_rollout_counts_as_failures(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1"], "gw-b": ["n1"]})
    ro, effects = create(w, retries=3)
    gws.deploys(effects)
    ask(w, "devices.decommission", {"id": "gw-b"})
    later(w)
    shown = show(w, ro["id"])
    assert states(shown)["gw-b/n1"] == "aborted" and shown["state"] == "paused"
    assert "gw-b/n1 aborted" in shown["reason"]


def test_attributes_are_set_removed_and_the_agent_is_the_gateways_own(w: World) -> None:
    fleet(w, {"gw-a": ["n1"]})
    reply, _ = ask(
        w, "devices.set_attributes", {"id": "gw-a/n1", "attributes": {"a": "1", "b": "2"}}
    )
    assert reply["result"]["attributes"] == {"a": "1", "b": "2"}
    reply, _ = ask(w, "devices.set_attributes", {"id": "gw-a/n1", "attributes": {"a": None}})
    assert reply["result"]["attributes"] == {"b": "2"}
    assert ask(w, "devices.show", {"id": "gw-a/n1"})[0]["result"]["attributes"] == {"b": "2"}
    for args, why in [
        ({"id": "gw-a", "attributes": {"agent": "x"}}, "the gateway's own"),
        ({"id": "gw-a", "attributes": {}}, "non-empty"),
        ({"id": "gw-a", "attributes": {"Bad Key": "x"}}, "attribute name"),
        ({"id": "gw-a", "attributes": {"k": ""}}, "1-256 characters"),
        ({"id": "gw-a/n9", "attributes": {"k": "v"}}, "unknown node"),
        ({"id": "gw-a", "attributes": {f"k{i}": "v" for i in range(33)}}, "over 32"),
    ]:
        reply, _ = ask(w, "devices.set_attributes", args)
        assert why in reply["error"], (args, reply)
    shown = ask(w, "devices.show", {"id": "gw-a"})[0]["result"]
    assert shown["agent"] == "test" and shown["attributes"] == {}


def test_named_nodes_keep_their_order_and_a_filter_takes_one_per_gateway(w: World) -> None:
    gws = fleet(w, {"gw-a": ["n1", "n2"], "gw-b": ["n1", "n2"]})
    named = ["gw-b/n2", "gw-a/n2", "gw-a/n1", "gw-b/n1"]
    ro, effects = create(w, target={"nodes": named}, phases="1,2,100%")
    shown = show(w, ro["id"])
    assert [(n["target"], n["phase"]) for n in shown["nodes"]] == [
        ("gw-b/n2", 1), ("gw-a/n2", 2), ("gw-a/n1", 3), ("gw-b/n1", 3),
    ]  # fmt: skip
    assert [j[2] for j in gws.deploys(effects)] == ["n2"]
    ask(w, "rollout.abort", {"id": ro["id"]})
    gws.finish([("gw-b", ro["deployment"], "n2")], "aborted")
    ro, _ = create(w, target={"filter": {}}, phases="1,2,100%")
    order = [(n["target"], n["phase"]) for n in show(w, ro["id"])["nodes"]]
    assert order == [("gw-a/n1", 1), ("gw-b/n1", 2), ("gw-a/n2", 3), ("gw-b/n2", 3)]


# -- the engine's kept rosters ---------------------------------------------------------------

_WORDS = (
    "deferred", "downloading", "downloaded", "flashing", "verifying", "rebooting", "confirming",
    "succeeded", "succeeded", "succeeded", "failed", "failed", "rolled_back", "rejected",
    "aborted", "already_installed",
)  # fmt: skip
_REASONS = (None, "link lost", "artifact refused by the gateway: bad signature", "no node n9")


class Twin:
    """One orchestrator of the pair, with its rollout and how far its gateways have reported."""

    def __init__(self, w: World, rollout: str) -> None:
        self.w = w
        self.rollout = rollout
        self.seq: Counter[tuple[str, str, int]] = Counter()

    @property
    def deployment(self) -> str:
        return str(self.w.o.show_rollout(self.rollout, 0)["deployment"])

    def rows(self) -> list[deployments.NodeRow]:
        return self.w.o._deployments.node_rows(self.deployment)

    def report(self, gw: str, node: str, word: str, reason: str | None) -> None:
        row = next(r for r in self.rows() if (r.gateway, r.node) == (gw, node))
        self.seq[(gw, node, row.attempt)] += 1
        extra = {} if reason is None else {"reason": reason}
        wire = wire_id(row.deployment, row.attempt)
        self.w.status(gw, wire, node, self.seq[(gw, node, row.attempt)], word, **extra)

    def ack_everything(self) -> None:
        for gw in self.w.o.list_devices()["gateways"]:
            for command in self.w.o._outbox.unacked(gw["id"]):
                self.w.send(gw["id"], t.Up.ACK, {"seq": command.seq})

    def snapshot(self) -> dict[str, Any]:
        """What the engine decided, with this orchestrator's random ids taken out."""
        shown = self.w.o.show_rollout(self.rollout, 1000)
        ids = {self.rollout: "RO", str(shown["deployment"]): "DEP"}

        def plain(value: Any) -> str:
            text = json.dumps(value, sort_keys=True)
            for real, alias in ids.items():
                text = text.replace(real, alias)
            return text

        rows = {
            f"{r.gateway}/{r.node}": (str(r.state), r.attempt, r.retryable, r.status_seq)
            for r in self.rows()
        }
        commands = [
            (c["gateway"], c["seq"], c["type"], c["node"], plain(c["deployment"]))
            for c in fetch_commands(self.w)
        ]
        return {
            "state": shown["state"], "phase": shown["phase"], "reason": plain(shown["reason"]),
            "phases": plain(shown["phases"]), "nodes": plain(shown["nodes"]), "rows": rows,
            "events": [(e["event"], e["state"], plain(e["detail"])) for e in shown["events"]],
            "commands": commands,
        }  # fmt: skip


def fetch_commands(w: World) -> list[dict[str, Any]]:
    con = sqlite3.connect(w.dir / "shoal.db")
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute("SELECT * FROM commands ORDER BY gateway, seq").fetchall()
        return [dict(r) for r in rows]
    finally:
        con.close()


def check_kept_rosters(w: World) -> None:
    """Every roster a tick kept, brought up to date as the next tick does (a copy, so the
    engine's own refreshes keep their pace), holds what reading the rollout anew gives."""
    engine = w.o._rollouts
    for rollout, roster in engine._rosters.items():
        r = engine._load(rollout)
        kept = copy.deepcopy(roster)
        engine._refresh(r, kept)
        members = engine._members(r)
        fresh = rollouts._Roster(r.options.retries, r.options.timeouts, members, kept.seen_event)
        assert kept.members == fresh.members
        assert +kept.kinds == +fresh.kinds
        assert +kept.active_by_gateway == +fresh.active_by_gateway
        assert (kept.retrying, kept.waiting) == (fresh.retrying, fresh.waiting)
        limits = [
            m.row.entered + r.options.timeouts.for_state(m.row.state)
            for m in members
            if m.row is not None and m.row.state in deployments.ACTIVE
        ]
        assert kept.deadline <= min(limits, default=math.inf)  # a lower bound: never late
        # And the counts are the per-node judgement the engine always made.
        for phase in {m.phase for m in members if m.phase is not None} | {None}:
            scope = [m for m in members if m.phase is not None and phase in (None, m.phase)]
            assert kept.tally(phase) == rollouts._Tally.of(scope, r.options.retries)
        unsettled = [m for m in members if m.kind(r.options.retries) in rollouts._UNSETTLED]
        assert kept.unsettled() == len(unsettled)


@pytest.mark.parametrize("seed", range(12))
def test_kept_rosters_decide_exactly_as_rosters_read_anew(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Randomized: two orchestrators take the same rollout and the same reports, acks, clock
    moves, pauses and resumes. One keeps its rosters between ticks (refreshed from the
    events); the other forgets them after every tick and looks for timeouts at every
    evaluation, so it judges every rollout from scratch each time, as the engine did before
    rosters. They must make the same moves, commands and events throughout."""
    rng = random.Random(seed)
    gateways = {f"gw-{g}": [f"n{i}" for i in range(1, rng.randint(2, 5))] for g in "abc"}
    args: dict[str, Any] = {
        "phases": rng.choice(["100%", "1,100%", "1,50%,100%", "2,4,100%"]),
        "max_parallel": rng.choice([1, 3, 100]),
        "max_per_gateway": rng.choice([1, 2, 16]),
        "retries": rng.choice([0, 1, 2]),
        "success_threshold": rng.choice([50, 100]),
        "on_failure": rng.choice(["pause", "abort"]),
        "failure_threshold": {
            "percent": rng.choice([10, 40, 100]), "min_count": rng.choice([1, 2, 4]),
            "scope": rng.choice(["phase", "rollout"]),
        },
        "timeouts": {"pending": 40, "offered": 50, "downloading": 30, "flashing": 45},
        "phase_wait_s": rng.choice([0, 5]),
    }  # fmt: skip
    twins = []
    for name in ("kept", "anew"):
        w = World(tmp_path / name)
        w.upload_all()
        w.o.add_operator("alice", "admin")
        fleet(w, gateways)
        result, _ = create(w, **args)
        twins.append(Twin(w, result["id"]))
    kept, anew = twins
    engine = anew.w.o._rollouts
    time_out = engine._time_out

    def time_out_always(r: Any, roster: Any, now: float) -> bool:
        roster.deadline = -math.inf  # no deadline to skip by: look at every node
        return time_out(r, roster, now)

    monkeypatch.setattr(engine, "_time_out", time_out_always)

    def tick(seconds: float) -> None:
        for twin in twins:
            twin.w.clock.advance(seconds)
            twin.w.o.tick()
        anew.w.o._rollouts._rosters.clear()

    targets = [(gw, n) for gw, nodes in gateways.items() for n in nodes]
    try:
        for _ in range(80):
            roll = rng.random()
            if roll < 0.5:
                running = [
                    (r.gateway, r.node) for r in kept.rows() if r.state in deployments.ACTIVE
                ]
                gw, node = rng.choice(running or targets)
                if any((r.gateway, r.node) == (gw, node) for r in kept.rows()):
                    word, reason = rng.choice(_WORDS), rng.choice(_REASONS)
                    for twin in twins:
                        twin.report(gw, node, word, reason)
            elif roll < 0.65:
                for twin in twins:
                    twin.ack_everything()
            elif roll < 0.95:
                tick(rng.choice([0.0, 0.05, 1.0, 3.0, 20.0, 60.0]))
            else:
                action = rng.choice(["rollout.pause", "rollout.resume"])
                for twin in twins:
                    ask(twin.w, action, {"id": twin.rollout})
            check_kept_rosters(kept.w)
            assert kept.snapshot() == anew.snapshot()
        for _ in range(50):  # then let every node succeed, until the rollout ends
            if kept.snapshot()["state"] in ("completed", "failed", "aborted"):
                break
            running = [(r.gateway, r.node) for r in kept.rows() if r.state in deployments.ACTIVE]
            if kept.snapshot()["state"] == "paused":
                for twin in twins:
                    ask(twin.w, "rollout.resume", {"id": twin.rollout})
            for twin in twins:
                twin.ack_everything()
            for gw, node in running:
                for twin in twins:
                    twin.report(gw, node, "succeeded", None)
            tick(1.0)
            check_kept_rosters(kept.w)
            assert kept.snapshot() == anew.snapshot()
        else:
            pytest.fail(f"the rollout never ended: {kept.snapshot()['state']}")
    finally:
        for twin in twins:
            twin.w.o.close()
