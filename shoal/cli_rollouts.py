"""``shoal rollout``, ``shoal groups`` and ``shoal audit``: thin click commands over the
operator API (``docs/rollouts.md``).

Every command is one request (``watch``: one per poll) through
:func:`shoal.opsclient.call`, so anything here can be done with
``mosquitto_pub``/``mosquitto_sub`` too. Shoal's errors (a refusal from the
orchestrator, an unreachable broker, bad options) are one line on stderr
and exit status 1; ``--json`` prints the orchestrator's result as JSON.

The click objects :data:`rollout`, :data:`groups` and :data:`audit` are
registered on ``shoal.cli.main`` by that module (this one does not import it,
so either can be imported first). What both share (the error-printing
group, the operator options and client) is in :mod:`shoal.cli_common`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import click

from otaproto.errors import UsageError
from shoal.cli_common import Client, ShoalGroup, operator_options, print_json

FINAL_STATES = ("completed", "aborted", "failed")
#: States that end a node's part (the rest are running or waiting).
_ENDED = {
    "succeeded", "skipped", "incompatible", "failed", "rolled_back", "aborted", "timed_out",
    "not_started",
}  # fmt: skip
_FILTER_FIELDS = ("device_type", "version", "gateway")
_STATE_STYLES = {
    "succeeded": "green", "skipped": "green", "failed": "red", "rolled_back": "red",
    "timed_out": "red", "aborted": "yellow", "incompatible": "magenta", "waiting": "dim",
    "not_started": "dim",
}  # fmt: skip


def parse_filter(text: str) -> dict[str, Any]:
    """``--filter``: JSON, or ``key=value,...`` where device_type, version and gateway
    (repeatable) are fields and any other key is an attribute. Raises UsageError."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--filter is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise UsageError("--filter JSON must be an object")
        return value
    out: dict[str, Any] = {}
    gateways: list[str] = []
    attributes: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--filter wants key=value pairs, got {part!r}")
        key, value = key.strip(), value.strip()
        if key == "gateway":
            gateways.append(value)
        elif key in _FILTER_FIELDS:
            out[key] = value
        else:
            attributes[key] = value
    if gateways:
        out["gateway"] = gateways
    if attributes:
        out["attributes"] = attributes
    return out


def _split_nodes(text: str) -> list[str]:
    nodes = [n.strip() for n in text.split(",") if n.strip()]
    if not nodes:
        raise UsageError("--nodes wants GATEWAY/NODE[,GATEWAY/NODE...]")
    return nodes


def _timeouts(pairs: tuple[str, ...]) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for pair in pairs:
        state, sep, value = pair.partition("=")
        try:
            out[state.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--timeout wants STATE=SECONDS, got {pair!r}") from None
        if not sep:
            raise UsageError(f"--timeout wants STATE=SECONDS, got {pair!r}")
    return out or None


# --- rollout ------------------------------------------------------------------------


@click.group(cls=ShoalGroup)
def rollout() -> None:
    """Phased rollouts of an artifact to a group, a filter or a list of nodes."""


@rollout.command("create")
@click.option("--artifact", required=True, help="SHA-256 of the full artifact (or its image).")
@click.option("--group", default=None, help="Target: a group's name.")
@click.option(
    "--filter", "node_filter", default=None,
    help="Target: nodes matching device_type=..,version=..,gateway=..,ATTR=.. (or JSON).",
)  # fmt: skip
@click.option("--nodes", default=None, help="Target: GATEWAY/NODE[,GATEWAY/NODE...].")
@click.option(
    "--phases", default=None,
    help="Cumulative counts or percentages, e.g. 1,10%,100% (default 100%).",
)  # fmt: skip
@click.option(
    "--success-threshold", type=click.IntRange(0, 100), default=None,
    help="Percent of a phase that must succeed before the next starts (default 100).",
)  # fmt: skip
@click.option(
    "--failure-threshold", type=click.IntRange(0, 100), default=None,
    help="Failed percent that trips the rollout (default 10).",
)  # fmt: skip
@click.option(
    "--min-failures", type=click.IntRange(1, None), default=None,
    help="...and at least this many failures (default 1).",
)  # fmt: skip
@click.option(
    "--failure-scope", type=click.Choice(["phase", "rollout"]), default=None,
    help="The failed percent is of the phase (default) or of the whole rollout.",
)  # fmt: skip
@click.option(
    "--on-failure", type=click.Choice(["pause", "abort"]), default=None,
    help="What a tripped threshold does (default pause).",
)  # fmt: skip
@click.option("--max-parallel", type=click.IntRange(1, None), default=None,
              help="Most nodes updating at once (default 100).")  # fmt: skip
@click.option("--max-per-gateway", type=click.IntRange(1, None), default=None,
              help="Most nodes updating at once behind one gateway (default 16).")  # fmt: skip
@click.option("--phase-wait", type=click.IntRange(0, None), default=None,
              help="Seconds between a phase passing and the next starting.")  # fmt: skip
@click.option("--retries", type=click.IntRange(0, None), default=None,
              help="Retries per node for transient failures (default 2).")  # fmt: skip
@click.option(
    "--timeout", "timeouts", multiple=True,
    help="Per-state limit STATE=SECONDS, e.g. pending=600 (repeatable).",
)  # fmt: skip
@click.option("--start-at", type=click.IntRange(0, None), default=None,
              help="Start at this Unix time (scheduled until then).")  # fmt: skip
@operator_options
def rollout_create(**kw: Any) -> None:
    """Create a rollout (it starts at once unless --start-at is later)."""
    targets = [k for k in ("group", "node_filter", "nodes") if kw[k] is not None]
    if len(targets) != 1:
        raise UsageError("give exactly one target: --group, --filter or --nodes")
    if kw["group"] is not None:
        target: dict[str, Any] = {"group": kw["group"]}
    elif kw["node_filter"] is not None:
        target = {"filter": parse_filter(kw["node_filter"])}
    else:
        target = {"nodes": _split_nodes(kw["nodes"])}
    failure = {
        "percent": kw["failure_threshold"], "min_count": kw["min_failures"],
        "scope": kw["failure_scope"],
    }  # fmt: skip
    args = {
        "artifact": kw["artifact"], "target": target, "phases": kw["phases"],
        "success_threshold": kw["success_threshold"],
        "failure_threshold": {k: v for k, v in failure.items() if v is not None} or None,
        "on_failure": kw["on_failure"], "max_parallel": kw["max_parallel"],
        "max_per_gateway": kw["max_per_gateway"], "phase_wait_s": kw["phase_wait"],
        "retries": kw["retries"], "timeouts": _timeouts(kw["timeouts"]),
        "start_at": kw["start_at"],
    }  # fmt: skip
    result = Client.from_options(kw).call("rollout.create", args)
    if kw["as_json"]:
        print_json(result)
        return
    sizes = ", ".join(str(p["size"]) for p in result["phases"])
    click.echo(
        f"{result['id']} {result['state']}: {result['name']} {result['version']}, "
        f"phases of {sizes or '-'} nodes, deployment {result['deployment'] or '-'}"
    )


@rollout.command("list")
@click.option("--state", default=None, help="Only rollouts in this state.")
@click.option("--limit", type=click.IntRange(1, 1000), default=None, help="At most this many.")
@operator_options
def rollout_list(state: str | None, limit: int | None, **kw: Any) -> None:
    """List rollouts, newest first."""
    result = Client.from_options(kw).call("rollout.list", {"state": state, "limit": limit})
    if kw["as_json"]:
        print_json(result)
        return
    for r in result["rollouts"]:
        counts = " ".join(f"{k}={v}" for k, v in sorted(r["counts"].items()))
        phase = f"phase {r['phase']}/{r['phases']}" if r["phase"] else "not started"
        click.echo(f"{r['id']}  {r['state']:9}  {r['version'] or '?':10}  {phase}  {counts}")


@rollout.command("show")
@click.argument("rollout_id")
@click.option("--nodes", "node_limit", type=click.IntRange(0, 10_000), default=None,
              help="List at most this many nodes (default 1000).")  # fmt: skip
@operator_options
def rollout_show(rollout_id: str, node_limit: int | None, **kw: Any) -> None:
    """Show a rollout: its phases, nodes and events."""
    result = Client.from_options(kw).call("rollout.show", {"id": rollout_id, "nodes": node_limit})
    if kw["as_json"]:
        print_json(result)
        return
    click.echo(describe(result))
    for n in result["nodes"]:
        why = f"  ({n['reason']})" if n["reason"] else ""
        attempt = f" attempt {n['attempt'] + 1}" if n["attempt"] else ""
        click.echo(f"  {n['target']:32} phase {n['phase'] or '-'}  {n['state']}{attempt}{why}")


def describe(shown: dict[str, Any]) -> str:
    """A rollout in a few lines of text: state, reason, one line per phase."""
    lines = [
        f"{shown['id']} {shown['state']}: {shown['name']} {shown['version']}"
        + (f" ({shown['reason']})" if shown["reason"] else "")
    ]
    for p in shown["phases"]:
        counts = " ".join(f"{k}={v}" for k, v in sorted(p["counts"].items()))
        what = f"phase {p['phase']} ({p['spec']}, {p['size']} nodes)"
        lines.append(f"  {what} {p['state']}: {counts}")
    if shown["excluded"]:
        lines.append(f"  excluded: {len(shown['excluded'])} (rollout show --json lists them)")
    return "\n".join(lines)


def _action(name: str, help_text: str) -> None:
    def run(rollout_id: str, **kw: Any) -> None:
        result = Client.from_options(kw).call(f"rollout.{name}", {"id": rollout_id})
        if kw["as_json"]:
            print_json(result)
        else:
            click.echo(describe(result))

    run.__doc__ = help_text
    rollout.command(name, help=help_text)(click.argument("rollout_id")(operator_options(run)))


_action("pause", "Pause a rollout: no new node starts; running nodes go on.")
_action("resume", "Resume a paused rollout, accepting the failures so far.")
_action("abort", "Abort a rollout: no new work; running nodes finish or stop safely.")


def render(shown: dict[str, Any]) -> Any:
    """Rich progress bars: one per phase (nodes ended of its size), one per state."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    title = f"{shown['id']} {shown['state']}: {shown['name']} {shown['version']}"
    if shown["reason"]:
        title += f" ({shown['reason']})"
    phases = Table(title=title, title_justify="left", box=None, expand=False)
    for column in ("phase", "progress", "ended", "state", "nodes"):
        phases.add_column(column)
    for p in shown["phases"]:
        ended = sum(n for state, n in p["counts"].items() if state in _ENDED)
        counts = " ".join(f"{k}={v}" for k, v in sorted(p["counts"].items()))
        bar = ProgressBar(total=max(p["size"], 1), completed=ended if p["size"] else 1, width=30)
        phases.add_row(
            f"{p['phase']} ({p['spec']})", bar, f"{ended}/{p['size']}", p["state"], counts
        )
    states = Table(box=None, expand=False)
    for column in ("state", "", "nodes"):
        states.add_column(column)
    total = max(sum(shown["counts"].values()), 1)
    for state, count in sorted(shown["counts"].items()):
        bar = ProgressBar(total=total, completed=count, width=30,
                          complete_style=_STATE_STYLES.get(state, "cyan"))  # fmt: skip
        states.add_row(Text(state, style=_STATE_STYLES.get(state, "")), bar, str(count))
    return Group(phases, states)


@rollout.command("watch")
@click.argument("rollout_id")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=1.0, show_default=True,
              help="Seconds between polls.")  # fmt: skip
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, None), default=None,
              help="Give up (exit 1) after this many seconds.")  # fmt: skip
@operator_options
def rollout_watch(rollout_id: str, interval: float, timeout_s: float | None, **kw: Any) -> None:
    """Follow a rollout until it has ended and its last node stopped.

    Progress bars per phase and per state; with --json, one JSON line per poll.
    Exit 0 when it completed, 1 when it ended aborted or failed (or --timeout passed).
    """
    client = Client.from_options(kw)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = threading.Event()

    def poll() -> dict[str, Any]:
        shown: dict[str, Any] = client.call("rollout.show", {"id": rollout_id, "nodes": 0})
        return shown

    def done(shown: dict[str, Any]) -> bool:
        if shown["settled"] is not None:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            still = f"rollout {rollout_id} is still {shown['state']}"
            raise UsageError(f"{still} after {timeout_s:g} s")
        pause.wait(interval)
        return False

    if kw["as_json"]:
        while True:
            shown = poll()
            click.echo(json.dumps(shown, sort_keys=True, default=str))
            if done(shown):
                break
    else:
        from rich.console import Console
        from rich.live import Live

        shown = poll()
        with Live(render(shown), console=Console(), auto_refresh=False) as live:
            while not done(shown):
                shown = poll()
                live.update(render(shown), refresh=True)
    if shown["state"] != "completed":
        reason = f": {shown['reason']}" if shown["reason"] else ""
        raise UsageError(f"rollout {rollout_id} ended {shown['state']}{reason}")


# --- groups -------------------------------------------------------------------------


@click.group(cls=ShoalGroup)
def groups() -> None:
    """Static (a list of nodes) and dynamic (a filter) groups of nodes."""


@groups.command("create")
@click.argument("name")
@click.option("--nodes", default=None, help="Static: GATEWAY/NODE[,GATEWAY/NODE...].")
@click.option(
    "--filter", "node_filter", default=None,
    help="Dynamic: device_type=..,version=..,gateway=..,ATTR=.. (or JSON).",
)  # fmt: skip
@operator_options
def groups_create(name: str, nodes: str | None, node_filter: str | None, **kw: Any) -> None:
    """Create a group NAME from --nodes or --filter."""
    if (nodes is None) == (node_filter is None):
        raise UsageError("give exactly one of --nodes or --filter")
    args: dict[str, Any] = {"name": name}
    if nodes is not None:
        args["nodes"] = _split_nodes(nodes)
    else:
        args["filter"] = parse_filter(node_filter or "")
    _show_group(Client.from_options(kw).call("groups.create", args), kw["as_json"])


def _show_group(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    definition = result.get("filter", result.get("nodes"))
    click.echo(f"{result['name']} ({result['kind']}) {json.dumps(definition)}")
    if "members" in result:
        click.echo(f"  {result['count']} nodes: {' '.join(result['members'])}")
        for e in result["excluded"]:
            click.echo(f"  excluded {e['target']}: {e['reason']}")


@groups.command("list")
@operator_options
def groups_list(**kw: Any) -> None:
    """List groups and their definitions."""
    result = Client.from_options(kw).call("groups.list")
    if kw["as_json"]:
        print_json(result)
        return
    for group in result["groups"]:
        _show_group(group, False)


@groups.command("show")
@click.argument("name")
@operator_options
def groups_show(name: str, **kw: Any) -> None:
    """Show a group and the nodes it holds now."""
    _show_group(Client.from_options(kw).call("groups.show", {"name": name}), kw["as_json"])


@groups.command("delete")
@click.argument("name")
@operator_options
def groups_delete(name: str, **kw: Any) -> None:
    """Delete a group (not while a scheduled rollout names it)."""
    result = Client.from_options(kw).call("groups.delete", {"name": name})
    if kw["as_json"]:
        print_json(result)
    else:
        click.echo(f"{name} deleted")


# --- audit --------------------------------------------------------------------------


@click.group(cls=ShoalGroup)
def audit() -> None:
    """The audit log: every operator request, who, when and how it ended."""


@audit.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=None, help="At most (100).")
@click.option("--operator", "who", default=None, help="Only this operator's requests.")
@click.option("--op", default=None, help="Only ops starting with this, e.g. rollout.")
@operator_options
def audit_list(limit: int | None, who: str | None, op: str | None, **kw: Any) -> None:
    """List audit entries, newest first."""
    result = Client.from_options(kw).call("audit.list", {"limit": limit, "operator": who, "op": op})
    if kw["as_json"]:
        print_json(result)
        return
    for e in result["entries"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        outcome = "ok" if e["ok"] else f"error: {e['error']}"
        click.echo(
            f"{when}  {e['operator']} ({e['role'] or '?'})  {e['op']}  "
            f"{json.dumps(e['args'], sort_keys=True)}  {outcome}"
        )
