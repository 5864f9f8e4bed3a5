"""The demo's live progress and its summary table (rich)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from shoal.demo import DemoReport


class DemoView:
    """Per node: state, bytes, rate; per phase: counts. Quiet when disabled (``--json``)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console()
        self._live: Live | None = None
        self._seen: dict[str, tuple[float, int]] = {}
        self._rates: dict[str, float] = {}

    def __enter__(self) -> DemoView:
        if self.enabled:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, exc, tb)

    def update(self, rollout: dict[str, Any], deployment: dict[str, Any]) -> None:
        """Redraw from the newest rollout.show and deploy.status replies."""
        if self._live is None:
            return
        phases = Table(title=f"rollout {rollout.get('id', '')}: {rollout.get('state', '')}")
        for column in ("phase", "spec", "state", "counts"):
            phases.add_column(column)
        for phase in rollout.get("phases", []):
            counts = ", ".join(f"{k} {v}" for k, v in sorted(phase.get("counts", {}).items()))
            phases.add_row(str(phase["phase"]), str(phase.get("spec", "")),
                           str(phase.get("state", "")), counts)  # fmt: skip
        nodes = Table(title="nodes")
        for column in ("node", "state", "bytes", "rate"):
            nodes.add_column(column)
        now = time.monotonic()
        for n in deployment.get("nodes", []):
            done = int(n.get("bytes") or n.get("serial_bytes") or 0)
            total = int(n.get("total") or n.get("serial_bytes") or 0)
            last = self._seen.get(n["target"])
            if last is not None and now > last[0] and done >= last[1]:
                rate = (done - last[1]) / (now - last[0])
                self._rates[n["target"]] = 0.7 * self._rates.get(n["target"], rate) + 0.3 * rate
            self._seen[n["target"]] = (now, done)
            rate_text = f"{self._rates.get(n['target'], 0.0) / 1024:6.1f} KiB/s"
            size = f"{done}/{total}" if total else "-"
            nodes.add_row(n["target"], n["state"], size, rate_text)
        self._live.update(Group(phases, nodes))

    def summary(self, report: DemoReport) -> None:
        """The final table and totals."""
        table = Table(title=f"shoal demo: {report.image}, {report.baud} baud")
        for column in ("node", "from -> to", "final state", "MQTT bytes", "serial bytes", "time"):
            table.add_column(column)
        for n in report.nodes:
            mark = "" if n.state == n.expected else f" (expected {n.expected})"
            table.add_row(n.node, f"{n.from_version} -> {n.to_version}", n.state + mark,
                          str(n.mqtt_bytes), str(n.serial_bytes), f"{n.seconds:.1f} s")  # fmt: skip
        self.console.print(table)
        self.console.print(
            f"totals: {report.mqtt_bytes} bytes over MQTT (delta {report.delta_artifact_bytes} B "
            f"vs full {report.full_artifact_bytes} B: {report.mqtt_bytes_saved} bytes saved), "
            f"{sum(n.serial_bytes for n in report.nodes)} bytes over serial, "
            f"rollout {report.rollout_state}, {report.seconds:.1f} s: "
            + ("every node ended as expected" if report.ok else "NOT every node ended as expected")
        )
