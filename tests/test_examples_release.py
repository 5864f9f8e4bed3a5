"""examples/ci-release.sh: build, sign, delta, upload and start a rollout, as a CI job would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fleet_fixtures import running_fleet
from tests.node_fixtures import images, write_keys
from tests.test_fleet import wait_for

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "ci-release.sh"


def test_the_release_script_starts_a_rollout_that_completes(tmp_path: Path) -> None:
    imgs = images(16 * 1024)
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(imgs.old.payload)
    new.write_bytes(imgs.new.payload)
    keys = write_keys(tmp_path / "keys")
    with running_fleet(tmp_path) as fleet:
        fleet.add_gateway("gw-a", ["n1", "n2"], tmp_path, imgs.old)
        wait_for(
            lambda: all(n.get("primary") for n in fleet.ops("devices.show", id="gw-a")["nodes"])
        )
        env = {
            **os.environ,
            "SHOAL": f"{sys.executable} -m shoal.cli",
            "SHOAL_RELEASE_KEY": str(keys / "release.key"),
            "DEVICE_TYPE": "nrf52840",
            "ROLLOUT_PHASES": "1,100%",
            "SHOAL_HOST": fleet.admin.host,
            "SHOAL_PORT": str(fleet.admin.port),
            "SHOAL_USER": fleet.admin.operator,
            "SHOAL_PASSWORD": fleet.admin.password,
        }
        run = subprocess.run(
            ["bash", str(SCRIPT), str(old), str(new), "2.0.0", "2"],
            capture_output=True, text=True, env=env, timeout=180,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        created = json.loads(run.stdout)  # stdout carries only the rollout
        rollout_id = created["id"]
        done = wait_for(lambda: (r := fleet.ops("rollout.show", id=rollout_id))["state"]
                        in ("completed", "paused", "aborted", "failed") and r)  # fmt: skip
        assert done["state"] == "completed", done
        for name in ("gw-a/n1", "gw-a/n2"):
            running = fleet.nodes[name].node.running
            assert running is not None and running.version == "2.0.0"
