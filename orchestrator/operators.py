"""The operator API: requests on ``shoal/v1/ops/{op}/req``, replies on ``.../resp``.

Rules (spec: ``docs/topics.md`` §Operator API):

* A request is JSON or CBOR (:func:`otaproto.fleet.decode_request`); the reply
  uses the request's encoding and carries its ``id``.
* Every refusal is a reply ``{"ok": false, "error": "<one line>"}``: unknown
  op, arguments that do not match the op's schema (unknown keys included),
  unknown ids, anything the registry, store or deployments refuse. Nothing
  an operator sends changes state unless the whole request succeeds.
* A request whose ``id`` cannot be read (oversized, not JSON or CBOR, not a
  map, no text ``id``) cannot be answered: it is logged and dropped.
* Requests come only from operators in the registry (the broker's ACL lets
  ``{op}`` publish only to its own request topic); roles are stored now and
  enforced by a later issue.
* ``artifact.upload`` carries bytes, so it needs a CBOR request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.effects import Effects, Outgoing
from orchestrator.store import ArtifactRecord
from otaproto import cbor, fleet
from otaproto.errors import InvalidInput, LimitExceeded, MalformedError
from otaproto.topics import operator_response

log = logging.getLogger("shoal.orchestrator")

#: Longest error text in a reply.
MAX_ERROR_CHARS = 1000


class Admin(Protocol):
    """What the operator API needs from the orchestrator (its public admin calls)."""

    def operator_known(self, operator_id: str) -> bool: ...
    def list_devices(self) -> dict[str, Any]: ...
    def show_device(self, device_id: str) -> dict[str, Any]: ...
    def add_gateway(self, gateway_id: str) -> str: ...
    def accept_gateway(self, gateway_id: str) -> Effects: ...
    def decommission_gateway(self, gateway_id: str) -> Effects: ...
    def upload_artifact(self, data: bytes) -> ArtifactRecord: ...
    def list_artifacts(self) -> dict[str, Any]: ...
    def create_deployment(self, artifact: str, nodes: list[str]) -> str: ...
    def cancel_deployment(self, deployment_id: str) -> Effects: ...
    def deployment_status(self, deployment_id: str) -> dict[str, Any]: ...
    def flush(self) -> Effects: ...


Result = tuple[Any, Effects]
Handler = Callable[[Admin, dict[str, Any]], Result]


@dataclass(frozen=True)
class Op:
    """One operation: its argument schema and what it does."""

    args: fleet.Schema
    run: Handler
    cbor_only: bool = False


ID_ARG: fleet.Schema = {"id": ("text", True)}


def _devices_add(admin: Admin, args: dict[str, Any]) -> Result:
    return {"id": args["id"], "secret": admin.add_gateway(args["id"])}, Effects()


def _devices_accept(admin: Admin, args: dict[str, Any]) -> Result:
    effects = admin.accept_gateway(args["id"])
    return {"id": args["id"], "state": "accepted"}, effects


def _devices_decommission(admin: Admin, args: dict[str, Any]) -> Result:
    effects = admin.decommission_gateway(args["id"])
    return {"id": args["id"], "state": "decommissioned"}, effects


def _deploy_create(admin: Admin, args: dict[str, Any]) -> Result:
    deployment = admin.create_deployment(args["artifact"], args["nodes"])
    return {"id": deployment}, admin.flush()


def _deploy_cancel(admin: Admin, args: dict[str, Any]) -> Result:
    effects = admin.cancel_deployment(args["id"])
    return admin.deployment_status(args["id"]), effects


OPS: dict[str, Op] = {
    "devices.list": Op({}, lambda a, _: (a.list_devices(), Effects())),
    "devices.show": Op(ID_ARG, lambda a, m: (a.show_device(m["id"]), Effects())),
    "devices.add": Op(ID_ARG, _devices_add),
    "devices.accept": Op(ID_ARG, _devices_accept),
    "devices.decommission": Op(ID_ARG, _devices_decommission),
    "artifact.upload": Op(
        {"data": ("bytes", True)},
        lambda a, m: (a.upload_artifact(m["data"]).to_public(), Effects()),
        cbor_only=True,
    ),
    "artifact.list": Op({}, lambda a, _: (a.list_artifacts(), Effects())),
    "deploy.create": Op({"artifact": ("text", True), "nodes": ("list", True)}, _deploy_create),
    "deploy.status": Op(ID_ARG, lambda a, m: (a.deployment_status(m["id"]), Effects())),
    "deploy.cancel": Op(ID_ARG, _deploy_cancel),
}


class OperatorApi:
    """Answers operator requests through an :class:`Admin`."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin

    def handle(self, operator: str, payload: bytes) -> Effects:
        """One request from ``operator``: the reply (and what the op caused) as Effects.

        Never raises for bad input: refusals are error replies, and a request
        whose id cannot be read is logged and dropped (no reply is possible).
        """
        try:
            request = fleet.decode_request(payload)
        except LimitExceeded as exc:
            log.warning("dropping a request from operator %s: %s", operator, exc)
            return Effects()
        except (MalformedError, UnicodeError) as exc:  # UnicodeError: lone surrogates in JSON
            salvaged = _salvage_id(payload)
            if salvaged is None:
                log.warning(
                    "dropping a request from operator %s (no readable id): %s", operator, exc
                )
                return Effects()
            request_id, as_json = salvaged
            log.warning("refused request %r from operator %s: %s", request_id, operator, exc)
            return Effects([self._reply(operator, request_id, as_json, error=str(exc))])
        try:
            result, effects = self._run(operator, request)
        except (InvalidInput, UnicodeError) as exc:
            log.warning(
                "refused %s (request %r) from operator %s: %s",
                request.op[:64], request.id, operator, exc,
            )  # fmt: skip
            return Effects([self._reply(operator, request.id, request.json, error=str(exc))])
        except Exception:  # a bug must not cost the operator a reply or the service its life
            log.exception("internal error in %s from operator %s", request.op[:64], operator)
            reply = self._reply(operator, request.id, request.json, error="internal error (logged)")
            return Effects([reply])
        log.info("operator %s: %s (request %r) done", operator, request.op, request.id)
        reply = self._reply(operator, request.id, request.json, result=result)
        return Effects([reply]).extend(effects)

    def _run(self, operator: str, request: fleet.OperatorRequest) -> Result:
        if not self._admin.operator_known(operator):
            raise InvalidInput(f"unknown operator {operator}")
        op = OPS.get(request.op)
        if op is None:
            raise InvalidInput(f"unknown op {request.op[:64]!r}; known: {', '.join(OPS)}")
        if op.cbor_only and request.json:
            raise InvalidInput(f"{request.op} carries bytes: send it as a CBOR request")
        args = fleet.check_map(request.args, op.args, f"{request.op} args")
        return op.run(self._admin, args)

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
