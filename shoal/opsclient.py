"""An operator's client of the topic API: one request, one reply.

The CLI commands ``devices``, ``artifact upload`` and ``deploy`` are built on
:func:`call`; anything they do can be done with ``mosquitto_pub`` and
``mosquitto_sub`` too (``docs/topics.md`` shows how).
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
    """Send one request and wait for its reply. Raises OperatorError, LinkBroken."""
    request_id = secrets.token_hex(8)
    settings = MqttSettings(
        host=login.host, port=login.port, client_id=f"shoal-op-{login.operator}-{request_id}",
        username=login.operator, password=login.password, tls_ca_file=login.tls_ca_file,
    )  # fmt: skip
    async with MqttClient(settings) as client:
        await client.subscribe(t.operator_response(login.operator))
        body = cbor.encode({"id": request_id, "op": op, "args": args})
        await client.publish(t.operator_request(login.operator), body)
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
            raise LinkBroken(f"no reply from the orchestrator within {timeout_s:g} s") from exc
    raise LinkBroken("connection closed before the reply")


def call(
    login: OperatorLogin, op: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0
) -> Any:
    """:func:`call_async` for the CLI."""
    return asyncio.run(call_async(login, op, args or {}, timeout_s))
