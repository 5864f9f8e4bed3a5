"""What Shoal's two MQTT clients share, with no MQTT library behind it.

:mod:`otaio.mqtt` (paho, for services) and :mod:`otaio.mqtt_lite` (asyncio
streams, for simulators with thousands of connections) raise the same errors
and hand out the same messages through the same stream, so code written
against one runs against the other.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from otaproto.errors import LinkBroken, LinkError, ShoalError


class AuthRefused(LinkBroken):
    """The broker refused our credentials (CONNACK 4 or 5); retrying with them is useless.

    A :class:`LinkBroken`, so code that only reconnects on broken links still
    stops here if it catches this first (an unknown or decommissioned device).
    """


class SubscribeRefused(ShoalError):
    """The broker answered a SUBSCRIBE with 0x80: its policy said no.

    Not a :class:`LinkError` (the connection stays up and usable), not
    :class:`InvalidInput` (no bytes were bad) and not :class:`UsageError` (the
    same filter may be fine for another account or another broker).
    """


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming application message.

    ``retain`` is whatever the broker set; Shoal ignores it (the embedded
    broker sets it on messages queued while a persistent session was offline).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: The packet id, for acknowledging later (``manual_ack``); not part of equality.
    mid: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Put on a client's queue when the link ends; every reader then raises ``error``."""

    error: LinkError


class MessageStream:
    """An async iterator over a client's queue; cancelling one ``__anext__`` loses nothing."""

    def __init__(self, queue: asyncio.Queue[Message | StreamEnd]) -> None:
        self._queue = queue

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if isinstance(item, StreamEnd):
            self._queue.put_nowait(item)  # every reader, now or later, ends the same way
            raise fresh(item.error)
        return item


def fresh(error: LinkError) -> LinkError:
    """A new exception of the same type and message, so that no two raises share a traceback."""
    return type(error)(str(error))
