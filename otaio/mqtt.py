"""The MQTT client: the one module that imports paho.

Rules:

* One :class:`MqttClient` is one MQTT 3.1.1 connection, used as ``async with``.
  It connects once and never reconnects on its own (paho's auto-reconnect is
  off): when the link drops, every waiter and :meth:`MqttClient.messages` end
  with :class:`LinkBroken`, and the caller reconnects by making a *new*
  client. Shoal does not trust the broker to carry state across a reconnect
  anyway (architecture: "End-to-end, not broker-trusting"): a gateway says
  hello and asks for its pending work, the orchestrator re-sends what was not
  acknowledged.
* paho runs its network loop on its own thread (``loop_start``; paho names it
  ``paho-mqtt-client-<client id>``). Every paho callback is handed to the
  event loop with ``call_soon_threadsafe`` and does nothing else on paho's
  thread, so all state of this module lives on the event loop thread and a
  callback can never run before the caller has registered its waiter.
  Incoming messages are handed over in bursts: paho's thread appends them to
  a deque and schedules one hand-over for as many as arrive before it runs
  (a burst of thousands would otherwise cost a wake-up of the loop each).
* ``publish`` with QoS 1 returns when the broker's PUBACK arrives (QoS 0: when
  paho has written the packet). One future per packet id, always removed
  when it is done. :meth:`MqttClient.start_publish` returns as soon as paho
  has the packet, with that future, for a sender that keeps many publishes
  in flight (the orchestrator's commands to a fleet); publishes started one
  after another go out in that order. Nothing is ever published retained (an
  amqtt bug delivers retained messages past topic ACLs; field notes §9): the
  will is QoS 1 and never retained either.
* ``subscribe`` returns the granted QoS; a SUBACK of 0x80 raises
  :class:`SubscribeRefused`. Note that mosquitto's ACL file does not check
  subscriptions at all (it grants them and filters at delivery), so a granted
  subscription does not mean anything will be delivered on it.
* Incoming messages go to one queue, in arrival order, bounded by
  :data:`MAX_QUEUED_MESSAGES`. A consumer that falls that far behind is a
  broken link, not a reason to drop messages silently: the client disconnects,
  the consumer reads what is queued and then :class:`LinkBroken`.
  :meth:`MqttClient.queued_messages` hands out what has already arrived
  without waiting, for a consumer that handles messages in batches.
* Errors: :class:`AuthRefused` (CONNACK 4 or 5) and :class:`LinkBroken`
  (timeout, refused, DNS, TLS, dropped) from outside; :class:`LinkClosed`
  after our own ``__aexit__``; :class:`UsageError` for calls that can never
  work (bad topic, unknown transport, use before ``async with``).
* Limits of paho (field notes §9): its threaded loop uses ``select()``, which
  fails silently once a socket number reaches 1024 — do not run more than
  about 1000 clients in one process (fleet simulators: several processes).
  paho also loses QoS>0 publishes silently beyond 65,535 in flight; this
  module keeps at most :data:`MAX_PENDING_PUBLISHES` waiting. paho's own
  window of QoS 1 publishes on the wire stays at its default of 20: paho
  queues the rest and, on every PUBACK, walks its messages until the window is
  full again, so a window as large as a burst (10,000 commands) makes that
  walk cover every message in flight, and the burst quadratic (measured:
  ``shoal bench fanout`` dispatched 1,400 a second instead of 2,700).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from otaio.mqtt_common import AuthRefused as AuthRefused
from otaio.mqtt_common import Message as Message
from otaio.mqtt_common import MessageStream, StreamEnd, fresh
from otaio.mqtt_common import SubscribeRefused as SubscribeRefused
from otaproto.errors import LinkBroken, LinkClosed, LinkError, UsageError

log = logging.getLogger(__name__)


class _QuietCleanExit(logging.Filter):
    """Drops the error paho 2.2's threaded loop logs after every clean DISCONNECT.

    Its loop runs once more after it closed the socket itself and reports the
    missing socket as an error; nothing is wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected.")


_paho_log = log.getChild("paho")
_paho_log.addFilter(_QuietCleanExit())

#: Unread incoming messages one client holds before it gives up on its consumer.
MAX_QUEUED_MESSAGES = 10_000
#: Publishes waiting for their PUBACK at once; more wait for a slot (paho breaks past 65,535).
MAX_PENDING_PUBLISHES = 10_000
TRANSPORTS = ("tcp", "websockets")

_CLOSE_TIMEOUT_S = 5.0
# paho reports CONNACK 4 and 5 of MQTT 3.1.1 as these MQTT 5 reason codes.
_BAD_CREDENTIALS = 134  # "Bad user name or password"
_NOT_AUTHORIZED = 135  # "Not authorized"
_SUBACK_FAILURE = 0x80


@dataclass(frozen=True)
class MqttSettings:
    """Where and as whom to connect. Raises UsageError for values that can never work."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Enables TLS and verifies the broker's certificate (and host name) against this CA.
    tls_ca_file: Path | None = None
    keepalive_s: int = 30
    #: Published by the broker (QoS 1, never retained) when we vanish without DISCONNECT.
    will_topic: str | None = None
    will_payload: bytes = b""
    clean_session: bool = True
    connect_timeout_s: float = 10.0
    #: "tcp" or "websockets" (path ``/mqtt``).
    transport: str = "tcp"
    #: Acknowledge a QoS 1 message only when the consumer calls
    #: :meth:`MqttClient.ack`, after it has stored what the message caused. A
    #: message the consumer never finished is then sent again by the broker
    #: (mosquitto: also after a reconnect, with a persistent session), and the
    #: broker's in-flight limit holds a fast sender back. Off: paho acknowledges
    #: on arrival.
    manual_ack: bool = False
    #: Unread messages held before the client gives up and disconnects. The
    #: orchestrator, which takes bursts of status reports from a whole fleet,
    #: raises it (about 200 bytes of memory each).
    max_queued_messages: int = MAX_QUEUED_MESSAGES

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
        if self.transport not in TRANSPORTS:
            raise UsageError(f"MQTT transport {self.transport!r} is not one of {TRANSPORTS}")


class MqttClient:
    """An asyncio MQTT 3.1.1 client over paho; see the module rules."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._where = f"{settings.host}:{settings.port}"
        self._paho: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_started = False
        self._connack: asyncio.Future[None] | None = None
        self._link_down = asyncio.Event()
        # Bounded by hand (MAX_QUEUED_MESSAGES) so that the end marker always fits.
        self._incoming: asyncio.Queue[Message | StreamEnd] = asyncio.Queue()
        # Written by paho's thread, emptied on the event loop (see the module rules).
        self._arrived: deque[Message] = deque()
        self._arrivals_handed_over = False
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._subscribes: dict[int, asyncio.Future[list[int]]] = {}
        self._publish_slots = asyncio.Semaphore(MAX_PENDING_PUBLISHES)
        #: Loop time of the last PUBACK: while the broker acknowledges publishes, a
        #: queued one is waiting its turn, not lost (see :meth:`start_publish`).
        self._last_puback_s = float("-inf")
        self._failure: LinkError | None = None
        self._connected = False
        self._closing = False

    # --- connection ---------------------------------------------------------------------

    async def __aenter__(self) -> MqttClient:
        """Connect and wait for the CONNACK.

        Raises AuthRefused (CONNACK 4/5), LinkBroken (no answer within
        ``connect_timeout_s``, connection refused, DNS or TLS failure, other
        CONNACK refusals), UsageError (entered twice, bad host).
        """
        if self._paho is not None:
            raise UsageError("an MqttClient connects once; make a new one to reconnect")
        self._loop = asyncio.get_running_loop()
        client = self._make_paho()
        self._paho = client
        self._connack = self._loop.create_future()
        connecting = self._in_thread(self._connect_blocking, "connect")
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await asyncio.shield(connecting)
                client.loop_start()
                self._thread_started = True
                await self._connack
        except BaseException as exc:
            error = self._connect_error(exc)
            if isinstance(error, LinkError):
                self._fail(error)
            else:
                self._fail(LinkClosed(f"connecting to MQTT broker {self._where} was abandoned"))
            await self._stop_paho(connecting)
            if error is exc:
                raise
            raise error from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Disconnect cleanly (the broker drops our will) and stop paho's thread."""
        await self.close()

    async def close(self) -> None:
        """What ``__aexit__`` does; idempotent. Later calls raise LinkClosed (or the
        LinkBroken that ended the link before)."""
        client = self._paho
        if client is None or self._closing:
            return
        self._closing = True
        if self._connected:
            client.disconnect()
            if not await _wait(self._link_down, _CLOSE_TIMEOUT_S):
                log.warning("MQTT broker %s did not take our DISCONNECT; dropping", self._where)
                _shutdown_socket(client.socket())
                await _wait(self._link_down, _CLOSE_TIMEOUT_S)
        await self._stop_paho(None)
        self._fail(LinkClosed(f"MQTT connection to {self._where} was closed by us"))

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the end of the link."""
        return self._connected and self._failure is None

    # --- traffic ------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, timeout_s: float = 10.0
    ) -> None:
        """Publish ``payload`` to ``topic`` (never retained).

        QoS 1 returns when the broker acknowledged it. Note that both brokers
        acknowledge a publish their ACL refuses and drop it (MQTT 3.1.1 has no
        way to say no). Raises LinkBroken (no PUBACK within ``timeout_s``, link
        lost), LinkClosed (after ``__aexit__``), UsageError (bad topic or QoS).
        """
        done = await self.start_publish(topic, payload, qos, timeout_s)
        await done

    async def start_publish(
        self, topic: str, payload: bytes, qos: int = 1, timeout_s: float = 10.0
    ) -> asyncio.Future[None]:
        """Hand a publish to paho and return at once, with a future for its acknowledgement.

        For a sender that keeps many publishes in flight: it waits only for a
        free slot when :data:`MAX_PENDING_PUBLISHES` are pending. Publishes
        started one after another go out in that order. The future is done
        when :meth:`publish` would return (the PUBACK, for QoS 1), or fails
        with LinkBroken (no PUBACK for it ``timeout_s`` after its start while
        none came for any publish in the last ``timeout_s`` either: a long
        queue draining through paho's small window is progress, not a lost
        link; or the link was lost) or LinkClosed; the caller must look at
        it (or its exception is logged as never retrieved). Raises, before anything is sent,
        LinkBroken or LinkClosed (no usable link, no free slot within
        ``timeout_s``) and UsageError (bad topic or QoS).
        """
        if qos not in (0, 1, 2):
            raise UsageError(f"MQTT QoS {qos} is not 0, 1 or 2")
        self._usable()
        loop = self._running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                await self._publish_slots.acquire()
        except TimeoutError as exc:
            raise LinkBroken(
                f"MQTT broker {self._where} acknowledged none of {MAX_PENDING_PUBLISHES} "
                f"pending publishes within {timeout_s} s"
            ) from exc
        try:
            client = self._usable()
            try:
                info = client.publish(topic, payload, qos=qos, retain=False)
            except ValueError as exc:
                raise UsageError(f"cannot publish to MQTT topic {topic!r}: {exc}") from exc
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise self._failure_or(f"cannot publish to {topic!r}", info.rc)
        except BaseException:
            self._publish_slots.release()
            raise
        done: asyncio.Future[None] = loop.create_future()
        self._publishes[info.mid] = done
        where = self._where

        timer: list[asyncio.TimerHandle] = []  # the one armed now

        def too_late() -> None:
            if done.done():
                return
            quiet_s = loop.time() - self._last_puback_s
            if quiet_s < timeout_s:  # others are being acknowledged: this one waits its turn
                timer[0] = loop.call_later(timeout_s - quiet_s, too_late)
                return
            done.set_exception(
                LinkBroken(
                    f"MQTT broker {where} acknowledged no publish for {timeout_s} s "
                    f"(one to {topic!r} waits)"
                )
            )

        timer.append(loop.call_later(timeout_s, too_late))

        def settled(_: asyncio.Future[None]) -> None:
            timer[0].cancel()
            if not done.cancelled() and done.exception() is None:
                self._last_puback_s = loop.time()
            if self._publishes.get(info.mid) is done:
                del self._publishes[info.mid]
            self._publish_slots.release()

        done.add_done_callback(settled)
        return done

    async def subscribe(self, topic_filter: str, qos: int = 1, timeout_s: float = 10.0) -> int:
        """Subscribe and return the QoS the broker granted.

        Raises SubscribeRefused (SUBACK 0x80), LinkBroken (no SUBACK within
        ``timeout_s``, link lost), LinkClosed, UsageError (bad filter or QoS).
        """
        if qos not in (0, 1, 2):
            raise UsageError(f"MQTT QoS {qos} is not 0, 1 or 2")
        client = self._usable()
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    rc, mid = client.subscribe(topic_filter, qos)
                except ValueError as exc:
                    raise UsageError(f"bad MQTT topic filter {topic_filter!r}: {exc}") from exc
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                    raise self._failure_or(f"cannot subscribe to {topic_filter!r}", rc)
                done = self._running_loop().create_future()
                self._subscribes[mid] = done
                try:
                    codes = await done
                finally:
                    self._subscribes.pop(mid, None)
        except TimeoutError as exc:
            raise LinkBroken(
                f"MQTT broker {self._where} did not answer a subscribe to {topic_filter!r} "
                f"within {timeout_s} s"
            ) from exc
        granted = codes[0] if codes else _SUBACK_FAILURE
        if granted >= _SUBACK_FAILURE:
            raise SubscribeRefused(
                f"MQTT broker {self._where} refused the subscription of "
                f"{self.settings.username!r} to {topic_filter!r}"
            )
        return granted

    def ack(self, message: Message) -> None:
        """Acknowledge ``message`` (with ``manual_ack``; a no-op otherwise or for QoS 0).

        Call it once what the message caused is stored. A link that is gone
        makes it a no-op: the broker sends the message again.
        """
        if not self.settings.manual_ack or message.qos == 0 or self._paho is None:
            return
        with contextlib.suppress(Exception):
            self._paho.ack(message.mid, message.qos)

    def queued_messages(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages that have already arrived, in order, without waiting.

        For a consumer that handles messages in batches: it waits for one with
        :meth:`messages`, then takes what queued up behind it. Maybe none; the
        end of the link is left for :meth:`messages` to raise. Raises
        UsageError before ``async with``.
        """
        if self._paho is None:
            raise UsageError("enter the MqttClient with 'async with' before reading messages")
        self._take_arrivals()
        out: list[Message] = []
        while len(out) < limit:
            try:
                item = self._incoming.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, StreamEnd):
                self._incoming.put_nowait(item)  # always the last item: its place is kept
                break
            out.append(item)
        return out

    def messages(self) -> AsyncIterator[Message]:
        """Every incoming message, in arrival order, across all subscriptions.

        The iterator ends by raising LinkBroken when the connection drops (after
        the messages that arrived before) and LinkClosed after ``__aexit__``;
        whichever happened first is what every later read raises. Raises
        UsageError before ``async with``.
        """
        if self._paho is None:
            raise UsageError("enter the MqttClient with 'async with' before reading messages")
        return MessageStream(self._incoming)

    # --- paho's side: runs on paho's thread, only hands over to the event loop -----------

    def _make_paho(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=s.clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            transport="websockets" if s.transport == "websockets" else "tcp",
            reconnect_on_failure=False,
            manual_ack=s.manual_ack,
        )
        client.suppress_exceptions = True  # a bug in a callback must not kill paho's thread
        client.enable_logger(_paho_log)
        client.connect_timeout = s.connect_timeout_s
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls_ca_file is not None:
            try:
                client.tls_set(ca_certs=str(s.tls_ca_file))
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise LinkBroken(f"cannot use TLS CA file {s.tls_ca_file}: {_reason(exc)}") from exc
        if s.will_topic is not None:
            try:
                client.will_set(s.will_topic, s.will_payload, qos=1, retain=False)
            except ValueError as exc:
                raise UsageError(f"bad MQTT will topic {s.will_topic!r}: {exc}") from exc
        client.on_socket_open = _no_delay
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        client.on_message = self._paho_message
        return client

    def _connect_blocking(self) -> None:
        assert self._paho is not None
        self._paho.connect(self.settings.host, self.settings.port, self.settings.keepalive_s)

    def _paho_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_connack, reason.value, str(reason))

    def _paho_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_link_down, str(reason))

    def _paho_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_published, mid)

    def _paho_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._hand_over(self._on_suback, mid, [r.value for r in reasons])

    def _paho_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning(
                "dropped an MQTT message from %s with a topic that is not UTF-8", self._where
            )
            return
        self._arrived.append(
            Message(topic, bytes(message.payload), message.qos, bool(message.retain), message.mid)
        )
        # One hand-over for every message that arrives before it runs: it clears the
        # flag before it empties the deque, so a message appended after it looked
        # finds the flag clear and hands over again.
        if not self._arrivals_handed_over:
            self._arrivals_handed_over = True
            self._hand_over(self._on_arrivals)

    def _hand_over(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
            loop.call_soon_threadsafe(callback, *args)

    # --- the event loop's side ---------------------------------------------------------

    def _on_connack(self, code: int, reason: str) -> None:
        waiter = self._connack
        if waiter is None or waiter.done():
            return
        if code < _SUBACK_FAILURE:
            self._connected = True
            waiter.set_result(None)
            return
        user = self.settings.username
        if code in (_BAD_CREDENTIALS, _NOT_AUTHORIZED):
            refusal: LinkError = AuthRefused(
                f"MQTT broker {self._where} refused the credentials of {user!r}: {reason}"
            )
        else:
            refusal = LinkBroken(
                f"MQTT broker {self._where} refused the connection of {user!r}: {reason}"
            )
        # Recorded now: the broker's close, right behind the CONNACK, must not
        # become the reason why this link ended.
        self._fail(refusal)
        waiter.set_exception(refusal)

    def _on_link_down(self, reason: str) -> None:
        self._connected = False
        if self._closing:
            error: LinkError = LinkClosed(f"MQTT connection to {self._where} was closed by us")
        else:
            error = LinkBroken(f"MQTT connection to {self._where} was lost: {reason}")
        waiter = self._connack
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                LinkBroken(
                    f"MQTT broker {self._where} closed the connection before CONNACK: {reason}"
                )
            )
        self._fail(error)
        self._link_down.set()

    def _on_published(self, mid: int) -> None:
        waiter = self._publishes.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_suback(self, mid: int, codes: list[int]) -> None:
        waiter = self._subscribes.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(codes)

    def _on_arrivals(self) -> None:
        self._arrivals_handed_over = False
        self._take_arrivals()

    def _take_arrivals(self) -> None:
        arrived = self._arrived
        while arrived:
            self._on_message(arrived.popleft())

    def _on_message(self, message: Message) -> None:
        if self._failure is not None:
            return
        if self._incoming.qsize() >= self.settings.max_queued_messages:
            log.error(
                "%d unread MQTT messages from %s: the consumer is too slow, disconnecting",
                self.settings.max_queued_messages,
                self._where,
            )
            self._fail(
                LinkBroken(
                    f"more than {self.settings.max_queued_messages} unread MQTT messages from "
                    f"{self._where}: "
                    "the consumer fell behind and the client disconnected"
                )
            )
            if self._paho is not None:
                self._paho.disconnect()
            return
        self._incoming.put_nowait(message)

    def _fail(self, error: LinkError) -> None:
        """Record why the link ended (the first reason wins) and release every waiter."""
        if self._failure is None:
            self._failure = error
            self._incoming.put_nowait(StreamEnd(error))
        waiters: list[asyncio.Future[Any]] = [*self._publishes.values(), *self._subscribes.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(fresh(self._failure))

    # --- helpers ------------------------------------------------------------------------

    def _usable(self) -> paho.Client:
        if self._paho is None:
            raise UsageError("enter the MqttClient with 'async with' before using it")
        if self._failure is not None:
            raise fresh(self._failure)
        return self._paho

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _failure_or(self, what: str, rc: MQTTErrorCode) -> LinkError:
        if self._failure is not None:
            return fresh(self._failure)
        return LinkBroken(f"{what} on MQTT broker {self._where}: {paho.error_string(rc)}")

    def _connect_error(self, exc: BaseException) -> BaseException:
        where, timeout_s = self._where, self.settings.connect_timeout_s
        if isinstance(exc, LinkError | UsageError):
            return exc
        if isinstance(exc, TimeoutError):
            return LinkBroken(f"no CONNACK from MQTT broker {where} within {timeout_s} s")
        if isinstance(exc, OSError):  # refused, DNS, TLS verification, websocket handshake
            return LinkBroken(f"cannot connect to MQTT broker {where}: {_reason(exc)}")
        if isinstance(exc, ValueError):
            return UsageError(f"cannot connect to MQTT broker {where}: {exc}")
        return exc

    async def _stop_paho(self, connecting: asyncio.Future[None] | None) -> None:
        """End paho's thread and socket, also when ``connecting`` is still running."""
        client = self._paho
        if client is None:
            return
        if connecting is not None and not connecting.done():
            # The connect thread is still blocked in DNS or TCP (bounded by paho's
            # connect timeout); close whatever socket it ends up with.
            def late(finished: asyncio.Future[None]) -> None:
                if not finished.cancelled():
                    finished.exception()  # retrieved: it was reported as a timeout already
                _close_quietly(client)

            connecting.add_done_callback(late)
            return
        if self._thread_started:
            self._thread_started = False
            client.disconnect()
            await self._in_thread(client.loop_stop, "stop")
        _close_quietly(client)

    def _in_thread(self, work: Callable[[], object], what: str) -> asyncio.Future[None]:
        """Run blocking ``work`` on a named daemon thread (not the default executor,
        which ``asyncio.run`` would wait for at exit)."""
        loop = self._running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def run() -> None:
            error: BaseException | None = None
            try:
                work()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, error)

        name = f"shoal-mqtt-{what}-{self.settings.client_id}"
        threading.Thread(target=run, name=name, daemon=True).start()
        return done


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _shutdown_socket(sock: object) -> None:
    """Shut a connection down under paho's feet: its thread sees EOF and ends."""
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fd = fileno()
        with socket.socket(fileno=socket.dup(fd)) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


def _close_quietly(client: paho.Client) -> None:
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off: small QoS 1 publishes each waited 25-50 ms for it.

    Found by ``shoal bench fanout``: with Nagle on, an orchestrator publishing a
    command and waiting for its PUBACK dispatched 42 deployments a second.
    """
    with contextlib.suppress(OSError, AttributeError, TypeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:160]
