"""The block server: FETCH requests queued per gateway, served fairly by the timer.

Rules (spec: ``docs/topics.md`` §Gateway messages; field notes §3):

* The caller decides whether a gateway may have an artifact's blocks (a
  running deployment of that gateway offered it) and checks the indices
  against the artifact's block count; this module only queues and serves.
* A gateway has at most :data:`MAX_QUEUED_PER_GATEWAY` blocks queued (twice
  one FETCH). Blocks asked for again while still queued are not queued twice;
  those that do not fit are refused, and the gateway asks again later, as it
  does for any block that never arrives.
* :meth:`BlockServer.serve` takes one block per gateway in turn (round robin,
  the turn kept across calls), so one gateway's large download cannot starve
  another's.
* The queue lives in memory only: a block is an idempotent read of an
  immutable file, and a gateway re-requests what it did not get (after a
  restart of either side, too), so there is nothing to recover.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from otaproto import fleet

MAX_QUEUED_PER_GATEWAY = 2 * fleet.MAX_BLOCKS_PER_FETCH


@dataclass(frozen=True)
class BlockRequest:
    """One queued block: which gateway wants which block of which artifact."""

    gateway: str
    artifact: bytes
    index: int


class BlockServer:
    """Per-gateway queues of requested blocks. Not thread-safe (one caller)."""

    def __init__(self, max_queued: int = MAX_QUEUED_PER_GATEWAY) -> None:
        self._max_queued = max_queued
        #: gateway -> its queue; the order of the keys is the round-robin turn.
        self._queues: OrderedDict[str, deque[BlockRequest]] = OrderedDict()

    def queue(self, gateway: str, artifact: bytes, indices: list[int]) -> list[int]:
        """Queue the blocks not already queued; returns the indices refused for lack of room."""
        q = self._queues.get(gateway)
        if q is None:
            q = self._queues[gateway] = deque()
        queued = {(r.artifact, r.index) for r in q}
        refused: list[int] = []
        for index in dict.fromkeys(indices):  # in order, without repeats
            if (artifact, index) in queued:
                continue
            if len(q) >= self._max_queued:
                refused.append(index)
                continue
            q.append(BlockRequest(gateway, artifact, index))
            queued.add((artifact, index))
        if not q:
            del self._queues[gateway]
        return refused

    def queued(self, gateway: str) -> int:
        """How many blocks ``gateway`` has waiting."""
        return len(self._queues.get(gateway, ()))

    def drop(self, gateway: str) -> None:
        """Forget a gateway's queue (it went offline or was decommissioned)."""
        self._queues.pop(gateway, None)

    def serve(self, limit: int) -> list[BlockRequest]:
        """Up to ``limit`` blocks to send now, one per gateway per turn."""
        out: list[BlockRequest] = []
        while self._queues and len(out) < limit:
            gateway, q = next(iter(self._queues.items()))
            out.append(q.popleft())
            if q:
                self._queues.move_to_end(gateway)
            else:
                del self._queues[gateway]
        return out
