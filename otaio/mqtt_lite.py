"""A small asyncio MQTT 3.1.1 client for fleet simulators: thousands of connections, one thread.

Why it exists: :mod:`otaio.mqtt` drives paho, which runs one thread per
connection and whose loop uses ``select()``, failing silently once a socket
number reaches 1024 (field notes §9). A simulator of 1,000 gateways in one
process needs neither. Services keep using :mod:`otaio.mqtt`; this client is
for simulators, benchmarks and tests. It never imports paho.

Rules:

* Two layers, after h11. The codec does no I/O: ``encode_*`` functions
  return the bytes of a packet, :class:`PacketDecoder` takes received bytes
  and returns whole packets, and the ``parse_*`` functions read their
  bodies. :class:`LiteClient` is a thin loop around them on asyncio streams.
* The subset of MQTT 3.1.1 Shoal uses: CONNECT (username and password, a
  will that is QoS 1 and never retained, keepalive, clean session),
  SUBSCRIBE of one filter, PUBLISH with QoS 0 or 1 in both directions,
  PUBACK, PINGREQ/PINGRESP, DISCONNECT. No QoS 2, no retained publishes
  (Shoal never uses them, see :mod:`otaproto.topics`), no UNSUBSCRIBE, no
  TLS, and no re-sending of unacknowledged publishes: like
  :mod:`otaio.mqtt`, a client connects once, a link that drops ends it, and
  the caller makes a new one (Shoal does not trust the broker to carry state
  across a reconnect anyway).
* Bounded, in one place (:class:`LiteSettings`): a packet whose remaining
  length is over ``max_packet_bytes`` is refused from its fixed header,
  before its body is buffered; the remaining length has at most four bytes
  [MQTT-2.2.3]. Unread incoming messages are bounded by
  ``max_queued_messages``: a consumer that falls that far behind is a broken
  link, not a reason to drop messages silently (the message that found the
  queue full is not acknowledged). QoS 1 publishes waiting for
  their PUBACK are bounded by :data:`MAX_PENDING_PUBLISHES`; more wait for a
  slot, so a packet id is never reused while in flight.
* ``publish`` with QoS 1 returns when the broker's PUBACK arrives; QoS 0
  when the bytes are handed to the transport. One future per packet id,
  always removed in ``finally``. An incoming QoS 1 message is acknowledged
  when it is queued for the consumer, before the consumer has seen it (what
  paho does too): a simulator that crashes loses it, as a gateway would.
* Keepalive: a PINGREQ every ``keepalive_s``; when the previous one is still
  unanswered by then, the link is broken.
* Errors: :class:`AuthRefused` (CONNACK 4 or 5) and :class:`LinkBroken`
  from outside (refused, timeout, reset, end of stream, a broker that breaks
  the protocol or a limit); :class:`LinkClosed` after our own ``close`` or
  ``abort``; :class:`SubscribeRefused` for a SUBACK of 0x80; UsageError for
  calls that can never work. The first reason a link ended is what every
  later call raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

from otaio.mqtt_common import AuthRefused as AuthRefused
from otaio.mqtt_common import Message as Message
from otaio.mqtt_common import MessageStream, StreamEnd, fresh
from otaio.mqtt_common import SubscribeRefused as SubscribeRefused
from otaproto.errors import (
    LimitExceeded,
    LinkBroken,
    LinkClosed,
    LinkError,
    MalformedError,
    UsageError,
)

log = logging.getLogger(__name__)

# Control packet types (MQTT 3.1.1 §2.2.1).
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
PUBREC, PUBREL, PUBCOMP = 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

#: Publishes waiting for their PUBACK at once; more wait for a slot (packet ids are 16 bits).
MAX_PENDING_PUBLISHES = 10_000
#: Largest remaining length MQTT can express (four length bytes) [MQTT-2.2.3].
MQTT_MAX_REMAINING_BYTES = 268_435_455
#: Default bound of one incoming packet: a block message (64 KiB of data) fits with room.
DEFAULT_MAX_PACKET_BYTES = 256 * 1024
#: Default bound of unread incoming messages (what otaio.mqtt allows too).
DEFAULT_MAX_QUEUED_MESSAGES = 10_000
_SUBACK_FAILURE = 0x80
_BAD_CREDENTIALS, _NOT_AUTHORIZED = 4, 5
_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_READ_CHUNK_BYTES = 64 * 1024
_CLOSE_TIMEOUT_S = 5.0
_MAX_STRING_BYTES = 65_535


# --- the codec: bytes in, packets out, no I/O ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """One control packet as it came off the wire: type, the four flag bits, the body."""

    type: int
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class IncomingPublish:
    """A parsed PUBLISH: the message and, for QoS 1, the packet id to acknowledge."""

    message: Message
    packet_id: int | None


def _string(text: str, what: str) -> bytes:
    """An MQTT UTF-8 string (two length bytes, then the text). Raises UsageError."""
    try:
        data = text.encode()
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} is not valid UTF-8") from exc
    if len(data) > _MAX_STRING_BYTES or "\0" in text:
        raise UsageError(f"{what} is over {_MAX_STRING_BYTES} bytes or contains NUL")
    return len(data).to_bytes(2, "big") + data


def _binary(data: bytes, what: str) -> bytes:
    if len(data) > _MAX_STRING_BYTES:
        raise UsageError(f"{what} is {len(data)} bytes, over {_MAX_STRING_BYTES}")
    return len(data).to_bytes(2, "big") + data


def encode_packet(packet_type: int, flags: int, body: bytes) -> bytes:
    """The fixed header (type, flags, remaining length) and ``body``. Raises UsageError."""
    length = len(body)
    if length > MQTT_MAX_REMAINING_BYTES:
        raise UsageError(f"an MQTT packet of {length} bytes is over {MQTT_MAX_REMAINING_BYTES}")
    header = bytearray([(packet_type << 4) | flags])
    while True:
        digit, length = length & 0x7F, length >> 7
        header.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(header) + body


def encode_connect(
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    keepalive_s: int,
    clean_session: bool,
    will_topic: str | None,
    will_payload: bytes,
) -> bytes:
    """CONNECT (MQTT 3.1.1 §3.1); the will is QoS 1 and never retained. Raises UsageError."""
    flags = 0x02 if clean_session else 0
    payload = _string(client_id, "client id")
    if will_topic is not None:
        flags |= 0x04 | (1 << 3)
        payload += _string(will_topic, "will topic") + _binary(will_payload, "will payload")
    if username is not None:
        flags |= 0x80
        payload += _string(username, "username")
    if password is not None:
        flags |= 0x40
        try:
            payload += _binary(password.encode(), "password")
        except UnicodeEncodeError as exc:
            raise UsageError("password is not valid UTF-8") from exc
    header = _string("MQTT", "protocol") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big")
    return encode_packet(CONNECT, 0, header + payload)


def encode_publish(topic: str, payload: bytes, qos: int, packet_id: int | None) -> bytes:
    """PUBLISH (never retained, never DUP). Raises UsageError for a bad topic or QoS."""
    check_topic(topic)
    if qos == 0:
        return encode_packet(PUBLISH, 0, _string(topic, "topic") + payload)
    if qos != 1 or packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise UsageError(f"cannot publish with QoS {qos} and packet id {packet_id}")
    body = _string(topic, "topic") + packet_id.to_bytes(2, "big") + payload
    return encode_packet(PUBLISH, 1 << 1, body)


def encode_subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """SUBSCRIBE of one filter (the fixed header flags are 0b0010 [MQTT-3.8.1-1]).

    Raises UsageError for an empty filter or one MQTT cannot carry.
    """
    if not topic_filter:
        raise UsageError("an MQTT topic filter cannot be empty")
    body = packet_id.to_bytes(2, "big") + _string(topic_filter, "topic filter") + bytes([qos])
    return encode_packet(SUBSCRIBE, 0x2, body)


def encode_puback(packet_id: int) -> bytes:
    """PUBACK of an incoming QoS 1 PUBLISH (the ack a broker waits for before it forgets it)."""
    return encode_packet(PUBACK, 0, packet_id.to_bytes(2, "big"))


PINGREQ_BYTES = encode_packet(PINGREQ, 0, b"")
DISCONNECT_BYTES = encode_packet(DISCONNECT, 0, b"")


def check_topic(topic: str) -> None:
    """Refuse a topic one may not publish to: empty, a wildcard, NUL. Raises UsageError."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise UsageError(f"cannot publish to MQTT topic {topic[:200]!r}")


class PacketDecoder:
    """Whole packets out of a byte stream, each bounded before its body is buffered.

    ``feed`` the bytes as they arrive, then take packets with ``next_packet``
    until it says None (more data needed). Raises LimitExceeded for a packet
    over ``max_packet_bytes`` and MalformedError for a remaining length longer
    than four bytes; after either, the stream cannot be read any further.
    The constructor raises UsageError for a bound MQTT cannot express.
    """

    def __init__(self, max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES) -> None:
        if not 0 < max_packet_bytes <= MQTT_MAX_REMAINING_BYTES:
            raise UsageError(f"max_packet_bytes must be 1..{MQTT_MAX_REMAINING_BYTES}")
        self.max_packet_bytes = max_packet_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as a packet."""
        return len(self._buffer)

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None until more bytes arrive. Raises the family above."""
        buffer = self._buffer
        length, shift, at = 0, 0, 1
        while True:
            if at >= len(buffer):
                return None
            digit = buffer[at]
            length |= (digit & 0x7F) << shift
            at += 1
            if not digit & 0x80:
                break
            shift += 7
            if at > 4:
                raise MalformedError("MQTT remaining length", "longer than four bytes")
        if length > self.max_packet_bytes:
            raise LimitExceeded("MQTT packet", length, self.max_packet_bytes)
        end = at + length
        if len(buffer) < end:
            return None
        first = buffer[0]
        packet = Packet(first >> 4, first & 0x0F, bytes(buffer[at:end]))
        del buffer[:end]
        return packet


def parse_connack(packet: Packet) -> int:
    """The CONNACK return code. Raises MalformedError."""
    if packet.type != CONNACK or len(packet.body) != 2:
        raise MalformedError("MQTT CONNACK", f"type {packet.type}, {len(packet.body)} bytes")
    return packet.body[1]


def parse_packet_id(packet: Packet, what: str) -> int:
    """The packet id of a PUBACK. Raises MalformedError."""
    if len(packet.body) != 2:
        raise MalformedError(what, f"{len(packet.body)} bytes, not 2")
    return int.from_bytes(packet.body, "big")


def parse_suback(packet: Packet) -> tuple[int, list[int]]:
    """The packet id and the granted QoS codes of a SUBACK. Raises MalformedError."""
    if len(packet.body) < 3:
        raise MalformedError("MQTT SUBACK", f"{len(packet.body)} bytes, fewer than 3")
    return int.from_bytes(packet.body[:2], "big"), list(packet.body[2:])


def parse_publish(packet: Packet) -> IncomingPublish:
    """An incoming PUBLISH of QoS 0 or 1. Raises MalformedError (QoS 2 included: never asked)."""
    qos, retain = (packet.flags >> 1) & 0x3, bool(packet.flags & 1)
    if qos > 1:
        raise MalformedError("MQTT PUBLISH", f"QoS {qos} (this client subscribes with 0 or 1)")
    body = packet.body
    if len(body) < 2:
        raise MalformedError("MQTT PUBLISH", "too short for its topic length")
    topic_end = 2 + int.from_bytes(body[:2], "big")
    id_end = topic_end + (2 if qos else 0)
    if len(body) < id_end:
        raise MalformedError("MQTT PUBLISH", "topic or packet id past the end of the packet")
    try:
        topic = body[2:topic_end].decode()
    except UnicodeDecodeError as exc:
        raise MalformedError("MQTT PUBLISH topic", "not UTF-8") from exc
    packet_id = int.from_bytes(body[topic_end:id_end], "big") if qos else None
    return IncomingPublish(Message(topic, body[id_end:], qos, retain), packet_id)


# --- the client: a thin loop on asyncio streams ---------------------------------------------


@dataclass(frozen=True)
class LiteSettings:
    """Where and as whom to connect, and the client's bounds. Raises UsageError for values
    that can never work."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 60
    #: Published by the broker (QoS 1, never retained) when we vanish without DISCONNECT.
    will_topic: str | None = None
    will_payload: bytes = b""
    clean_session: bool = True
    connect_timeout_s: float = 10.0
    #: Largest incoming packet (its remaining length); a larger one breaks the link.
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    #: Unread incoming messages before the consumer counts as gone (the link is broken).
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES

    def __post_init__(self) -> None:
        if not self.host:
            raise UsageError("MQTT host is empty")
        if not 1 <= self.port <= 65535:
            raise UsageError(f"MQTT port {self.port} is not in 1..65535")
        if not self.client_id:
            raise UsageError("MQTT client id is empty (Shoal always names its clients)")
        if self.password is not None and self.username is None:
            raise UsageError("an MQTT password needs a username (MQTT 3.1.1 [MQTT-3.1.2-22])")
        if not 0 <= self.keepalive_s <= 65535:
            raise UsageError(f"MQTT keepalive {self.keepalive_s} s is not in 0..65535")
        if not self.connect_timeout_s > 0:
            raise UsageError(f"MQTT connect timeout {self.connect_timeout_s} s is not positive")
        if not 0 < self.max_packet_bytes <= MQTT_MAX_REMAINING_BYTES:
            raise UsageError(f"max_packet_bytes must be 1..{MQTT_MAX_REMAINING_BYTES}")
        if self.max_queued_messages <= 0:
            raise UsageError("max_queued_messages must be positive")
        if self.will_topic is not None:
            check_topic(self.will_topic)


class LiteClient:
    """One MQTT 3.1.1 connection on asyncio streams, used as ``async with``; see the rules."""

    def __init__(self, settings: LiteSettings) -> None:
        self.settings = settings
        self._where = f"{settings.host}:{settings.port}"
        self._id = settings.client_id
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_outstanding = False
        self._pings: list[asyncio.Future[None]] = []
        self._decoder = PacketDecoder(settings.max_packet_bytes)
        # Bounded by hand (max_queued_messages) so that the end marker always fits.
        self._incoming: asyncio.Queue[Message | StreamEnd] = asyncio.Queue()
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._subscribes: dict[int, asyncio.Future[list[int]]] = {}
        self._publish_slots = asyncio.Semaphore(MAX_PENDING_PUBLISHES)
        self._packet_ids = itertools.cycle(range(1, 0x10000))
        self._failure: LinkError | None = None
        self._entered = False
        self._closing = False

    # --- connection ---------------------------------------------------------------------

    async def __aenter__(self) -> LiteClient:
        """Connect and wait for the CONNACK.

        Raises AuthRefused (CONNACK 4/5), LinkBroken (no CONNACK within
        ``connect_timeout_s``, connection refused, other CONNACK refusals, a
        broker that answers with something else), UsageError (entered twice,
        a client id or credentials MQTT cannot carry).
        """
        if self._entered:
            raise UsageError("a LiteClient connects once; make a new one to reconnect")
        self._entered = True
        s = self.settings
        connect = encode_connect(
            s.client_id, username=s.username, password=s.password, keepalive_s=s.keepalive_s,
            clean_session=s.clean_session, will_topic=s.will_topic, will_payload=s.will_payload,
        )  # fmt: skip
        try:
            async with asyncio.timeout(s.connect_timeout_s):
                self._reader, self._writer = await asyncio.open_connection(s.host, s.port)
                self._writer.write(connect)
                packet = await self._read_packet()
        except TimeoutError as exc:
            timeout_s = s.connect_timeout_s
            self._give_up(
                LinkBroken(f"no CONNACK from MQTT broker {self._where} within {timeout_s:g} s")
            )
            raise fresh(self._failure_or_closed()) from exc
        except OSError as exc:
            why = _reason(exc)
            self._give_up(LinkBroken(f"cannot connect to MQTT broker {self._where}: {why}"))
            raise fresh(self._failure_or_closed()) from exc
        except LinkError as exc:
            self._give_up(exc)
            raise
        except BaseException:
            self._give_up(LinkClosed(f"connecting to MQTT broker {self._where} was abandoned"))
            raise
        try:
            code = parse_connack(packet)
        except MalformedError as exc:
            self._give_up(LinkBroken(f"MQTT broker {self._where} answered CONNECT badly: {exc}"))
            raise fresh(self._failure_or_closed()) from exc
        if code != 0:
            why = _CONNACK_REASONS.get(code, f"return code {code}")
            user = s.username
            text = f"MQTT broker {self._where} refused the connection of {user!r}: {why}"
            refusal = AuthRefused(text) if code in (_BAD_CREDENTIALS, _NOT_AUTHORIZED) else None
            self._give_up(refusal or LinkBroken(text))
            raise fresh(self._failure_or_closed())
        self._reader_task = asyncio.create_task(
            self._read_loop(), name=f"mqtt-lite-reader-{s.client_id}"
        )
        self._arm_keepalive()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Disconnect cleanly: the broker drops our will."""
        await self.close()

    async def close(self) -> None:
        """Send DISCONNECT and close; idempotent. Later calls raise LinkClosed (or the
        LinkBroken that ended the link before)."""
        if self._closing or self._writer is None:
            self._closing = True
            return
        self._closing = True
        writer = self._writer
        if self._failure is None:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(DISCONNECT_BYTES)
        self._fail(LinkClosed(f"MQTT connection to {self._where} was closed by us"))
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await writer.wait_closed()
        await self._stop_reader()

    async def abort(self) -> None:
        """End the connection without DISCONNECT, as a crash would: the broker publishes the
        will. Later calls raise LinkClosed."""
        if self._closing or self._writer is None:
            self._closing = True
            return
        self._closing = True
        self._fail(LinkClosed(f"MQTT connection to {self._where} was aborted by us"))
        self._writer.transport.abort()
        await self._stop_reader()

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the end of the link."""
        return self._reader_task is not None and self._failure is None

    # --- traffic ------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, timeout_s: float = 10.0
    ) -> None:
        """Publish ``payload`` to ``topic`` (never retained).

        QoS 1 returns when the broker acknowledged it (both brokers acknowledge
        a publish their ACL refuses, and drop it); QoS 0 once written. Raises
        LinkBroken (no PUBACK within ``timeout_s``, link lost), LinkClosed
        (after ``close``), UsageError (bad topic, QoS 2, before ``async with``).
        """
        if qos not in (0, 1):
            raise UsageError(f"this MQTT client publishes with QoS 0 or 1, not {qos}")
        check_topic(topic)
        writer = self._usable()
        if qos == 0:
            writer.write(encode_publish(topic, payload, 0, None))
            await self._drain(writer)
            return
        try:
            async with asyncio.timeout(timeout_s), self._publish_slots:
                writer = self._usable()
                packet_id = self._free_id()
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._publishes[packet_id] = done
                try:
                    writer.write(encode_publish(topic, payload, 1, packet_id))
                    await self._drain(writer)
                    await done
                finally:
                    self._publishes.pop(packet_id, None)
        except TimeoutError as exc:
            raise LinkBroken(
                f"MQTT broker {self._where} did not acknowledge a publish to {topic[:200]!r} "
                f"within {timeout_s:g} s"
            ) from exc

    async def subscribe(self, topic_filter: str, qos: int = 1, timeout_s: float = 10.0) -> int:
        """Subscribe and return the QoS the broker granted.

        Raises SubscribeRefused (SUBACK 0x80), LinkBroken (no SUBACK within
        ``timeout_s``, link lost), LinkClosed, UsageError (empty filter, QoS
        other than 0 or 1).
        """
        if qos not in (0, 1):
            raise UsageError(f"this MQTT client subscribes with QoS 0 or 1, not {qos}")
        writer = self._usable()
        packet_id = self._free_id()
        packet = encode_subscribe(packet_id, topic_filter, qos)
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subscribes[packet_id] = done
        try:
            async with asyncio.timeout(timeout_s):
                writer.write(packet)
                await self._drain(writer)
                codes = await done
        except TimeoutError as exc:
            raise LinkBroken(
                f"MQTT broker {self._where} did not answer a subscribe to "
                f"{topic_filter[:200]!r} within {timeout_s:g} s"
            ) from exc
        finally:
            self._subscribes.pop(packet_id, None)
        granted = codes[0] if codes else _SUBACK_FAILURE
        if granted >= _SUBACK_FAILURE:
            raise SubscribeRefused(
                f"MQTT broker {self._where} refused the subscription of "
                f"{self.settings.username!r} to {topic_filter[:200]!r}"
            )
        return granted

    async def ping(self, timeout_s: float = 10.0) -> None:
        """Send PINGREQ and wait for PINGRESP: is the broker still answering?

        Raises LinkBroken (no PINGRESP within ``timeout_s``, link lost),
        LinkClosed, UsageError (before ``async with``).
        """
        writer = self._usable()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings.append(done)
        try:
            async with asyncio.timeout(timeout_s):
                writer.write(PINGREQ_BYTES)
                await self._drain(writer)
                await done
        except TimeoutError as exc:
            raise LinkBroken(
                f"MQTT broker {self._where} did not answer PINGREQ within {timeout_s:g} s"
            ) from exc
        finally:
            with contextlib.suppress(ValueError):
                self._pings.remove(done)

    def messages(self) -> AsyncIterator[Message]:
        """Every incoming message, in arrival order, across all subscriptions.

        Ends by raising LinkBroken when the link drops (after the messages that
        arrived before) and LinkClosed after ``close``. Raises UsageError before
        ``async with``.
        """
        if not self._entered:
            raise UsageError("enter the LiteClient with 'async with' before reading messages")
        return MessageStream(self._incoming)

    # --- the reading side -----------------------------------------------------------------

    async def _read_packet(self) -> Packet:
        """The next packet (used for the CONNACK only). Raises LinkBroken."""
        assert self._reader is not None
        while True:
            try:
                packet = self._decoder.next_packet()
            except (MalformedError, LimitExceeded) as exc:
                raise LinkBroken(f"MQTT broker {self._where} sent a bad packet: {exc}") from exc
            if packet is not None:
                return packet
            data = await self._reader.read(_READ_CHUNK_BYTES)
            if not data:
                raise LinkBroken(f"MQTT broker {self._where} closed the connection before CONNACK")
            self._decoder.feed(data)

    async def _read_loop(self) -> None:
        """Read, decode and dispatch until the stream ends or breaks; records why it ended."""
        assert self._reader is not None
        reader = self._reader
        try:
            while True:
                while (packet := self._decoder.next_packet()) is not None:
                    self._dispatch(packet)
                    if self._failure is not None:
                        return
                data = await reader.read(_READ_CHUNK_BYTES)
                if not data:
                    self._fail(LinkBroken(f"MQTT broker {self._where} closed the connection"))
                    return
                self._decoder.feed(data)
        except (MalformedError, LimitExceeded) as exc:
            self._fail(LinkBroken(f"MQTT broker {self._where} sent a bad packet: {exc}"))
        except OSError as exc:
            self._fail(LinkBroken(f"MQTT connection to {self._where} was lost: {_reason(exc)}"))
        except Exception as exc:  # a bug here must still end the link, and say so
            log.exception("MQTT client %s: internal error reading from %s", self._id, self._where)
            self._fail(
                LinkBroken(f"MQTT connection to {self._where} ended: internal error {exc!r}")
            )
        finally:
            if self._failure is None:  # cancelled: close() or abort() recorded why already
                self._fail(LinkClosed(f"MQTT connection to {self._where} was closed by us"))
            if self._writer is not None and not self._closing:
                self._writer.transport.abort()

    def _dispatch(self, packet: Packet) -> None:
        """One packet from the broker. Raises MalformedError for one that breaks the protocol."""
        kind = packet.type
        if kind == PUBLISH:
            incoming = parse_publish(packet)
            if self._incoming.qsize() >= self.settings.max_queued_messages:
                # Not acknowledged: a broker that keeps our session delivers it again.
                self._fail(
                    LinkBroken(
                        f"more than {self.settings.max_queued_messages} unread MQTT messages "
                        f"from {self._where}: the consumer fell behind"
                    )
                )
                return
            self._incoming.put_nowait(incoming.message)
            if incoming.packet_id is not None and self._writer is not None:
                self._writer.write(encode_puback(incoming.packet_id))
        elif kind == PUBACK:
            waiter = self._publishes.get(parse_packet_id(packet, "MQTT PUBACK"))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == SUBACK:
            packet_id, codes = parse_suback(packet)
            suback = self._subscribes.get(packet_id)
            if suback is not None and not suback.done():
                suback.set_result(codes)
        elif kind == PINGRESP:
            self._ping_outstanding = False
            for ping in self._pings:
                if not ping.done():
                    ping.set_result(None)
        else:
            raise MalformedError("MQTT packet", f"type {kind} is not one a broker sends here")

    # --- keepalive ------------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self.settings.keepalive_s and self._failure is None:
            loop = asyncio.get_running_loop()
            self._keepalive = loop.call_later(self.settings.keepalive_s, self._keepalive_due)

    def _keepalive_due(self) -> None:
        if self._failure is not None or self._writer is None:
            return
        if self._ping_outstanding:
            self._fail(
                LinkBroken(
                    f"MQTT broker {self._where} did not answer PINGREQ within "
                    f"{self.settings.keepalive_s} s"
                )
            )
            self._writer.transport.abort()
            return
        self._ping_outstanding = True
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.write(PINGREQ_BYTES)
        self._arm_keepalive()

    # --- helpers ------------------------------------------------------------------------

    def _usable(self) -> asyncio.StreamWriter:
        if not self._entered:
            raise UsageError("enter the LiteClient with 'async with' before using it")
        if self._failure is not None:
            raise fresh(self._failure)
        assert self._writer is not None
        return self._writer

    def _free_id(self) -> int:
        """A packet id not in flight (publishes and subscribes share one id space)."""
        for packet_id in self._packet_ids:
            if packet_id not in self._publishes and packet_id not in self._subscribes:
                return packet_id
        raise UsageError("no free MQTT packet id")  # pragma: no cover - the cycle is endless

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Wait while the transport's buffer is full. Raises the link's LinkError."""
        try:
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            self._fail(LinkBroken(f"MQTT connection to {self._where} was lost: {_reason(exc)}"))
            raise fresh(self._failure_or_closed()) from exc

    def _fail(self, error: LinkError) -> None:
        """Record why the link ended (the first reason wins) and release every waiter."""
        if self._failure is None:
            self._failure = error
            self._incoming.put_nowait(StreamEnd(error))
            if self._keepalive is not None:
                self._keepalive.cancel()
        failure = self._failure
        waiters: list[asyncio.Future[None]] = [*self._publishes.values(), *self._pings]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(fresh(failure))
        for suback in self._subscribes.values():
            if not suback.done():
                suback.set_exception(fresh(failure))

    def _give_up(self, error: LinkError) -> None:
        """A connect that failed: record why and drop the socket, if any."""
        self._fail(error)
        self._closing = True
        if self._writer is not None:
            self._writer.transport.abort()

    def _failure_or_closed(self) -> LinkError:
        return self._failure or LinkClosed(f"MQTT connection to {self._where} was closed by us")

    async def _stop_reader(self) -> None:
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:160]
