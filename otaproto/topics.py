"""The MQTT topic tree of Shoal, version 1, and who may use which topic.

Rules (spec: ``docs/topics.md``):

* Everything lives under ``shoal/v1/``. A gateway's traffic lives under its
  own subtree ``shoal/v1/gw/{gateway}/``: it publishes only to ``up/...`` and
  subscribes only to ``down/...`` of its own subtree, so one pattern ACL
  (``%u`` = the MQTT username = the gateway id) covers every gateway.
* An operator sends requests on the *channels* of its subtree
  ``shoal/v1/ops/{operator}/{channel}`` and hears back on
  ``shoal/v1/ops/{operator}/resp``; nobody else can read those replies. The
  channel says the least role an op needs (:data:`OP_CHANNELS`): ``req``
  for read-only ops (viewer), ``write`` for deployer ops, ``admin`` for
  admin ops. An operator account may publish on the channels of its role
  and the roles below it, so the broker itself drops a request that the
  account's role may not make: it never reaches the orchestrator, which
  checks the role again on every request anyway. Why per channel rather
  than per op: one ACL line per channel (three at most per operator) and a
  new op needs no new broker config.
* The orchestrator account may use the whole tree.
* Ids are lowercase letters, digits, ``-`` and ``_``, 1 to 64 characters:
  nothing that could be an MQTT wildcard, a level separator or ``$``.
* No retained messages are used anywhere (an amqtt bug delivers retained
  messages past topic ACLs); state is asked for, not left lying in the broker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from otaproto.errors import MalformedError

ROOT = "shoal/v1"
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Role(StrEnum):
    """What an MQTT account is; an operator account is one of three roles."""

    GATEWAY = "gateway"
    VIEWER = "viewer"  #: an operator who may read
    DEPLOYER = "deployer"  #: an operator who may also deploy
    ADMIN = "admin"  #: an operator who may do everything, gateways and operators too
    ORCHESTRATOR = "orchestrator"


#: The operator roles, least first: each may do whatever the ones before it may.
OPERATOR_ROLES: tuple[Role, ...] = (Role.VIEWER, Role.DEPLOYER, Role.ADMIN)


class Channel(StrEnum):
    """An operator's request topics, ``shoal/v1/ops/{operator}/{channel}``, by least role."""

    READ = "req"  #: ops a viewer may use (read-only)
    WRITE = "write"  #: ops that need a deployer
    ADMIN = "admin"  #: ops that need an admin


#: The channel of the ops that need each operator role.
ROLE_CHANNELS: Mapping[Role, Channel] = {
    Role.VIEWER: Channel.READ,
    Role.DEPLOYER: Channel.WRITE,
    Role.ADMIN: Channel.ADMIN,
}
_R, _W, _A = Channel.READ, Channel.WRITE, Channel.ADMIN

#: Every op of the operator API and the channel it is sent on. The client's copy of the
#: orchestrator's op table (``orchestrator.operators.OPS``: the least role of each op), which
#: clients cannot import; a test and the orchestrator's import check that the two agree.
OP_CHANNELS: Mapping[str, Channel] = {
    "devices.list": _R,
    "devices.show": _R,
    "devices.add": _A,
    "devices.accept": _A,
    "devices.decommission": _A,
    "devices.set_attributes": _W,
    "operators.add": _A,
    "operators.list": _A,
    "operators.check": _R,
    "artifact.upload": _W,
    "artifact.list": _R,
    "deploy.create": _W,
    "deploy.status": _R,
    "deploy.events": _R,
    "deploy.cancel": _W,
    "rollout.create": _W,
    "rollout.list": _R,
    "rollout.show": _R,
    "rollout.pause": _W,
    "rollout.resume": _W,
    "rollout.abort": _W,
    "groups.create": _W,
    "groups.list": _R,
    "groups.show": _R,
    "groups.delete": _W,
    "audit.list": _R,
}


class Up(StrEnum):
    """Gateway -> orchestrator topics, under ``shoal/v1/gw/{gateway}/up/``."""

    HELLO = "hello"  #: (re)connected: here I am, what is pending for me?
    STATE = "state"  #: online / offline (the offline one is the will)
    INVENTORY = "inventory"  #: the nodes behind me and what they run
    ACK = "ack"  #: I have taken command N
    STATUS = "status"  #: a deployment moved
    FETCH = "fetch"  #: send me these blocks of this artifact


class Down(StrEnum):
    """Orchestrator -> gateway topics, under ``shoal/v1/gw/{gateway}/down/``."""

    COMMAND = "cmd"  #: deploy, cancel (ids and sequence numbers, re-sent until acked)
    BLOCK = "block"  #: one block of an artifact
    ERROR = "error"  #: your last message was refused, and why


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid gateway, node or operator id. Raises MalformedError."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise MalformedError(what, "must be 1-64 of a-z, 0-9, '-', '_', starting alphanumeric")
    return value


def gateway_up(gateway: str, kind: Up) -> str:
    return f"{ROOT}/gw/{check_id(gateway, 'gateway id')}/up/{kind}"


def gateway_down(gateway: str, kind: Down) -> str:
    return f"{ROOT}/gw/{check_id(gateway, 'gateway id')}/down/{kind}"


def operator_request(operator: str, channel: Channel = Channel.READ) -> str:
    """The topic of ``operator``'s requests on ``channel`` (see :func:`op_request`)."""
    return f"{ROOT}/ops/{check_id(operator, 'operator id')}/{channel}"


def op_channel(op: str) -> Channel:
    """The channel ``op`` is sent on; ``req`` for an op this table does not know.

    Why ``req`` then: every operator may publish there, so an unknown op (a
    typo, an op of a newer orchestrator) gets the orchestrator's error reply
    instead of being dropped silently by the broker.
    """
    return OP_CHANNELS.get(op, Channel.READ)


def op_request(operator: str, op: str) -> str:
    """The topic ``operator`` publishes a request for ``op`` on."""
    return operator_request(operator, op_channel(op))


def operator_response(operator: str) -> str:
    return f"{ROOT}/ops/{check_id(operator, 'operator id')}/resp"


def channels_of(role: Role) -> frozenset[Channel]:
    """The request channels an account of ``role`` may publish on (none unless an operator)."""
    if role not in OPERATOR_ROLES:
        return frozenset()
    return frozenset(ROLE_CHANNELS[r] for r in OPERATOR_ROLES[: OPERATOR_ROLES.index(role) + 1])


#: What the orchestrator subscribes to: every gateway's up topics; every operator's request
#: channels (one filter each, not ``ops/+/+``, which would bring back its own replies).
ALL_GATEWAY_UP = f"{ROOT}/gw/+/up/#"
ALL_OPERATOR_REQUESTS: tuple[str, ...] = tuple(f"{ROOT}/ops/+/{c}" for c in Channel)


@dataclass(frozen=True)
class Parsed:
    """Who a topic belongs to and what it carries."""

    scope: str  #: "gw" or "ops"
    owner: str  #: gateway or operator id
    direction: str  #: "up", "down"; for ops a Channel value ("req", "write", "admin") or "resp"
    kind: str  #: Up/Down value, or "" for ops


def parse(topic: str) -> Parsed | None:
    """Split a concrete topic of the tree; None when it is not one of Shoal's."""
    parts = topic.split("/")
    if parts[:2] != ["shoal", "v1"] or len(parts) < 4:
        return None
    scope, owner = parts[2], parts[3]
    if not ID_PATTERN.match(owner):
        return None
    if scope == "gw" and len(parts) == 6 and parts[4] in ("up", "down"):
        kinds = {k.value for k in (Up if parts[4] == "up" else Down)}
        return Parsed("gw", owner, parts[4], parts[5]) if parts[5] in kinds else None
    if scope == "ops" and len(parts) == 5 and parts[4] in _OPS_DIRECTIONS:
        return Parsed("ops", owner, parts[4], "")
    return None


_OPS_DIRECTIONS = frozenset({*(c.value for c in Channel), "resp"})


# --- access control, shared by the embedded broker and the mosquitto config ----


def may_publish(role: Role, username: str, topic: str) -> bool:
    """True when ``username`` (of ``role``) may publish to the concrete ``topic``."""
    if role is Role.ORCHESTRATOR:
        return topic.startswith(ROOT + "/")
    parsed = parse(topic)
    if parsed is None or parsed.owner != username:
        return False
    if role is Role.GATEWAY:
        return parsed.scope == "gw" and parsed.direction == "up"
    return parsed.scope == "ops" and parsed.direction in channels_of(role)


def may_subscribe(role: Role, username: str, topic_filter: str) -> bool:
    """True when ``username`` may subscribe to ``topic_filter``.

    Devices and operators get exact topics of their own subtree only (a
    gateway: ``.../gw/{me}/down/#`` or one of its down topics; an operator of
    any role: its response topic); no wildcard can reach past them.
    """
    if role is Role.ORCHESTRATOR:
        return topic_filter.startswith(ROOT + "/") or topic_filter == ROOT + "/#"
    if role is Role.GATEWAY:
        own = f"{ROOT}/gw/{username}/down/"
        if topic_filter == own + "#":
            return ID_PATTERN.match(username) is not None
        return topic_filter.startswith(own) and topic_filter[len(own) :] in {k.value for k in Down}
    if role not in OPERATOR_ROLES or not ID_PATTERN.match(username):
        return False
    return topic_filter == operator_response(username)


def may_receive(role: Role, username: str, topic: str) -> bool:
    """True when a message on ``topic`` may be delivered to ``username``.

    Checked again at delivery, whatever the subscription: the embedded broker
    has paths (retained messages, offline queues) that skip the subscribe check.
    """
    if role is Role.ORCHESTRATOR:
        return topic.startswith(ROOT + "/")
    parsed = parse(topic)
    if parsed is None or parsed.owner != username:
        return False
    if role is Role.GATEWAY:
        return parsed.scope == "gw" and parsed.direction == "down"
    return role in OPERATOR_ROLES and parsed.scope == "ops" and parsed.direction == "resp"
