"""Groups and targets: which nodes a rollout goes to.

Rules (spec: ``docs/rollouts.md`` §Targets):

* A group has a name (an id: ``a-z 0-9 - _``) and is either *static*, a list
  of ``gateway/node`` names, each a node the registry knows when the group is
  created, or *dynamic*, a :class:`NodeFilter` over device type, running
  version, gateway and attributes.
* A rollout's target is ``{"group": name}``, ``{"filter": {...}}`` or
  ``{"nodes": [...]}``. It is resolved (:meth:`Groups.resolve`) when the
  rollout starts, and the rollout keeps the nodes it found then: a node that
  joins the group (or starts matching the filter) later is not added to a
  rollout already running. Another rollout over the same target reaches it,
  and the nodes already on the image end ``skipped`` there.
* Named nodes keep the order they were named in (a rollout's phases follow
  it: put the canary first); a filter's nodes come by gateway and node.
* Resolution keeps present nodes of accepted gateways. Named nodes (a static
  group, a list) that are absent or behind a gateway that is not accepted
  are *excluded*, each with the reason, and a rollout shows them; a name the
  registry has never heard of is refused.
* Every size is bounded: names, filters (:data:`MAX_FILTER_GATEWAYS`,
  attributes), members (:data:`MAX_TARGETS`), groups (:data:`MAX_GROUPS`),
  and what a listing shows (:data:`MAX_MEMBERS_SHOWN`).
* A group that a scheduled rollout names cannot be deleted (the rollout
  resolves it when it starts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from orchestrator.db import one
from orchestrator.deployments import MAX_TARGETS
from orchestrator.registry import MAX_ATTRIBUTES, Gateway, GatewayState, Node, Registry
from otaproto.errors import InvalidInput, MalformedError
from otaproto.topics import ID_PATTERN, check_id

MAX_GROUPS = 1000
MAX_FILTER_GATEWAYS = 1000
#: Most members (and excluded nodes) a reply lists; counts are always complete.
MAX_MEMBERS_SHOWN = 1000
_FILTER_KEYS = ("device_type", "version", "gateway", "attributes")
_TARGET_KEYS = ("group", "filter", "nodes")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise MalformedError(where, "must be 1-256 characters of text")
    return value


@dataclass(frozen=True)
class NodeFilter:
    """Which nodes a dynamic group holds: all the given conditions must hold."""

    device_type: str | None = None
    version: str | None = None  #: the version the node runs now
    gateways: tuple[str, ...] = ()  #: any of these gateways (empty: any gateway)
    attributes: tuple[tuple[str, str], ...] = ()  #: every one of these, exactly

    @classmethod
    def parse(cls, raw: Any, what: str = "filter") -> NodeFilter:
        """A filter from its JSON map. Raises MalformedError naming the bad field."""
        if not isinstance(raw, dict):
            raise MalformedError(what, f"must be a map of {', '.join(_FILTER_KEYS)}")
        for key in raw:
            if key not in _FILTER_KEYS:
                raise MalformedError(what, f"unknown key {str(key)[:64]!r}")
        device_type = version = None
        if raw.get("device_type") is not None:
            device_type = _text(raw["device_type"], f"{what}.device_type")
        if raw.get("version") is not None:
            version = _text(raw["version"], f"{what}.version")
        gateways: list[str] = []
        given = raw.get("gateway")
        if given is not None:
            items = given if isinstance(given, list) else [given]
            if not 0 < len(items) <= MAX_FILTER_GATEWAYS:
                raise MalformedError(f"{what}.gateway", f"must name 1..{MAX_FILTER_GATEWAYS}")
            gateways = sorted({check_id(g, f"{what}.gateway") for g in items})
        attributes: dict[str, str] = {}
        given = raw.get("attributes")
        if given is not None:
            if not isinstance(given, dict) or len(given) > MAX_ATTRIBUTES:
                raise MalformedError(
                    f"{what}.attributes", f"must be a map of at most {MAX_ATTRIBUTES} names"
                )
            for key, value in given.items():
                check_id(key, f"{what}.attributes name")
                attributes[key] = _text(value, f"{what}.attributes.{key}")
        return cls(device_type, version, tuple(gateways), tuple(sorted(attributes.items())))

    def to_map(self) -> dict[str, Any]:
        """The filter as JSON (only the conditions given)."""
        out: dict[str, Any] = {}
        if self.device_type is not None:
            out["device_type"] = self.device_type
        if self.version is not None:
            out["version"] = self.version
        if self.gateways:
            out["gateway"] = list(self.gateways)
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        return out

    def matches(self, gateway: Gateway, node: Node) -> bool:
        """True when ``node`` (behind ``gateway``) meets every condition."""
        if self.device_type is not None and node.device_type != self.device_type:
            return False
        if self.version is not None and (
            node.primary is None or node.primary.version != self.version
        ):
            return False
        if self.gateways and node.gateway not in self.gateways:
            return False
        merged = {**gateway.attributes, **node.attributes}
        return all(merged.get(k) == v for k, v in self.attributes)


@dataclass(frozen=True)
class Resolved:
    """What a target holds now: the nodes to update, and the named nodes left out (and why)."""

    nodes: list[Node]
    excluded: list[tuple[str, str]]
    #: The nodes were named (a list, a static group): a rollout keeps their order.
    named: bool = False

    def to_public(self) -> dict[str, Any]:
        """Counts, and the first MAX_MEMBERS_SHOWN of each list."""
        return {
            "count": len(self.nodes),
            "members": [n.target for n in self.nodes[:MAX_MEMBERS_SHOWN]],
            "excluded": [
                {"target": t, "reason": why} for t, why in self.excluded[:MAX_MEMBERS_SHOWN]
            ],
        }


def parse_targets(raw: Any, what: str) -> list[tuple[str, str]]:
    """A list of ``gateway/node`` names as (gateway, node), in order. Raises MalformedError."""
    if not isinstance(raw, list) or not raw:
        raise MalformedError(what, "must be a non-empty list of 'gateway/node'")
    if len(raw) > MAX_TARGETS:
        raise MalformedError(what, f"{len(raw)} targets, over {MAX_TARGETS}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, str):
            raise MalformedError(what, "every target must be a 'gateway/node' string")
        gateway, _, node = item.partition("/")
        if not ID_PATTERN.match(gateway) or not ID_PATTERN.match(node):
            raise MalformedError(what, f"{item[:140]!r} is not 'gateway/node'")
        if item in seen:
            raise MalformedError(what, f"{item} is listed twice")
        seen.add(item)
        out.append((gateway, node))
    return out


class Groups:
    """Groups in the database, and target resolution. The caller holds the transaction."""

    def __init__(self, db: Database, clock: Callable[[], float], registry: Registry) -> None:
        self._db = db
        self._clock = clock
        self._registry = registry

    def create(self, name: Any, nodes: Any, node_filter: Any, by: str) -> dict[str, Any]:
        """Create a static (``nodes``) or dynamic (``node_filter``) group; the group shown.

        Raises MalformedError for bad arguments, InvalidInput for a taken name,
        an unknown node, or too many groups.
        """
        check_id(name, "group name")
        if (nodes is None) == (node_filter is None):
            raise InvalidInput("a group has either nodes (static) or a filter (dynamic)")
        if one(self._db, "SELECT 1 FROM groups WHERE name = ?", [name]) is not None:
            raise InvalidInput(f"group {name} exists (delete it first to change it)")
        count = one(self._db, "SELECT COUNT(*) AS n FROM groups")
        if count is not None and count["n"] >= MAX_GROUPS:
            raise InvalidInput(f"there are {MAX_GROUPS} groups already: delete some first")
        nodes_text = filter_text = None
        if nodes is not None:
            targets = parse_targets(nodes, "nodes")
            self._require_known(targets, self._known(targets))
            nodes_text = json.dumps([f"{g}/{n}" for g, n in targets])
        else:
            filter_text = json.dumps(NodeFilter.parse(node_filter).to_map(), sort_keys=True)
        self._db.execute(
            "INSERT INTO groups (name, nodes, filter, created, created_by) VALUES (?, ?, ?, ?, ?)",
            [name, nodes_text, filter_text, self._clock(), by],
        )
        return self.show(name)

    def delete(self, name: Any) -> dict[str, Any]:
        """Delete a group. Raises InvalidInput for an unknown group or one a rollout waits for."""
        self._get(name)
        waiting = one(
            self._db,
            "SELECT id FROM rollouts WHERE state = 'scheduled'"
            " AND json_extract(target, '$.group') = ? LIMIT 1",
            [name],
        )
        if waiting is not None:
            raise InvalidInput(f"group {name} is the target of scheduled rollout {waiting['id']}")
        self._db.execute("DELETE FROM groups WHERE name = ?", [name])
        return {"name": name, "deleted": True}

    def listing(self) -> dict[str, Any]:
        """Every group with its kind and definition, by name (members: see :meth:`show`)."""
        rows = self._db.query("SELECT * FROM groups ORDER BY name")
        return {"groups": [_public(r) for r in rows]}

    def show(self, name: Any) -> dict[str, Any]:
        """One group and the nodes it holds now. Raises InvalidInput for an unknown group."""
        row = self._get(name)
        return {**_public(row), **self._resolve_row(row).to_public()}

    def resolve(self, target: Any) -> Resolved:
        """The nodes a rollout target holds now (see the module rules).

        Raises MalformedError for a target that is not exactly one of group,
        filter or nodes, and InvalidInput for an unknown group or node.
        """
        kind = check_target(target)
        if kind == "group":
            return self._resolve_row(self._get(target["group"]))
        if kind == "filter":
            return self._match(NodeFilter.parse(target["filter"], "target.filter"))
        targets = parse_targets(target["nodes"], "target.nodes")
        known = self._known(targets)
        self._require_known(targets, known)
        return self._named(targets, known)

    def _get(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not ID_PATTERN.match(name):
            raise InvalidInput(f"unknown group {str(name)[:64]!r}")
        row = one(self._db, "SELECT * FROM groups WHERE name = ?", [name])
        if row is None:
            raise InvalidInput(f"unknown group {name!r}")
        return row

    def _resolve_row(self, row: dict[str, Any]) -> Resolved:
        if row["filter"] is not None:
            return self._match(NodeFilter.parse(json.loads(row["filter"])))
        return self._named([_split(t) for t in json.loads(row["nodes"])])

    def _match(self, node_filter: NodeFilter) -> Resolved:
        nodes = [
            node
            for gateway, node in self._registry.all_nodes()
            if gateway.state is GatewayState.ACCEPTED
            and node.present
            and node_filter.matches(gateway, node)
        ]
        return Resolved(nodes, [])

    def _named(self, targets: list[tuple[str, str]], known: _Known | None = None) -> Resolved:
        nodes: list[Node] = []
        excluded: list[tuple[str, str]] = []
        known = self._known(targets) if known is None else known
        for gateway_id, node_id in targets:
            name = f"{gateway_id}/{node_id}"
            gateway, of_gateway = known[gateway_id]
            node = of_gateway.get(node_id)
            if gateway is None or node is None:
                excluded.append((name, "unknown to the registry"))
            elif gateway.state is not GatewayState.ACCEPTED:
                excluded.append((name, f"gateway {gateway_id} is {gateway.state}"))
            elif not node.present:
                excluded.append((name, f"gateway {gateway_id} no longer lists it"))
            else:
                nodes.append(node)
        return Resolved(nodes, excluded, named=True)

    def _require_known(self, targets: list[tuple[str, str]], known: _Known) -> None:
        for gateway_id, node_id in targets:
            if node_id not in known[gateway_id][1]:
                raise InvalidInput(f"unknown node {gateway_id}/{node_id}")

    def _known(self, targets: list[tuple[str, str]]) -> _Known:
        """Each target gateway with its nodes (present or not), read once per gateway:
        a target of 10,000 nodes on 1,000 gateways is 2,000 reads, not 20,000."""
        known: _Known = {}
        for gateway_id, _ in targets:
            if gateway_id not in known:
                gateway = self._registry.gateway(gateway_id)
                nodes = [] if gateway is None else self._registry.nodes(gateway_id)
                known[gateway_id] = (gateway, {n.node: n for n in nodes})
        return known


#: Gateway id -> the gateway (None: unknown) and its nodes by id.
_Known = dict[str, tuple[Gateway | None, dict[str, Node]]]


def check_target(target: Any) -> str:
    """Which kind of target this is: ``group``, ``filter`` or ``nodes``. Raises MalformedError."""
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in _TARGET_KEYS:
        raise MalformedError("target", "must be exactly one of group, filter or nodes")
    kind = str(next(iter(target)))
    if kind == "group" and not isinstance(target["group"], str):
        raise MalformedError("target.group", "must be a group name")
    return kind


def _split(target: str) -> tuple[str, str]:
    gateway, _, node = target.partition("/")
    return gateway, node


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    static = row["nodes"] is not None
    out: dict[str, Any] = {
        "name": row["name"], "kind": "static" if static else "dynamic",
        "created": row["created"], "created_by": row["created_by"],
    }  # fmt: skip
    if static:
        out["nodes"] = json.loads(row["nodes"])[:MAX_MEMBERS_SHOWN]
    else:
        out["filter"] = json.loads(row["filter"])
    return out
