"""The fleet commands as a user runs them: ``shoal serve`` as a process, the CLI as clients."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node_fixtures import artifact_file, images, process, shoal, write_keys


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("serve")
    keys = write_keys(tmp / "keys")
    with process(shoal("serve", "--data", str(tmp / "data"), "--trust", str(keys / "release.pub"),
                       "--port", "0")) as proc:  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        match = re.search(r"MQTT on ([\d.]+):(\d+)", line)
        assert match, f"serve did not start: {line!r}"
        env = {
            **os.environ,
            "SHOAL_HOST": match.group(1),
            "SHOAL_PORT": match.group(2),
            "SHOAL_USER": "admin",
            "SHOAL_PASSWORD_FILE": str(tmp / "data" / "admin.secret"),
        }
        yield tmp, env


def cli(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(shoal(*args), capture_output=True, text=True, env=env, timeout=60)
    if ok:
        assert run.returncode == 0, run.stderr
    else:
        assert run.returncode == 1, run.stdout + run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert run.stderr.startswith("error: ")
        assert "Traceback" not in run.stderr
    return run


def test_devices_lifecycle_through_the_cli(server: tuple[Path, dict[str, str]]) -> None:
    _, env = server
    added = json.loads(cli(env, "devices", "add", "gw-cli", "--json").stdout)
    assert added["id"] == "gw-cli" and len(added["secret"]) > 20
    assert "pending" in cli(env, "devices", "show", "gw-cli", "--json").stdout
    cli(env, "devices", "accept", "gw-cli")
    listing = json.loads(cli(env, "devices", "list", "--json").stdout)
    assert "gw-cli" in json.dumps(listing) and "accepted" in json.dumps(listing)
    cli(env, "devices", "decommission", "gw-cli")
    assert "decommissioned" in cli(env, "devices", "show", "gw-cli", "--json").stdout


def test_upload_and_deploy_errors_are_one_line(server: tuple[Path, dict[str, str]]) -> None:
    tmp, env = server
    imgs = images(8 * 1024)
    art = artifact_file(tmp, imgs.new, "v2.art")
    uploaded = json.loads(cli(env, "artifact", "upload", str(art), "--json").stdout)
    assert "2.0.0" in json.dumps(uploaded)
    digest = imgs.new.manifest.image_digest.hex()
    assert "no-such" in cli(env, "deploy", digest, "--nodes", "no-such/n1", ok=False).stderr
    cli(env, "deploy", "status", "nope", ok=False)
    cli(env, "devices", "show", "ghost", ok=False)
    junk = tmp / "junk.art"
    junk.write_bytes(b"\x00" * 100)
    cli(env, "artifact", "upload", str(junk), ok=False)


def test_a_wrong_password_is_one_line(server: tuple[Path, dict[str, str]]) -> None:
    _, env = server
    bad = {**env, "SHOAL_PASSWORD": "wrong"}
    bad.pop("SHOAL_PASSWORD_FILE")
    run = cli(bad, "devices", "list", ok=False)
    assert "cannot reach the orchestrator" in run.stderr
