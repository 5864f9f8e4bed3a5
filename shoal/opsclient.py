"""An operator's client of the topic API: one request, one reply (after a check, for an op
that needs a deployer or an admin).

The CLI's operator commands are built on :func:`call`; anything they do can
be done with ``mosquitto_pub`` and ``mosquitto_sub`` too (``docs/topics.md``
shows how). Each op is published on its own request channel
(:func:`otaproto.topics.op_request`: ``req``, ``write`` or ``admin``), the
one the broker lets only roles that may use the op publish on; the
orchestrator refuses an op on any other channel. The op -> channel table
comes from ``otaproto``, so this client needs nothing of the orchestrator.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otaio.mqtt import MqttClient, MqttSettings
from otaproto import cbor, fleet
from otaproto import topics as t
from otaproto.errors import InvalidInput, LinkBroken


@dataclass(frozen=True)
class OperatorLogin:
    """How an operator reaches the API."""

    host: str
    port: int
    operator: str
    password: str
    tls_ca_file: Path | None = None


class OperatorError(InvalidInput):
    """The orchestrator refused the request; the message is its one-line reason."""


async def call_async(
    login: OperatorLogin, op: str, args: dict[str, Any], timeout_s: float = 30.0
) -> Any:
    """Send one request on the op's channel and wait for its reply.

    An op of the ``write`` or ``admin`` channel is preceded by
    ``operators.check`` on ``req``: the broker drops a request on a channel
    the account's role lacks, and that request would get no reply, while the
    check gets the orchestrator's clear refusal. Raises OperatorError (a
    refusal), LinkBroken (no reply within ``timeout_s``).
    """
    session = secrets.token_hex(8)
    settings = MqttSettings(
        host=login.host, port=login.port, client_id=f"shoal-op-{login.operator}-{session}",
        username=login.operator, password=login.password, tls_ca_file=login.tls_ca_file,
    )  # fmt: skip
    async with MqttClient(settings) as client:
        await client.subscribe(t.operator_response(login.operator))
        if t.op_channel(op) is t.Channel.READ:
            return await _request(client, login, session, op, args, timeout_s)
        check = {"op": op}
        await _request(client, login, f"{session}-check", "operators.check", check, timeout_s)
        dropped = (
            f"; the orchestrator said {login.operator} may use {op}: if this persists, the "
            f"broker may be dropping {t.op_request(login.operator, op)} (is its ACL current?)"
        )
        return await _request(client, login, session, op, args, timeout_s, dropped)


async def _request(
    client: MqttClient, login: OperatorLogin, request_id: str, op: str, args: dict[str, Any],
    timeout_s: float, hint: str = "",
) -> Any:  # fmt: skip
    """Publish one request on ``op``'s channel; its result. Raises OperatorError, LinkBroken
    (``hint`` ends the message of a timeout)."""
    body = cbor.encode({"id": request_id, "op": op, "args": args})
    await client.publish(t.op_request(login.operator, op), body)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in client.messages():
                reply = fleet.decode_response(message.payload)
                if reply.get("id") != request_id:
                    continue
                if not reply["ok"]:
                    raise OperatorError(str(reply.get("error", "refused")))
                return reply.get("result")
    except TimeoutError as exc:
        raise LinkBroken(f"no reply to {op} within {timeout_s:g} s{hint}") from exc
    raise LinkBroken("connection closed before the reply")


def call(
    login: OperatorLogin, op: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0
) -> Any:
    """:func:`call_async` for the CLI."""
    return asyncio.run(call_async(login, op, args or {}, timeout_s))
