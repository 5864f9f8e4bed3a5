"""What the operator examples promise: ``examples/operator-session.sh`` and a production mosquitto.

* The session script talks to the operator API with nothing but
  ``mosquitto_sub``/``mosquitto_pub`` and prints each reply, on the embedded
  broker and on mosquitto, each request on its op's channel.
* ``shoal broker mosquitto-config`` writes files a real mosquitto starts
  from as they are (started as root too, when it drops to its own user before
  reading the password file), that let in exactly the registry's accounts
  and carry none of their secrets.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from orchestrator.core import Orchestrator
from otaproto import topics as t
from shoal.opsclient import OperatorLogin, call
from shoal.serve import ServeOptions, bootstrap_admin, serve
from tests.brokers import free_port
from tests.conftest import require_program
from tests.fleet_fixtures import Fleet, LoopThread, running_fleet
from tests.node_fixtures import TRUST, artifact_file, images, shoal
from tests.test_fleet_mosquitto import broker_folder, mosquitto_program

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "operator-session.sh"
HOST = "127.0.0.1"
POLL_S = 0.05
TIMEOUT_S = 30.0
FINAL = {"succeeded", "failed", "rolled_back", "skipped", "incompatible", "aborted"}


def wait_until(check: Any, what: str, timeout_s: float = TIMEOUT_S) -> Any:
    """The first truthy value of ``check()``, asked every POLL_S; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:g} s")
        pause.wait(POLL_S)


def require_clients() -> None:
    require_program("mosquitto_sub")
    require_program("mosquitto_pub")


def run_session(
    login: OperatorLogin, *args: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the example as its README says: settings in SHOAL_*, the gateway (and deployment)."""
    env = {
        **os.environ,
        "SHOAL_HOST": login.host,
        "SHOAL_PORT": str(login.port),
        "SHOAL_USER": login.operator,
        "SHOAL_PASSWORD": login.password,
    }
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def replies(stdout: str) -> list[tuple[str, dict[str, Any]]]:
    """``(op, reply)`` for each ``# op`` line and the JSON line after it."""
    found: list[tuple[str, dict[str, Any]]] = []
    op = ""
    for line in stdout.splitlines():
        if line.startswith("# "):
            op = line[2:].strip()
        elif line.startswith("{"):
            found.append((op, json.loads(line)))
    return found


def finished(fleet: Fleet, deployment: str) -> dict[str, str]:
    def states() -> dict[str, str] | None:
        nodes = fleet.ops("deploy.status", id=deployment)["nodes"]
        found = {n["target"]: n["state"] for n in nodes}
        return found if set(found.values()) <= FINAL else None

    result: dict[str, str] = wait_until(states, f"deployment {deployment} finished", 60)
    return result


def test_the_operator_session_lists_shows_accepts_and_reports_with_stock_clients(
    tmp_path: Path,
) -> None:
    require_clients()
    imgs = images(24 * 1024)
    with running_fleet(tmp_path) as fleet:
        for artifact, name in ((imgs.old, "v1.art"), (imgs.new, "v2.art")):
            fleet.ops("artifact.upload", data=artifact_file(tmp_path, artifact, name).read_bytes())
        fleet.add_gateway("gw-a", ["n1"], tmp_path, imgs.old)
        wait_until(
            lambda: all(n.get("primary") for n in fleet.ops("devices.show", id="gw-a")["nodes"]),
            "gw-a's node reported",
        )
        target = imgs.new.manifest.image_digest.hex()
        deployment = fleet.ops("deploy.create", artifact=target, nodes=["gw-a/n1"])["id"]
        assert finished(fleet, deployment) == {"gw-a/n1": "succeeded"}
        fleet.ops("devices.add", id="gw-new")  # pending: it may connect, not get work

        run = run_session(fleet.admin, "gw-new", deployment)
        assert run.returncode == 0, run.stderr
        steps = replies(run.stdout)
        assert [op for op, _ in steps] == [
            "devices.list",
            "devices.show",
            "devices.accept",
            "deploy.status",
        ]
        assert all(reply["ok"] is True for _, reply in steps), steps
        assert len({reply["id"] for _, reply in steps}) == 4, "each request has its own id"
        (_, listed), (_, shown), (_, accepted), (_, status) = steps

        gateways = {g["id"]: g for g in listed["result"]["gateways"]}
        assert gateways["gw-a"]["state"] == "accepted"
        assert [n["node"] for n in gateways["gw-a"]["nodes"]] == ["n1"]
        assert gateways["gw-new"]["state"] == "pending"
        assert shown["result"]["id"] == "gw-new"
        assert shown["result"]["state"] == "pending"
        assert accepted["result"] == {"id": "gw-new", "state": "accepted"}
        assert status["result"]["id"] == deployment
        assert [(n["target"], n["state"]) for n in status["result"]["nodes"]] == [
            ("gw-a/n1", "succeeded")
        ]

        # The acceptance is the orchestrator's, not just the script's words.
        assert fleet.ops("devices.show", id="gw-new")["state"] == "accepted"
        after = {g["id"]: g["state"] for g in fleet.ops("devices.list")["gateways"]}
        assert after == {"gw-a": "accepted", "gw-new": "accepted"}


def test_each_request_of_the_session_goes_on_its_ops_channel() -> None:
    """The script names each request's channel by hand; a wrong one would be dropped by the
    broker (a channel the role lacks) or refused by the orchestrator (the op's is another)."""
    steps = re.findall(r"^\s*request (\S+) (\S+)", SCRIPT.read_text(), re.MULTILINE)
    assert [op for _, op in steps] == [
        "devices.list", "devices.show", "devices.accept", "deploy.status",
    ]  # fmt: skip
    assert steps == [(str(t.op_channel(op)), op) for _, op in steps]


def test_the_operator_session_stops_at_the_first_refusal_and_prints_it(tmp_path: Path) -> None:
    require_clients()
    with running_fleet(tmp_path) as fleet:
        run = run_session(fleet.admin, "gw-unknown")
        assert run.returncode == 1
        steps = replies(run.stdout)
        assert [op for op, _ in steps] == ["devices.list", "devices.show"]
        refusal = steps[1][1]
        assert refusal["ok"] is False
        assert "gw-unknown" in refusal["error"]
        assert "devices.show was refused" in run.stderr

        wrong = OperatorLogin(HOST, fleet.port, "admin", "not-the-secret")
        refused = run_session(wrong, "gw-unknown")
        assert refused.returncode != 0
        assert replies(refused.stdout) == []


class MosquittoDidNotStart(Exception):
    """mosquitto exited before it listened; the message is its log."""


@contextmanager
def started_mosquitto(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``mosquitto -c config``, up once ``port`` accepts connections; terminated by its pid."""
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [mosquitto_program(), "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise MosquittoDidNotStart(log.read_text(errors="replace"))
            with suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise AssertionError("mosquitto did not listen in time")
            with suppress(subprocess.TimeoutExpired):  # a pause that ends at once if it exits
                process.wait(timeout=0.02)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def publish(
    port: int, username: str, password: str, topic: str
) -> subprocess.CompletedProcess[str]:
    """One QoS 1 ``mosquitto_pub``: exit 0 once the broker took it, non-zero when refused."""
    argv = [
        require_program("mosquitto_pub"), "-h", HOST, "-p", str(port), "-u", username,
        "-P", password, "-q", "1", "-t", topic, "-m", "{}",
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@contextmanager
def configured_mosquitto(data: Path, out: Path, log: Path) -> Iterator[int]:
    """``shoal broker mosquitto-config`` as a command, then mosquitto on its files as they are.

    Yields the port. A port found free may be taken before mosquitto binds
    it: then the config is written again for another one.
    """
    for _ in range(3):
        port = free_port(HOST)
        written = subprocess.run(
            shoal("broker", "mosquitto-config", "--data", str(data), "--out", str(out),
                  "--host", HOST, "--port", str(port)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert written.returncode == 0, written.stderr
        # The orchestrator, admin and the pending gateway; not the decommissioned one.
        assert written.stdout.strip() == f"{out.resolve() / 'mosquitto.conf'} (3 accounts)"
        try:
            with started_mosquitto(out / "mosquitto.conf", port, log):
                yield port
                return
        except MosquittoDidNotStart:
            if "Address already in use" not in log.read_text(errors="replace"):
                raise
    raise AssertionError("mosquitto lost the race for a free port three times")


def test_shoal_broker_mosquitto_config_writes_what_mosquitto_serves(tmp_path: Path) -> None:
    require_clients()
    mosquitto_program()
    data = tmp_path / "orchestrator"
    with Orchestrator(data, TRUST) as orchestrator:
        admin_secret = bootstrap_admin(orchestrator, data).read_text().strip()
        pending_secret = orchestrator.add_gateway("gw-1")
        gone_secret = orchestrator.add_gateway("gw-2")
        orchestrator.accept_gateway("gw-2")
        orchestrator.decommission_gateway("gw-2")
        orchestrator_secret = orchestrator.orchestrator_secret

    with (
        broker_folder(tmp_path) as out,
        configured_mosquitto(data, out, tmp_path / "mosquitto.log") as port,
    ):
        # Three files and the persistence folder, the password file private,
        # and no secret in any of them.
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        assert files == ["acl", "mosquitto.conf", "passwd"]
        assert (out / "persistence").is_dir()
        assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o600
        secrets = (admin_secret, pending_secret, gone_secret, orchestrator_secret)
        for path in (p for p in out.iterdir() if p.is_file()):
            text = path.read_text()
            assert not any(secret in text for secret in secrets), f"a secret in {path.name}"

        # Who may log in: exactly the registry's accounts, each with its own secret.
        command = "shoal/v1/gw/gw-1/down/cmd"
        assert publish(port, "orchestrator", orchestrator_secret, command).returncode == 0
        refused = publish(port, "orchestrator", admin_secret, command)
        assert refused.returncode != 0
        assert "not authorised" in refused.stderr
        assert publish(port, "gw-1", pending_secret, "shoal/v1/gw/gw-1/up/hello").returncode == 0
        assert publish(port, "gw-2", gone_secret, "shoal/v1/gw/gw-2/up/hello").returncode != 0

        # The orchestrator logs in and serves; an operator session goes through, both ways.
        loop = LoopThread()
        try:
            ready = threading.Event()
            options = ServeOptions(data_dir=data, trusted=TRUST, port=port, embedded=False)
            loop.start(lambda stop: serve(options, stop, lambda _port: ready.set()))
            assert ready.wait(TIMEOUT_S), "the orchestrator did not log in to mosquitto"
            admin = OperatorLogin(HOST, port, "admin", admin_secret)
            run = run_session(admin, "gw-1")
            assert run.returncode == 0, run.stderr
            steps = dict(replies(run.stdout))
            assert steps["devices.accept"]["result"] == {"id": "gw-1", "state": "accepted"}
            assert call(admin, "devices.show", {"id": "gw-1"})["state"] == "accepted"
        finally:
            loop.close()


def test_the_example_mosquitto_files_are_what_the_command_writes(tmp_path: Path) -> None:
    examples = ROOT / "examples" / "mosquitto"
    data = tmp_path / "orchestrator"
    with Orchestrator(data, TRUST) as orchestrator:  # the README's registry
        bootstrap_admin(orchestrator, data)
        orchestrator.add_operator("alice", "deployer")
        orchestrator.add_gateway("gw-lab-1")
        orchestrator.accept_gateway("gw-lab-1")
    out = tmp_path / "etc" / "mosquitto" / "shoal"
    written = subprocess.run(
        shoal("broker", "mosquitto-config", "--data", str(data), "--out", str(out)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    conf = (out / "mosquitto.conf").read_text().replace(str(out.resolve()), "/etc/mosquitto/shoal")
    assert conf == (examples / "mosquitto.conf").read_text()
    assert (out / "acl").read_text() == (examples / "acl").read_text()
    assert not (examples / "passwd").exists(), "a password file must never be committed"
