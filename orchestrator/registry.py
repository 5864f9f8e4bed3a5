"""The device registry: gateways, the nodes behind them, operators, and their secrets.

Rules (spec: ``docs/topics.md``; architecture.md §Security model):

* A gateway is ``pending`` when added, ``accepted`` by an operator, and
  ``decommissioned`` for good (:data:`GATEWAY_TRANSITIONS`). Pending and
  accepted gateways may connect; only accepted ones are sent anything.
  Asking for the state a gateway is already in is a no-op, so a retried
  operator request is harmless; anything else not in the table is refused.
  A decommissioned id is never reused.
* Gateway ids, operator ids and ``orchestrator`` share the broker's one
  username namespace, so an id is refused when any of them already has it.
* Secrets are stored only as mosquitto ``$7$`` hashes
  (:mod:`otaproto.credentials`); the token is returned once, at creation.
* Membership of nodes comes from the gateway's HELLO (its configured nodes):
  nodes it no longer lists are marked absent, never deleted, so their
  deployment history stays. An INVENTORY is news about the nodes it names
  (the gateway reports one node after flashing it and skips busy nodes), so
  it updates those and leaves the others alone. A report that carries only
  ``error`` (the node did not answer) keeps the last known device type and
  image and records the error.
* Attributes are free-form text labels (``site=berlin``) on gateways and
  nodes, set by operators, for dynamic groups (:mod:`orchestrator.groups`);
  a node's attributes are its gateway's with its own on top. ``agent`` is
  the gateway's own (from its HELLO) and cannot be set by an operator.
* Operators have a role (:class:`OperatorRole`), checked by the operator API
  on every request (:mod:`orchestrator.operators`). The broker learns it too
  (:meth:`Registry.check_secret`, :meth:`Registry.accounts` give the
  operator's own :class:`otaproto.topics.Role`), so that its topic ACL lets
  each operator publish only on the request channels of its role.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlite_utils import Database

from orchestrator.db import check_sql_int, fetch_all, one
from otaproto import fleet
from otaproto.credentials import hash_secret, new_token, verify_secret
from otaproto.errors import InvalidInput, MalformedError
from otaproto.topics import ID_PATTERN, Role, check_id

log = logging.getLogger("shoal.orchestrator")

ORCHESTRATOR_USERNAME = "orchestrator"
#: Longest password the broker may hand to :meth:`Registry.check_secret`.
MAX_SECRET_CHARS = 1024
#: Verified against for unknown usernames, so that they take as long as known ones.
_DUMMY_HASH = hash_secret("shoal-no-such-account")


class GatewayState(StrEnum):
    """Where a gateway stands in the registry."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    DECOMMISSIONED = "decommissioned"


#: Allowed moves of a gateway. Staying in the same state is a no-op.
GATEWAY_TRANSITIONS: Mapping[GatewayState, frozenset[GatewayState]] = {
    GatewayState.PENDING: frozenset({GatewayState.ACCEPTED, GatewayState.DECOMMISSIONED}),
    GatewayState.ACCEPTED: frozenset({GatewayState.DECOMMISSIONED}),
    GatewayState.DECOMMISSIONED: frozenset(),
}


class OperatorRole(StrEnum):
    """What an operator may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"  #: read-only: list, show, status, events, audit
    DEPLOYER = "deployer"  #: + artifacts, deployments, rollouts, groups, attributes
    ADMIN = "admin"  #: + gateways (add, accept, decommission) and operators


#: The order of the roles: a role may do what any role of lower rank may.
ROLE_RANK: Mapping[OperatorRole, int] = {role: rank for rank, role in enumerate(OperatorRole)}


def broker_role(role: OperatorRole) -> Role:
    """The broker's name for an operator of ``role`` (the same word: viewer, deployer, admin)."""
    return Role(role.value)


#: Most attributes one gateway or node may carry.
MAX_ATTRIBUTES = 32
#: Attributes only the gateway itself sets.
RESERVED_ATTRIBUTES = frozenset({"agent"})


@dataclass(frozen=True)
class Gateway:
    """One row of ``gateways``, without its secret."""

    id: str
    state: GatewayState
    created: float
    last_seen: float | None
    online: bool
    attributes: dict[str, Any]
    next_seq: int

    def to_public(self) -> dict[str, Any]:
        """The gateway as the operator API shows it."""
        return {
            "id": self.id, "state": str(self.state), "online": self.online,
            "created": self.created, "last_seen": self.last_seen,
            "agent": self.attributes.get("agent"),
            "attributes": {
                k: v for k, v in self.attributes.items() if k not in RESERVED_ATTRIBUTES
            },
        }  # fmt: skip


@dataclass(frozen=True)
class Sender:
    """A gateway as a message from it needs it: who, and may it send this."""

    id: str
    state: GatewayState


@dataclass(frozen=True)
class Slot:
    """The image a node runs, as it reported it."""

    version: str
    sequence: int
    digest: bytes
    size: int


@dataclass(frozen=True)
class NodeReport:
    """One node of an INVENTORY, checked."""

    node: str
    device_type: str | None
    boot_state: str | None
    primary: Slot | None
    error: str | None


@dataclass(frozen=True)
class Node:
    """One row of ``nodes``."""

    gateway: str
    node: str
    present: bool
    device_type: str | None
    boot_state: str | None
    primary: Slot | None
    error: str | None
    last_seen: float
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The ``gateway/node`` name operators use."""
        return f"{self.gateway}/{self.node}"

    def to_public(self) -> dict[str, Any]:
        """The node as the operator API shows it."""
        p = self.primary
        return {
            "gateway": self.gateway, "node": self.node, "target": self.target,
            "present": self.present, "device_type": self.device_type,
            "boot_state": self.boot_state, "error": self.error, "last_seen": self.last_seen,
            "attributes": self.attributes,
            "primary": None if p is None else {
                "version": p.version, "sequence": p.sequence, "digest": p.digest.hex(),
                "size": p.size,
            },
        }  # fmt: skip


def parse_node_reports(raw: Any, what: str) -> list[NodeReport]:
    """Check the ``nodes`` list of an INVENTORY. Raises MalformedError naming the entry."""
    if not isinstance(raw, list):
        raise MalformedError(what, "must be a list")
    if len(raw) > fleet.MAX_NODES_PER_GATEWAY:
        raise MalformedError(what, f"{len(raw)} nodes, over {fleet.MAX_NODES_PER_GATEWAY}")
    reports: list[NodeReport] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{what}[{i}]"
        m = fleet.check_map(item, fleet.NODE_REPORT, where)
        node = check_id(m["node"], f"{where}.node")
        if node in seen:
            raise MalformedError(f"{where}.node", f"{node!r} is listed twice")
        seen.add(node)
        primary = None
        if m["primary"] is not None:
            s = fleet.check_map(m["primary"], fleet.SLOT, f"{where}.primary")
            primary = Slot(
                s["version"],
                check_sql_int(s["sequence"], f"{where}.primary.sequence"),
                s["digest"],
                check_sql_int(s["size"], f"{where}.primary.size"),
            )
        reports.append(NodeReport(node, m["device_type"], m["boot_state"], primary, m["error"]))
    return reports


def parse_node_ids(raw: Any, what: str) -> list[str]:
    """Check the ``nodes`` list of a HELLO (node ids). Raises MalformedError."""
    if not isinstance(raw, list):
        raise MalformedError(what, "must be a list")
    if len(raw) > fleet.MAX_NODES_PER_GATEWAY:
        raise MalformedError(what, f"{len(raw)} nodes, over {fleet.MAX_NODES_PER_GATEWAY}")
    ids = [check_id(item, f"{what}[{i}]") for i, item in enumerate(raw)]
    if len(set(ids)) != len(ids):
        raise MalformedError(what, "lists a node twice")
    return ids


class Registry:
    """Gateways, nodes and operators in the database. Not thread-safe (one caller)."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    # -- gateways ----------------------------------------------------------------

    def add_gateway(self, gateway_id: str) -> str:
        """Register a pending gateway; returns its secret (stored only as a hash).

        Raises MalformedError for a bad id, InvalidInput when the id is taken.
        """
        check_id(gateway_id, "gateway id")
        self._check_free(gateway_id)
        token = new_token()
        self._db.execute(
            "INSERT INTO gateways (id, state, secret_hash, created) VALUES (?, ?, ?, ?)",
            [gateway_id, str(GatewayState.PENDING), hash_secret(token), self._clock()],
        )
        log.info("gateway %s added (pending)", gateway_id)
        return token

    def gateway(self, gateway_id: str) -> Gateway | None:
        """The gateway with this id, or None."""
        row = one(self._db, "SELECT * FROM gateways WHERE id = ?", [gateway_id])
        return None if row is None else _gateway(row)

    def sender(self, gateway_id: str) -> Sender | None:
        """The id and state of a gateway, or None: all a message needs, read for each one."""
        row = self._db.conn.execute("SELECT state FROM gateways WHERE id = ?", [gateway_id])
        found = row.fetchone()
        return None if found is None else Sender(gateway_id, GatewayState(found[0]))

    def require_gateway(self, gateway_id: str) -> Gateway:
        """The gateway with this id. Raises InvalidInput when there is none."""
        gateway = self.gateway(gateway_id) if ID_PATTERN.match(gateway_id) else None
        if gateway is None:
            raise InvalidInput(f"unknown gateway {gateway_id!r}")
        return gateway

    def gateways(self) -> list[Gateway]:
        """Every gateway, by id."""
        return [_gateway(r) for r in fetch_all(self._db, "SELECT * FROM gateways ORDER BY id")]

    def move_gateway(self, gateway_id: str, new: GatewayState) -> GatewayState:
        """Move a gateway to ``new``; returns the state it was in.

        Raises InvalidInput for an unknown gateway or a move the table does not allow.
        """
        old = self.require_gateway(gateway_id).state
        if old is new:
            return old
        if new not in GATEWAY_TRANSITIONS[old]:
            raise InvalidInput(f"gateway {gateway_id} cannot go from {old} to {new}")
        self._db.execute("UPDATE gateways SET state = ? WHERE id = ?", [str(new), gateway_id])
        log.info("gateway %s: %s -> %s", gateway_id, old, new)
        return old

    def seen(self, gateway_id: str, *, online: bool = True) -> None:
        """Note that a valid message came from the gateway (and whether it is online)."""
        self._db.execute(
            "UPDATE gateways SET last_seen = ?, online = ? WHERE id = ?",
            [self._clock(), int(online), gateway_id],
        )

    def set_attribute(self, gateway_id: str, key: str, value: Any) -> None:
        """Record one attribute (e.g. the agent version) in the gateway's JSON."""
        gateway = self.require_gateway(gateway_id)
        attributes = {**gateway.attributes, key: value}
        self._db.execute(
            "UPDATE gateways SET attributes = ? WHERE id = ?",
            [json.dumps(attributes, sort_keys=True), gateway_id],
        )

    # -- nodes -------------------------------------------------------------------

    def record_membership(self, gateway_id: str, node_ids: list[str]) -> None:
        """The gateway's configured nodes (from HELLO): listed ones present, others absent."""
        now = self._clock()
        self._db.execute("UPDATE nodes SET present = 0 WHERE gateway = ?", [gateway_id])
        for node in node_ids:
            self._db.execute(
                "INSERT INTO nodes (gateway, node, present, last_seen) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (gateway, node) DO UPDATE SET present = 1",
                [gateway_id, node, now],
            )

    def record_reports(self, gateway_id: str, reports: list[NodeReport]) -> None:
        """What the nodes of an INVENTORY run; they are present from now on."""
        now = self._clock()
        for r in reports:
            device_type, boot_state, primary = r.device_type, r.boot_state, r.primary
            if r.error is not None and device_type is None and primary is None:
                known = self.node(gateway_id, r.node)  # did not answer: keep what it said last
                if known is not None:
                    device_type, boot_state, primary = (
                        known.device_type, known.boot_state, known.primary
                    )  # fmt: skip
            p = primary
            self._db.execute(
                "INSERT INTO nodes (gateway, node, present, device_type, boot_state,"
                " primary_version, primary_sequence, primary_digest, primary_size, error,"
                " last_seen) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (gateway, node) DO UPDATE SET present = 1,"
                " device_type = excluded.device_type, boot_state = excluded.boot_state,"
                " primary_version = excluded.primary_version,"
                " primary_sequence = excluded.primary_sequence,"
                " primary_digest = excluded.primary_digest, primary_size = excluded.primary_size,"
                " error = excluded.error, last_seen = excluded.last_seen",
                [
                    gateway_id, r.node, device_type, boot_state,
                    None if p is None else p.version, None if p is None else p.sequence,
                    None if p is None else p.digest.hex(), None if p is None else p.size,
                    r.error, now,
                ],
            )  # fmt: skip

    def node(self, gateway_id: str, node_id: str) -> Node | None:
        """One node, present or absent, or None when never reported."""
        row = one(
            self._db, "SELECT * FROM nodes WHERE gateway = ? AND node = ?", [gateway_id, node_id]
        )
        return None if row is None else _node(row)

    def nodes(self, gateway_id: str) -> list[Node]:
        """The nodes of one gateway, by id."""
        return [
            _node(r)
            for r in fetch_all(
                self._db, "SELECT * FROM nodes WHERE gateway = ? ORDER BY node", [gateway_id]
            )
        ]

    def set_attributes(self, device_id: str, changes: Any) -> dict[str, str]:
        """Set (text) or remove (None) attributes of a gateway or ``gateway/node``; the result.

        Raises MalformedError for a bad key, value or count and InvalidInput
        for an unknown device or a reserved key.
        """
        if not isinstance(changes, dict) or not changes:
            raise MalformedError("attributes", "must be a non-empty map of name -> text or null")
        for key, value in changes.items():
            check_id(key, "attribute name")
            if key in RESERVED_ATTRIBUTES:
                raise InvalidInput(f"attribute {key!r} is the gateway's own (from its HELLO)")
            if value is not None and not (isinstance(value, str) and 0 < len(value) <= 256):
                raise MalformedError(f"attributes.{key}", "must be 1-256 characters, or null")
        gateway_id, _, node_id = device_id.partition("/")
        gateway = self.require_gateway(gateway_id)
        if node_id:
            node = self.node(gateway_id, node_id)
            if node is None:
                raise InvalidInput(f"unknown node {device_id[:140]!r}")
            current = dict(node.attributes)
        else:
            current = {k: v for k, v in gateway.attributes.items() if k not in RESERVED_ATTRIBUTES}
        for key, value in changes.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        if len(current) > MAX_ATTRIBUTES:
            raise MalformedError("attributes", f"{len(current)} attributes, over {MAX_ATTRIBUTES}")
        text = json.dumps(current, sort_keys=True)
        if node_id:
            self._db.execute(
                "UPDATE nodes SET attributes = ? WHERE gateway = ? AND node = ?",
                [text, gateway_id, node_id],
            )
        else:
            kept = {k: v for k, v in gateway.attributes.items() if k in RESERVED_ATTRIBUTES}
            self._db.execute(
                "UPDATE gateways SET attributes = ? WHERE id = ?",
                [json.dumps({**current, **kept}, sort_keys=True), gateway_id],
            )
        return current

    def all_nodes(self) -> list[tuple[Gateway, Node]]:
        """Every node of every gateway, with its gateway, by gateway and node."""
        gateways = {g.id: g for g in self.gateways()}
        rows = fetch_all(self._db, "SELECT * FROM nodes ORDER BY gateway, node")
        return [(gateways[r["gateway"]], _node(r)) for r in rows]

    # -- operators ---------------------------------------------------------------

    def add_operator(self, operator_id: str, role: str) -> str:
        """Register an operator; returns its secret (stored only as a hash).

        Raises MalformedError for a bad id or role, InvalidInput when the id is taken.
        """
        check_id(operator_id, "operator id")
        try:
            checked = OperatorRole(role)
        except ValueError as exc:
            roles = ", ".join(r.value for r in OperatorRole)
            raise MalformedError("operator role", f"must be one of {roles}") from exc
        self._check_free(operator_id)
        token = new_token()
        self._db.execute(
            "INSERT INTO operators (id, secret_hash, role, created) VALUES (?, ?, ?, ?)",
            [operator_id, hash_secret(token), str(checked), self._clock()],
        )
        log.info("operator %s added (%s)", operator_id, checked)
        return token

    def operators(self) -> list[dict[str, Any]]:
        """Every operator with its role (never its secret), by id."""
        rows = fetch_all(self._db, "SELECT id, role, created FROM operators ORDER BY id")
        return [{"id": r["id"], "role": r["role"], "created": r["created"]} for r in rows]

    def operator_role(self, operator_id: str) -> OperatorRole | None:
        """The operator's role, or None for an unknown operator."""
        row = one(self._db, "SELECT role FROM operators WHERE id = ?", [operator_id])
        return None if row is None else OperatorRole(row["role"])

    # -- authentication ------------------------------------------------------------

    def check_secret(self, username: str, password: str) -> Role | None:
        """The role of a registry account whose secret matches, else None.

        Gateways count while pending or accepted; a decommissioned gateway is
        refused; an operator gets its own role (viewer, deployer, admin).
        Never raises: a damaged stored hash is logged and refused.
        """
        if len(password) > MAX_SECRET_CHARS or not ID_PATTERN.match(username):
            return None
        role: Role | None = None
        stored = _DUMMY_HASH
        row = one(self._db, "SELECT state, secret_hash FROM gateways WHERE id = ?", [username])
        if row is not None:
            if row["state"] != GatewayState.DECOMMISSIONED:
                role, stored = Role.GATEWAY, str(row["secret_hash"])
        else:
            row = one(self._db, "SELECT secret_hash, role FROM operators WHERE id = ?", [username])
            if row is not None:
                role = broker_role(OperatorRole(row["role"]))
                stored = str(row["secret_hash"])
        try:
            ok = verify_secret(password, stored)
        except MalformedError as exc:
            log.error("stored secret of %s is damaged: %s", username, exc)
            return None
        return role if ok else None

    def accounts(self) -> list[tuple[str, str, Role]]:
        """(username, ``$7$`` hash, role) of every gateway and operator that may connect.

        An operator's role is its own (viewer, deployer, admin): the broker's
        ACL gives it the request channels of that role.
        """
        gateways = fetch_all(
            self._db,
            "SELECT id, secret_hash FROM gateways WHERE state != ? ORDER BY id",
            [str(GatewayState.DECOMMISSIONED)],
        )
        operators = fetch_all(self._db, "SELECT id, secret_hash, role FROM operators ORDER BY id")
        return [(r["id"], r["secret_hash"], Role.GATEWAY) for r in gateways] + [
            (r["id"], r["secret_hash"], broker_role(OperatorRole(r["role"]))) for r in operators
        ]

    def _check_free(self, account_id: str) -> None:
        if account_id == ORCHESTRATOR_USERNAME:
            raise InvalidInput(f"{account_id!r} is reserved for the orchestrator's own account")
        if one(self._db, "SELECT 1 FROM gateways WHERE id = ?", [account_id]) is not None:
            raise InvalidInput(f"{account_id!r} is already a gateway")
        if one(self._db, "SELECT 1 FROM operators WHERE id = ?", [account_id]) is not None:
            raise InvalidInput(f"{account_id!r} is already an operator")


def _gateway(row: dict[str, Any]) -> Gateway:
    return Gateway(
        id=row["id"], state=GatewayState(row["state"]), created=row["created"],
        last_seen=row["last_seen"], online=bool(row["online"]),
        attributes=json.loads(row["attributes"]), next_seq=row["next_seq"],
    )  # fmt: skip


def _node(row: dict[str, Any]) -> Node:
    primary = None
    if row["primary_digest"] is not None:
        primary = Slot(
            row["primary_version"], row["primary_sequence"],
            bytes.fromhex(row["primary_digest"]), row["primary_size"],
        )  # fmt: skip
    return Node(
        gateway=row["gateway"], node=row["node"], present=bool(row["present"]),
        device_type=row["device_type"], boot_state=row["boot_state"], primary=primary,
        error=row["error"], last_seen=row["last_seen"],
        attributes=json.loads(row.get("attributes") or "{}"),
    )  # fmt: skip
