"""The topic tree and its access rules, and the account secret format."""

from __future__ import annotations

import pytest

from otaproto import topics as t
from otaproto.credentials import hash_secret, new_token, verify_secret
from otaproto.errors import MalformedError

G, OP, ORCH = t.Role.GATEWAY, t.Role.OPERATOR, t.Role.ORCHESTRATOR


def test_topic_builders_and_parser_agree() -> None:
    topic = t.gateway_up("gw-1", t.Up.STATUS)
    assert topic == "shoal/v1/gw/gw-1/up/status"
    assert t.parse(topic) == t.Parsed("gw", "gw-1", "up", "status")
    assert t.parse(t.operator_request("alice")) == t.Parsed("ops", "alice", "req", "")
    for bad in ("shoal/v2/gw/a/up/status", "shoal/v1/gw/A/up/status", "shoal/v1/gw/a/up/nope",
                "shoal/v1/gw/a/up", "shoal/v1/ops/a/req/x", "other/v1/gw/a/up/hello"):  # fmt: skip
        assert t.parse(bad) is None


@pytest.mark.parametrize("bad", ["", "A", "+", "#", "a/b", "$sys", "-x", "x" * 65, "a b"])
def test_ids_that_could_escape_a_subtree_are_refused(bad: str) -> None:
    with pytest.raises(MalformedError):
        t.gateway_up(bad, t.Up.HELLO)


def test_a_gateway_publishes_up_and_reads_down_of_its_own_subtree_only() -> None:
    assert t.may_publish(G, "a", "shoal/v1/gw/a/up/status")
    assert not t.may_publish(G, "a", "shoal/v1/gw/a/down/cmd")
    assert not t.may_publish(G, "a", "shoal/v1/gw/b/up/status")
    assert not t.may_publish(G, "a", "shoal/v1/ops/a/req")
    assert t.may_subscribe(G, "a", "shoal/v1/gw/a/down/#")
    assert t.may_subscribe(G, "a", "shoal/v1/gw/a/down/cmd")
    for wide in ("#", "shoal/#", "shoal/v1/#", "shoal/v1/gw/+/down/#", "shoal/v1/gw/b/down/#",
                 "shoal/v1/gw/a/#", "shoal/v1/gw/a/up/#", "shoal/v1/gw/a/down/+"):  # fmt: skip
        assert not t.may_subscribe(G, "a", wide), wide
    assert t.may_receive(G, "a", "shoal/v1/gw/a/down/block")
    assert not t.may_receive(G, "a", "shoal/v1/gw/b/down/block")
    assert not t.may_receive(G, "a", "shoal/v1/gw/a/up/status")


def test_operators_see_only_their_own_replies_and_the_orchestrator_sees_all() -> None:
    assert t.may_publish(OP, "alice", "shoal/v1/ops/alice/req")
    assert not t.may_publish(OP, "alice", "shoal/v1/ops/bob/req")
    assert not t.may_publish(OP, "alice", "shoal/v1/gw/alice/up/status")
    assert t.may_subscribe(OP, "alice", "shoal/v1/ops/alice/resp")
    assert not t.may_subscribe(OP, "alice", "shoal/v1/ops/+/resp")
    assert not t.may_receive(OP, "alice", "shoal/v1/ops/bob/resp")
    assert t.may_subscribe(ORCH, "orchestrator", t.ALL_GATEWAY_UP)
    assert t.may_publish(ORCH, "orchestrator", "shoal/v1/gw/a/down/cmd")
    assert not t.may_publish(ORCH, "orchestrator", "elsewhere/x")


def test_secrets_use_mosquittos_format_and_verify_in_constant_time() -> None:
    token = new_token()
    stored = hash_secret(token)
    assert stored.startswith("$7$101$")
    assert verify_secret(token, stored)
    assert not verify_secret(token + "x", stored)
    fixed = hash_secret("pw", salt=bytes(12))
    assert fixed == hash_secret("pw", salt=bytes(12))
    for bad in ("plain", "$6$1$a$b", "$7$x$a$b", "$7$101$!!$b"):
        with pytest.raises(MalformedError):
            verify_secret("pw", bad)
