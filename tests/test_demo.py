"""``shoal demo`` end to end, and the README's two quickstart commands in a fresh clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
INNER = "SHOAL_README_TEST"


def test_shoal_demo_json_ends_with_every_node_where_it_should(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "demo", "--json"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["ok"] is True
    assert report["rollout_state"] == "completed"
    states = {n["node"]: n["state"] for n in report["nodes"]}
    assert len(states) == 6
    assert states.pop("gw-2/node-3") == "rolled_back"
    assert set(states.values()) == {"succeeded"}
    assert report["mqtt_bytes_saved_by_delta"] > 0
    assert report["seconds"] < 120
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the quickstart has no sh block"
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert "shoal demo" in commands[0]
    return commands


@pytest.mark.timeout(1500)
def test_the_readme_quickstart_is_two_commands_that_work_from_a_fresh_clone(tmp_path: Path) -> None:
    if os.environ.get(INNER):
        pytest.skip("already inside the README's test command")
    if not IN_CI and not os.environ.get("SHOAL_SLOW_TESTS"):
        pytest.skip(
            "installs a fresh virtual environment: runs under CI=true or SHOAL_SLOW_TESTS=1"
        )
    demo, tests = quickstart_commands()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # The working tree's uncommitted state is not what a user clones; the clone is.
    env = {**os.environ, INNER: "1"}
    env.pop("VIRTUAL_ENV", None)
    first = subprocess.run(demo, shell=True, cwd=clone, env=env, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "every node ended as expected" in " ".join(first.stdout.split())  # rich wraps lines
    second = subprocess.run(tests, shell=True, cwd=clone, env=env, capture_output=True, text=True,
                            timeout=1200)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:]
    assert re.search(r"\d+ passed", second.stdout)
    shutil.rmtree(clone, ignore_errors=True)
