"""Rollouts: one artifact to a target, in phases, stopping itself when too much fails.

Rules (spec: ``docs/rollouts.md``; architecture.md §State machines):

* A rollout's state is a :class:`RolloutState`, stored by name, moved only by
  a (state, event) pair of :data:`TRANSITIONS`; any other pair is refused
  with :class:`IllegalRolloutMove`, which names both. An operator repeating
  a request (pause a paused rollout, resume a running one, abort an aborted
  one) gets a no-op (:data:`REPEATS`), so a retried request is harmless.
* A rollout is *one deployment* (:mod:`orchestrator.deployments`) whose nodes
  are added phase by phase: each node's part is an ordinary deployment row,
  with its own state machine and events, added when its turn comes. Until
  then the node is ``waiting`` (a rollout word, not a deployment state).
* The target (:mod:`orchestrator.groups`) is resolved when the rollout
  starts: at once, or at ``start_at`` (``scheduled`` until then). Nodes that
  already run the image end ``skipped`` and nodes of another device type (or
  whose anti-rollback would refuse it) ``incompatible`` right then; they are
  in no phase. The others are *eligible* and are split into phases.
* Phases are cumulative counts or percentages of the eligible nodes
  (``1,10%,100%``: one node, then up to 10%, then the rest; percentages round
  up); the last must cover them all. Named nodes (a list, a static group)
  go in the order given, so the operator picks the canary; a filter's nodes
  are taken one per gateway in turn, so early phases span gateways.
* A phase *passes* when at least ``success_threshold`` percent of its nodes
  (not counting ``incompatible`` and excused ones) ended ``succeeded`` or
  ``skipped``. The next phase starts ``phase_wait_s`` after that. The
  rollout ``completes`` when its last phase passed and no node is running,
  waiting or due a retry.
* Failures (``failed``, ``rolled_back``, ``aborted``, ``timed_out`` with no
  retry left) *trip* the failure threshold when there are at least
  ``min_count`` of them and at least ``percent`` of the nodes of their phase
  (scope ``phase``) or of all eligible nodes (scope ``rollout``). A phase
  whose nodes all ended below the success threshold trips it too. A trip
  pauses the rollout (``on_failure: pause``, event ``halt``) or ends it
  ``failed`` (``on_failure: abort``, event ``fail``); the reason is recorded.
* Resuming accepts what went wrong so far: nodes that had ended failed with
  no retry left are *excused* and no longer count for either threshold.
* Retries: a node that ended ``failed`` with a transient reason or
  ``timed_out`` is started again (a new attempt) while the rollout runs,
  ``retries`` times at most. ``rejected`` and ``rolled_back`` never are
  (:data:`orchestrator.deployments.RETRY_RULES`).
* Timeouts: a started node that stays in one active state longer than its
  limit (:class:`Timeouts`) is ``timed_out`` (its attempt is cancelled on
  the gateway). They apply until every node has ended, also after an abort,
  so no rollout waits forever on a gateway that never comes back.
* Caps: at most ``max_parallel`` nodes of a rollout are running at once, and
  at most ``max_per_gateway`` per gateway; a node still running another
  deployment waits for it to end.
* Pause stops new work (no node starts, no retry); nodes already running go
  on. Abort (and ``fail``) stops new work for good and cancels the running
  nodes: a gateway drops a job it is not flashing yet (``aborted``); a node
  being flashed finishes, succeeding or rolling back, and is never left
  half-written.
* The engine runs in :meth:`Orchestrator.tick`: :meth:`Rollouts.tick`
  evaluates the rollouts a status report touched (:meth:`Rollouts.touch`)
  and, every ``check_interval_s``, all that are not settled (timeouts,
  waits, start times), each in its own transaction. Every move is a row in
  ``rollout_events``. Between ticks it keeps each rollout's :class:`_Roster`
  and reads only the nodes that moved since (their ``events`` rows), so an
  evaluation costs what changed, not the size of the rollout.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from sqlite_utils import Database

from orchestrator import diagrams
from orchestrator.db import fetch_all, one
from orchestrator.deployments import (
    ACTIVE,
    MAX_TARGETS,
    SUCCESSFUL,
    UNSUCCESSFUL,
    Deployments,
    DeploymentState,
    NodeRow,
    Plan,
    plan_node,
)
from orchestrator.groups import MAX_MEMBERS_SHOWN, Groups, check_target
from orchestrator.registry import Gateway, GatewayState, Node, Registry
from orchestrator.store import ArtifactRecord, ArtifactStore
from otaproto.errors import InvalidInput, MalformedError, UsageError
from otaproto.fleet import MAX_NODES_PER_GATEWAY

log = logging.getLogger("shoal.orchestrator")

MAX_PHASES = 20
MAX_RETRIES = 10
MAX_PARALLEL = 10_000
MAX_WAIT_S = 30 * 24 * 3600
MAX_TIMEOUT_S = 7 * 24 * 3600
#: Most rollouts one ``rollout.list`` shows (the newest).
MAX_LISTED = 1000
DEFAULT_LISTED = 100
#: Most nodes (and rollout events) one ``rollout.show`` lists; counts are always complete.
MAX_NODES_SHOWN = 10_000
DEFAULT_NODES_SHOWN = 1000
MAX_EVENTS_SHOWN = 50


class RolloutState(StrEnum):
    """Where a rollout stands."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"


class RolloutEvent(StrEnum):
    """What moves a rollout: an operator (pause, resume, abort) or the engine (the others)."""

    START = "start"  #: start time reached: target resolved, phase 1 begins
    PAUSE = "pause"  #: an operator
    RESUME = "resume"  #: an operator
    HALT = "halt"  #: a threshold tripped with on_failure: pause
    FAIL = "fail"  #: a threshold tripped with on_failure: abort, or the target failed to resolve
    COMPLETE = "complete"  #: the last phase passed and every node ended
    ABORT = "abort"  #: an operator


R = RolloutState
E = RolloutEvent
S = DeploymentState

#: Allowed moves: (state, event) -> the new state.
TRANSITIONS: Mapping[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.SCHEDULED, E.START): R.RUNNING,
    (R.SCHEDULED, E.FAIL): R.FAILED,
    (R.SCHEDULED, E.ABORT): R.ABORTED,
    (R.RUNNING, E.PAUSE): R.PAUSED,
    (R.RUNNING, E.HALT): R.PAUSED,
    (R.RUNNING, E.FAIL): R.FAILED,
    (R.RUNNING, E.COMPLETE): R.COMPLETED,
    (R.RUNNING, E.ABORT): R.ABORTED,
    (R.PAUSED, E.RESUME): R.RUNNING,
    (R.PAUSED, E.ABORT): R.ABORTED,
}
#: Operator requests that find the rollout already where they would take it: no-ops.
REPEATS = frozenset({(R.PAUSED, E.PAUSE), (R.RUNNING, E.RESUME), (R.ABORTED, E.ABORT)})
FINAL = frozenset({R.COMPLETED, R.ABORTED, R.FAILED})


class IllegalRolloutMove(InvalidInput):
    """An event the rollout table does not allow in the rollout's state."""

    def __init__(self, rollout: str, state: RolloutState, event: RolloutEvent) -> None:
        super().__init__(f"rollout {rollout} is {state}: cannot {event} it")
        self.state = state
        self.event = event


def next_state(rollout: str, state: RolloutState, event: RolloutEvent) -> RolloutState:
    """The state ``event`` moves a rollout in ``state`` to. Raises IllegalRolloutMove."""
    new = TRANSITIONS.get((state, event))
    if new is None:
        raise IllegalRolloutMove(rollout, state, event)
    return new


def mermaid() -> str:
    """The rollout state machine as a Mermaid ``stateDiagram-v2`` (for docs/rollouts.md)."""
    labels: dict[tuple[str, str], list[str]] = {}
    for (state, event), new in TRANSITIONS.items():
        labels.setdefault((str(state), str(new)), []).append(str(event))
    drawn = [
        diagrams.Drawn(a, b, ", ".join(events), frozenset({(a, b)}))
        for (a, b), events in labels.items()
    ]
    return diagrams.render(drawn, (), [str(R.SCHEDULED)])


# -- options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """How long a node's deployment may stay in each active state, in seconds.

    The one place the defaults live; ``rollout.create`` may override any of
    them (``timeouts: {"pending": 60, ...}``).
    """

    pending: float = 600.0  #: the gateway has not taken the command (offline?)
    offered: float = 600.0  #: taken, but no word since
    #: a gateway's state hook keeps asking to retry later (the gateway caps its tries too)
    deferred: float = 3600.0
    downloading: float = 1800.0
    downloaded: float = 600.0
    flashing: float = 1800.0
    verifying: float = 600.0
    rebooting: float = 600.0
    confirming: float = 600.0

    def for_state(self, state: DeploymentState) -> float:
        """The limit for an active state. Raises UsageError for a final one."""
        if state not in ACTIVE:
            raise UsageError(f"{state} is final: it has no timeout")
        return float(getattr(self, str(state)))

    @classmethod
    def parse(cls, raw: Any) -> Timeouts:
        """Defaults overridden by ``{state: seconds}``. Raises MalformedError."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise MalformedError("timeouts", "must be a map of state -> seconds")
        names = [f.name for f in fields(cls)]
        values: dict[str, float] = {}
        for key, value in raw.items():
            if key not in names:
                raise MalformedError("timeouts", f"unknown state {str(key)[:64]!r}; known: "
                                     f"{', '.join(names)}")  # fmt: skip
            values[key] = _seconds(value, f"timeouts.{key}", 0.0, MAX_TIMEOUT_S, positive=True)
        return cls(**values)

    def to_map(self) -> dict[str, float]:
        """Every limit by state name."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


def timeouts_markdown() -> str:
    """The default timeouts table of ``docs/rollouts.md``, from :class:`Timeouts`."""
    lines = ["| state | default limit |", "|---|---|"]
    for name, seconds in Timeouts().to_map().items():
        lines.append(f"| `{name}` | {seconds:g} s ({seconds / 60:g} min) |")
    return "\n".join(lines) + "\n"


class OnFailure(StrEnum):
    """What a tripped threshold does."""

    PAUSE = "pause"
    ABORT = "abort"


class Scope(StrEnum):
    """What the failure threshold's percentage is of."""

    PHASE = "phase"  #: the nodes of the failing node's phase
    ROLLOUT = "rollout"  #: all eligible nodes of the rollout


@dataclass(frozen=True)
class PhaseSpec:
    """Phases as cumulative (value, is_percent) entries: ``1,10%,100%``."""

    entries: tuple[tuple[int, bool], ...]

    @classmethod
    def parse(cls, text: Any) -> PhaseSpec:
        """Parse ``"1,10%,100%"``. Raises MalformedError."""
        if not isinstance(text, str) or not 0 < len(text) <= 256:
            raise MalformedError("phases", "must be text like '1,10%,100%'")
        parts = [p.strip() for p in text.split(",")]
        if not 0 < len(parts) <= MAX_PHASES:
            raise MalformedError("phases", f"must have 1..{MAX_PHASES} phases")
        entries: list[tuple[int, bool]] = []
        for part in parts:
            percent = part.endswith("%")
            digits = part[:-1] if percent else part
            if not (digits.isascii() and digits.isdigit()) or len(digits) > 6:
                raise MalformedError("phases", f"{part[:20]!r} is not a count or a percentage")
            value = int(digits)
            if value < 1 or (percent and value > 100):
                raise MalformedError("phases", f"{part!r}: counts from 1, percentages 1..100%")
            entries.append((value, percent))
        for (a, pa), (b, pb) in itertools.pairwise(entries):
            if pa == pb and b <= a:
                raise MalformedError("phases", "each phase must reach further than the last")
        return cls(tuple(entries))

    @property
    def text(self) -> str:
        return ",".join(self.labels)

    @property
    def labels(self) -> list[str]:
        return [f"{v}%" if p else str(v) for v, p in self.entries]

    def sizes(self, eligible: int) -> list[int]:
        """How many nodes each phase adds, for ``eligible`` nodes. Raises InvalidInput
        when the last phase does not reach them all."""
        reached = 0
        out: list[int] = []
        for value, percent in self.entries:
            cumulative = math.ceil(eligible * value / 100) if percent else value
            cumulative = min(eligible, max(cumulative, reached))
            out.append(cumulative - reached)
            reached = cumulative
        if reached < eligible:
            raise InvalidInput(
                f"phases {self.text!r} reach {reached} of {eligible} nodes: "
                "end them with 100% (or a count that covers them all)"
            )
        return out


@dataclass(frozen=True)
class RolloutOptions:
    """Everything about a rollout but its artifact and target (stored as JSON)."""

    phases: PhaseSpec = field(default_factory=lambda: PhaseSpec(((100, True),)))
    success_threshold: int = 100  #: percent of a phase that must succeed
    failure_percent: int = 10
    failure_min_count: int = 1
    failure_scope: Scope = Scope.PHASE
    on_failure: OnFailure = OnFailure.PAUSE
    max_parallel: int = 100
    max_per_gateway: int = 16
    phase_wait_s: float = 0.0
    retries: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> RolloutOptions:
        """From ``rollout.create`` args (absent ones take the defaults). Raises MalformedError."""
        d = cls()
        phases = d.phases if args.get("phases") is None else PhaseSpec.parse(args["phases"])
        failure = args.get("failure_threshold") or {}
        if not isinstance(failure, dict):
            raise MalformedError("failure_threshold", "must be a map of percent, min_count, scope")
        for key in failure:
            if key not in ("percent", "min_count", "scope"):
                raise MalformedError("failure_threshold", f"unknown key {str(key)[:64]!r}")
        try:
            scope = Scope(failure.get("scope") or d.failure_scope)
            on_failure = OnFailure(args.get("on_failure") or d.on_failure)
        except ValueError as exc:
            raise MalformedError("on_failure or failure_threshold.scope", str(exc)) from exc
        return cls(
            phases=phases,
            success_threshold=_int(args, "success_threshold", d.success_threshold, 0, 100),
            failure_percent=_int(failure, "percent", d.failure_percent, 0, 100),
            failure_min_count=_int(failure, "min_count", d.failure_min_count, 1, MAX_TARGETS),
            failure_scope=scope,
            on_failure=on_failure,
            max_parallel=_int(args, "max_parallel", d.max_parallel, 1, MAX_PARALLEL),
            max_per_gateway=_int(
                args, "max_per_gateway", d.max_per_gateway, 1, MAX_NODES_PER_GATEWAY
            ),
            phase_wait_s=_seconds(args.get("phase_wait_s") or 0, "phase_wait_s", 0.0, MAX_WAIT_S),
            retries=_int(args, "retries", d.retries, 0, MAX_RETRIES),
            timeouts=Timeouts.parse(args.get("timeouts")),
        )

    def to_map(self) -> dict[str, Any]:
        """The options as JSON: what ``rollout.show`` prints and the database keeps."""
        return {
            "phases": self.phases.text, "success_threshold": self.success_threshold,
            "failure_threshold": {
                "percent": self.failure_percent, "min_count": self.failure_min_count,
                "scope": str(self.failure_scope),
            },
            "on_failure": str(self.on_failure), "max_parallel": self.max_parallel,
            "max_per_gateway": self.max_per_gateway, "phase_wait_s": self.phase_wait_s,
            "retries": self.retries, "timeouts": self.timeouts.to_map(),
        }  # fmt: skip


def _int(m: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = m.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MalformedError(key, f"must be a whole number in {low}..{high}")
    return value


def _seconds(value: Any, where: str, low: float, high: float, *, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high or (positive and value <= 0):
        more = " and above 0" if positive else ""
        raise MalformedError(where, f"must be seconds in {low:g}..{high:g}{more}")
    return float(value)


# -- the engine ---------------------------------------------------------------------------


@dataclass
class _Rollout:
    """One row of ``rollouts``, decoded."""

    id: str
    state: RolloutState
    reason: str | None
    artifact: str
    target: dict[str, Any]
    options: RolloutOptions
    deployment: str | None
    phase: int
    phase_sizes: list[int]
    phase_started: float | None
    phase_passed: float | None
    start_at: float
    settled: float | None
    row: dict[str, Any]


class Kind(StrEnum):
    """How a rollout node counts (a rollout's words, next to the deployment states)."""

    WAITING = "waiting"  #: not started yet
    ACTIVE = "active"  #: its deployment is running
    OK = "ok"  #: succeeded or skipped
    NOT_APPLICABLE = "not_applicable"  #: incompatible
    RETRY = "retry"  #: ended in a retryable way with attempts left
    FAILED = "failed"  #: ended unsuccessfully for good (and not excused)
    EXCUSED = "excused"  #: failed, but accepted by an operator's resume


@dataclass(frozen=True)
class _Member:
    gateway: str
    node: str
    phase: int | None  #: None: settled when the rollout started (skipped, incompatible)
    started: float | None
    excused: bool
    row: NodeRow | None
    updated: float | None

    @property
    def target(self) -> str:
        return f"{self.gateway}/{self.node}"

    def kind(self, retries: int) -> Kind:
        row = self.row
        if self.started is None or row is None:
            return Kind.WAITING
        if row.state in ACTIVE:
            return Kind.ACTIVE
        if row.state in SUCCESSFUL:
            return Kind.OK
        if row.state is DeploymentState.INCOMPATIBLE:
            return Kind.NOT_APPLICABLE
        if row.state in UNSUCCESSFUL and row.retryable and row.attempt < retries:
            return Kind.RETRY
        return Kind.EXCUSED if self.excused else Kind.FAILED


@dataclass(frozen=True)
class _Tally:
    """A phase's (or the rollout's) nodes counted for the thresholds."""

    size: int  #: nodes that count: not incompatible, not excused
    ok: int
    failed: int
    unsettled: int  #: waiting, running or due a retry

    @classmethod
    def of(cls, members: list[_Member], retries: int) -> _Tally:
        return cls.from_kinds(Counter(m.kind(retries) for m in members))

    @classmethod
    def from_kinds(cls, kinds: Counter[Kind]) -> _Tally:
        size = kinds.total() - kinds[Kind.NOT_APPLICABLE] - kinds[Kind.EXCUSED]
        unsettled = kinds[Kind.WAITING] + kinds[Kind.ACTIVE] + kinds[Kind.RETRY]
        return cls(size, kinds[Kind.OK], kinds[Kind.FAILED], unsettled)


class _Roster:
    """A rollout's nodes as the engine judges them, with the counts it asks for kept up to date.

    Why: judging a rollout from scratch is a query joining every node and a
    pass in Python over all of them, tens of milliseconds at 10,000 nodes, and
    :meth:`Rollouts.tick` judges every rollout a status report touched, up to
    twenty times a second. So :meth:`Rollouts.tick` keeps one roster per
    rollout between ticks and refreshes it with the nodes that moved since it
    last looked: every change of a node's deployment row writes an ``events``
    row in the same transaction (:mod:`orchestrator.deployments`), and the
    engine writes one for every node it starts. ``seen_event`` is the newest
    ``events.id`` read. Excusing (an operator's resume) writes no event, so it
    drops the roster; so does a tick that fails, whose transaction rolled back.

    Every figure here is what :meth:`_Tally.of` and a pass over ``members``
    would give: the randomized test in ``tests/test_rollouts.py`` checks it.
    """

    def __init__(
        self, retries: int, timeouts: Timeouts, members: list[_Member], seen_event: int
    ) -> None:
        self.retries = retries
        self.timeouts = timeouts
        self.members = members  #: in the engine's order (phase, then place in the phase)
        self.seen_event = seen_event
        self._position = {(m.gateway, m.node): i for i, m in enumerate(members)}
        #: (phase, kind) -> nodes; phase None: settled when the rollout started
        self.kinds: Counter[tuple[int | None, Kind]] = Counter()
        self.active_by_gateway: Counter[str] = Counter()  #: nodes of kind ACTIVE
        self.retrying: set[int] = set()  #: positions of nodes of kind RETRY
        self.waiting: set[int] = set()  #: positions of phased nodes not started yet
        #: No node in an active state reaches its timeout before this (a lower bound).
        self.deadline = math.inf
        for i, m in enumerate(members):
            self._count(i, m, 1)

    def replace(self, m: _Member) -> None:
        """Take a node's new row (it must be a member)."""
        i = self._position[(m.gateway, m.node)]
        self._count(i, self.members[i], -1)
        self.members[i] = m
        self._count(i, m, 1)

    def _count(self, i: int, m: _Member, sign: int) -> None:
        kind = m.kind(self.retries)
        self.kinds[(m.phase, kind)] += sign
        if kind is Kind.ACTIVE:
            self.active_by_gateway[m.gateway] += sign
        if kind is Kind.RETRY:
            _mark(self.retrying, i, sign)
        if m.started is None and m.phase is not None:
            _mark(self.waiting, i, sign)
        if sign > 0 and m.row is not None and m.row.state in ACTIVE:
            limit = self.timeouts.for_state(m.row.state)
            self.deadline = min(self.deadline, m.row.entered + limit)

    def tally(self, phase: int | None) -> _Tally:
        """One phase's :class:`_Tally`, or (None) that of every phased node."""
        kinds: Counter[Kind] = Counter()
        for (p, kind), n in self.kinds.items():
            if p == phase or (phase is None and p is not None):
                kinds[kind] += n
        return _Tally.from_kinds(kinds)

    def unsettled(self) -> int:
        """Nodes waiting, running or due a retry, phased or not."""
        return sum(n for (_, kind), n in self.kinds.items() if kind in _UNSETTLED)

    def active(self) -> int:
        """Nodes of kind ACTIVE (their deployment is running)."""
        return sum(self.active_by_gateway.values())

    def failed(self, phase: int | None, limit: int) -> list[_Member]:
        """The first ``limit`` nodes of kind FAILED of a phase (None: of every phase), in order."""
        out: list[_Member] = []
        for m in self.members:
            if (
                m.phase is not None
                and (phase is None or m.phase == phase)
                and m.kind(self.retries) is Kind.FAILED
            ):
                out.append(m)
                if len(out) == limit:
                    break
        return out


def _mark(positions: set[int], i: int, sign: int) -> None:
    if sign > 0:
        positions.add(i)
    else:
        positions.discard(i)


def _interleave(nodes: list[Node]) -> list[Node]:
    """One node per gateway in turn (gateways and nodes by id), so phases span gateways."""
    by_gateway: dict[str, list[Node]] = defaultdict(list)
    for node in sorted(nodes, key=lambda n: (n.gateway, n.node)):
        by_gateway[node.gateway].append(node)
    queues = [by_gateway[g] for g in sorted(by_gateway)]
    out: list[Node] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


class Rollouts:
    """Rollouts in the database and the engine that drives them. Not thread-safe.

    The operator-side methods and :meth:`evaluate` run in the caller's
    transaction; :meth:`tick` opens one per rollout.
    """

    def __init__(
        self,
        db: Database,
        clock: Callable[[], float],
        registry: Registry,
        store: ArtifactStore,
        deployments: Deployments,
        groups: Groups,
        check_interval_s: float = 1.0,
    ) -> None:
        if check_interval_s <= 0:
            raise UsageError("check_interval_s must be positive")
        self._db = db
        self._clock = clock
        self._registry = registry
        self._store = store
        self._deployments = deployments
        self._groups = groups
        self._check_interval_s = check_interval_s
        self._last_check = -math.inf
        #: Rollouts a status report touched since the last tick.
        self._dirty: set[str] = set()
        #: Rosters kept between ticks (see :class:`_Roster`), by rollout.
        self._rosters: dict[str, _Roster] = {}
        #: The rollout (or None) of each deployment asked about: a deployment's never changes.
        self._owners: dict[str, str | None] = {}

    # -- operators' side -------------------------------------------------------------

    def create(self, args: Mapping[str, Any], by: str) -> str:
        """Create a rollout from checked ``rollout.create`` args; its id.

        Starts it at once unless ``start_at`` is in the future. Raises
        MalformedError for bad arguments and InvalidInput for anything refused
        (unknown artifact, group or node; a target holding no nodes; phases
        that do not cover it); nothing is stored then.
        """
        record = self._deployments.full_artifact(args["artifact"])
        options = RolloutOptions.parse(args)
        target = args["target"]
        check_target(target)
        now = self._clock()
        start_at = now if args.get("start_at") is None else float(args["start_at"])
        if start_at > now:
            self._groups.resolve(target)  # a bad target is refused now, not at start time
        rollout = "ro-" + secrets.token_hex(8)
        self._db.execute(
            "INSERT INTO rollouts (id, state, artifact, target, options, phase, created,"
            " created_by, start_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
            [
                rollout, str(R.SCHEDULED), record.hex, json.dumps(target, sort_keys=True),
                json.dumps(options.to_map(), sort_keys=True), now, by, start_at,
            ],
        )  # fmt: skip
        detail = {"artifact": record.hex, "version": record.version, "start_at": start_at}
        self._event(rollout, "create", R.SCHEDULED, by, detail)
        log.info("rollout %s of %s %s created by %s", rollout, record.name, record.version, by)
        if start_at <= now:
            self._start(self._load(rollout))
            self.evaluate(rollout)
        return rollout

    def act(self, rollout: Any, event: RolloutEvent, by: str) -> None:
        """An operator's pause, resume or abort. Raises InvalidInput for an unknown
        rollout and IllegalRolloutMove for an event its state does not allow."""
        if event not in (E.PAUSE, E.RESUME, E.ABORT):
            raise UsageError(f"{event} is not an operator's event")
        r = self._load(rollout)
        if (r.state, event) in REPEATS:
            return
        next_state(r.id, r.state, event)  # refuse before changing anything
        self._rosters.pop(r.id, None)  # excusing writes no event: the next tick reads all anew
        if event is E.RESUME:
            members = self._members(r)
            excused = [m for m in members if m.kind(r.options.retries) is Kind.FAILED]
            for m in excused:
                self._db.execute(
                    "UPDATE rollout_nodes SET excused = 1 WHERE rollout = ? AND gateway = ?"
                    " AND node = ?",
                    [r.id, m.gateway, m.node],
                )
            why = f"resumed by {by}" + (
                f"; {len(excused)} failed nodes accepted" if excused else ""
            )
            self._move(r, event, why, by, {"excused": [m.target for m in excused][:100]})
            self.evaluate(r.id)
            return
        verb = {E.PAUSE: "paused", E.ABORT: "aborted"}[event]
        self._move(r, event, f"{verb} by {by}", by, {})

    def listing(self, state: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """Rollouts, newest first, with their node counts. Raises InvalidInput for a bad state."""
        if state is not None and state not in {str(s) for s in R}:
            raise InvalidInput(f"unknown rollout state {state[:32]!r}")
        count = DEFAULT_LISTED if limit is None else max(1, min(limit, MAX_LISTED))
        rows = fetch_all(
            self._db,
            "SELECT * FROM rollouts WHERE (:s IS NULL OR state = :s)"
            " ORDER BY created DESC, id LIMIT :n",
            {"s": state, "n": count},
        )
        out = []
        for row in rows:
            r = _decode(row)
            record = self._store.get(bytes.fromhex(r.artifact))
            out.append({
                "id": r.id, "state": str(r.state), "reason": r.reason,
                "version": None if record is None else record.version,
                "phase": r.phase + 1 if r.phase_sizes else None, "phases": len(r.phase_sizes),
                "created": row["created"], "created_by": row["created_by"],
                "counts": self._counts(r),
            })  # fmt: skip
        return {"rollouts": out}

    def show(self, rollout: Any, node_limit: int | None = None) -> dict[str, Any]:
        """A rollout: options, phases (counts per state), nodes, excluded nodes, events.

        Raises InvalidInput for an unknown rollout.
        """
        r = self._load(rollout)
        record = self._store.get(bytes.fromhex(r.artifact))
        members = self._members(r)
        ended = r.state in FINAL
        spec_labels = r.options.phases.labels
        phases = []
        for index, size in enumerate(r.phase_sizes):
            in_phase = [m for m in members if m.phase == index]
            tally = _Tally.of(in_phase, r.options.retries)
            phases.append({
                "phase": index + 1, "spec": spec_labels[index] if index < len(spec_labels) else "",
                "size": size, "state": self._phase_state(r, index),
                "need": math.ceil(r.options.success_threshold * tally.size / 100),
                "ok": tally.ok, "failed": tally.failed,
                "counts": dict(Counter(_word(m, ended) for m in in_phase)),
            })  # fmt: skip
        limit = DEFAULT_NODES_SHOWN if node_limit is None else min(node_limit, MAX_NODES_SHOWN)
        events = list(
            fetch_all(
                self._db,
                "SELECT at, event, state, operator, detail FROM rollout_events WHERE rollout = ?"
                " ORDER BY id DESC LIMIT ?",
                [r.id, MAX_EVENTS_SHOWN],
            )
        )
        excluded = json.loads(r.row["excluded"] or "[]")
        return {
            "id": r.id,
            "state": str(r.state),
            "reason": r.reason,
            "artifact": r.artifact,
            "name": None if record is None else record.name,
            "version": None if record is None else record.version,
            "deployment": r.deployment,
            "target": r.target,
            "options": r.options.to_map(),
            "created": r.row["created"],
            "created_by": r.row["created_by"],
            "start_at": r.start_at,
            "started": r.row["started"],
            "ended": r.row["ended"],
            "settled": r.settled,
            "phase": r.phase + 1 if r.phase_sizes else None,
            "phases": phases,
            "counts": dict(Counter(_word(m, ended) for m in members)),
            "excluded": excluded,
            "nodes_total": len(members),
            "nodes": [
                {
                    "target": m.target,
                    "phase": None if m.phase is None else m.phase + 1,
                    "state": _word(m, ended),
                    "attempt": None if m.row is None else m.row.attempt,
                    "reason": None if m.row is None else m.row.reason,
                    "updated": m.updated,
                    "excused": m.excused,
                }
                for m in members[:limit]
            ],
            "events": [
                {
                    "at": e["at"],
                    "event": e["event"],
                    "state": e["state"],
                    "operator": e["operator"],
                    "detail": json.loads(e["detail"]),
                }
                for e in reversed(events)
            ],
        }

    def owner(self, deployment: str) -> str | None:
        """The rollout a deployment belongs to, if any."""
        row = one(self._db, "SELECT id FROM rollouts WHERE deployment = ?", [deployment])
        return None if row is None else str(row["id"])

    def _owner(self, deployment: str) -> str | None:
        """:meth:`owner`, remembered once it is a rollout's (which it then stays for good)."""
        if deployment in self._owners:
            return self._owners[deployment]
        rollout = self.owner(deployment)
        if rollout is not None:  # a plain deployment is asked again: a rollout may adopt it yet
            self._owners[deployment] = rollout
        return rollout

    # -- the engine ---------------------------------------------------------------------

    def touch(self, deployment: str) -> None:
        """A node of ``deployment`` ended: evaluate its rollout (if any) at the next tick."""
        rollout = self._owner(deployment)
        if rollout is not None:
            self._dirty.add(rollout)

    def tick(self) -> None:
        """Evaluate touched rollouts, and all unsettled ones every ``check_interval_s``.

        Each in its own transaction; a bug in one is logged and the others go on.
        Rosters (:class:`_Roster`) are kept between ticks only when the tick runs
        outside any transaction of the caller's, so that each one describes
        committed rows.
        """
        now = self._clock()
        due = set(self._dirty)
        self._dirty.clear()
        if now - self._last_check >= self._check_interval_s:
            self._last_check = now
            rows = fetch_all(
                self._db, "SELECT id FROM rollouts WHERE settled IS NULL AND start_at <= ?", [now]
            )
            due |= {str(row["id"]) for row in rows}
        keep = not self._db.conn.in_transaction
        for rollout in sorted(due):
            try:
                with self._db.atomic():
                    self._evaluate(rollout, self._rosters if keep else None)
            except Exception:
                self._rosters.pop(rollout, None)
                log.exception("internal error evaluating rollout %s", rollout)
        if not keep:
            self._rosters.clear()

    def evaluate(self, rollout: str) -> None:
        """Do what is due for one rollout now: start it, time out, retry, check thresholds,
        advance phases, start nodes, settle. Raises InvalidInput for an unknown rollout.

        Reads every node anew (and forgets the roster a tick kept), since the
        caller's transaction may yet roll back.
        """
        self._rosters.pop(rollout, None)
        self._evaluate(rollout, None)

    def _evaluate(self, rollout: str, rosters: dict[str, _Roster] | None) -> None:
        """:meth:`evaluate`, with the rosters kept between ticks (None: read every node)."""
        r = self._load(rollout)
        now = self._clock()
        if r.state is R.SCHEDULED:
            if now < r.start_at:
                return
            try:
                with self._db.atomic():
                    self._start(r)
            except InvalidInput as exc:
                self._move(r, E.FAIL, f"cannot start: {exc}", None, {})
                return
            r = self._load(rollout)
        if r.settled is not None or r.deployment is None:
            if rosters is not None:
                rosters.pop(r.id, None)
            return
        roster = self._roster(r, rosters)
        if self._time_out(r, roster, now):
            self._refresh(r, roster)
        if r.state is R.RUNNING:
            if self._retry(r, roster):
                self._refresh(r, roster)
            self._judge(r, roster, now)
        if r.state is R.RUNNING:
            self._start_nodes(r, roster)  # judging moved no node: the roster is current
        elif r.state in FINAL and r.settled is None and roster.active() == 0:
            self._db.execute("UPDATE rollouts SET settled = ? WHERE id = ?", [now, r.id])
            self._event(r.id, "settled", r.state, None, {})

    def _roster(self, r: _Rollout, rosters: dict[str, _Roster] | None) -> _Roster:
        """The kept roster brought up to date, else one read anew (and kept, if ``rosters``)."""
        roster = None if rosters is None else rosters.get(r.id)
        if roster is not None:
            self._refresh(r, roster)
            return roster
        seen = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        roster = _Roster(r.options.retries, r.options.timeouts, self._members(r), int(seen))
        if rosters is not None:
            rosters[r.id] = roster
        return roster

    def _refresh(self, r: _Rollout, roster: _Roster) -> None:
        """Read anew the nodes with an event newer than the roster's newest."""
        seen = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
        if seen == roster.seen_event:
            return
        for m in self._members(r, moved_since=roster.seen_event):
            roster.replace(m)
        roster.seen_event = seen

    def _start(self, r: _Rollout) -> None:
        """Resolve the target, plan every node, split the eligible ones into phases."""
        record = self._record(r)
        resolved = self._groups.resolve(r.target)
        if not resolved.nodes:
            raise InvalidInput("the target holds no nodes (present, behind accepted gateways)")
        deployment = self._deployments.open(record)
        now = self._clock()
        eligible: list[Node] = []
        settled: list[Plan] = []
        deltas = self._store.deltas_to(record.image_digest)
        for node in resolved.nodes:
            plan = self._plan(record, node, deltas)
            if plan.state is DeploymentState.PENDING:
                eligible.append(node)
            else:
                settled.append(plan)
        self._deployments.add_many(deployment, settled)
        sizes = r.options.phases.sizes(len(eligible))
        ordered = eligible if resolved.named else _interleave(eligible)
        bounds = list(itertools.accumulate(sizes))
        phases = [bisect.bisect_right(bounds, index) for index in range(len(ordered))]
        self._db.conn.executemany(
            "INSERT INTO rollout_nodes (rollout, gateway, node, phase, ord, started)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            itertools.chain(
                ((r.id, p.gateway, p.node, None, -1, now) for p in settled),
                (
                    (r.id, node.gateway, node.node, phase, index, None)
                    for index, (node, phase) in enumerate(zip(ordered, phases, strict=True))
                ),
            ),
        )
        excluded = [{"target": t, "reason": why} for t, why in resolved.excluded]
        self._db.execute(
            "UPDATE rollouts SET deployment = ?, phase = 0, phase_sizes = ?, phase_started = ?,"
            " started = ?, excluded = ? WHERE id = ?",
            [
                deployment, json.dumps(sizes), now, now,
                json.dumps(excluded[:MAX_MEMBERS_SHOWN]), r.id,
            ],
        )  # fmt: skip
        r.deployment, r.phase_sizes, r.phase_started = deployment, sizes, now
        detail = {
            "deployment": deployment, "eligible": len(eligible), "phases": sizes,
            "settled_at_start": dict(Counter(str(p.state) for p in settled)),
            "excluded": len(excluded),
        }  # fmt: skip
        self._move(r, E.START, None, None, detail)

    def _plan(self, record: ArtifactRecord, node: Node, deltas: list[ArtifactRecord]) -> Plan:
        if node.device_type is None:
            why = "has not reported its device type"
            return Plan(node.gateway, node.node, DeploymentState.INCOMPATIBLE, None, None, why)
        return plan_node(record, node, deltas)

    def _time_out(self, r: _Rollout, roster: _Roster, now: float) -> bool:
        """Time out the nodes that stayed too long in an active state; True if any did.

        Looks at the nodes only once the roster's deadline has come (a little
        before it, so that rounding never makes it late).
        """
        if now + _DEADLINE_MARGIN_S < roster.deadline:
            return False
        timeouts = r.options.timeouts
        changed = False
        deadline = math.inf
        for m in roster.members:
            row = m.row
            if row is None or row.state not in ACTIVE:
                continue
            limit = timeouts.for_state(row.state)
            if now - row.entered >= limit:
                self._deployments.time_out(row, f"no progress for {limit:g} s in {row.state}")
                changed = True
            else:
                deadline = min(deadline, row.entered + limit)
        roster.deadline = deadline  # the nodes timed out now are final: they have none
        return changed

    def _retry(self, r: _Rollout, roster: _Roster) -> bool:
        due = [roster.members[i] for i in sorted(roster.retrying)]
        if not due:
            return False
        record = self._record(r)
        for m in due:
            if m.row is not None:
                self._deployments.retry(m.row, record)
        return True

    def _judge(self, r: _Rollout, roster: _Roster, now: float) -> None:
        """Thresholds first (a trip stops everything), then phase advances and completion."""
        o = r.options
        scopes: list[tuple[str, int | None]] = []
        if o.failure_scope is Scope.ROLLOUT:
            scopes.append(("the rollout", None))
        else:
            for index in range(min(r.phase, len(r.phase_sizes) - 1) + 1):
                scopes.append((f"phase {index + 1}", index))
        for name, scope in scopes:
            tally = roster.tally(scope)
            if (
                tally.failed >= o.failure_min_count
                and tally.size > 0
                and tally.failed * 100 >= o.failure_percent * tally.size
            ):
                failed = roster.failed(scope, 3)
                why = (
                    f"failure threshold: {tally.failed} of {tally.size} nodes of {name} failed "
                    f"(threshold {o.failure_percent}% and at least {o.failure_min_count}): "
                    + "; ".join(f"{m.target} {_word(m, False)}" for m in failed)
                )
                self._trip(r, why)
                return
        while r.phase_sizes:
            tally = roster.tally(r.phase)
            need = math.ceil(o.success_threshold * tally.size / 100)
            if tally.ok < need:
                if tally.unsettled == 0:
                    why = (
                        f"phase {r.phase + 1} ended with {tally.ok} of {tally.size} nodes on "
                        f"the image, below the {o.success_threshold}% success threshold"
                    )
                    self._trip(r, why)
                return
            if r.phase_passed is None:
                r.phase_passed = now
                self._db.execute("UPDATE rollouts SET phase_passed = ? WHERE id = ?", [now, r.id])
                detail = {"ok": tally.ok, "size": tally.size}
                self._event(r.id, f"phase {r.phase + 1} passed", r.state, None, detail)
            if r.phase == len(r.phase_sizes) - 1:
                break
            if now < r.phase_passed + o.phase_wait_s:
                return
            r.phase, r.phase_started, r.phase_passed = r.phase + 1, now, None
            self._db.execute(
                "UPDATE rollouts SET phase = ?, phase_started = ?, phase_passed = NULL"
                " WHERE id = ?",
                [r.phase, now, r.id],
            )
            self._event(r.id, f"phase {r.phase + 1} started", r.state, None, {})
        if roster.unsettled() == 0:
            self._move(r, E.COMPLETE, None, None, dict(self._counts(r)))

    def _trip(self, r: _Rollout, why: str) -> None:
        event = E.HALT if r.options.on_failure is OnFailure.PAUSE else E.FAIL
        log.warning("rollout %s: %s", r.id, why)
        self._move(r, event, why, None, {})

    def _start_nodes(self, r: _Rollout, roster: _Roster) -> None:
        """Start waiting nodes of the phases reached, in order, within the caps.

        Decided node by node (a node still in another deployment waits and
        takes no room; one that cannot start at all ends ``aborted`` and takes
        none either), then written together: one statement per table for all
        the nodes started, since a rollout may start 10,000 at once.
        """
        o = r.options
        free = o.max_parallel - roster.active()
        per_gateway = Counter(roster.active_by_gateway)
        if free <= 0 or r.deployment is None or not roster.waiting:
            return
        record = self._record(r)
        deltas = self._store.deltas_to(record.image_digest)
        gateways: dict[str, tuple[Gateway | None, dict[str, Node]]] = {}
        plans: list[Plan] = []
        unstartable: list[tuple[Plan, str]] = []
        started: list[_Member] = []
        for m in (roster.members[i] for i in sorted(roster.waiting)):
            if free <= 0 or m.phase is None or m.phase > r.phase:
                break  # members are in phase order: the rest wait for a later phase
            if per_gateway[m.gateway] >= o.max_per_gateway:
                continue
            if self._deployments.active_deployment(m.gateway, m.node) is not None:
                continue  # still in another deployment: it waits for that one to end
            if m.gateway not in gateways:
                gateway = self._registry.gateway(m.gateway)
                known = [] if gateway is None else self._registry.nodes(m.gateway)
                gateways[m.gateway] = (gateway, {n.node: n for n in known})
            gateway, nodes = gateways[m.gateway]
            node = nodes.get(m.node)
            if gateway is None or gateway.state is not GatewayState.ACCEPTED or node is None:
                why = f"node {m.target} is unknown"
                if gateway is not None and gateway.state is not GatewayState.ACCEPTED:
                    why = f"gateway {m.gateway} is {gateway.state}"
                unstartable.append((Plan(m.gateway, m.node, S.ABORTED, None, None, why), why))
                state = S.ABORTED
            else:
                plan = self._plan(record, node, deltas)
                plans.append(plan)
                state = plan.state
            started.append(m)
            if state in ACTIVE:
                free -= 1
                per_gateway[m.gateway] += 1
        self._deployments.add_many(r.deployment, plans)
        for plan, why in unstartable:
            self._deployments.abort_unstarted(r.deployment, plan, why)
        now = self._clock()
        self._db.conn.executemany(
            "UPDATE rollout_nodes SET started = ? WHERE rollout = ? AND gateway = ? AND node = ?",
            [(now, r.id, m.gateway, m.node) for m in started],
        )

    # -- helpers -------------------------------------------------------------------------

    def _move(
        self,
        r: _Rollout,
        event: RolloutEvent,
        reason: str | None,
        operator: str | None,
        detail: dict[str, Any],
    ) -> None:
        new = next_state(r.id, r.state, event)
        now = self._clock()
        ended = now if new in FINAL else None
        settled = now if new is R.COMPLETED or (new in FINAL and r.deployment is None) else None
        self._db.execute(
            "UPDATE rollouts SET state = ?, reason = ?, ended = COALESCE(?, ended),"
            " settled = COALESCE(?, settled) WHERE id = ?",
            [str(new), reason, ended, settled, r.id],
        )
        if new in (R.ABORTED, R.FAILED) and r.deployment is not None:
            self._deployments.cancel(r.deployment)
        log.info("rollout %s: %s -> %s (%s)", r.id, r.state, new, event)
        r.state, r.reason = new, reason
        r.settled = settled if settled is not None else r.settled
        self._event(r.id, str(event), new, operator, {"reason": reason, **detail})

    def _event(
        self, rollout: str, event: str, state: RolloutState, operator: str | None,
        detail: dict[str, Any],
    ) -> None:  # fmt: skip
        clean = {k: v for k, v in detail.items() if v is not None}
        self._db.execute(
            "INSERT INTO rollout_events (rollout, at, event, state, operator, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [rollout, self._clock(), event, str(state), operator, json.dumps(clean)],
        )

    def _load(self, rollout: Any) -> _Rollout:
        if not isinstance(rollout, str):
            raise InvalidInput("a rollout id is text")
        row = one(self._db, "SELECT * FROM rollouts WHERE id = ?", [rollout])
        if row is None:
            raise InvalidInput(f"unknown rollout {rollout[:64]!r}")
        return _decode(row)

    def _record(self, r: _Rollout) -> ArtifactRecord:
        record = self._store.get(bytes.fromhex(r.artifact))
        if record is None:  # pragma: no cover - artifacts are never deleted
            raise InvalidInput(f"the artifact {r.artifact} of rollout {r.id} is gone")
        return record

    def _members(self, r: _Rollout, moved_since: int | None = None) -> list[_Member]:
        """Every node of the rollout in the engine's order; or, in no order, those with an
        event newer than ``moved_since`` (an ``events.id``)."""
        columns = (
            "rn.gateway AS gateway, rn.node AS node, rn.phase AS phase,"
            " rn.started AS started, rn.excused AS excused, dn.deployment AS deployment,"
            " dn.state AS state, dn.status_seq AS status_seq, dn.attempt AS attempt,"
            " COALESCE(dn.entered, dn.updated) AS entered, dn.retryable AS retryable,"
            " dn.reason AS reason, dn.updated AS updated"
        )
        nodes = (
            " LEFT JOIN deployment_nodes dn ON dn.deployment = :dep"
            " AND dn.gateway = rn.gateway AND dn.node = rn.node"
        )
        if moved_since is None:
            sql = (
                f"SELECT {columns} FROM rollout_nodes rn{nodes} WHERE rn.rollout = :id"  # noqa: S608
                " ORDER BY rn.phase IS NOT NULL, rn.phase, rn.ord, rn.gateway, rn.node"
            )
        else:
            # The few nodes that moved first, then each one's rows by primary key;
            # "+e.deployment" walks the new rowids, not the deployment's whole history.
            sql = (
                f"SELECT {columns} FROM (SELECT DISTINCT e.gateway, e.node FROM events e"  # noqa: S608
                " WHERE e.id > :seen AND +e.deployment = :dep) AS moved"
                " JOIN rollout_nodes rn ON rn.rollout = :id AND rn.gateway = moved.gateway"
                f" AND rn.node = moved.node{nodes}"
            )
        cursor = self._db.conn.execute(
            sql, {"dep": r.deployment, "id": r.id, "seen": moved_since}
        )  # tuples, in the order of ``columns``: a roster reads every node that moved
        out = []
        for row in cursor:
            (gw, node, phase, started, excused, dep, state, seq, attempt, entered, retryable,
             reason, updated) = row  # fmt: skip
            node_row = None
            if state is not None:
                node_row = NodeRow(
                    dep, gw, node, _STATES[state], seq, attempt, entered, bool(retryable), reason
                )
            out.append(_Member(gw, node, phase, started, bool(excused), node_row, updated))
        return out

    def _counts(self, r: _Rollout) -> dict[str, int]:
        rows = fetch_all(
            self._db,
            "SELECT COALESCE(dn.state, 'waiting') AS state, COUNT(*) AS n"
            " FROM rollout_nodes rn LEFT JOIN deployment_nodes dn ON dn.deployment = :dep"
            " AND dn.gateway = rn.gateway AND dn.node = rn.node WHERE rn.rollout = :id"
            " GROUP BY 1 ORDER BY 1",
            {"dep": r.deployment, "id": r.id},
        )
        ended = r.state in FINAL
        return {
            ("not_started" if ended and row["state"] == "waiting" else row["state"]): row["n"]
            for row in rows
        }

    def _phase_state(self, r: _Rollout, index: int) -> str:
        if r.state is R.COMPLETED or index < r.phase:
            return "passed"
        if index > r.phase:
            return "waiting"
        if r.phase_passed is not None:
            return "passed"
        return "stopped" if r.state in FINAL else "running"


_UNSETTLED = frozenset({Kind.WAITING, Kind.ACTIVE, Kind.RETRY})
_STATES = {str(s): s for s in DeploymentState}
#: How early :meth:`Rollouts._time_out` looks at the nodes before the roster's deadline.
_DEADLINE_MARGIN_S = 0.001


def _word(m: _Member, ended: bool) -> str:
    """A node's state as ``rollout.show`` says it: its deployment state, or waiting."""
    if m.row is None or m.started is None:
        return "not_started" if ended else "waiting"
    return str(m.row.state)


def _decode(row: dict[str, Any]) -> _Rollout:
    options = json.loads(row["options"])
    failure = options["failure_threshold"]
    parsed = RolloutOptions.parse({
        "phases": options["phases"], "success_threshold": options["success_threshold"],
        "failure_threshold": failure, "on_failure": options["on_failure"],
        "max_parallel": options["max_parallel"], "max_per_gateway": options["max_per_gateway"],
        "phase_wait_s": options["phase_wait_s"], "retries": options["retries"],
        "timeouts": options["timeouts"],
    })  # fmt: skip
    return _Rollout(
        id=row["id"], state=RolloutState(row["state"]), reason=row["reason"],
        artifact=row["artifact"], target=json.loads(row["target"]), options=parsed,
        deployment=row["deployment"], phase=row["phase"],
        phase_sizes=json.loads(row["phase_sizes"] or "[]"), phase_started=row["phase_started"],
        phase_passed=row["phase_passed"], start_at=row["start_at"], settled=row["settled"],
        row=row,
    )  # fmt: skip
