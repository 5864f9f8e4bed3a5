"""The operator API: requests on ``shoal/v1/ops/{op}/{channel}``, replies on ``.../resp``.

Rules (spec: ``docs/topics.md`` §Operator API, ``docs/rollouts.md`` §Roles):

* A request is JSON or CBOR (:func:`otaproto.fleet.decode_request`); the reply
  uses the request's encoding and carries its ``id``.
* Every refusal is a reply ``{"ok": false, "error": "<one line>"}``: unknown
  operator or op, a role that may not use the op, arguments that do not
  match the op's schema (unknown keys included), unknown ids, anything the
  registry, store, deployments, groups or rollouts refuse. Nothing an
  operator sends changes state unless the whole request succeeds (each
  request runs in one transaction).
* Roles are checked on every request, whatever the broker let through: each
  op names the least role that may use it (:data:`OPS`); viewer < deployer <
  admin. A refusal says who, what role and which op.
* Each op has one request channel, the channel of its least role
  (:data:`otaproto.topics.ROLE_CHANNELS`: viewer ``req``, deployer
  ``write``, admin ``admin``); the broker lets an operator publish only on
  the channels of its role, so a request its role may not make is dropped
  before it gets here. An op that arrives on another channel than its own is
  refused with a reply naming the right topic (after the role check, so a
  viewer is told about its role, not about a channel it cannot use). Why
  refuse it when the role check alone would be safe: so that a channel
  always means what the ACL assumes (nothing sent on ``req`` changes
  anything), and a client that picks the wrong channel fails at once, even
  for an admin, not only later for the operators the broker stops.
* The broker drops a request on a channel the account lacks, so that request
  gets no reply. ``operators.check {op}`` (any role, on ``req``) answers
  what the op itself would: its topic, or the role refusal. A client asks
  it before an op of ``write`` or ``admin`` (:mod:`shoal.opsclient` does),
  so an operator whose role may not use the op still gets a clear error
  reply, from the orchestrator and in the audit log.
* :data:`OPS` is the one table of ops and roles; clients cannot import it,
  so :data:`otaproto.topics.OP_CHANNELS` carries each op's channel for
  them. The two must agree exactly (:func:`channel_mismatches`): this module
  refuses to load otherwise, and a test checks it.
* Every request is written to the audit log (:mod:`orchestrator.audit`):
  a success in the same transaction as its changes, a refusal after the
  rollback, an unreadable request as op ``?``.
* A request whose ``id`` cannot be read (oversized, not JSON or CBOR, not a
  map, no text ``id``) cannot be answered: it is logged, audited and dropped.
* ``artifact.upload`` carries bytes, so it needs a CBOR request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.effects import Effects, Outgoing
from orchestrator.registry import ROLE_RANK, OperatorRole, broker_role
from orchestrator.rollouts import RolloutEvent
from orchestrator.store import ArtifactRecord
from otaproto import cbor, fleet
from otaproto.errors import InvalidInput, LimitExceeded, MalformedError
from otaproto.topics import (
    OP_CHANNELS,
    ROLE_CHANNELS,
    Channel,
    operator_request,
    operator_response,
)

log = logging.getLogger("shoal.orchestrator")

#: Longest error text in a reply.
MAX_ERROR_CHARS = 1000


class Admin(Protocol):
    """What the operator API needs from the orchestrator (its public admin calls)."""

    def operator_role(self, operator_id: str) -> OperatorRole | None: ...
    def transaction(self) -> AbstractContextManager[object]: ...
    def record_audit(
        self, operator: str, role: str | None, op: str, args: Any, error: str | None
    ) -> None: ...
    def list_audit(
        self, limit: int | None, operator: str | None, op: str | None
    ) -> dict[str, Any]: ...
    def list_devices(self) -> dict[str, Any]: ...
    def show_device(self, device_id: str) -> dict[str, Any]: ...
    def add_gateway(self, gateway_id: str) -> str: ...
    def accept_gateway(self, gateway_id: str) -> Effects: ...
    def decommission_gateway(self, gateway_id: str) -> Effects: ...
    def set_attributes(self, device_id: str, attributes: Any) -> dict[str, Any]: ...
    def add_operator(self, operator_id: str, role: str = "admin") -> str: ...
    def list_operators(self) -> dict[str, Any]: ...
    def upload_artifact(self, data: bytes) -> ArtifactRecord: ...
    def list_artifacts(self) -> dict[str, Any]: ...
    def create_deployment(self, artifact: str, nodes: list[str]) -> str: ...
    def cancel_deployment(self, deployment_id: str) -> Effects: ...
    def deployment_status(self, deployment_id: str) -> dict[str, Any]: ...
    def deployment_events(self, deployment_id: str, node: str) -> dict[str, Any]: ...
    def create_rollout(self, args: dict[str, Any], by: str) -> str: ...
    def rollout_action(self, rollout_id: str, event: RolloutEvent, by: str) -> Effects: ...
    def list_rollouts(self, state: str | None, limit: int | None) -> dict[str, Any]: ...
    def show_rollout(self, rollout_id: str, node_limit: int | None = None) -> dict[str, Any]: ...
    def create_group(self, name: str, nodes: Any, node_filter: Any, by: str) -> dict[str, Any]: ...
    def list_groups(self) -> dict[str, Any]: ...
    def show_group(self, name: str) -> dict[str, Any]: ...
    def delete_group(self, name: str) -> dict[str, Any]: ...
    def flush(self) -> Effects: ...


Result = tuple[Any, Effects]
#: An op's action: the admin calls, the checked arguments, the operator asking.
Handler = Callable[[Admin, dict[str, Any], str], Result]

V, D, A = OperatorRole.VIEWER, OperatorRole.DEPLOYER, OperatorRole.ADMIN


@dataclass(frozen=True)
class Op:
    """One operation: the least role that may use it, its argument schema, what it does."""

    role: OperatorRole
    args: fleet.Schema
    run: Handler
    cbor_only: bool = False


ID_ARG: fleet.Schema = {"id": ("text", True)}
NAME_ARG: fleet.Schema = {"name": ("text", True)}
ROLLOUT_CREATE_ARGS: fleet.Schema = {
    "artifact": ("text", True),
    "target": ("map", True),
    "phases": ("text", False),
    "success_threshold": ("uint", False),
    "failure_threshold": ("map", False),
    "on_failure": ("text", False),
    "max_parallel": ("uint", False),
    "max_per_gateway": ("uint", False),
    "phase_wait_s": ("uint", False),
    "retries": ("uint", False),
    "timeouts": ("map", False),
    "start_at": ("uint", False),
}


def _plain(call: Callable[[Admin, dict[str, Any]], Any]) -> Handler:
    """An op whose result is all it causes: nothing to publish."""
    return lambda admin, args, _: (call(admin, args), Effects())


def _devices_add(admin: Admin, args: dict[str, Any], _: str) -> Result:
    return {"id": args["id"], "secret": admin.add_gateway(args["id"])}, Effects()


def _devices_accept(admin: Admin, args: dict[str, Any], _: str) -> Result:
    effects = admin.accept_gateway(args["id"])
    return {"id": args["id"], "state": "accepted"}, effects


def _devices_decommission(admin: Admin, args: dict[str, Any], _: str) -> Result:
    effects = admin.decommission_gateway(args["id"])
    return {"id": args["id"], "state": "decommissioned"}, effects


def _deploy_create(admin: Admin, args: dict[str, Any], _: str) -> Result:
    deployment = admin.create_deployment(args["artifact"], args["nodes"])
    return {"id": deployment}, admin.flush()


def _deploy_cancel(admin: Admin, args: dict[str, Any], _: str) -> Result:
    effects = admin.cancel_deployment(args["id"])
    return admin.deployment_status(args["id"]), effects


def _operators_add(admin: Admin, args: dict[str, Any], _: str) -> Result:
    secret = admin.add_operator(args["id"], args["role"])
    return {"id": args["id"], "role": args["role"], "secret": secret}, Effects()


def _rollout_create(admin: Admin, args: dict[str, Any], who: str) -> Result:
    rollout = admin.create_rollout(args, who)
    return admin.show_rollout(rollout, 0), admin.flush()


def _rollout_action(event: RolloutEvent) -> Handler:
    def run(admin: Admin, args: dict[str, Any], who: str) -> Result:
        effects = admin.rollout_action(args["id"], event, who)
        return admin.show_rollout(args["id"], 0), effects

    return run


def _groups_create(admin: Admin, args: dict[str, Any], who: str) -> Result:
    return admin.create_group(args["name"], args["nodes"], args["filter"], who), Effects()


def _operators_check(admin: Admin, args: dict[str, Any], who: str) -> Result:
    """May ``who`` use ``args.op``: the op's topic, or the refusal the op itself would get.

    Why: the broker drops a request on a channel the account's role lacks, so
    that request can get no reply. A client asks this (a viewer op, on
    ``req``) before an op of another channel, and so gets the clear refusal.
    """
    role = admin.operator_role(who)
    if role is None:  # _check refused unknown operators before this runs
        raise InvalidInput(f"unknown operator {who}")
    op = permitted(who, role, args["op"])
    topic = operator_request(who, channel_of(op.role))
    return {"operator": who, "role": str(role), "op": args["op"], "topic": topic}, Effects()


OPS: dict[str, Op] = {
    "devices.list": Op(V, {}, _plain(lambda a, _: a.list_devices())),
    "devices.show": Op(V, ID_ARG, _plain(lambda a, m: a.show_device(m["id"]))),
    "devices.add": Op(A, ID_ARG, _devices_add),
    "devices.accept": Op(A, ID_ARG, _devices_accept),
    "devices.decommission": Op(A, ID_ARG, _devices_decommission),
    "devices.set_attributes": Op(
        D,
        {"id": ("text", True), "attributes": ("map", True)},
        _plain(lambda a, m: a.set_attributes(m["id"], m["attributes"])),
    ),
    "operators.add": Op(A, {"id": ("text", True), "role": ("text", True)}, _operators_add),
    "operators.list": Op(A, {}, _plain(lambda a, _: a.list_operators())),
    "operators.check": Op(V, {"op": ("text", True)}, _operators_check),
    "artifact.upload": Op(
        D,
        {"data": ("bytes", True)},
        _plain(lambda a, m: a.upload_artifact(m["data"]).to_public()),
        cbor_only=True,
    ),
    "artifact.list": Op(V, {}, _plain(lambda a, _: a.list_artifacts())),
    "deploy.create": Op(D, {"artifact": ("text", True), "nodes": ("list", True)}, _deploy_create),
    "deploy.status": Op(V, ID_ARG, _plain(lambda a, m: a.deployment_status(m["id"]))),
    "deploy.events": Op(
        V,
        {"id": ("text", True), "node": ("text", True)},
        _plain(lambda a, m: a.deployment_events(m["id"], m["node"])),
    ),
    "deploy.cancel": Op(D, ID_ARG, _deploy_cancel),
    "rollout.create": Op(D, ROLLOUT_CREATE_ARGS, _rollout_create),
    "rollout.list": Op(
        V,
        {"state": ("text", False), "limit": ("uint", False)},
        _plain(lambda a, m: a.list_rollouts(m["state"], m["limit"])),
    ),
    "rollout.show": Op(
        V,
        {"id": ("text", True), "nodes": ("uint", False)},
        _plain(lambda a, m: a.show_rollout(m["id"], m["nodes"])),
    ),
    "rollout.pause": Op(D, ID_ARG, _rollout_action(RolloutEvent.PAUSE)),
    "rollout.resume": Op(D, ID_ARG, _rollout_action(RolloutEvent.RESUME)),
    "rollout.abort": Op(D, ID_ARG, _rollout_action(RolloutEvent.ABORT)),
    "groups.create": Op(
        D,
        {"name": ("text", True), "nodes": ("list", False), "filter": ("map", False)},
        _groups_create,
    ),
    "groups.list": Op(V, {}, _plain(lambda a, _: a.list_groups())),
    "groups.show": Op(V, NAME_ARG, _plain(lambda a, m: a.show_group(m["name"]))),
    "groups.delete": Op(D, NAME_ARG, _plain(lambda a, m: a.delete_group(m["name"]))),
    "audit.list": Op(
        V,
        {"limit": ("uint", False), "operator": ("text", False), "op": ("text", False)},
        _plain(lambda a, m: a.list_audit(m["limit"], m["operator"], m["op"])),
    ),
}


class PermissionRefused(InvalidInput):
    """The operator's role may not use this op."""


class WrongChannel(InvalidInput):
    """The op came on another request channel than its own."""


def ops_for(role: OperatorRole) -> list[str]:
    """The ops an operator of ``role`` may use (for docs and broker ACLs)."""
    return [name for name, op in OPS.items() if ROLE_RANK[role] >= ROLE_RANK[op.role]]


def permitted(operator: str, role: OperatorRole, name: str) -> Op:
    """The op ``name`` if ``operator`` (of ``role``) may use it.

    Raises InvalidInput (an unknown op), PermissionRefused (the role may not).
    """
    op = OPS.get(name)
    if op is None:
        raise InvalidInput(f"unknown op {name[:64]!r}; known: {', '.join(OPS)}")
    if ROLE_RANK[role] < ROLE_RANK[op.role]:
        raise PermissionRefused(f"operator {operator} ({role}) may not {name}: it needs {op.role}")
    return op


def channel_of(role: OperatorRole) -> Channel:
    """The request channel of the ops whose least role is ``role``."""
    return ROLE_CHANNELS[broker_role(role)]


def channel_mismatches(
    ops: Mapping[str, Op] | None = None, table: Mapping[str, Channel] = OP_CHANNELS
) -> list[str]:
    """Where ``table`` (the clients' op -> channel table) and ``ops`` (default :data:`OPS`)
    disagree, one line each; empty when they agree exactly. Why it matters: a client sends
    each op on the channel ``table`` names, and the orchestrator refuses any other."""
    ops = OPS if ops is None else ops
    wrong = [f"{name}: missing from the channel table" for name in ops if name not in table]
    wrong += [f"{name}: in the channel table, not an op" for name in table if name not in ops]
    for name, op in ops.items():
        if name in table and table[name] != channel_of(op.role):
            wrong.append(f"{name}: channel {table[name]}, but it needs {op.role}")
    return wrong


def roles_markdown() -> str:
    """The roles table of ``docs/rollouts.md``: which role may use which op, and the op's
    request channel, from :data:`OPS`."""
    roles = list(OperatorRole)
    lines = [
        "| op | channel | " + " | ".join(str(r) for r in roles) + " |",
        "|---|---|" + "---|" * len(roles),
    ]
    for name in sorted(OPS):
        marks = ["yes" if ROLE_RANK[r] >= ROLE_RANK[OPS[name].role] else "no" for r in roles]
        channel = channel_of(OPS[name].role)
        lines.append(f"| `{name}` | `{channel}` | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


_MISMATCHES = channel_mismatches()
if _MISMATCHES:  # a client would send these ops where the orchestrator refuses them
    raise RuntimeError(
        "orchestrator.operators.OPS and otaproto.topics.OP_CHANNELS disagree: "
        + "; ".join(_MISMATCHES)
    )


class OperatorApi:
    """Answers operator requests through an :class:`Admin`."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin

    def handle(self, operator: str, channel: Channel, payload: bytes) -> Effects:
        """One request from ``operator`` on ``channel``: the reply (and what the op caused).

        Never raises for bad input: refusals are error replies, and a request
        whose id cannot be read is logged and dropped (no reply is possible).
        """
        try:
            request = fleet.decode_request(payload)
        except LimitExceeded as exc:
            log.warning("dropping a request from operator %s: %s", operator, exc)
            self._audit(operator, None, "?", {"bytes": len(payload)}, str(exc))
            return Effects()
        except (MalformedError, UnicodeError) as exc:  # UnicodeError: lone surrogates in JSON
            self._audit(operator, None, "?", {"bytes": len(payload)}, str(exc))
            salvaged = _salvage_id(payload)
            if salvaged is None:
                log.warning(
                    "dropping a request from operator %s (no readable id): %s", operator, exc
                )
                return Effects()
            request_id, as_json = salvaged
            log.warning("refused request %r from operator %s: %s", request_id, operator, exc)
            return Effects([self._reply(operator, request_id, as_json, error=str(exc))])
        role: OperatorRole | None = None
        try:
            role = self._admin.operator_role(operator)
            op, args = self._check(operator, role, channel, request)
            with self._admin.transaction():
                result, effects = op.run(self._admin, args, operator)
                self._admin.record_audit(operator, role, request.op, args, None)
        except (InvalidInput, UnicodeError) as exc:
            log.warning(
                "refused %s (request %r) from operator %s: %s",
                request.op[:64], request.id, operator, exc,
            )  # fmt: skip
            self._audit(operator, role, request.op, request.args, str(exc))
            return Effects([self._reply(operator, request.id, request.json, error=str(exc))])
        except Exception:  # a bug must not cost the operator a reply or the service its life
            log.exception("internal error in %s from operator %s", request.op[:64], operator)
            self._audit(operator, role, request.op, request.args, "internal error (logged)")
            reply = self._reply(operator, request.id, request.json, error="internal error (logged)")
            return Effects([reply])
        log.info("operator %s: %s (request %r) done", operator, request.op, request.id)
        reply = self._reply(operator, request.id, request.json, result=result)
        return Effects([reply]).extend(effects)

    def _check(
        self,
        operator: str,
        role: OperatorRole | None,
        channel: Channel,
        request: fleet.OperatorRequest,
    ) -> tuple[Op, dict[str, Any]]:
        """The op and its checked arguments.

        Raises InvalidInput (PermissionRefused, WrongChannel).
        """
        if role is None:
            raise InvalidInput(f"unknown operator {operator}")
        op = permitted(operator, role, request.op)
        wanted = channel_of(op.role)
        if channel != wanted:
            raise WrongChannel(
                f"{request.op} must be sent on {operator_request(operator, wanted)}, "
                f"not {operator_request(operator, channel)}"
            )
        if op.cbor_only and request.json:
            raise InvalidInput(f"{request.op} carries bytes: send it as a CBOR request")
        return op, fleet.check_map(request.args, op.args, f"{request.op} args")

    def _audit(
        self, operator: str, role: OperatorRole | None, op: str, args: Any, error: str
    ) -> None:
        """Record a refused request; a failure to record is logged, never raised."""
        try:
            with self._admin.transaction():
                self._admin.record_audit(operator, role, op, args, error)
        except Exception:
            log.exception("cannot write the audit log entry for %s from %s", op[:64], operator)

    def _reply(
        self,
        operator: str,
        request_id: str,
        as_json: bool,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> Outgoing:
        if error is not None:
            error = " ".join(error.split())[:MAX_ERROR_CHARS]
        payload = fleet.encode_response(request_id, as_json=as_json, result=result, error=error)
        return Outgoing(operator_response(operator), payload)


def _salvage_id(payload: bytes) -> tuple[str, bool] | None:
    """The id of a request that failed to decode, and whether it was JSON; None if unreadable.

    Only called after :func:`fleet.decode_request` bounded the size.
    """
    as_json = payload[:1] in (b"{", b" ", b"\n", b"\t")
    try:
        raw = json.loads(payload) if as_json else cbor.decode(payload, "operator request")
    except (ValueError, RecursionError, InvalidInput):
        return None
    if not isinstance(raw, dict):
        return None
    request_id = raw.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id.encode(errors="replace")) <= 256:
        return None
    return request_id, as_json
