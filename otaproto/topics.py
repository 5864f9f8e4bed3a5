"""The MQTT topic tree of Shoal, version 1, and who may use which topic.

Rules (spec: ``docs/topics.md``):

* Everything lives under ``shoal/v1/``. A gateway's traffic lives under its
  own subtree ``shoal/v1/gw/{gateway}/``: it publishes only to ``up/...`` and
  subscribes only to ``down/...`` of its own subtree, so one pattern ACL
  (``%u`` = the MQTT username = the gateway id) covers every gateway.
* An operator talks through ``shoal/v1/ops/{operator}/req`` and hears back on
  ``shoal/v1/ops/{operator}/resp``; nobody else can read those replies.
* The orchestrator account may use the whole tree.
* Ids are lowercase letters, digits, ``-`` and ``_``, 1 to 64 characters:
  nothing that could be an MQTT wildcard, a level separator or ``$``.
* No retained messages are used anywhere (an amqtt bug delivers retained
  messages past topic ACLs); state is asked for, not left lying in the broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from otaproto.errors import MalformedError

ROOT = "shoal/v1"
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Role(StrEnum):
    """What an MQTT account is."""

    GATEWAY = "gateway"
    OPERATOR = "operator"
    ORCHESTRATOR = "orchestrator"


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


def operator_request(operator: str) -> str:
    return f"{ROOT}/ops/{check_id(operator, 'operator id')}/req"


def operator_response(operator: str) -> str:
    return f"{ROOT}/ops/{check_id(operator, 'operator id')}/resp"


#: What the orchestrator subscribes to.
ALL_GATEWAY_UP = f"{ROOT}/gw/+/up/#"
ALL_OPERATOR_REQUESTS = f"{ROOT}/ops/+/req"


@dataclass(frozen=True)
class Parsed:
    """Who a topic belongs to and what it carries."""

    scope: str  #: "gw" or "ops"
    owner: str  #: gateway or operator id
    direction: str  #: "up", "down", "req", "resp"
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
    if scope == "ops" and len(parts) == 5 and parts[4] in ("req", "resp"):
        return Parsed("ops", owner, parts[4], "")
    return None


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
    return parsed.scope == "ops" and parsed.direction == "req"


def may_subscribe(role: Role, username: str, topic_filter: str) -> bool:
    """True when ``username`` may subscribe to ``topic_filter``.

    Devices and operators get exact topics of their own subtree only (a
    gateway: ``.../gw/{me}/down/#`` or one of its down topics; an operator:
    its response topic); no wildcard can reach past them.
    """
    if role is Role.ORCHESTRATOR:
        return topic_filter.startswith(ROOT + "/") or topic_filter == ROOT + "/#"
    if role is Role.GATEWAY:
        own = f"{ROOT}/gw/{username}/down/"
        if topic_filter == own + "#":
            return ID_PATTERN.match(username) is not None
        return topic_filter.startswith(own) and topic_filter[len(own) :] in {k.value for k in Down}
    return ID_PATTERN.match(username) is not None and topic_filter == operator_response(username)


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
    return parsed.scope == "ops" and parsed.direction == "resp"
