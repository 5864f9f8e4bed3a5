"""The embedded MQTT broker on amqtt: the one module that imports amqtt.

Rules:

* Access control is :mod:`otaproto.topics` and nothing else: Shoal's topic
  plugin answers amqtt's PUBLISH, SUBSCRIBE and RECEIVE checks with
  ``may_publish``, ``may_subscribe`` and ``may_receive``, for the identity
  fixed when the session authenticated. A session without an identity (not
  yet authenticated, refused, revoked) may do nothing. amqtt runs only
  Shoal's two plugins: its defaults (event and packet loggers, the anonymous
  plugin, ``$SYS``) halve throughput and would make every client anonymous.
* Every CONNECT passes Shoal's gate *before* amqtt sees a byte of it: the
  account must authenticate (``Accounts.authenticate``, asked on every
  connect, so a revoked account is refused at its next one), its will topic
  must be one it may publish to, and the client id must not belong to a
  session of another account. Refusals get CONNACK 5 (2 for a client id of
  another account). Why the gate, rather than amqtt's auth plugin alone:
  amqtt 0.12 acts on a CONNECT's client id *before* it authenticates it.
  With clean session it deletes the existing session of that client id, so
  the connected client silently stops receiving (reproduced with a wrong
  password); without clean session it takes the existing session over,
  rewrites its username and kicks its connection. Anyone who knows a client
  id could silence that client without a password, and another account could
  inherit a persistent session with its queued messages. The auth plugin
  checks again and records the identity.
* ``disconnect(username)`` drops every live session of an account at once and
  forgets what was queued for it (revocation takes effect now, not at the
  next connect).
* Listeners: TCP on ``port`` (0: an ephemeral one, read back as
  :attr:`EmbeddedBroker.port`), a websocket listener when ``websocket_port``
  is given; both speak TLS when ``tls`` is given (there is then no
  plaintext listener).

amqtt 0.12's known bugs (field notes §9) and how Shoal lives with them:

1. Retained messages are delivered past topic ACLs: a newly connected client
   gets every retained message that matches *any* subscription in the
   broker, its own or another client's, unchecked. This broker never stores
   a retained message: the message is delivered live, without the retain
   flag, and nothing is kept. Shoal never publishes retained.
2. The delivery QoS is the subscription's, not min(publish, subscribe). Shoal
   publishes and subscribes with QoS 1 everywhere, where the two agree.
3. and 4. Unacknowledged QoS 1 messages are not resent on reconnect, and are
   dropped after a fixed 5 s ack wait. Shoal does not rely on broker
   redelivery: commands carry ids and sequence numbers, are re-sent by the
   orchestrator until acknowledged end to end, and gateways ask for pending
   work when they (re)connect.
5. Messages queued for an offline persistent session arrive with RETAIN set.
   Shoal ignores the retain flag of incoming messages.
6. The anonymous plugin makes every client anonymous (and disables offline
   queues). It is not loaded; a CONNECT without credentials is refused.
7. The contrib persistence plugin cannot store binary payloads. It is not
   loaded: this broker keeps sessions in memory only.

Also: amqtt publishes a will without any PUBLISH check (reproduced: a
gateway's will reached another gateway's command topic), hence the will check
at the gate. Overlapping subscriptions get a message once per matching
subscription. Refused publishes are acknowledged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from amqtt.adapters import (  # type: ignore[import-untyped]
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
)
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.errors import AMQTTError, MQTTError, NoDataError  # type: ignore[import-untyped]
from amqtt.mqtt.connack import ConnackPacket  # type: ignore[import-untyped]
from amqtt.mqtt.connect import ConnectPacket  # type: ignore[import-untyped]
from amqtt.mqtt.packet import CONNECT  # type: ignore[import-untyped]
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]
from websockets.asyncio.server import Server as WebsocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from broker.mosquitto import TlsFiles
from otaproto.errors import InvalidInput, LinkBroken, UsageError
from otaproto.topics import Role, may_publish, may_receive, may_subscribe

__all__ = ["Accounts", "EmbeddedBroker", "TlsFiles"]

log = logging.getLogger(__name__)

#: A client must send its whole CONNECT within this time after the TCP (or websocket) handshake.
CONNECT_TIMEOUT_S = 10.0
#: Largest CONNECT the gate reads (client id, will, credentials); bigger ones are dropped.
MAX_CONNECT_BYTES = 65_536
#: How long stopping waits for connections to wind down before cancelling them.
STOP_TIMEOUT_S = 5.0

# CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3).
IDENTIFIER_REJECTED = 2
NOT_AUTHORIZED = 5

_TCP_LISTENER = "default"  # amqtt insists on a listener of this name
_WS_LISTENER = "ws"
_IDENTITY = "shoal.identity"  # session attribute: who this session is; removed when revoked
_OWNER = "shoal.owner"  # session attribute: the account that owns this client id; kept


class Accounts(Protocol):
    """Who may connect: the registry, as the broker sees it."""

    def authenticate(self, username: str, password: str) -> Role | None:
        """The role of a valid ``username``/``password`` pair; None refuses the connection.

        An operator's role is its own (viewer, deployer, admin): it decides the
        request channels the session may publish on, fixed for the session.
        """
        ...


@dataclass(frozen=True)
class _Identity:
    username: str
    role: Role


class _Gate:
    """The connect-time decisions, shared by the gate in front of amqtt and the auth plugin."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    def admit(
        self, username: str | None, password: str | None, will_topic: str | None, owner: str | None
    ) -> _Identity | int:
        """The identity of an acceptable CONNECT, or the CONNACK code that refuses it."""
        if not username or password is None:
            return NOT_AUTHORIZED
        try:
            role = self.accounts.authenticate(username, password)
        except Exception:  # the registry failed: refuse, never let in by accident
            log.exception("authenticating %r failed; refusing the connection", username)
            return NOT_AUTHORIZED
        if not isinstance(role, Role):
            return NOT_AUTHORIZED
        if owner is not None and owner != username:
            return IDENTIFIER_REJECTED
        if will_topic is not None and not may_publish(role, username, will_topic):
            return NOT_AUTHORIZED
        return _Identity(username, role)


class _AuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt's authentication hook: checks again and fixes the session's identity."""

    @dataclass
    class Config:
        gate: Any = None

    async def authenticate(self, *, session: Any) -> bool:
        gate: _Gate = self.config.gate
        will_topic = session.will_topic if session.will_flag else None
        verdict = gate.admit(
            session.username, session.password, will_topic, session.attributes.get(_OWNER)
        )
        if isinstance(verdict, int):
            session.attributes.pop(_IDENTITY, None)
            return False
        session.attributes[_IDENTITY] = verdict
        session.attributes.setdefault(_OWNER, verdict.username)
        return True


class _TopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt's topic hook: otaproto.topics decides, for the session's fixed identity."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        identity = session.attributes.get(_IDENTITY) if session is not None else None
        if not isinstance(identity, _Identity) or not topic:
            return False
        if action == Action.PUBLISH:
            return may_publish(identity.role, identity.username, topic)
        if action == Action.SUBSCRIBE:
            return may_subscribe(identity.role, identity.username, topic)
        if action == Action.RECEIVE:
            return may_receive(identity.role, identity.username, topic)
        return False


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, storing no retained message (amqtt bug 1), delivering to every subscriber.

    amqtt 0.12.1 walks each topic's subscriber list while it awaits the topic
    plugin, and a client that disconnects meanwhile is removed from that same
    list, so the next subscriber is skipped: a reply to an operator was lost
    about once in 150 requests. :meth:`_run_broadcast` walks copies.
    """

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for target, subscribed_qos in list(subscriptions):
                qos = broadcast.get("qos", subscribed_qos)
                if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target.transitions.state == "connected"
                if not connected:
                    # MQTT 3.1.2.4: queue for a persistent session, QoS 1 and 2 only.
                    if not target.clean_session and qos in (1, 2) and not target.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )

    async def retain_message(
        self, source_session: Any, topic_name: str | None, data: Any, qos: int | None = None
    ) -> None:
        if data:
            log.info("not retaining a message on %r: Shoal uses no retained messages", topic_name)


class _TooLarge(Exception):
    pass


class _RecordingReader(ReaderAdapter):  # type: ignore[misc]
    """Reads the CONNECT for the gate, keeping the bytes for amqtt; bounded."""

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.seen = bytearray()

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or len(self.seen) + n > self._limit:
            raise _TooLarge
        data: bytes = await self._inner.read(n)
        self.seen += data
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _ReplayReader(ReaderAdapter):  # type: ignore[misc]
    """Gives amqtt the CONNECT the gate already read, then the rest of the stream."""

    def __init__(self, head: bytes, inner: Any) -> None:
        self._head = head
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            data: bytes = await self._inner.read(n)
            return data
        if n < 0:
            head, self._head = self._head, b""
            rest: bytes = await self._inner.read(n)
            return head + rest
        head, self._head = self._head[:n], self._head[n:]
        if len(head) < n:
            head += await self._inner.read(n - len(head))
        return head

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class EmbeddedBroker:
    """An MQTT 3.1.1 broker in this process, with Shoal's access control; see the module rules."""

    def __init__(
        self,
        accounts: Accounts,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsFiles | None = None,
        websocket_port: int | None = None,
    ) -> None:
        self.accounts = accounts
        self.host = host
        #: The TCP port; after start, the one actually bound (also when 0 was asked for).
        self.port = port
        #: The websocket port, if any; after start, the one actually bound.
        self.websocket_port = websocket_port
        self.tls = tls
        self._gate = _Gate(accounts)
        self._broker: Any = None
        self._tcp_server: asyncio.Server | None = None
        self._ws_server: WebsocketServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._at_gate: set[asyncio.Task[Any]] = set()  # connections not yet handed to amqtt

    async def __aenter__(self) -> Self:
        """Start amqtt and the listeners.

        Raises LinkBroken when a port cannot be bound, InvalidInput when the TLS
        files cannot be loaded, UsageError when started twice.
        """
        if self._broker is not None:
            raise UsageError("an EmbeddedBroker starts once; make a new one")
        context = self._ssl_context()
        listeners: dict[str, Any] = {_TCP_LISTENER: {"type": "external"}}
        if self.websocket_port is not None:
            listeners[_WS_LISTENER] = {"type": "external"}
        self._broker = _Broker(
            {
                "listeners": listeners,
                "plugins": {
                    f"{__name__}._AuthPlugin": {"gate": self._gate},
                    f"{__name__}._TopicPlugin": {},
                },
            }
        )
        await self._broker.start()
        try:
            self._tcp_server = await asyncio.start_server(
                self._on_tcp, self.host, self.port, ssl=context, reuse_address=True
            )
            self.port = self._tcp_server.sockets[0].getsockname()[1]
            if self.websocket_port is not None:
                self._ws_server = await serve(
                    self._on_websocket,
                    self.host,
                    self.websocket_port,
                    ssl=context,
                    subprotocols=[Subprotocol("mqtt")],
                )
                self.websocket_port = next(iter(self._ws_server.sockets)).getsockname()[1]
        except OSError as exc:
            await self._stop()
            raise LinkBroken(f"cannot listen on {self.host}: {exc.strerror or exc}") from exc
        except BaseException:
            await self._stop()
            raise
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop: close the listeners and every connection, release the ports and all tasks."""
        await self._stop()

    async def disconnect(self, username: str) -> None:
        """Drop every live session of ``username`` now.

        Revocation: the registry's ``Accounts`` stops admitting the account,
        this ends what is already connected. The sessions lose their identity
        (from now on they may do nothing) and whatever was queued for them; the
        broker publishes the will of a dropped connection as for any other
        unexpected disconnect. Unknown or offline accounts are no error.
        """
        if self._broker is None:
            return
        for session, handler in list(self._broker.sessions.values()):
            identity = session.attributes.get(_IDENTITY)
            if not isinstance(identity, _Identity) or identity.username != username:
                continue
            del session.attributes[_IDENTITY]
            session.clear_queues()
            if session.transitions.is_connected() and handler is not None:
                log.info("dropping session %r of revoked account %r", session.client_id, username)
                await handler.stop()

    # --- connections ----------------------------------------------------------------------

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(StreamReaderAdapter(reader), StreamWriterAdapter(writer), _TCP_LISTENER)

    async def _on_websocket(self, connection: ServerConnection) -> None:
        await self._serve(WebSocketsReader(connection), WebSocketsWriter(connection), _WS_LISTENER)

    async def _serve(self, reader: Any, writer: Any, listener: str) -> None:
        """The gate: read and judge the CONNECT, then hand the connection to amqtt."""
        task = asyncio.current_task()
        assert task is not None  # asyncio runs every connection handler as a task
        self._connections.add(task)
        self._at_gate.add(task)
        peer = writer.get_peer_info()
        try:
            recording = _RecordingReader(reader, MAX_CONNECT_BYTES)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    connect = await ConnectPacket.from_stream(recording)
            except (TimeoutError, _TooLarge, AMQTTError, MQTTError, NoDataError, ValueError) as exc:
                log.info("dropped a connection from %s without a usable CONNECT: %r", peer, exc)
                return
            if connect.fixed_header.packet_type != CONNECT or connect.payload is None:
                log.info("dropped a connection from %s that did not start with CONNECT", peer)
                return
            verdict = self._admit(connect)
            if isinstance(verdict, int):
                log.info(
                    "refused CONNECT of %r (client id %r) from %s: code %d",
                    connect.username,
                    connect.client_id,
                    peer,
                    verdict,
                )
                await ConnackPacket.build(0, verdict).to_stream(writer)
                return
            self._at_gate.discard(task)
            await self._broker.external_connected(
                _ReplayReader(bytes(recording.seen), reader), writer, listener
            )
        except (OSError, asyncio.IncompleteReadError, AMQTTError, MQTTError, NoDataError) as exc:
            log.info("connection from %s ended: %r", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                await writer.close()
            self._at_gate.discard(task)
            self._connections.discard(task)

    def _admit(self, connect: Any) -> _Identity | int:
        will_topic = connect.will_topic if connect.variable_header.will_flag else None
        owner = None
        existing = self._broker.sessions.get(connect.client_id)
        if existing is not None:
            owner = existing[0].attributes.get(_OWNER)
        verdict: _Identity | int = self._gate.admit(
            connect.username, connect.password, will_topic, owner
        )
        return verdict

    # --- start and stop --------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise InvalidInput(
                f"cannot load TLS certificate {self.tls.cert_file} and key {self.tls.key_file}: "
                f"{exc}"
            ) from exc
        return context

    async def _stop(self) -> None:
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        for task in list(self._at_gate):  # no session yet: nothing to wind down
            task.cancel()
        try:
            if self._broker is not None and self._broker.transitions.is_started():
                await self._broker.shutdown()
        finally:
            if self._connections:
                _, pending = await asyncio.wait(set(self._connections), timeout=STOP_TIMEOUT_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            if self._tcp_server is not None:
                await self._tcp_server.wait_closed()
                self._tcp_server = None
            if self._ws_server is not None:
                await self._ws_server.wait_closed()
                self._ws_server = None
