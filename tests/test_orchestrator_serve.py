"""``shoal serve``'s loop around the orchestrator: batches, acknowledgements, publishes.

The MQTT client is a fake that records what the loop does with it, so the
order of things can be checked exactly: a message is acknowledged to the
broker only once the transaction that handled it has committed (checked
through a connection of its own, which sees committed rows only), and a
burst that queued up is handled in batches, not one message at a time.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core import Effects
from otaio.mqtt import Message, MqttSettings
from otaio.mqtt_common import MessageStream, StreamEnd
from otaproto import fleet
from otaproto import topics as t
from otaproto.errors import LinkBroken
from shoal import serve
from tests.brokers import async_test
from tests.test_orchestrator import FULL_V2, World, report, sha

NODES = [f"n{i}" for i in range(1, 9)]
SETTINGS = MqttSettings(host="127.0.0.1", port=1883, client_id="shoal-orchestrator")


class FakeClient:
    """What ``_session`` uses of :class:`otaio.mqtt.MqttClient`, recorded."""

    instance: FakeClient | None = None

    def __init__(self, settings: MqttSettings) -> None:
        self.queue: asyncio.Queue[Message | StreamEnd] = asyncio.Queue()
        self.acked: list[Message] = []
        self.published: list[str] = []
        self.on_ack: Any = None
        self.publish_error: BaseException | None = None
        FakeClient.instance = self

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        return qos

    def messages(self) -> MessageStream:
        return MessageStream(self.queue)

    def queued_messages(self, limit: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < limit and not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, StreamEnd):
                self.queue.put_nowait(item)
                break
            out.append(item)
        return out

    def ack(self, message: Message) -> None:
        self.acked.append(message)
        if self.on_ack is not None:
            self.on_ack(message)

    async def start_publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        self.published.append(topic)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.publish_error is None:
            done.set_result(None)
        else:
            done.set_exception(self.publish_error)
        return done


@pytest.fixture
def w(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[World, str]]:
    monkeypatch.setattr(serve, "MqttClient", FakeClient)
    world = World(tmp_path / "orch")
    world.upload_all()
    world.gateway("gw-1", [report(n) for n in NODES])
    dep = world.o.create_deployment(sha(FULL_V2).hex(), [f"gw-1/{n}" for n in NODES])
    yield world, dep
    world.o.close()


def committed_events(w: World) -> int:
    con = sqlite3.connect(w.dir / "shoal.db")
    try:
        return int(con.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        con.close()


def status(dep: str, node: str, seq: int, state: str, mid: int) -> Message:
    body = {"deployment": dep, "node": node, "seq": seq, "state": state}
    return Message(t.gateway_up("gw-1", t.Up.STATUS), fleet.encode_map(body), 1, False, mid)


@async_test
async def test_a_burst_is_handled_in_batches_and_acked_only_after_its_commit(
    w: tuple[World, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, dep = w
    burst = [
        status(dep, node, seq, state, mid=len(NODES) * (seq - 1) + i + 1)
        for seq, state in enumerate(("downloading", "downloaded", "flashing"), start=1)
        for i, node in enumerate(NODES)
    ]
    before = committed_events(world)
    batches: list[int] = []
    real = world.o.handle_batch

    def handle_batch(messages: list[tuple[str, bytes]]) -> Effects:
        batches.append(len(messages))
        return real(messages)

    monkeypatch.setattr(world.o, "handle_batch", handle_batch)
    stop = asyncio.Event()
    committed_at_ack: list[int] = []

    def on_ack(message: Message) -> None:
        committed_at_ack.append(committed_events(world) - before)
        if len(committed_at_ack) == len(burst):
            stop.set()

    session = asyncio.create_task(
        serve._session(world.o, SETTINGS, stop, None, None, asyncio.Event())
    )
    await asyncio.sleep(0)  # the session is up: its client exists
    client = FakeClient.instance
    assert client is not None
    client.on_ack = on_ack
    for message in burst:
        client.queue.put_nowait(message)
    await session
    assert [m.mid for m in client.acked] == [m.mid for m in burst]  # all, once, in order
    # Each message's event was committed (visible to another connection) before its ack.
    assert all(seen >= n for n, seen in enumerate(committed_at_ack, start=1)), committed_at_ack
    assert batches[0] == len(burst)  # the whole burst had queued up: one transaction
    assert committed_events(world) - before == len(burst)


@async_test
async def test_a_failed_publish_ends_the_session_as_a_broken_link(w: tuple[World, str]) -> None:
    world, _ = w
    stop = asyncio.Event()
    session = asyncio.create_task(
        serve._session(world.o, SETTINGS, stop, None, None, asyncio.Event())
    )
    await asyncio.sleep(0)
    client = FakeClient.instance
    assert client is not None
    client.publish_error = LinkBroken("no PUBACK within 10 s")
    # The ticker's first pass sends the deployment's commands; their publishes fail.
    with pytest.raises(LinkBroken, match="no PUBACK"):
        async with asyncio.timeout(5):
            await session
    assert client.published  # it did try


@async_test
async def test_what_the_database_cannot_store_is_not_acked_and_is_handled_again(
    w: tuple[World, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, dep = w
    monkeypatch.setattr(serve, "STORAGE_RETRY_S", (0.05,))
    world.o._db.conn.execute("PRAGMA busy_timeout = 50")
    # Another writer (a backup tool, an sqlite3 shell) holds the write lock.
    other = sqlite3.connect(world.dir / "shoal.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    burst = [status(dep, node, 1, "downloading", mid=i + 1) for i, node in enumerate(NODES[:3])]
    before = committed_events(world)
    stop = asyncio.Event()
    attempts = 0
    real = world.o.handle_batch

    def handle_batch(messages: list[tuple[str, bytes]]) -> Effects:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            other.execute("ROLLBACK")  # the lock goes away before the second try
        return real(messages)

    monkeypatch.setattr(world.o, "handle_batch", handle_batch)
    acked_at_commit: list[int] = []

    def on_ack(message: Message) -> None:
        acked_at_commit.append(committed_events(world) - before)
        if len(acked_at_commit) == len(burst):
            stop.set()

    session = asyncio.create_task(
        serve._session(world.o, SETTINGS, stop, None, None, asyncio.Event())
    )
    await asyncio.sleep(0)
    client = FakeClient.instance
    assert client is not None
    client.on_ack = on_ack
    for message in burst:
        client.queue.put_nowait(message)
    await asyncio.wait_for(session, timeout=10)
    other.close()
    assert attempts >= 2  # the first try could store nothing, and acked nothing
    assert [m.mid for m in client.acked] == [m.mid for m in burst]
    assert all(seen >= n for n, seen in enumerate(acked_at_commit, start=1)), acked_at_commit
    assert committed_events(world) - before == len(burst)
