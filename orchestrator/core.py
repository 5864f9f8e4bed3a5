"""The orchestrator's core: every message in, every timer tick, every admin call.

Rules (spec: ``docs/topics.md``; architecture.md §End-to-end, §Security model):

* No MQTT here. The service around it feeds :meth:`Orchestrator.handle` each
  message from ``shoal/v1/gw/+/up/#`` and the operators' request channels
  ``shoal/v1/ops/+/{req,write,admin}`` (the channel goes to the operator API,
  which refuses an op sent on the wrong one), calls
  :meth:`Orchestrator.tick` on a timer, asks :meth:`Orchestrator.authenticate`
  on every CONNECT, and carries out the returned :class:`Effects` in order.
* Each message is handled in one database transaction; its effects are
  returned after the commit. :meth:`Orchestrator.handle_batch` puts many
  gateway messages in one transaction (one commit, one fsync), each in a
  savepoint of its own, so every message still takes effect whole or not at
  all; what the service acknowledges to the broker is then committed. Bad
  input (malformed, oversized, unknown keys or message types, refused by the
  state machine) changes nothing, is logged, and gets an ERROR on the
  gateway's ``down/error`` (or an error reply to an operator).
  :meth:`Orchestrator.handle`, :meth:`Orchestrator.handle_batch` and
  :meth:`Orchestrator.tick` never raise: a bug is logged with its traceback
  and the message dropped.
* Only a valid message counts as a sign of life: it sets the gateway's
  ``last_seen`` and ``online`` (the STATE will sets it offline).
* Messages from unknown or decommissioned gateways are dropped. A pending
  gateway may say HELLO, STATE and INVENTORY (recorded); nothing at all is
  sent to a gateway that is not accepted, not even an ERROR.
* Commands go through the outbox (:mod:`orchestrator.outbox`); blocks
  through the block server (:mod:`orchestrator.blocks`), for artifacts a
  running deployment of that gateway names.
* Rollouts (:mod:`orchestrator.rollouts`) are driven from :meth:`tick`: a
  status report that ends a node's deployment marks its rollout for the next
  tick, and every ``rollout_check_s`` all unsettled rollouts are looked at
  (timeouts, waits, start times). The engine runs before the outbox is
  drained, so the commands it queues go out in the same tick.
* A new Orchestrator on the same ``data_dir`` continues where the last one
  stopped: everything but the block queue is in the database, and gateways
  ask again for blocks they lack.
* Not thread-safe: one caller (the service's event loop) at a time.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from orchestrator.audit import AuditLog
from orchestrator.blocks import MAX_QUEUED_PER_GATEWAY, BlockServer
from orchestrator.db import DB_FILE, check_sql_int, open_database, savepoint
from orchestrator.deployments import FINAL, Deployments
from orchestrator.effects import Effects, Outgoing
from orchestrator.groups import Groups
from orchestrator.operators import OperatorApi
from orchestrator.outbox import Command, Outbox
from orchestrator.registry import (
    ORCHESTRATOR_USERNAME,
    GatewayState,
    OperatorRole,
    Registry,
    Sender,
    parse_node_ids,
    parse_node_reports,
)
from orchestrator.rollouts import RolloutEvent, Rollouts
from orchestrator.store import ARTIFACTS_DIR, ArtifactRecord, ArtifactStore
from otaio.files import read_bounded, write_atomic
from otaproto import fleet
from otaproto.credentials import hash_secret, new_token
from otaproto.errors import InvalidInput, MalformedError, ShoalError, UsageError
from otaproto.keys import TrustedKeys
from otaproto.topics import ID_PATTERN, ROOT, Channel, Down, Role, Up, gateway_down

__all__ = ["Effects", "Orchestrator", "Outgoing"]

log = logging.getLogger("shoal.orchestrator")

SECRET_FILE = "orchestrator.secret"  # noqa: S105 - a file name, not a secret
MAX_SECRET_FILE_BYTES = 1024
_MAX_TOPIC_LOG = 200
#: The last level of an operator's request topics.
_CHANNELS = frozenset(c.value for c in Channel)
_OPERATOR_PREFIX = f"{ROOT}/ops/"


class StorageUnavailable(ShoalError):
    """The database could not store what a message caused (locked, full, I/O error).

    Unlike bad input or a bug, this must not be acknowledged: the broker
    delivers the message again later. ``handled`` counts the messages of the
    batch that were stored before it (those may be acknowledged), ``effects``
    what they caused.
    """

    def __init__(self, message: str, *, handled: int = 0, effects: Effects | None = None):
        super().__init__(message)
        self.handled = handled
        self.effects = effects if effects is not None else Effects()


def _is_storage_failure(exc: BaseException) -> bool:
    """SQLite could not store (as opposed to our bug, such as a broken constraint)."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


class Orchestrator:
    """Registry, artifact store, deployments, outbox and block server over one SQLite file."""

    def __init__(
        self,
        data_dir: Path,
        trusted: TrustedKeys,
        *,
        clock: Callable[[], float] = time.time,
        block_bytes: int = fleet.DEFAULT_BLOCK_BYTES,
        resend_after_s: float = 10.0,
        blocks_per_tick: int = 64,
        rollout_check_s: float = 1.0,
        commands_per_tick: int = 1000,
    ) -> None:
        """Open (or create) ``data_dir/shoal.db`` and ``data_dir/artifacts/``.

        Raises UsageError for impossible settings and InvalidInput when the
        data folder, database or secret file cannot be used.
        """
        if not 0 < block_bytes <= fleet.MAX_BLOCK_BYTES:
            raise UsageError(f"block_bytes must be 1..{fleet.MAX_BLOCK_BYTES}")
        if min(resend_after_s, blocks_per_tick, rollout_check_s, commands_per_tick) <= 0:
            raise UsageError(
                "resend_after_s, blocks_per_tick, rollout_check_s and commands_per_tick"
                " must be positive"
            )
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise InvalidInput(f"cannot create {data_dir}: {exc.strerror or exc}") from exc
        self._clock = clock
        self._resend_after_s = resend_after_s
        self._resend_cursor = ""  #: the gateway a capped re-send pass stopped at
        self._blocks_per_tick = blocks_per_tick
        self._commands_per_tick = commands_per_tick
        self.orchestrator_secret = _load_or_create_secret(data_dir / SECRET_FILE)
        self._db = open_database(data_dir / DB_FILE, clock)
        self._registry = Registry(self._db, clock)
        self._store = ArtifactStore(self._db, data_dir / ARTIFACTS_DIR, trusted, clock, block_bytes)
        self._outbox = Outbox(self._db, clock)
        self._deployments = Deployments(self._db, clock, self._registry, self._store, self._outbox)
        self._groups = Groups(self._db, clock, self._registry)
        self._rollouts = Rollouts(
            self._db, clock, self._registry, self._store, self._deployments, self._groups,
            rollout_check_s,
        )  # fmt: skip
        self._audit = AuditLog(self._db, clock)
        self._blocks = BlockServer()
        #: Blocks sent per (gateway, artifact) since this start: what deploy.status shows.
        self._served: Counter[tuple[str, bytes]] = Counter()
        self._operators = OperatorApi(self)
        self._up: dict[Up, Callable[[Sender, bytes], Effects]] = {
            Up.HELLO: self._on_hello,
            Up.STATE: self._on_state,
            Up.INVENTORY: self._on_inventory,
            Up.ACK: self._on_ack,
            Up.STATUS: self._on_status,
            Up.FETCH: self._on_fetch,
        }

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the broker's questions -----------------------------------------------------

    @staticmethod
    def read_accounts(data_dir: Path) -> list[tuple[str, str, Role]]:
        """Every account that may connect, as (username, ``$7$`` hash, role).

        For an external broker's password and ACL files (``shoal broker
        mosquitto-config``): the orchestrator's own account (hashed now),
        gateways that are pending or accepted, operators with their own role
        (viewer, deployer, admin: the ACL follows it). Safe while the
        orchestrator runs (WAL). Raises InvalidInput when ``data_dir`` holds
        no orchestrator.
        """
        secret_file, db_file = data_dir / SECRET_FILE, data_dir / DB_FILE
        if not secret_file.exists() or not db_file.exists():
            raise InvalidInput(f"{data_dir} holds no orchestrator (no {DB_FILE} and {SECRET_FILE})")
        secret = _load_or_create_secret(secret_file)
        db = open_database(db_file, time.time)
        try:
            accounts = Registry(db, time.time).accounts()
        finally:
            db.close()
        return [(ORCHESTRATOR_USERNAME, hash_secret(secret), Role.ORCHESTRATOR), *accounts]

    def authenticate(self, username: str, password: str) -> Role | None:
        """The role of the account connecting, or None to refuse it. Never raises.

        The orchestrator's own account; gateways that are pending or accepted
        (not decommissioned); operators, each as its own role (viewer,
        deployer, admin), which decides the request channels the broker lets
        it publish on.
        """
        try:
            password.encode()
        except UnicodeEncodeError:  # lone surrogates: no secret of ours looks like that
            return None
        try:
            if username == ORCHESTRATOR_USERNAME:
                ok = hmac.compare_digest(password.encode(), self.orchestrator_secret.encode())
                return Role.ORCHESTRATOR if ok else None
            return self._registry.check_secret(username, password)
        except Exception:  # a broker plugin must get an answer, whatever happened
            log.exception("cannot check the credentials of %.64r", username)
            return None

    # -- messages --------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> Effects:
        """One message from a gateway (``up/*``) or an operator (a request channel).

        Raises StorageUnavailable when the database cannot store what a
        gateway message caused (the message must not be acknowledged); never
        raises otherwise (an operator gets an error reply).
        """
        try:
            parts = topic.split("/", 6)
            if (
                len(parts) == 5
                and parts[:3] == ["shoal", "v1", "ops"]
                and parts[4] in _CHANNELS
                and ID_PATTERN.match(parts[3])
            ):
                return self._operators.handle(parts[3], Channel(parts[4]), payload)
            if (
                len(parts) == 6
                and parts[:3] == ["shoal", "v1", "gw"]
                and parts[4] == "up"
                and ID_PATTERN.match(parts[3])
            ):
                return self._gateway_message(parts[3], parts[5], topic, payload)
            log.warning("ignoring a message on %.*r: not a topic I serve", _MAX_TOPIC_LOG, topic)
        except (
            Exception
        ) as exc:  # a bug must not take the service down; the transaction rolled back
            if _is_storage_failure(exc):
                raise StorageUnavailable(
                    f"cannot store a message on {topic[:120]!r}: {exc}"
                ) from exc
            log.exception("internal error on a message on %.*r", _MAX_TOPIC_LOG, topic)
        return Effects()

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> Effects:
        """Many messages as ``(topic, payload)``; their effects in order, after the commits.

        Consecutive gateway messages share one transaction, each in a
        savepoint of its own: one that is refused (or hits a bug) changes
        nothing and gets its ERROR, the others keep what they did, exactly as
        if each had been handled alone. An operator request runs in its own
        transaction between the gateway messages around it (it may take
        seconds, and its refusal is audited after its rollback). When a shared
        transaction cannot be committed (disk full, I/O error) it is rolled
        back whole and its messages are handled again one by one; gateway
        messages are idempotent (a report carries its ``seq``, an ack its
        command number), so a message applied twice counts once.

        Raises StorageUnavailable when even one by one a message cannot be
        stored: its ``handled`` says how many messages, from the first, were
        stored (and may be acknowledged), ``effects`` what they caused.
        """
        effects = Effects()
        run: list[tuple[str, bytes]] = []
        handled = 0
        try:
            for topic, payload in messages:
                if topic.startswith(_OPERATOR_PREFIX):
                    effects.extend(self._handle_together(run))
                    handled += len(run)
                    run = []
                    effects.extend(self.handle(topic, payload))
                    handled += 1
                else:
                    run.append((topic, payload))
            effects.extend(self._handle_together(run))
        except StorageUnavailable as exc:
            raise StorageUnavailable(
                str(exc), handled=handled + exc.handled, effects=effects.extend(exc.effects)
            ) from exc
        return effects

    def _handle_together(self, messages: list[tuple[str, bytes]]) -> Effects:
        if len(messages) < 2:
            return Effects().extend(*(self.handle(t, p) for t, p in messages))
        effects = Effects()
        try:
            with self._db.atomic():
                for topic, payload in messages:
                    effects.extend(self.handle(topic, payload))
                    if not self._db.conn.in_transaction:  # an error like SQLITE_FULL ended it
                        raise sqlite3.DatabaseError("SQLite rolled the batch's transaction back")
        except Exception:
            log.exception("cannot commit %d messages together: handling them one by one",
                          len(messages))  # fmt: skip
            effects = Effects()
            for done, (topic, payload) in enumerate(messages):
                try:
                    effects.extend(self.handle(topic, payload))
                except StorageUnavailable as exc:
                    raise StorageUnavailable(str(exc), handled=done, effects=effects) from exc
        return effects

    def _gateway_message(self, gw: str, kind: str, topic: str, payload: bytes) -> Effects:
        gateway = self._registry.sender(gw)
        if gateway is None or gateway.state is GatewayState.DECOMMISSIONED:
            what = "unknown" if gateway is None else "decommissioned"
            log.warning("dropping %.32r from %s gateway %s", kind, what, gw)
            return Effects()
        try:
            try:
                handler = self._up[Up(kind)]
            except ValueError:
                raise MalformedError("topic", f"unknown message type {kind[:64]!r}") from None
            with savepoint(self._db):
                return handler(gateway, payload)
        except InvalidInput as exc:
            log.warning("refused %.32r from gateway %s: %s", kind, gw, exc)
            if gateway.state is not GatewayState.ACCEPTED:
                return Effects()
            return Effects([_error(gw, topic, str(exc))])

    def _on_hello(self, gateway: Sender, payload: bytes) -> Effects:
        m = fleet.decode_map(payload, fleet.HELLO, "hello")
        nodes = parse_node_ids(m["nodes"], "hello.nodes")
        handled = check_sql_int(m["handled_seq"], "hello.handled_seq")
        self._registry.set_attribute(gateway.id, "agent", m["agent"])
        self._registry.record_membership(gateway.id, nodes)
        self._registry.seen(gateway.id)
        if gateway.state is not GatewayState.ACCEPTED:
            return Effects()
        for command in self._outbox.ack_through(gateway.id, handled):
            self._deployments.acked(command)
        return self._send(self._outbox.unacked(gateway.id))

    def _on_state(self, gateway: Sender, payload: bytes) -> Effects:
        online = fleet.decode_map(payload, fleet.STATE, "state")["online"]
        self._registry.seen(gateway.id, online=online)
        if not online:
            self._blocks.drop(gateway.id)
        log.info("gateway %s is %s", gateway.id, "online" if online else "offline")
        return Effects()

    def _on_inventory(self, gateway: Sender, payload: bytes) -> Effects:
        m = fleet.decode_map(payload, fleet.INVENTORY, "inventory")
        reports = parse_node_reports(m["nodes"], "inventory.nodes")
        self._registry.record_reports(gateway.id, reports)
        self._registry.seen(gateway.id)
        return Effects()

    def _on_ack(self, gateway: Sender, payload: bytes) -> Effects:
        seq = check_sql_int(fleet.decode_map(payload, fleet.ACK, "ack")["seq"], "ack.seq")
        _require_accepted(gateway)
        command = self._outbox.ack(gateway.id, seq)
        if command is not None:
            self._deployments.acked(command)
        self._registry.seen(gateway.id)
        return Effects()

    def _on_status(self, gateway: Sender, payload: bytes) -> Effects:
        m = fleet.decode_map(payload, fleet.STATUS, "status")
        _require_accepted(gateway)
        node = self._deployments.apply_status(gateway.id, m)
        if node is not None and node.state in FINAL:
            self._rollouts.touch(node.deployment)
        self._registry.seen(gateway.id)
        return Effects()

    def _on_fetch(self, gateway: Sender, payload: bytes) -> Effects:
        digest, indices = fleet.decode_fetch(payload)
        _require_accepted(gateway)
        record = self._store.get(digest)
        if record is None or not self._deployments.offered(gateway.id, digest):
            raise InvalidInput(
                f"blocks requested for an artifact the gateway was not offered ({digest.hex()})"
            )
        past = [i for i in indices if i >= record.block_count]
        if past:
            raise InvalidInput(
                f"block {past[0]} is past the end of artifact {record.hex} "
                f"({record.block_count} blocks)"
            )
        self._registry.seen(gateway.id)
        refused = self._blocks.queue(gateway.id, digest, indices)
        if not refused:
            return Effects()
        topic = f"{ROOT}/gw/{gateway.id}/up/{Up.FETCH}"
        reason = (
            f"block queue full ({MAX_QUEUED_PER_GATEWAY} blocks per gateway): refused "
            f"{len(refused)} of {len(indices)} blocks ({refused[:8]}...); ask again later"
        )
        log.warning("gateway %s: %s", gateway.id, reason)
        return Effects([_error(gateway.id, topic, reason)])

    # -- timers ------------------------------------------------------------------------

    def tick(self) -> Effects:
        """Drive rollouts, re-send what is due, then serve queued blocks fairly. Never raises.

        Due: unacknowledged commands of accepted, online gateways never sent
        or last sent at least ``resend_after_s`` ago, at most
        ``commands_per_tick`` of them (the rest go with the next ticks). At
        most ``blocks_per_tick`` blocks, one per gateway in turn.
        """
        effects = Effects()
        try:
            self._rollouts.tick()
        except Exception:
            log.exception("internal error driving rollouts")
        try:
            with self._db.atomic():
                due = self._outbox.due(
                    self._clock(), self._resend_after_s, limit=self._commands_per_tick,
                    after_gateway=self._resend_cursor,
                )  # fmt: skip
                effects.extend(self._send(due))
            # A pass the limit cut goes on after its last gateway next tick.
            self._resend_cursor = due[-1].gateway if len(due) >= self._commands_per_tick else ""
        except Exception:
            log.exception("internal error re-sending commands")
        try:
            effects.extend(self._serve_blocks())
        except Exception:
            log.exception("internal error serving blocks")
        return effects

    def _serve_blocks(self) -> Effects:
        effects = Effects()
        records: dict[bytes, ArtifactRecord | None] = {}
        for request in self._blocks.serve(self._blocks_per_tick):
            if request.artifact not in records:
                records[request.artifact] = self._store.get(request.artifact)
            record = records[request.artifact]
            if record is None:
                continue
            try:
                data = self._store.read_block(record, request.index)
            except InvalidInput as exc:
                log.error("cannot serve block %d to %s: %s", request.index, request.gateway, exc)
                continue
            body = {"artifact": request.artifact, "index": request.index, "data": data}
            topic = gateway_down(request.gateway, Down.BLOCK)
            effects.outgoing.append(Outgoing(topic, fleet.encode_map(body)))
            self._served[(request.gateway, request.artifact)] += 1
        return effects

    def flush(self) -> Effects:
        """Commands never sent yet, for accepted online gateways, now (tick() does it too)."""
        with self._db.atomic():
            due = self._outbox.due(self._clock(), self._resend_after_s, unsent_only=True)
            return self._send(due)

    def _send(self, commands: list[Command]) -> Effects:
        self._outbox.mark_sent(commands)
        return Effects(
            [Outgoing(gateway_down(c.gateway, Down.COMMAND), c.payload) for c in commands]
        )

    # -- admin calls (the operator API uses them; so may the CLI and tests) -----------

    def add_gateway(self, gateway_id: str) -> str:
        """Register a pending gateway; its secret token, shown once. Raises InvalidInput."""
        with self._db.atomic():
            return self._registry.add_gateway(gateway_id)

    def accept_gateway(self, gateway_id: str) -> Effects:
        """Let a pending gateway receive commands. Raises InvalidInput."""
        with self._db.atomic():
            self._registry.move_gateway(gateway_id, GatewayState.ACCEPTED)
        return Effects()

    def decommission_gateway(self, gateway_id: str) -> Effects:
        """Retire a gateway for good: it can no longer connect and its live session is dropped.

        Its running deployments end as ``aborted``. Raises InvalidInput.
        """
        with self._db.atomic():
            old = self._registry.move_gateway(gateway_id, GatewayState.DECOMMISSIONED)
            if old is not GatewayState.DECOMMISSIONED:
                self._deployments.abort_gateway(gateway_id, "gateway decommissioned")
                self._registry.seen(gateway_id, online=False)
        self._blocks.drop(gateway_id)
        return Effects(disconnect=[gateway_id])

    def add_operator(self, operator_id: str, role: str = "admin") -> str:
        """Register an operator (viewer, deployer or admin); its secret. Raises InvalidInput."""
        with self._db.atomic():
            return self._registry.add_operator(operator_id, role)

    def operator_known(self, operator_id: str) -> bool:
        """True for a registered operator."""
        return self._registry.operator_role(operator_id) is not None

    def upload_artifact(self, data: bytes) -> ArtifactRecord:
        """Verify with the trusted keys and store an artifact (a no-op for stored bytes).

        Raises the InvalidInput family (see ArtifactStore.add).
        """
        with self._db.atomic():
            return self._store.add(data)

    def list_artifacts(self) -> dict[str, Any]:
        """Every stored artifact, for ``artifact.list``."""
        return {"artifacts": [r.to_public() for r in self._store.all()]}

    def create_deployment(self, artifact: str, nodes: list[str]) -> str:
        """Deploy a FULL artifact to ``gateway/node`` targets.

        ``artifact`` is the hex SHA-256 of the full artifact's file, or of its
        image (then the earliest stored full artifact of that image is used).
        Returns the deployment id. The deploy commands go out with the next
        tick() or flush(), or the gateway's next HELLO. Raises InvalidInput
        (MalformedError for bad arguments): the whole request is refused.
        """
        with self._db.atomic():
            return self._deployments.create(artifact, nodes)

    def cancel_deployment(self, deployment_id: str) -> Effects:
        """Send cancel commands for a deployment's running nodes. Raises InvalidInput,
        also for the deployment of a rollout (abort the rollout instead)."""
        with self._db.atomic():
            rollout = self._rollouts.owner(deployment_id)
            if rollout is not None:
                raise InvalidInput(
                    f"deployment {deployment_id} belongs to rollout {rollout}: abort that"
                )
            self._deployments.cancel(deployment_id)
        return self.flush()

    def deployment_events(self, deployment_id: str, node: str) -> dict[str, Any]:
        """Every event of one node (``gateway/node``) of a deployment. Raises InvalidInput."""
        return self._deployments.events(deployment_id, node)

    # -- rollouts, groups, operators, audit -----------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[object]:
        """One transaction (a savepoint when nested) around several admin calls."""
        with self._db.atomic():
            yield self

    def create_rollout(self, args: dict[str, Any], by: str) -> str:
        """Create (and, unless scheduled, start) a rollout from checked ``rollout.create``
        args; its id. Its first commands go out with the next tick() or flush().
        Raises InvalidInput (MalformedError for bad arguments): nothing is stored then."""
        with self._db.atomic():
            return self._rollouts.create(args, by)

    def rollout_action(self, rollout_id: str, event: RolloutEvent, by: str) -> Effects:
        """An operator's pause, resume or abort; the commands it caused. Raises InvalidInput
        (IllegalRolloutMove when the rollout's state does not allow it)."""
        with self._db.atomic():
            self._rollouts.act(rollout_id, event, by)
        return self.flush()

    def list_rollouts(self, state: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """Rollouts, newest first. Raises InvalidInput for an unknown state."""
        return self._rollouts.listing(state, limit)

    def show_rollout(self, rollout_id: str, node_limit: int | None = None) -> dict[str, Any]:
        """A rollout, its phases, nodes and events. Raises InvalidInput for an unknown one."""
        return self._rollouts.show(rollout_id, node_limit)

    def create_group(self, name: str, nodes: Any, node_filter: Any, by: str) -> dict[str, Any]:
        """A static (nodes) or dynamic (filter) group. Raises InvalidInput."""
        with self._db.atomic():
            return self._groups.create(name, nodes, node_filter, by)

    def list_groups(self) -> dict[str, Any]:
        """Every group and its definition."""
        return self._groups.listing()

    def show_group(self, name: str) -> dict[str, Any]:
        """A group and the nodes it holds now. Raises InvalidInput."""
        return self._groups.show(name)

    def delete_group(self, name: str) -> dict[str, Any]:
        """Delete a group no scheduled rollout waits for. Raises InvalidInput."""
        with self._db.atomic():
            return self._groups.delete(name)

    def set_attributes(self, device_id: str, attributes: Any) -> dict[str, Any]:
        """Set or remove attributes of a gateway or ``gateway/node``. Raises InvalidInput."""
        with self._db.atomic():
            result = self._registry.set_attributes(device_id, attributes)
        return {"id": device_id, "attributes": result}

    def operator_role(self, operator_id: str) -> OperatorRole | None:
        """The operator's role, or None for an unknown operator."""
        return self._registry.operator_role(operator_id)

    def list_operators(self) -> dict[str, Any]:
        """Every operator and its role."""
        return {"operators": self._registry.operators()}

    def record_audit(
        self, operator: str, role: str | None, op: str, args: Any, error: str | None
    ) -> None:
        """One operator request in the audit log (error None: it succeeded)."""
        with self._db.atomic():
            self._audit.record(operator, role, op, args, error)

    def list_audit(
        self, limit: int | None = None, operator: str | None = None, op: str | None = None
    ) -> dict[str, Any]:
        """The newest audit entries first."""
        return self._audit.entries(limit, operator, op)

    def deployment_status(self, deployment_id: str) -> dict[str, Any]:
        """A deployment, its per-node states, bytes and events. Raises InvalidInput.

        Each node also gets ``blocks_served``: the blocks of its artifact (and
        fallback) this orchestrator sent to its gateway since it started, shared
        by that gateway's nodes fetching the same artifact. Set against the
        artifact's block count it shows what resumable downloads save, or a
        gateway fetching the same blocks again; the gateway's ``mqtt_bytes``
        only says what arrived.
        """
        status = self._deployments.status(deployment_id)
        for node in status["nodes"]:
            digests = {d for d in (node["artifact"], node["full"]) if d is not None}
            node["blocks_served"] = sum(
                self._served[(node["gateway"], bytes.fromhex(d))] for d in digests
            )
        return status

    def list_devices(self) -> dict[str, Any]:
        """Every gateway with its nodes, for ``devices.list``."""
        return {
            "gateways": [
                {**g.to_public(), "nodes": [n.to_public() for n in self._registry.nodes(g.id)]}
                for g in self._registry.gateways()
            ]
        }

    def show_device(self, device_id: str) -> dict[str, Any]:
        """One gateway (``id``) or node (``gateway/node``) in detail. Raises InvalidInput."""
        gateway_id, _, node_id = device_id.partition("/")
        gateway = self._registry.require_gateway(gateway_id)
        if node_id:
            node = self._registry.node(gateway_id, node_id)
            if node is None:
                raise InvalidInput(f"unknown node {device_id[:140]!r}")
            history = self._deployments.of_node(gateway_id, node_id)
            return {**node.to_public(), "deployments": history}
        return {
            **gateway.to_public(),
            "unacked_commands": len(self._outbox.unacked(gateway_id)),
            "nodes": [
                {**n.to_public(), "deployments": self._deployments.of_node(gateway_id, n.node)}
                for n in self._registry.nodes(gateway_id)
            ],
        }


def _require_accepted(gateway: Sender) -> None:
    if gateway.state is not GatewayState.ACCEPTED:
        raise InvalidInput(f"gateway {gateway.id} is {gateway.state}, not accepted")


def _clip(text: str, limit_bytes: int) -> str:
    return text.encode(errors="replace")[:limit_bytes].decode(errors="ignore")


def _error(gateway: str, topic: str, reason: str) -> Outgoing:
    """An ERROR for ``gateway``: its message on ``topic`` was refused, and why (one line)."""
    body = {
        "topic": _clip(topic, 256) or "?",
        "reason": _clip(" ".join(reason.split()), 4096) or "refused",
    }
    return Outgoing(gateway_down(gateway, Down.ERROR), fleet.encode_map(body))


def _load_or_create_secret(path: Path) -> str:
    """The orchestrator account's secret: read, or made and stored (mode 0600) on first start."""
    if path.exists():
        try:
            secret = read_bounded(path, MAX_SECRET_FILE_BYTES, "secret file").decode().strip()
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{path} is not a text file") from exc
        if not secret:
            raise InvalidInput(f"{path} is empty")
        return secret
    secret = new_token()
    write_atomic(path, secret.encode() + b"\n", mode=0o600)
    log.info("created the orchestrator's broker secret in %s", path)
    return secret
