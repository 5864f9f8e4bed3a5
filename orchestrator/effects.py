"""What one call into the orchestrator's core asks the MQTT service to do afterwards.

The core does no I/O on the broker: it returns :class:`Effects`, and the
service publishes ``outgoing`` in order and drops the ``disconnect`` sessions.
Every effect is returned only after the database transaction that produced
it has committed (the outbox rule of ``docs/topics.md`` §Principles), so a
crash between the two loses at most a publish, which the re-send repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outgoing:
    """One message to publish (QoS 1, never retained)."""

    topic: str
    payload: bytes


@dataclass
class Effects:
    """Messages to publish, in order, and MQTT usernames whose sessions must end now."""

    outgoing: list[Outgoing] = field(default_factory=list)
    disconnect: list[str] = field(default_factory=list)

    def extend(self, *others: Effects) -> Effects:
        """Append the effects of ``others`` after these, in order; returns self."""
        for other in others:
            self.outgoing.extend(other.outgoing)
            self.disconnect.extend(other.disconnect)
        return self
