"""The topic tree and its access rules, and the account secret format."""

from __future__ import annotations

import pytest

from otaproto import topics as t
from otaproto.credentials import hash_secret, new_token, verify_secret
from otaproto.errors import MalformedError

G, ORCH = t.Role.GATEWAY, t.Role.ORCHESTRATOR
VIEWER, DEPLOYER, ADMIN = t.Role.VIEWER, t.Role.DEPLOYER, t.Role.ADMIN


def test_topic_builders_and_parser_agree() -> None:
    topic = t.gateway_up("gw-1", t.Up.STATUS)
    assert topic == "shoal/v1/gw/gw-1/up/status"
    assert t.parse(topic) == t.Parsed("gw", "gw-1", "up", "status")
    assert t.parse(t.operator_request("alice")) == t.Parsed("ops", "alice", "req", "")
    assert t.operator_request("alice", t.Channel.ADMIN) == "shoal/v1/ops/alice/admin"
    for channel in ("req", "write", "admin", "resp"):
        assert t.parse(f"shoal/v1/ops/alice/{channel}") == t.Parsed("ops", "alice", channel, "")
    for bad in ("shoal/v2/gw/a/up/status", "shoal/v1/gw/A/up/status", "shoal/v1/gw/a/up/nope",
                "shoal/v1/gw/a/up", "shoal/v1/ops/a/req/x", "other/v1/gw/a/up/hello",
                "shoal/v1/ops/a/root", "shoal/v1/ops/a/+"):  # fmt: skip
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
    for role in t.OPERATOR_ROLES:
        assert t.may_publish(role, "alice", "shoal/v1/ops/alice/req"), role
        assert not t.may_publish(role, "alice", "shoal/v1/ops/bob/req"), role
        assert not t.may_publish(role, "alice", "shoal/v1/ops/bob/admin"), role
        assert not t.may_publish(role, "alice", "shoal/v1/ops/alice/resp"), role
        assert not t.may_publish(role, "alice", "shoal/v1/gw/alice/up/status"), role
        assert t.may_subscribe(role, "alice", "shoal/v1/ops/alice/resp"), role
        for wide in ("shoal/v1/ops/+/resp", "shoal/v1/ops/alice/+", "shoal/v1/ops/alice/req",
                     "shoal/v1/ops/#", "#"):  # fmt: skip
            assert not t.may_subscribe(role, "alice", wide), (role, wide)
        assert t.may_receive(role, "alice", "shoal/v1/ops/alice/resp"), role
        assert not t.may_receive(role, "alice", "shoal/v1/ops/bob/resp"), role
        assert not t.may_receive(role, "alice", "shoal/v1/ops/alice/write"), role
    for request in t.ALL_OPERATOR_REQUESTS:
        assert t.may_subscribe(ORCH, "orchestrator", request)
    assert t.may_subscribe(ORCH, "orchestrator", t.ALL_GATEWAY_UP)
    assert t.may_publish(ORCH, "orchestrator", "shoal/v1/gw/a/down/cmd")
    assert not t.may_publish(ORCH, "orchestrator", "elsewhere/x")


# Who may publish on which request channel: the broker's half of role enforcement.
CHANNEL_MATRIX = {
    VIEWER: {"req"},
    DEPLOYER: {"req", "write"},
    ADMIN: {"req", "write", "admin"},
    G: set(),
}


@pytest.mark.parametrize("role", sorted(CHANNEL_MATRIX))
def test_each_role_publishes_on_the_request_channels_of_its_role_and_below_only(
    role: t.Role,
) -> None:
    allowed = {
        c
        for c in ("req", "write", "admin")
        if t.may_publish(role, "alice", f"shoal/v1/ops/alice/{c}")
    }
    assert allowed == CHANNEL_MATRIX[role]
    assert {str(c) for c in t.channels_of(role)} == CHANNEL_MATRIX[role]


def test_the_orchestrator_hears_every_request_channel_and_not_its_own_replies() -> None:
    assert set(t.ALL_OPERATOR_REQUESTS) == {
        "shoal/v1/ops/+/req", "shoal/v1/ops/+/write", "shoal/v1/ops/+/admin",
    }  # fmt: skip


def test_each_op_goes_to_the_channel_of_its_least_role_and_unknown_ops_to_req() -> None:
    assert t.op_request("alice", "devices.list") == "shoal/v1/ops/alice/req"
    assert t.op_request("alice", "rollout.create") == "shoal/v1/ops/alice/write"
    assert t.op_request("alice", "devices.accept") == "shoal/v1/ops/alice/admin"
    assert t.op_request("alice", "operators.check") == "shoal/v1/ops/alice/req"
    assert t.op_request("alice", "devices.reboot") == "shoal/v1/ops/alice/req"
    # Every channel is some role's, and the roles' channels are distinct.
    assert sorted(t.ROLE_CHANNELS) == sorted(t.OPERATOR_ROLES)
    assert set(t.ROLE_CHANNELS.values()) == set(t.Channel)


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
