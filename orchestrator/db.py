"""The orchestrator's SQLite database: how it is opened and how its schema changes.

Rules:

* One file, ``{data_dir}/shoal.db``, in WAL mode (readers such as a status page
  never block the writer) with foreign keys enforced.
* The schema changes only through a migration: a numbered function in
  :data:`MIGRATIONS`, applied in order, each in one transaction together with
  its row in the ``migrations`` table, so a crash leaves a migration either
  fully applied and recorded or not at all. The very first table is created
  by migration 1; a released migration is never edited, only followed.
* A database that records a version this code does not know (written by a
  newer orchestrator) is refused rather than guessed at.
* Conventions: states are stored by their names (text, never ordinals);
  digests as lowercase hex; times as float seconds from the orchestrator's
  clock; JSON in ``TEXT`` columns. Tables are ``STRICT``, so a wrong type is
  an error at the write, not a surprise at the read.
* Every integer Shoal stores must fit SQLite's signed 64 bits; values from
  outside are checked with :func:`check_sql_int` before they get here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from otaproto.errors import InvalidInput, MalformedError

DB_FILE = "shoal.db"
MAX_SQL_INT = 2**63 - 1

Migration = tuple[int, str, Callable[[Database], None]]


def check_sql_int(value: int, where: str) -> int:
    """``value`` if SQLite can store it (a wire ``uint`` may not). Raises MalformedError."""
    if not 0 <= value <= MAX_SQL_INT:
        raise MalformedError(where, f"must be at most {MAX_SQL_INT}")
    return value


def _v1_initial(db: Database) -> None:
    """Registry, artifact store, deployments, the command outbox and the event log."""
    db.table("gateways").create(
        {
            "id": str, "state": str, "secret_hash": str, "created": float,
            "last_seen": float, "online": int, "attributes": str, "next_seq": int,
        },
        pk="id",
        not_null={"id", "state", "secret_hash", "created", "online", "attributes", "next_seq"},
        defaults={"online": 0, "attributes": "{}", "next_seq": 1},
        strict=True,
    )  # fmt: skip
    db.table("nodes").create(
        {
            "gateway": str, "node": str, "present": int, "device_type": str, "boot_state": str,
            "primary_version": str, "primary_sequence": int, "primary_digest": str,
            "primary_size": int, "error": str, "last_seen": float,
        },
        pk=("gateway", "node"),
        not_null={"gateway", "node", "present", "last_seen"},
        foreign_keys=[("gateway", "gateways", "id")],
        strict=True,
    )  # fmt: skip
    db.table("operators").create(
        {"id": str, "secret_hash": str, "role": str, "created": float},
        pk="id",
        not_null={"id", "secret_hash", "role", "created"},
        strict=True,
    )
    db.table("artifacts").create(
        {
            "digest": str, "name": str, "version": str, "sequence": int, "device_types": str,
            "payload_kind": str, "image_digest": str, "image_size": int, "base_digest": str,
            "base_version": str, "size": int, "block_bytes": int, "created": float,
            "full_digest": str, "base_full_digest": str,
        },
        pk="digest",
        not_null={
            "digest", "name", "version", "sequence", "device_types", "payload_kind",
            "image_digest", "image_size", "size", "block_bytes", "created",
        },
        strict=True,
    )  # fmt: skip
    db.table("artifacts").create_index(["image_digest"])
    db.table("artifacts").create_index(["base_digest"])
    db.table("deployments").create(
        {"id": str, "artifact": str, "created": float, "cancelled": float},
        pk="id",
        not_null={"id", "artifact", "created"},
        foreign_keys=[("artifact", "artifacts", "digest")],
        strict=True,
    )
    db.table("deployment_nodes").create(
        {
            "deployment": str, "gateway": str, "node": str, "state": str, "artifact": str,
            "full": str, "status_seq": int, "bytes": int, "total": int, "mqtt_bytes": int,
            "serial_bytes": int, "reason": str, "updated": float,
        },
        pk=("deployment", "gateway", "node"),
        not_null={"deployment", "gateway", "node", "state", "status_seq", "updated"},
        defaults={"status_seq": 0},
        foreign_keys=[
            ("deployment", "deployments", "id"),
            ("gateway", "gateways", "id"),
            ("artifact", "artifacts", "digest"),
            ("full", "artifacts", "digest"),
        ],
        strict=True,
    )  # fmt: skip
    db.table("deployment_nodes").create_index(["gateway", "node", "state"])
    db.table("events").create(
        {
            "id": int, "deployment": str, "gateway": str, "node": str, "at": float,
            "state": str, "detail": str,
        },
        pk="id",
        not_null={"deployment", "gateway", "node", "at", "state", "detail"},
        foreign_keys=[("deployment", "deployments", "id")],
        strict=True,
    )  # fmt: skip
    db.table("events").create_index(["deployment", "gateway", "node"])
    db.table("commands").create(
        {
            "gateway": str, "seq": int, "type": str, "deployment": str, "node": str,
            "payload": bytes, "created": float, "sent_at": float, "send_count": int,
            "acked_at": float,
        },
        pk=("gateway", "seq"),
        not_null={"gateway", "seq", "type", "deployment", "node", "payload", "created",
                  "send_count"},
        defaults={"send_count": 0},
        foreign_keys=[("gateway", "gateways", "id")],
        strict=True,
    )  # fmt: skip
    db.table("commands").create_index(["acked_at", "gateway", "seq"])


def _v2_rollouts(db: Database) -> None:
    """Rollouts, groups, the audit log; retries, timeouts and attributes on existing tables.

    ``deployment_nodes`` gains ``attempt`` (retries so far: the wire id of a
    retry is ``{deployment}-r{attempt}``), ``entered`` (when the node entered
    its current state, for per-state timeouts; rows from before take
    ``updated``) and ``retryable`` (1 when a final state may be retried).
    ``nodes`` gains operator-set ``attributes`` (JSON) for dynamic groups.
    """
    db.execute("ALTER TABLE deployment_nodes ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE deployment_nodes ADD COLUMN entered REAL")
    db.execute("UPDATE deployment_nodes SET entered = updated")
    db.execute("ALTER TABLE deployment_nodes ADD COLUMN retryable INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE nodes ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}'")
    db.table("groups").create(
        {"name": str, "nodes": str, "filter": str, "created": float, "created_by": str},
        pk="name",
        not_null={"name", "created", "created_by"},
        strict=True,
    )
    db.table("rollouts").create(
        {
            "id": str, "state": str, "reason": str, "artifact": str, "target": str,
            "options": str, "deployment": str, "phase": int, "phase_sizes": str,
            "phase_started": float, "phase_passed": float, "excluded": str, "created": float,
            "created_by": str, "start_at": float, "started": float, "ended": float,
            "settled": float,
        },
        pk="id",
        not_null={"id", "state", "artifact", "target", "options", "phase", "created",
                  "created_by", "start_at"},
        defaults={"phase": 0},
        foreign_keys=[("artifact", "artifacts", "digest"), ("deployment", "deployments", "id")],
        strict=True,
    )  # fmt: skip
    db.table("rollouts").create_index(["deployment"])
    db.table("rollouts").create_index(["settled", "start_at"])
    db.table("rollout_nodes").create(
        {
            "rollout": str, "gateway": str, "node": str, "phase": int, "ord": int,
            "started": float, "excused": int,
        },
        pk=("rollout", "gateway", "node"),
        not_null={"rollout", "gateway", "node", "ord", "excused"},
        defaults={"excused": 0},
        foreign_keys=[("rollout", "rollouts", "id")],
        strict=True,
    )  # fmt: skip
    db.table("rollout_nodes").create_index(["rollout", "phase", "ord"])
    db.table("rollout_events").create(
        {
            "id": int, "rollout": str, "at": float, "event": str, "state": str,
            "operator": str, "detail": str,
        },
        pk="id",
        not_null={"rollout", "at", "event", "state", "detail"},
        foreign_keys=[("rollout", "rollouts", "id")],
        strict=True,
    )  # fmt: skip
    db.table("rollout_events").create_index(["rollout", "id"])
    db.table("audit").create(
        {
            "id": int, "at": float, "operator": str, "role": str, "op": str, "args": str,
            "ok": int, "error": str,
        },
        pk="id",
        not_null={"at", "operator", "op", "args", "ok"},
        strict=True,
    )  # fmt: skip
    db.table("audit").create_index(["operator", "id"])


#: Every schema change, in order. Append only.
MIGRATIONS: tuple[Migration, ...] = (
    (1, "initial schema", _v1_initial),
    (2, "rollouts, groups, audit log, retries and timeouts", _v2_rollouts),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def open_database(path: Path, clock: Callable[[], float]) -> Database:
    """Open (or create) the database at ``path``, in WAL mode and migrated to the latest.

    Raises InvalidInput when the file is not a database this orchestrator can use.
    """
    db = Database(path)
    try:
        db.enable_wal()
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db, clock)
    except InvalidInput:
        db.close()
        raise
    except Exception as exc:  # sqlite3.DatabaseError and friends: an unusable file
        db.close()
        raise InvalidInput(f"cannot open the database {path}: {exc}") from exc
    return db


def applied_versions(db: Database) -> list[int]:
    """The migration versions recorded in ``db``, in order (empty for a new file)."""
    if not db.table("migrations").exists():
        return []
    return [int(row["version"]) for row in db.query("SELECT version FROM migrations ORDER BY 1")]


def migrate(db: Database, clock: Callable[[], float]) -> list[int]:
    """Apply the migrations ``db`` lacks; returns the versions applied now.

    Raises InvalidInput for a database from a newer orchestrator, or one whose
    recorded versions are not a prefix of :data:`MIGRATIONS`.
    """
    done = applied_versions(db)
    known = [version for version, _, _ in MIGRATIONS]
    if done != known[: len(done)]:
        raise InvalidInput(
            f"database schema versions {done} are not this orchestrator's "
            f"(it knows {known}): written by a newer or a different version"
        )
    applied: list[int] = []
    for version, name, step in MIGRATIONS[len(done) :]:
        with db.atomic():
            db.execute(
                "CREATE TABLE IF NOT EXISTS migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL"
                ") STRICT"
            )
            step(db)
            db.execute(
                "INSERT INTO migrations (version, name, applied_at) VALUES (?, ?, ?)",
                [version, name, clock()],
            )
        applied.append(version)
    return applied


def one(db: Database, sql: str, params: list[Any] | None = None) -> dict[str, Any] | None:
    """The first row of a ``SELECT``, or None.

    Straight on the connection: ``Database.query`` wraps every statement in a
    savepoint of its own (three statements for one), which the orchestrator's
    hot paths (a status report is a few of these) cannot afford. Only for
    statements that read.
    """
    cursor = db.conn.execute(sql, params or [])
    row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip([d[0] for d in cursor.description], row, strict=True))


def fetch_all(
    db: Database, sql: str, params: list[Any] | dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every row of a ``SELECT``, as :func:`one` reads it."""
    cursor = db.conn.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


@contextmanager
def savepoint(db: Database) -> Iterator[None]:
    """A savepoint in the caller's transaction (else a transaction): ``Database.atomic``
    without its random name (a system call for every message handled)."""
    if not db.conn.in_transaction:
        with db.atomic():
            yield
        return
    db.conn.execute("SAVEPOINT shoal")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:  # an error like SQLITE_FULL may have ended it already
            db.conn.execute("ROLLBACK TO SAVEPOINT shoal")
            db.conn.execute("RELEASE SAVEPOINT shoal")
        raise
    db.conn.execute("RELEASE SAVEPOINT shoal")
