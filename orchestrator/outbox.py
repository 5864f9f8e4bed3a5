"""The command outbox: every command to a gateway, numbered, stored, re-sent until acked.

Rules (spec: ``docs/topics.md`` §Principles; architecture.md §End-to-end):

* A command gets its gateway's next ``seq`` (1, 2, 3, ... per gateway, kept
  in ``gateways.next_seq``, never reused) and is written to ``commands`` with
  its exact payload in the same transaction as the state change that caused
  it. Only after that transaction commits is it published, so a crash can
  lose a publish (the re-send covers it) but never a command.
* A command is acknowledged by ``up/ack {seq}`` or by a HELLO whose
  ``handled_seq`` is at or above it. Acknowledging twice is a no-op;
  acknowledging a number never issued is refused.
* Unacknowledged commands are re-sent with their stored bytes, in ``seq``
  order: all of them on HELLO, and by the timer those sent longer ago than
  the re-send interval (or never), while the gateway is accepted and online.
  The broker cannot be trusted to redeliver (amqtt drops unacked QoS 1
  after 5 s). The timer's pass is capped (:meth:`Outbox.due` ``limit``): a
  fleet that acknowledges slowly (10,000 commands of a rollout not acked
  within the interval) gets its re-sends spread over several ticks instead of
  all of them at once, in the same order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlite_utils import Database

from orchestrator.db import fetch_all, one
from orchestrator.registry import GatewayState
from otaproto import fleet
from otaproto.errors import InvalidInput, UsageError

log = logging.getLogger("shoal.orchestrator")


class CommandType(StrEnum):
    """What a command asks of a gateway."""

    DEPLOY = "deploy"
    CANCEL = "cancel"


@dataclass(frozen=True)
class Command:
    """One row of the outbox."""

    gateway: str
    seq: int
    type: CommandType
    deployment: str
    node: str
    payload: bytes
    sent_at: float | None
    send_count: int
    acked_at: float | None


@dataclass(frozen=True)
class NewCommand:
    """A command to number and store (:meth:`Outbox.enqueue_many`)."""

    gateway: str
    type: CommandType
    deployment: str
    node: str
    artifact: fleet.ArtifactRef | None = None
    full: fleet.ArtifactRef | None = None


class Outbox:
    """Commands of every gateway in the database. The caller holds the transaction."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def enqueue(
        self,
        gateway: str,
        kind: CommandType,
        deployment: str,
        node: str,
        *,
        artifact: fleet.ArtifactRef | None = None,
        full: fleet.ArtifactRef | None = None,
    ) -> Command:
        """Number and store a command for ``gateway``. Raises UsageError for an unknown one."""
        return self.enqueue_many([NewCommand(gateway, kind, deployment, node, artifact, full)])[0]

    def enqueue_many(self, new: Sequence[NewCommand]) -> list[Command]:
        """Number and store commands, in order (each gateway's get its next numbers).

        One statement for all of them, not a few per command: a rollout of
        10,000 nodes queues 10,000 commands in one request. Raises UsageError
        for an unknown gateway (nothing is stored then).
        """
        if not new:
            return []
        names = list(dict.fromkeys(c.gateway for c in new))
        next_seq = {
            str(row[0]): int(row[1])
            for row in self._db.execute(
                "SELECT id, next_seq FROM gateways WHERE id IN (SELECT value FROM json_each(?))",
                [json.dumps(names)],
            )
        }
        missing = [g for g in names if g not in next_seq]
        if missing:
            raise UsageError(f"no gateway {missing[0]!r} to send a command to")
        now = self._clock()
        out: list[Command] = []
        for c in new:
            seq = next_seq[c.gateway]
            next_seq[c.gateway] = seq + 1
            body: dict[str, Any] = {
                "seq": seq, "type": str(c.type), "deployment": c.deployment, "node": c.node,
                "artifact": None if c.artifact is None else c.artifact.to_map(),
                "full": None if c.full is None else c.full.to_map(),
            }  # fmt: skip
            payload = fleet.encode_map(body)
            fleet.decode_map(payload, fleet.COMMAND, "command")  # what we send meets the contract
            out.append(
                Command(c.gateway, seq, c.type, c.deployment, c.node, payload, None, 0, None)
            )
        self._db.conn.executemany(
            "INSERT INTO commands (gateway, seq, type, deployment, node, payload, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(c.gateway, c.seq, str(c.type), c.deployment, c.node, c.payload, now) for c in out],
        )
        self._db.conn.executemany(
            "UPDATE gateways SET next_seq = ? WHERE id = ?",
            [(next_seq[g], g) for g in names],
        )
        return out

    def last_issued(self, gateway: str) -> int:
        """The highest ``seq`` issued to ``gateway`` (0 before the first)."""
        row = one(self._db, "SELECT next_seq FROM gateways WHERE id = ?", [gateway])
        return 0 if row is None else int(row["next_seq"]) - 1

    def ack(self, gateway: str, seq: int) -> Command | None:
        """Mark one command acknowledged; returns it when this is news, None for a repeat.

        Raises InvalidInput for a ``seq`` never issued to this gateway.
        """
        command = self._get(gateway, seq)
        if command is None:
            raise InvalidInput(f"ack for command {seq}, which was never sent to {gateway}")
        if command.acked_at is not None:
            return None
        self._db.execute(
            "UPDATE commands SET acked_at = ? WHERE gateway = ? AND seq = ?",
            [self._clock(), gateway, seq],
        )
        return command

    def ack_through(self, gateway: str, handled_seq: int) -> list[Command]:
        """Mark every command up to ``handled_seq`` acknowledged; returns those that were not.

        A ``handled_seq`` above the last issued number means the gateway saw
        commands from a database newer than this one (restored from a backup):
        the counter skips past it, so new commands are not taken as repeats.
        """
        last = self.last_issued(gateway)
        if handled_seq > last:
            log.warning(
                "gateway %s has handled command %d but only %d were issued: "
                "continuing at %d (was the database restored from a backup?)",
                gateway, handled_seq, last, handled_seq + 1,
            )  # fmt: skip
            self._db.execute(
                "UPDATE gateways SET next_seq = ? WHERE id = ?", [handled_seq + 1, gateway]
            )
        news = [
            _command(r)
            for r in fetch_all(
                self._db,
                "SELECT * FROM commands WHERE gateway = ? AND seq <= ? AND acked_at IS NULL"
                " ORDER BY seq",
                [gateway, handled_seq],
            )
        ]
        self._db.execute(
            "UPDATE commands SET acked_at = ? WHERE gateway = ? AND seq <= ? AND acked_at IS NULL",
            [self._clock(), gateway, handled_seq],
        )
        return news

    def unacked(self, gateway: str) -> list[Command]:
        """The gateway's unacknowledged commands, in ``seq`` order."""
        rows = fetch_all(
            self._db,
            "SELECT * FROM commands WHERE gateway = ? AND acked_at IS NULL ORDER BY seq",
            [gateway],
        )
        return [_command(r) for r in rows]

    def due(
        self,
        now: float,
        resend_after_s: float,
        *,
        unsent_only: bool = False,
        limit: int | None = None,
        after_gateway: str = "",
    ) -> list[Command]:
        """Commands to (re-)send now: unacknowledged, to accepted online gateways.

        Those never sent, and (unless ``unsent_only``) those last sent at least
        ``resend_after_s`` ago; by gateway, then ``seq``; the first ``limit``
        of them (None: all). A limit cuts a gateway's commands after a lower
        ``seq``, never before: the rest are due at the next call. The gateways
        after ``after_gateway`` (by id) come first, then the others: a caller
        that goes on after the last gateway a limit reached serves them all in
        turn, not the first ones over and over.
        """
        rows = fetch_all(
            self._db,
            "SELECT c.* FROM commands c JOIN gateways g ON g.id = c.gateway"
            " WHERE c.acked_at IS NULL AND g.state = ? AND g.online = 1"
            " AND (c.sent_at IS NULL OR (? = 0 AND c.sent_at <= ?))"
            " ORDER BY c.gateway <= ?, c.gateway, c.seq LIMIT ?",
            [
                str(GatewayState.ACCEPTED),
                int(unsent_only),
                now - resend_after_s,
                after_gateway,
                -1 if limit is None else limit,
            ],
        )
        return [_command(r) for r in rows]

    def mark_sent(self, commands: list[Command]) -> None:
        """Record that these commands are being published now."""
        now = self._clock()
        self._db.conn.executemany(
            "UPDATE commands SET sent_at = ?, send_count = send_count + 1"
            " WHERE gateway = ? AND seq = ?",
            [(now, c.gateway, c.seq) for c in commands],
        )

    def _get(self, gateway: str, seq: int) -> Command | None:
        row = one(self._db, "SELECT * FROM commands WHERE gateway = ? AND seq = ?", [gateway, seq])
        return None if row is None else _command(row)


def _command(row: dict[str, Any]) -> Command:
    return Command(
        gateway=row["gateway"], seq=row["seq"], type=CommandType(row["type"]),
        deployment=row["deployment"], node=row["node"], payload=row["payload"],
        sent_at=row["sent_at"], send_count=row["send_count"], acked_at=row["acked_at"],
    )  # fmt: skip
