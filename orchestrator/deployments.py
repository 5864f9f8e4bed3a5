"""Deployments: one node's part of an update, its state machine, and how reports move it.

Rules (architecture.md §State machines; ``docs/topics.md`` §Gateway messages):

* A deployment names one FULL artifact, by the SHA-256 of its file or of the
  image it carries (then the earliest stored full artifact of that image),
  and a set of ``gateway/node`` targets. Per node the orchestrator chooses at
  creation: ``incompatible`` (wrong device type, or an image not newer than the one
  installed: the node's anti-rollback would refuse it), ``skipped`` (the node
  already runs the image), or ``pending`` with the delta whose base is the
  node's running image (and the full artifact as the fallback), else the full
  artifact. A request naming an unknown or absent node, a gateway that is not
  accepted, or a node with another deployment still running is refused whole.
* States are :class:`DeploymentState`, stored by name; every move is checked
  against :data:`TRANSITIONS` and refused with an error naming both states.
* The orchestrator owns ``pending`` (created, or retried), ``offered`` (the
  deploy command was acknowledged) and ``incompatible``. Everything else is
  the gateway's report (STATUS), mapped from its words by :data:`REPORTED`
  (``already_installed`` -> ``skipped``, ``rejected`` -> ``failed``).
* A gateway's reports are ordered by their own ``seq`` per (deployment,
  node): one not above the last accepted is a replay or overtaken and is
  ignored (logged, no error). A repeated report of the final state a node is
  already in is ignored the same way.
* The table is explicit about what a gateway may skip or repeat and why:
  reports may be lost (so any later state may follow any earlier one, and a
  final state may follow any active one), progress repeats a state, a
  gateway restarted mid-install resumes from its download (install ->
  ``downloading``/``downloaded``), and the serial transfer restarts from the
  node's HELLO (any install state -> ``flashing``). Final states stay final,
  except that an operator's retry takes ``failed``, ``rolled_back`` and
  ``aborted`` back to ``pending``.
* Every accepted move is a row in ``events`` (deployment, gateway, node, at,
  state, detail JSON), written in the same transaction as the move; so is
  every other change of a node's row. The rollout engine relies on it: it
  reads again only the nodes with events newer than the last it read.
* ``deferred`` is a gateway's word for "a state hook asked to try later":
  nothing was written to the node for the phase it held back, and any active
  state may follow it (the gateway retries on its own, a bounded number of
  times).
* ``timed_out`` is the orchestrator's: a rollout's per-state timeout fired
  (:mod:`orchestrator.rollouts`). A retry (``failed`` or ``timed_out`` ->
  ``pending``) starts a new *attempt*: the node's status numbering restarts
  and its commands carry the wire id ``{deployment}-r{attempt}``, so the
  gateway runs it as a new job, and reports of an earlier attempt (a gateway
  repeats its final reports after every reconnect) are recognised and
  ignored instead of moving the new attempt.
* Whether a final state may be retried is decided when it is reached and
  stored with it (``retryable``), by :data:`RETRY_RULES`: a node that refused
  the image or rolled it back would do so again; a lost link, a busy node or
  a timeout may not happen twice.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlite_utils import Database

from orchestrator import diagrams
from orchestrator.db import check_sql_int, fetch_all, one
from orchestrator.outbox import Command, CommandType, NewCommand, Outbox
from orchestrator.registry import GatewayState, Node, Registry
from orchestrator.store import ArtifactRecord, ArtifactStore, parse_hex_digest
from otaproto.errors import InvalidInput, MalformedError, UsageError
from otaproto.topics import ID_PATTERN

log = logging.getLogger("shoal.orchestrator")

#: Most targets one deployment may name.
MAX_TARGETS = 10_000
#: Most problems listed in one refusal of a deployment request.
MAX_PROBLEMS_SHOWN = 5
#: Most events per node in a status reply (the newest).
MAX_EVENTS_SHOWN = 20
#: Most events one ``deploy.events`` reply lists (the newest).
MAX_EVENTS_LISTED = 500
#: Most attempts (the first and its retries) a node's deployment may have.
MAX_ATTEMPTS = 100
_RETRY_MARK = "-r"


class DeploymentState(StrEnum):
    """Where one node's deployment stands."""

    PENDING = "pending"
    OFFERED = "offered"
    DEFERRED = "deferred"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    FLASHING = "flashing"
    VERIFYING = "verifying"
    REBOOTING = "rebooting"
    CONFIRMING = "confirming"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    INCOMPATIBLE = "incompatible"
    ABORTED = "aborted"
    TIMED_OUT = "timed_out"


S = DeploymentState

#: States in which the node's deployment is still running (in path order).
ACTIVE: tuple[DeploymentState, ...] = (
    S.PENDING, S.OFFERED, S.DEFERRED, S.DOWNLOADING, S.DOWNLOADED,
    S.FLASHING, S.VERIFYING, S.REBOOTING, S.CONFIRMING,
)  # fmt: skip
FINAL = frozenset(S) - frozenset(ACTIVE)
#: The active states as an SQL list (our own constants), so that the index on state is used.
_ACTIVE_SQL = ", ".join(f"'{s}'" for s in ACTIVE)

_DOWNLOAD = frozenset({S.DOWNLOADING, S.DOWNLOADED})  # the gateway fetches and rebuilds
_INSTALL = frozenset({S.FLASHING, S.VERIFYING, S.REBOOTING, S.CONFIRMING})  # serial + boot
_QUEUED = frozenset({S.PENDING, S.OFFERED})  # the orchestrator's, before the gateway reports
_HELD = frozenset({S.DEFERRED})  # a gateway's state hook asked to retry later
_ENDINGS = frozenset({S.SUCCEEDED, S.FAILED, S.ROLLED_BACK, S.SKIPPED, S.ABORTED})
_ENDS = _ENDINGS | {S.TIMED_OUT}  # reported by the gateway, or a timeout

#: Allowed moves: state -> the states it may go to next.
TRANSITIONS: Mapping[DeploymentState, frozenset[DeploymentState]] = {
    # acked, or the gateway's reports overtook a lost ack
    S.PENDING: frozenset({S.OFFERED}) | _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    S.OFFERED: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    # a hook deferred the next phase; the gateway tries again later (it caps the tries)
    S.DEFERRED: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    # progress repeats a state; a download that failed its digest check starts again
    S.DOWNLOADING: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    S.DOWNLOADED: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    # a restarted gateway resumes from its download; the serial transfer restarts at HELLO
    S.FLASHING: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    S.VERIFYING: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    S.REBOOTING: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    S.CONFIRMING: _HELD | _DOWNLOAD | _INSTALL | _ENDS,
    # final; a retry (a rollout's, for failed and timed_out) goes back to pending
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.PENDING}),
    S.ROLLED_BACK: frozenset({S.PENDING}),
    S.SKIPPED: frozenset(),
    S.INCOMPATIBLE: frozenset(),
    S.ABORTED: frozenset({S.PENDING}),
    S.TIMED_OUT: frozenset({S.PENDING}),
}
#: States a deployment row may be created in.
INITIAL: tuple[DeploymentState, ...] = (S.PENDING, S.SKIPPED, S.INCOMPATIBLE)
#: Final states that count as "on the target" (for a rollout's success threshold).
SUCCESSFUL = frozenset({S.SUCCEEDED, S.SKIPPED})
#: Final states that count as failures (for a rollout's failure threshold).
UNSUCCESSFUL = frozenset({S.FAILED, S.ROLLED_BACK, S.ABORTED, S.TIMED_OUT})

#: Whether a retry may help, by the gateway's final word and how its reason
#: starts (first match wins; "" matches any reason). Timeouts are always retryable.
RETRY_RULES: tuple[tuple[str, str, bool], ...] = (
    ("rejected", "", False),  # the node refused it: signature, device type, rollback, size
    ("rolled_back", "", False),  # the image failed its self-test: it would again
    ("failed", "artifact refused by the gateway", False),  # bad signature, digest, device
    ("failed", "no node ", False),  # that gateway has no such node configured
    ("failed", "", True),  # link lost, node busy or silent, serial errors: may pass next time
)

#: The gateway's words in STATUS ``state`` -> the state they move the node to.
REPORTED: Mapping[str, DeploymentState] = {
    "deferred": S.DEFERRED,
    "downloading": S.DOWNLOADING,
    "downloaded": S.DOWNLOADED,
    "flashing": S.FLASHING,
    "verifying": S.VERIFYING,
    "rebooting": S.REBOOTING,
    "confirming": S.CONFIRMING,
    "succeeded": S.SUCCEEDED,
    "failed": S.FAILED,
    "rolled_back": S.ROLLED_BACK,
    "aborted": S.ABORTED,
    "already_installed": S.SKIPPED,
    "rejected": S.FAILED,
}


class IllegalTransition(InvalidInput):
    """A move the deployment table does not allow (from a report, or asked for)."""

    def __init__(self, where: str, old: DeploymentState, new: DeploymentState) -> None:
        super().__init__(f"{where} cannot go from {old} to {new}")
        self.old = old
        self.new = new


def check_transition(old: DeploymentState, new: DeploymentState, where: str) -> None:
    """Refuse a move that :data:`TRANSITIONS` does not list. Raises IllegalTransition."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(where, old, new)


def is_retryable(reported: str, reason: str | None) -> bool:
    """Whether a gateway's final report (its word and reason) may be retried (RETRY_RULES)."""
    for word, prefix, retryable in RETRY_RULES:
        if reported == word and (reason or "").startswith(prefix):
            return retryable
    return False


def retry_markdown() -> str:
    """The retry rules table of ``docs/rollouts.md``, from :data:`RETRY_RULES`."""
    lines = ["| gateway reports | reason starts with | retried |", "|---|---|---|"]
    for word, prefix, retryable in RETRY_RULES:
        lines.append(
            f"| `{word}` | {f'`{prefix}`' if prefix else 'anything'} | "
            f"{'yes' if retryable else 'no'} |"
        )
    lines.append("| (timeout) | - | yes |")
    return "\n".join(lines) + "\n"


def wire_id(deployment: str, attempt: int) -> str:
    """The deployment id commands of this attempt carry (the first attempt: the id itself)."""
    return deployment if attempt == 0 else f"{deployment}{_RETRY_MARK}{attempt}"


def split_wire_id(text: str) -> tuple[str, int]:
    """(deployment, attempt) of an id from a gateway; a non-canonical id is taken as it is."""
    base, mark, number = text.rpartition(_RETRY_MARK)
    if mark and number.isdigit() and number.isascii():
        attempt = int(number[:4])
        if 0 < attempt < MAX_ATTEMPTS and wire_id(base, attempt) == text:
            return base, attempt
    return text, 0


#: The boxes the deployment diagram groups states into (see orchestrator.diagrams).
DIAGRAM_BOXES = (
    diagrams.Box(
        "active",
        boxes=(
            diagrams.Box("queued", tuple(str(s) for s in ACTIVE if s in _QUEUED | _HELD)),
            diagrams.Box("download", tuple(str(s) for s in ACTIVE if s in _DOWNLOAD)),
            diagrams.Box("install", tuple(str(s) for s in ACTIVE if s in _INSTALL)),
        ),
    ),
)
#: Who makes the moves into these states (the others are the gateway's reports).
_DIAGRAM_LABELS = {str(S.OFFERED): "ack", str(S.TIMED_OUT): "timeout", str(S.PENDING): "retry"}


def diagram() -> list[diagrams.Drawn]:
    """The arrows of the deployment diagram, standing for exactly :data:`TRANSITIONS`."""
    edges = [(str(a), str(b)) for a, targets in TRANSITIONS.items() for b in targets]
    return diagrams.cover(
        edges, [str(s) for s in S], DIAGRAM_BOXES, lambda _, b: _DIAGRAM_LABELS.get(b)
    )


def mermaid() -> str:
    """The deployment state machine as a Mermaid ``stateDiagram-v2`` (for docs/rollouts.md)."""
    return diagrams.render(diagram(), DIAGRAM_BOXES, [str(s) for s in INITIAL])


@dataclass(frozen=True)
class Plan:
    """What a new deployment does for one node."""

    gateway: str
    node: str
    state: DeploymentState  #: pending, skipped or incompatible
    chosen: ArtifactRecord | None  #: what the gateway fetches (pending only)
    full: ArtifactRecord | None  #: the fallback when ``chosen`` is a delta
    reason: str | None


def plan_node(target: ArtifactRecord, node: Node, deltas: list[ArtifactRecord]) -> Plan:
    """Decide one node's part of a deployment of ``target`` (a full artifact).

    ``deltas`` are the stored deltas to the target image, smallest first.
    Raises InvalidInput when the node has never reported its device type.
    """
    gw, name = node.gateway, node.node
    if node.device_type is None:
        raise InvalidInput(f"node {node.target} has not reported its device type yet")
    if node.device_type not in target.device_types:
        why = f"artifact is for {', '.join(target.device_types)}, node is {node.device_type}"
        return Plan(gw, name, S.INCOMPATIBLE, None, None, why)
    running = node.primary
    if running is not None and running.digest == target.image_digest:
        return Plan(gw, name, S.SKIPPED, None, None, f"already runs {target.version}")
    if running is not None and running.sequence >= target.sequence:
        why = (
            f"runs sequence {running.sequence}, not older than {target.sequence}: "
            "the node's anti-rollback would refuse it"
        )
        return Plan(gw, name, S.INCOMPATIBLE, None, None, why)
    for delta in deltas:
        if (
            running is not None
            and delta.base_digest == running.digest
            and node.device_type in delta.device_types
        ):
            return Plan(gw, name, S.PENDING, delta, target, None)
    return Plan(gw, name, S.PENDING, target, None, None)


@dataclass(frozen=True)
class NodeRow:
    """One node's deployment as the rollout engine sees it."""

    deployment: str
    gateway: str
    node: str
    state: DeploymentState
    status_seq: int
    attempt: int
    entered: float
    retryable: bool
    reason: str | None

    @property
    def target(self) -> str:
        """The ``gateway/node`` name operators use."""
        return f"{self.gateway}/{self.node}"

    @property
    def where(self) -> str:
        again = f" (attempt {self.attempt + 1})" if self.attempt else ""
        return f"deployment {self.deployment} of {self.gateway}/{self.node}{again}"


_ROW_COLUMNS = (
    "deployment, gateway, node, state, status_seq, attempt, COALESCE(entered, updated) AS entered,"
    " retryable, reason"
)


class Deployments:
    """Deployments in the database. The caller holds the transaction; not thread-safe."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], float],
        registry: Registry,
        store: ArtifactStore,
        outbox: Outbox,
    ) -> None:
        self._db = db
        self._clock = clock
        self._registry = registry
        self._store = store
        self._outbox = outbox

    # -- operators' side -----------------------------------------------------------

    def full_artifact(self, artifact: Any) -> ArtifactRecord:
        """The full artifact named by its file's or its image's hex SHA-256.

        Raises MalformedError for a bad digest and InvalidInput for an unknown
        artifact or a delta (deltas are chosen per node).
        """
        record = self._store.find_full(parse_hex_digest(artifact, "artifact"))
        if record is None:
            raise InvalidInput(f"unknown artifact {artifact}")
        if record.is_delta:
            raise InvalidInput(
                f"artifact {artifact} is a delta: deploy the full artifact "
                "(deltas are chosen per node)"
            )
        return record

    def create(self, artifact: Any, targets: Any) -> str:
        """Create a deployment of a full artifact to ``gateway/node`` targets; its id.

        Queues a deploy command for every pending node (published by the caller
        after the commit). Raises MalformedError for a bad argument and
        InvalidInput for anything refused (the whole request is refused).
        """
        record = self.full_artifact(artifact)
        if not isinstance(targets, list) or not targets:
            raise MalformedError("nodes", "must be a non-empty list of 'gateway/node'")
        if len(targets) > MAX_TARGETS:
            raise MalformedError("nodes", f"{len(targets)} targets, over {MAX_TARGETS}")
        deltas = self._store.deltas_to(record.image_digest)
        plans: list[Plan] = []
        problems: list[str] = []
        seen: set[str] = set()
        for target in targets:
            try:
                plans.append(self._plan(record, target, seen, deltas))
            except InvalidInput as exc:
                problems.append(str(exc))
        if problems:
            more = len(problems) - MAX_PROBLEMS_SHOWN
            shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
            raise InvalidInput(shown + (f" (and {more} more)" if more > 0 else ""))
        deployment = self.open(record)
        self.add_many(deployment, plans)
        log.info(
            "deployment %s of %s %s created for %d nodes",
            deployment, record.name, record.version, len(plans),
        )  # fmt: skip
        return deployment

    def open(self, record: ArtifactRecord) -> str:
        """A new deployment of ``record`` with no nodes yet (a rollout adds them phase by phase)."""
        deployment = "dep-" + secrets.token_hex(8)
        self._db.execute(
            "INSERT INTO deployments (id, artifact, created) VALUES (?, ?, ?)",
            [deployment, record.hex, self._clock()],
        )
        return deployment

    def add(self, deployment: str, p: Plan) -> None:
        """Add one planned node to a deployment; a pending one gets its deploy command queued.

        The caller checked that the node has no other deployment running.
        """
        self.add_many(deployment, [p])

    def add_many(self, deployment: str, plans: Sequence[Plan]) -> None:
        """:meth:`add` for many nodes, in order, with a few statements for all of them.

        Each node's row, its deploy command (when it has an artifact to fetch)
        and its first event, as :meth:`add` writes them, in the caller's
        transaction. The caller checked that no node has another deployment
        running.
        """
        if not plans:
            return
        now = self._clock()
        self._db.conn.executemany(
            "INSERT INTO deployment_nodes (deployment, gateway, node, state, artifact, full,"
            " reason, updated, entered) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    deployment, p.gateway, p.node, str(p.state),
                    None if p.chosen is None else p.chosen.hex,
                    None if p.full is None else p.full.hex, p.reason, now, now,
                )
                for p in plans
            ],
        )  # fmt: skip
        sending = [p for p in plans if p.chosen is not None]
        commands = iter(
            self._outbox.enqueue_many([self._new_deploy(deployment, 0, p) for p in sending])
        )
        events: list[tuple[str, str, DeploymentState, dict[str, Any]]] = []
        for p in plans:
            detail: dict[str, Any] = {"reason": p.reason}
            if p.chosen is not None:
                detail.update(_command_detail(p.chosen, next(commands)))
            events.append((p.gateway, p.node, p.state, detail))
        self._events_many(deployment, events)

    def plan(self, record: ArtifactRecord, node: Node) -> Plan:
        """:func:`plan_node` with the stored deltas to ``record``'s image. Raises InvalidInput."""
        return plan_node(record, node, self._store.deltas_to(record.image_digest))

    def _deploy_command(self, deployment: str, attempt: int, p: Plan) -> dict[str, Any]:
        if p.chosen is None:
            raise UsageError(f"no artifact chosen for {p.gateway}/{p.node}")
        command = self._outbox.enqueue_many([self._new_deploy(deployment, attempt, p)])[0]
        return _command_detail(p.chosen, command)

    @staticmethod
    def _new_deploy(deployment: str, attempt: int, p: Plan) -> NewCommand:
        if p.chosen is None:
            raise UsageError(f"no artifact chosen for {p.gateway}/{p.node}")
        return NewCommand(
            p.gateway, CommandType.DEPLOY, wire_id(deployment, attempt), p.node,
            artifact=p.chosen.ref(), full=None if p.full is None else p.full.ref(),
        )  # fmt: skip

    def _plan(
        self, record: ArtifactRecord, target: Any, seen: set[str], deltas: list[ArtifactRecord]
    ) -> Plan:
        if not isinstance(target, str):
            raise MalformedError("nodes", "every target must be a 'gateway/node' string")
        gateway_id, _, node_id = target.partition("/")
        if not ID_PATTERN.match(gateway_id) or not ID_PATTERN.match(node_id):
            raise InvalidInput(f"{target[:140]!r} is not 'gateway/node'")
        if target in seen:
            raise InvalidInput(f"{target} is listed twice")
        seen.add(target)
        gateway = self._registry.gateway(gateway_id)
        if gateway is None:
            raise InvalidInput(f"unknown gateway {gateway_id}")
        if gateway.state is not GatewayState.ACCEPTED:
            raise InvalidInput(f"gateway {gateway_id} is {gateway.state}, not accepted")
        node = self._registry.node(gateway_id, node_id)
        if node is None or not node.present:
            raise InvalidInput(f"unknown node {target}")
        running = self.active_deployment(gateway_id, node_id)
        if running is not None:
            raise InvalidInput(f"node {target} is still in deployment {running}")
        return plan_node(record, node, deltas)

    def cancel(self, deployment: str) -> list[Command]:
        """Ask the gateways to stop a deployment's running nodes; the cancel commands queued.

        Nodes change state only when their gateway reports (``aborted``, or
        what had already happened); a second cancel is a no-op. Raises
        InvalidInput for an unknown deployment.
        """
        row = one(self._db, "SELECT * FROM deployments WHERE id = ?", [deployment])
        if row is None:
            raise InvalidInput(f"unknown deployment {deployment!r}")
        if row["cancelled"] is not None:
            return []
        self._db.execute(
            "UPDATE deployments SET cancelled = ? WHERE id = ?", [self._clock(), deployment]
        )
        commands: list[Command] = []
        for r in self._active_rows(deployment=deployment):
            command = self._cancel_command(r)
            if command is not None:
                self._event(deployment, r.gateway, r.node, r.state, {"cancel": command.seq})
                commands.append(command)
        log.info("deployment %s cancelled: %d cancel commands", deployment, len(commands))
        return commands

    def _cancel_command(self, r: NodeRow) -> Command | None:
        """Queue a cancel of the node's current attempt, when its gateway can still get one."""
        gateway = self._registry.gateway(r.gateway)
        if gateway is None or gateway.state is not GatewayState.ACCEPTED:
            return None
        return self._outbox.enqueue(
            r.gateway, CommandType.CANCEL, wire_id(r.deployment, r.attempt), r.node
        )

    def status(self, deployment: str) -> dict[str, Any]:
        """A deployment and each node's state, bytes and newest events. Raises InvalidInput."""
        row = one(self._db, "SELECT * FROM deployments WHERE id = ?", [deployment])
        if row is None:
            raise InvalidInput(f"unknown deployment {deployment!r}")
        record = self._store.get(bytes.fromhex(row["artifact"]))
        nodes: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        for n in fetch_all(
            self._db,
            "SELECT * FROM deployment_nodes WHERE deployment = ? ORDER BY gateway, node",
            [deployment],
        ):
            counts[n["state"]] = counts.get(n["state"], 0) + 1
            events = self._events(deployment, n["gateway"], n["node"], MAX_EVENTS_SHOWN)
            nodes.append({
                "gateway": n["gateway"], "node": n["node"],
                "target": f"{n['gateway']}/{n['node']}", "state": n["state"],
                "artifact": n["artifact"], "full": n["full"], "bytes": n["bytes"],
                "total": n["total"], "mqtt_bytes": n["mqtt_bytes"],
                "serial_bytes": n["serial_bytes"], "reason": n["reason"], "updated": n["updated"],
                "attempt": n["attempt"], "events": events,
            })  # fmt: skip
        active = any(DeploymentState(n["state"]) in ACTIVE for n in nodes)
        return {
            "id": deployment, "artifact": row["artifact"],
            "name": None if record is None else record.name,
            "version": None if record is None else record.version,
            "created": row["created"], "cancelled": row["cancelled"],
            "state": "active" if active else "finished", "counts": counts, "nodes": nodes,
        }  # fmt: skip

    def events(self, deployment: str, target: str) -> dict[str, Any]:
        """Every event (the newest MAX_EVENTS_LISTED) of one node of a deployment.

        Raises InvalidInput for an unknown deployment or a node not in it.
        """
        if one(self._db, "SELECT 1 FROM deployments WHERE id = ?", [deployment]) is None:
            raise InvalidInput(f"unknown deployment {deployment[:64]!r}")
        gateway, _, node = target.partition("/")
        row = self._row(deployment, gateway, node)
        if row is None:
            raise InvalidInput(f"node {target[:140]!r} is not in deployment {deployment}")
        return {
            "deployment": deployment, "target": row.target, "state": str(row.state),
            "attempt": row.attempt,
            "events": self._events(deployment, gateway, node, MAX_EVENTS_LISTED),
        }  # fmt: skip

    def _events(self, deployment: str, gateway: str, node: str, limit: int) -> list[dict[str, Any]]:
        rows = list(
            fetch_all(
                self._db,
                "SELECT at, state, detail FROM events WHERE deployment = ? AND gateway = ?"
                " AND node = ? ORDER BY id DESC LIMIT ?",
                [deployment, gateway, node, limit],
            )
        )
        return [
            {"at": e["at"], "state": e["state"], "detail": json.loads(e["detail"])}
            for e in reversed(rows)
        ]

    def of_node(self, gateway: str, node: str) -> list[dict[str, Any]]:
        """The deployments a node was part of, newest first (for ``devices.show``)."""
        rows = fetch_all(
            self._db,
            "SELECT dn.deployment, dn.state, dn.updated, d.artifact FROM deployment_nodes dn"
            " JOIN deployments d ON d.id = dn.deployment WHERE dn.gateway = ? AND dn.node = ?"
            " ORDER BY d.created DESC, dn.deployment",
            [gateway, node],
        )
        return [
            {"id": r["deployment"], "state": r["state"], "updated": r["updated"],
             "artifact": r["artifact"]}
            for r in rows
        ]  # fmt: skip

    # -- the rollout engine's side -----------------------------------------------------

    def node_rows(self, deployment: str) -> list[NodeRow]:
        """Every node of a deployment, by gateway and node."""
        rows = fetch_all(
            self._db,
            f"SELECT {_ROW_COLUMNS} FROM deployment_nodes WHERE deployment = ?"  # noqa: S608
            " ORDER BY gateway, node",
            [deployment],
        )
        return [_as_row(r) for r in rows]

    def time_out(self, row: NodeRow, reason: str) -> None:
        """End a node's attempt that stayed too long in one state: ``timed_out``, retryable.

        A cancel of the attempt is queued, so a gateway that still has the job
        drops it (unless it is flashing: a flash is never cut short). Raises
        IllegalTransition for a node that is not active.
        """
        command = self._cancel_command(row)
        detail: dict[str, Any] = {"reason": reason, "attempt": row.attempt or None}
        if command is not None:
            detail["cancel"] = command.seq
        self._move(row, S.TIMED_OUT, detail, reason=reason, retryable=True)

    def retry(self, row: NodeRow, record: ArtifactRecord) -> None:
        """Start the next attempt of a ``failed`` or ``timed_out`` node: ``pending`` again.

        The artifact is chosen again for the image the node runs now; a node
        that meanwhile runs the target ends ``skipped`` at once. Raises
        IllegalTransition when the node is in no retryable state.
        """
        check_transition(row.state, S.PENDING, row.where)
        attempt = row.attempt + 1
        node = self._registry.node(row.gateway, row.node)
        plan = Plan(row.gateway, row.node, S.PENDING, record, None, None)
        if node is not None and node.device_type is not None:
            replanned = self.plan(record, node)
            if replanned.state is not S.INCOMPATIBLE:  # else: send it anyway; the node decides
                plan = replanned
        self._db.execute(
            "UPDATE deployment_nodes SET state = ?, attempt = ?, status_seq = 0, bytes = NULL,"
            " total = NULL, mqtt_bytes = NULL, serial_bytes = NULL, retryable = 0, reason = NULL,"
            " artifact = ?, full = ?, updated = ?, entered = ?"
            " WHERE deployment = ? AND gateway = ? AND node = ?",
            [
                str(S.PENDING), attempt, None if plan.chosen is None else plan.chosen.hex,
                None if plan.full is None else plan.full.hex, self._clock(), self._clock(),
                row.deployment, row.gateway, row.node,
            ],
        )  # fmt: skip
        detail: dict[str, Any] = {"attempt": attempt, "retry_of": str(row.state)}
        if plan.state is S.PENDING and plan.chosen is not None:
            detail.update(self._deploy_command(row.deployment, attempt, plan))
        self._event(row.deployment, row.gateway, row.node, S.PENDING, detail)
        log.info("%s: %s -> pending (attempt %d)", row.where, row.state, attempt + 1)
        if plan.state is S.SKIPPED:
            moved = NodeRow(
                row.deployment, row.gateway, row.node, S.PENDING, 0, attempt, self._clock(),
                False, None,
            )  # fmt: skip
            self._move(moved, S.SKIPPED, {"reason": plan.reason}, reason=plan.reason)

    def abort_unstarted(self, deployment: str, plan: Plan, reason: str) -> None:
        """Record a node that cannot start at all (its gateway is gone): pending, then aborted."""
        self.add(deployment, Plan(plan.gateway, plan.node, S.PENDING, None, None, None))
        row = self._row(deployment, plan.gateway, plan.node)
        if row is None:  # pragma: no cover - inserted just above
            raise UsageError(f"{plan.gateway}/{plan.node} vanished inside its own transaction")
        self._move(row, S.ABORTED, {"reason": reason}, reason=reason)

    # -- gateways' side --------------------------------------------------------------

    def apply_status(self, gateway: str, m: Mapping[str, Any]) -> NodeRow | None:
        """Apply one checked STATUS map from ``gateway``; the node as it is now, or None.

        None when the report was ignored: a replay, overtaken, a repeated final
        state, or a report of an earlier attempt. Raises InvalidInput for an
        unknown deployment, a node that is not this gateway's in it, an
        unknown attempt, an unknown state word, and (IllegalTransition) a move
        the table refuses.
        """
        deployment, attempt = split_wire_id(m["deployment"])
        row = self._row(deployment, gateway, m["node"])
        if row is None:
            if one(self._db, "SELECT 1 FROM deployments WHERE id = ?", [deployment]):
                raise InvalidInput(
                    f"node {m['node'][:64]!r} of gateway {gateway} "
                    f"is not in deployment {deployment}"
                )
            raise InvalidInput(f"unknown deployment {m['deployment'][:64]!r}")
        new = REPORTED.get(m["state"])
        if new is None:
            raise MalformedError("status.state", f"unknown state {m['state'][:64]!r}")
        for key in ("seq", "bytes", "total", "mqtt_bytes", "serial_bytes"):
            if m[key] is not None:
                check_sql_int(m[key], f"status.{key}")
        if m["bytes"] is not None and m["total"] is not None and m["bytes"] > m["total"]:
            raise MalformedError("status.bytes", "more than total")
        if attempt < row.attempt:
            log.info(
                "ignoring status %s of attempt %d of %s: superseded by a retry",
                m["state"][:32], attempt + 1, row.where,
            )  # fmt: skip
            return None
        if attempt > row.attempt:
            raise InvalidInput(f"{row.where} has no attempt {attempt + 1}")
        if m["seq"] <= row.status_seq:
            log.info(
                "ignoring status %d (%s) of %s: already at status %d",
                m["seq"], m["state"], row.where, row.status_seq,
            )  # fmt: skip
            return None
        if new is row.state and new in FINAL:
            log.info("ignoring a repeated %s of %s", new, row.where)
            return None
        check_transition(row.state, new, row.where)
        reason = m["reason"]
        if reason is None and m["state"] in ("rejected", "already_installed"):
            reason = m["state"].replace("_", " ")
        retryable = new in FINAL and is_retryable(m["state"], m["reason"])
        now = self._clock()
        entered = row.entered if new is row.state else now
        self._db.execute(
            "UPDATE deployment_nodes SET state = ?, status_seq = ?, bytes = ?, total = ?,"
            " mqtt_bytes = COALESCE(?, mqtt_bytes), serial_bytes = COALESCE(?, serial_bytes),"
            " reason = ?, updated = ?, entered = ?, retryable = ?"
            " WHERE deployment = ? AND gateway = ? AND node = ?",
            [
                str(new), m["seq"], m["bytes"], m["total"], m["mqtt_bytes"], m["serial_bytes"],
                reason, now, entered, int(retryable), row.deployment, gateway, row.node,
            ],
        )  # fmt: skip
        detail = {k: m[k] for k in ("seq", "bytes", "total", "mqtt_bytes", "serial_bytes")}
        detail["reason"] = reason
        if m["state"] != new:
            detail["reported"] = m["state"]
        if row.attempt:
            detail["attempt"] = row.attempt
        self._event(row.deployment, gateway, row.node, new, detail)
        if new is not row.state:  # DEBUG: one line per node and step is too many for a fleet
            log.debug("%s: %s -> %s", row.where, row.state, new)
        return NodeRow(
            row.deployment, gateway, row.node, new, m["seq"], row.attempt, entered, retryable,
            reason,
        )  # fmt: skip

    def acked(self, command: Command) -> None:
        """A deploy command was acknowledged: its node moves from pending to offered.

        An acknowledgement of an earlier attempt's command changes nothing.
        """
        if command.type is not CommandType.DEPLOY:
            return
        deployment, attempt = split_wire_id(command.deployment)
        row = self._row(deployment, command.gateway, command.node)
        if row is None or row.state is not S.PENDING or row.attempt != attempt:
            return
        self._move(row, S.OFFERED, {"command": command.seq})

    def abort_gateway(self, gateway: str, reason: str) -> None:
        """End every running deployment of a gateway that will never report again."""
        for row in self._active_rows(gateway=gateway):
            self._move(row, S.ABORTED, {"reason": reason}, reason=reason)

    def offered(self, gateway: str, artifact: bytes) -> bool:
        """True when a running deployment of ``gateway`` names this artifact (or its fallback)."""
        found = one(
            self._db,
            "SELECT 1 FROM deployment_nodes WHERE gateway = ? AND (artifact = ? OR full = ?)"  # noqa: S608
            f" AND state IN ({_ACTIVE_SQL}) LIMIT 1",
            [gateway, artifact.hex(), artifact.hex()],
        )
        return found is not None

    def active_deployment(self, gateway: str, node: str) -> str | None:
        """The deployment still running on a node, if any."""
        row = self._db.execute(
            "SELECT deployment FROM deployment_nodes WHERE gateway = ? AND node = ?"  # noqa: S608
            f" AND state IN ({_ACTIVE_SQL}) ORDER BY deployment LIMIT 1",
            [gateway, node],
        ).fetchone()
        return None if row is None else str(row[0])

    # -- helpers ---------------------------------------------------------------------

    def _row(self, deployment: str, gateway: str, node: str) -> NodeRow | None:
        row = one(
            self._db,
            f"SELECT {_ROW_COLUMNS} FROM deployment_nodes"  # noqa: S608
            " WHERE deployment = ? AND gateway = ? AND node = ?",
            [deployment, gateway, node],
        )
        return None if row is None else _as_row(row)

    def _active_rows(
        self, *, deployment: str | None = None, gateway: str | None = None
    ) -> list[NodeRow]:
        """The running node deployments of a deployment or of a gateway (or both).

        Only the filters given are in the SQL, so that SQLite can use the index
        for them (``:x IS NULL OR column = :x`` makes it scan every row).
        """
        where = [f"state IN ({_ACTIVE_SQL})"]
        params: list[str] = []
        for column, value in (("deployment", deployment), ("gateway", gateway)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = fetch_all(
            self._db,
            f"SELECT {_ROW_COLUMNS} FROM deployment_nodes"  # noqa: S608
            f" WHERE {' AND '.join(where)} ORDER BY deployment, gateway, node",
            params,
        )
        return [_as_row(r) for r in rows]

    def _move(
        self,
        row: NodeRow,
        new: DeploymentState,
        detail: dict[str, Any],
        *,
        reason: str | None = None,
        retryable: bool = False,
    ) -> None:
        check_transition(row.state, new, row.where)
        now = self._clock()
        self._db.execute(
            "UPDATE deployment_nodes SET state = ?, reason = COALESCE(?, reason), updated = ?,"
            " entered = ?, retryable = ? WHERE deployment = ? AND gateway = ? AND node = ?",
            [
                str(new), reason, now, now, int(retryable), row.deployment, row.gateway,
                row.node,
            ],
        )  # fmt: skip
        self._event(row.deployment, row.gateway, row.node, new, detail)
        log.debug("%s: %s -> %s", row.where, row.state, new)

    def _event(
        self, deployment: str, gateway: str, node: str, state: DeploymentState,
        detail: dict[str, Any],
    ) -> None:  # fmt: skip
        self._events_many(deployment, [(gateway, node, state, detail)])

    def _events_many(
        self, deployment: str, events: list[tuple[str, str, DeploymentState, dict[str, Any]]]
    ) -> None:
        """One ``events`` row per (gateway, node, state, detail), in order."""
        now = self._clock()
        self._db.conn.executemany(
            "INSERT INTO events (deployment, gateway, node, at, state, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    deployment, gateway, node, now, str(state),
                    json.dumps({k: v for k, v in detail.items() if v is not None}),
                )
                for gateway, node, state, detail in events
            ],
        )  # fmt: skip


def _command_detail(chosen: ArtifactRecord, command: Command) -> dict[str, Any]:
    """What a node's event says about the deploy command it was sent."""
    return {"artifact": chosen.hex, "kind": str(chosen.payload_kind), "command": command.seq}


def _as_row(row: dict[str, Any]) -> NodeRow:
    return NodeRow(
        row["deployment"], row["gateway"], row["node"], DeploymentState(row["state"]),
        row["status_seq"], row["attempt"], row["entered"], bool(row["retryable"]), row["reason"],
    )  # fmt: skip
