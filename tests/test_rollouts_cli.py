"""``shoal rollout``, ``shoal groups`` and ``shoal audit`` against a running in-process fleet."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from shoal.cli_rollouts import audit, describe, groups, parse_filter, render, rollout
from tests.fleet_fixtures import Fleet, running_fleet
from tests.node_fixtures import artifact_file, images
from tests.test_rollouts_fleet import add_gateway, inventoried, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, str]]:
    """A fleet of two gateways with two nodes each, running v1; the v2 image digest."""
    tmp = tmp_path_factory.mktemp("cli")
    imgs = images(16 * 1024)
    with running_fleet(tmp) as f:
        f.ops("artifact.upload", data=artifact_file(tmp, imgs.new, "v2.art").read_bytes())
        for gateway_id in ("gw-a", "gw-b"):
            add_gateway(f, tmp, gateway_id, ["n1", "n2"], imgs.old)
        wait_for("inventory of 4 nodes", lambda: inventoried(f, 4))
        yield f, imgs.new.manifest.image_digest.hex()


def run(fleet: Fleet, group: click.Group, *args: str, ok: bool = True,
        user: str = "admin", password: str | None = None) -> Result:  # fmt: skip
    login = ["--host", "127.0.0.1", "--port", str(fleet.port), "--user", user,
             "--password", password or fleet.admin.password]  # fmt: skip
    result = CliRunner().invoke(group, [*args, *login])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert "Traceback" not in result.output
    return result


def test_groups_and_a_rollout_through_the_cli(fleet: tuple[Fleet, str]) -> None:
    f, image = fleet
    made = run(f, groups, "create", "site-a", "--filter", "gateway=gw-a", "--json").output
    made = json.loads(made)
    assert made["members"] == ["gw-a/n1", "gw-a/n2"] and made["kind"] == "dynamic"
    out = run(f, groups, "create", "pair", "--nodes", "gw-b/n1,gw-b/n2").output
    assert out.startswith("pair (static)") and "2 nodes: gw-b/n1 gw-b/n2" in out
    assert "site-a (dynamic)" in run(f, groups, "list").output
    run(f, groups, "delete", "pair")
    run(f, groups, "show", "pair", ok=False)
    created = run(f, rollout, "create", "--artifact", image, "--group", "site-a",
                  "--phases", "1,100%", "--max-per-gateway", "1", "--timeout", "flashing=120",
                  "--json").output  # fmt: skip
    rollout_id = json.loads(created)["id"]
    lines = run(f, rollout, "watch", rollout_id, "--json", "--interval", "0.2").output
    snapshots = [json.loads(line) for line in lines.strip().splitlines()]
    assert snapshots[-1]["state"] == "completed" and snapshots[-1]["settled"] is not None
    assert snapshots[-1]["options"]["timeouts"]["flashing"] == 120
    assert snapshots[-1]["options"]["max_per_gateway"] == 1
    text = run(f, rollout, "watch", rollout_id).output  # the rich view, once: it has ended
    assert "phase" in text and "1 (1)" in text and "succeeded" in text
    listing = run(f, rollout, "list").output
    assert rollout_id in listing and "completed" in listing and "succeeded=2" in listing
    shown = run(f, rollout, "show", rollout_id).output
    assert "phase 2 (100%, 1 nodes) passed" in shown and "gw-a/n2" in shown
    entries = json.loads(run(f, audit, "list", "--op", "rollout.create", "--json").output)
    assert entries["entries"][0]["args"]["target"] == {"group": "site-a"}
    assert "rollout.create" in run(f, audit, "list", "--limit", "5").output


def test_cli_errors_are_one_line(fleet: tuple[Fleet, str]) -> None:
    f, image = fleet
    secret = f.ops("operators.add", id="viewer-cli", role="viewer")["secret"]
    refused = run(f, rollout, "create", "--artifact", image, "--nodes", "gw-b/n1",
                  user="viewer-cli", password=secret, ok=False).output  # fmt: skip
    assert "operator viewer-cli (viewer) may not rollout.create" in refused
    assert "unknown rollout 'ro-nope'" in run(f, rollout, "pause", "ro-nope", ok=False).output
    out = run(f, rollout, "create", "--artifact", image, ok=False).output
    assert "exactly one target" in out
    out = run(f, rollout, "create", "--artifact", image, "--nodes", "gw-b/n1",
              "--timeout", "soon", ok=False).output  # fmt: skip
    assert "STATE=SECONDS" in out
    out = run(f, rollout, "watch", "ro-nope", ok=False).output
    assert "unknown rollout" in out


def test_watch_exits_1_for_a_rollout_that_did_not_complete(fleet: tuple[Fleet, str]) -> None:
    f, image = fleet
    created = f.ops("rollout.create", artifact=image, target={"nodes": ["gw-b/n1"]},
                    start_at=2**40)  # fmt: skip
    out = run(f, rollout, "watch", created["id"], "--timeout", "0", ok=False).stderr
    assert f"rollout {created['id']} is still scheduled after 0 s" in out
    run(f, rollout, "abort", created["id"])
    out = run(f, rollout, "watch", created["id"], ok=False).output
    assert "ended aborted: aborted by admin" in out


def test_every_command_has_help_text() -> None:
    for group in (rollout, groups, audit):
        assert group.help
        for name, command in group.commands.items():
            assert command.help, name


def test_filters_parse_from_pairs_or_json() -> None:
    assert parse_filter("device_type=nrf52840, gateway=gw-a,gateway=gw-b,site=berlin") == {
        "device_type": "nrf52840", "gateway": ["gw-a", "gw-b"], "attributes": {"site": "berlin"},
    }  # fmt: skip
    assert parse_filter('{"version": "1.0.0"}') == {"version": "1.0.0"}
    for bad in ("site", "{", "[1]", "=x"):
        with pytest.raises(Exception, match="filter"):
            parse_filter(bad)


def test_render_draws_bars_per_phase_and_per_state() -> None:
    from rich.console import Console

    shown: dict[str, Any] = {
        "id": "ro-1", "state": "running", "name": "app", "version": "2.0.0", "reason": None,
        "excluded": [],
        "phases": [
            {"phase": 1, "spec": "1", "size": 1, "state": "passed", "counts": {"succeeded": 1}},
            {"phase": 2, "spec": "100%", "size": 3, "state": "running",
             "counts": {"succeeded": 1, "flashing": 1, "waiting": 1}},
        ],
        "counts": {"succeeded": 2, "flashing": 1, "waiting": 1},
    }  # fmt: skip
    console = Console(width=120, record=True, color_system=None)
    console.print(render(shown))
    text = console.export_text()
    assert "2 (100%)" in text and "1/3" in text and "flashing" in text and "waiting" in text
    assert describe(shown).splitlines()[2].startswith("  phase 2 (100%, 3 nodes) running")


def test_the_module_does_not_need_shoal_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import shoal.cli_rollouts, sys; print('shoal.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
