"""``shoal bench fanout``: one rollout to many simulated gateways on mosquitto, measured.

What runs (all on this machine, as the issue asks):

* mosquitto, configured from the orchestrator's registry (``write_mosquitto_config``
  with ``Orchestrator.read_accounts``), on a port found free, persistence off.
* The orchestrator as ``shoal serve --external``, a child process of its own,
  so that its CPU seconds (``/proc/<pid>/stat`` utime + stime) and peak
  resident memory (``VmHWM`` of ``/proc/<pid>/status``) are its alone. Its
  data folder is prepared before it starts, through the Orchestrator API
  (gateways added and accepted, the ``bench`` operator, two artifacts).
* N simulated gateways in this process on :mod:`otaio.mqtt_lite` (paho's
  threaded loop cannot hold a thousand connections). Each connects with its
  secret and its will, subscribes to its ``down/#``, says online, HELLO and
  INVENTORY (each node of the bench device type, running the old image). On
  each deploy command: ACK at once; then ``downloading``, ``downloaded``,
  ``flashing``, ``verifying``, ``rebooting``, ``succeeded`` with increasing
  ``seq``, back to back, once the orchestrator has recorded *every* node as
  offered. That wait stands for the minutes a real download and flash take,
  and it keeps the two figures apart: dispatch is measured with no status
  traffic, ingestion with no dispatch traffic, and then all 6 x N statuses
  arrive as one burst (identical nodes finish together). ``overlap`` sends
  each node's statuses right after its ACK instead. The nodes are simulated
  without serial and *no blocks are fetched*: the issue's figures are
  dispatch and status ingestion, and block serving is paced by the
  orchestrator's tick (``blocks_per_tick``), so fetching would measure that
  pacing instead.
* The rollout: one operator request over MQTT (CBOR, since 10,000 targets
  are over the 64 KiB a JSON request may have): ``rollout.create`` when the
  operator API has it (target: the node list; one phase of 100%, no cap on
  parallel nodes), else one ``deploy.create`` for every node. The full artifact and a delta from the
  old image are stored, so the per-node choice runs (every node gets the
  delta, with the full artifact as fallback).

What is measured, from the orchestrator's own records: every move it makes
is an ``events`` row with its time (the same wall clock as this process).
t0 is when the request was sent. *All offered* is when the last node left
``pending`` (its ACK was handled); *all succeeded* is the last
``succeeded``. Dispatch rate = deployments / (all offered - t0) (in a run
that did not complete: the nodes offered so far over the time to the last
of them); the fan-out part of it is the same count over (all offered -
reply), since the commands go out behind the reply. Ingest rate = status
events persisted / (last status event - first status event). Completion
is watched by reading ``deployment_nodes`` (read-only, WAL) rather than
polling ``deploy.status``: at 10,000 nodes one status reply is megabytes
and a query per node, which would load the process being measured; one
``deploy.status`` at the end checks that the API agrees.
"Every event persisted": the status events in ``events`` equal the statuses
the gateways published (each acknowledged by the broker).

Raw broker throughput is measured in the same run, before the rollout: one
publisher and one subscriber on mqtt_lite, QoS 1, messages of the size of a
typical status, on a topic the orchestrator does not subscribe to. The
ratios printed are the orchestrator's rates over that raw rate, and over the
issue's targets: 1,000 deployments dispatched and 3,000 status events
ingested per second; AWS IoT Jobs' published rollout rate of 1,000 devices
per minute is printed beside the end-to-end rollout rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import resource
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.mosquitto import Account, write_mosquitto_config
from orchestrator.core import Orchestrator
from orchestrator.operators import OPS
from otaio.mqtt_lite import LiteClient, LiteSettings, Message
from otaproto import cbor, fleet
from otaproto import topics as t
from otaproto.artifact import build_delta_artifact, build_full_artifact, verify_artifact
from otaproto.errors import InvalidInput, LinkBroken, LinkError, ShoalError, UsageError
from otaproto.keys import SigningKey, TrustedKeys
from shoal.synthetic import evolve, firmware_like

TARGET_DISPATCH_PER_S = 1_000.0
TARGET_INGEST_PER_S = 3_000.0
AWS_IOT_JOBS_NODES_PER_MIN = 1_000.0
DEVICE_TYPE = "bench-mcu"
OPERATOR = "bench"
IMAGE_BYTES = 64 * 1024
#: The gateway's words, in the order a simulated node reports them.
STATUS_STEPS = ("downloading", "downloaded", "flashing", "verifying", "rebooting", "succeeded")
#: The raw broker run: messages of a typical status's size, QoS 1.
RAW_MESSAGES = 20_000
RAW_WINDOW = 200  #: publishes of the raw run in flight at once
RAW_TOPIC = f"{t.ROOT}/bench/raw"  # the orchestrator does not subscribe to it
CONNECTS_AT_ONCE = 50  #: mosquitto's listen backlog drops SYNs past about 100
START_TIMEOUT_S = 60.0
POLL_S = 0.2
#: A rollout that makes no progress for this long is reported as incomplete.
STALL_TIMEOUT_S = 120.0
OPERATOR_REPLY_BYTES = 64 * 1024 * 1024  #: a deploy.status of 10,000 nodes is megabytes


# --- the processes: mosquitto and the orchestrator, stopped by pid ------------------------


@dataclass
class ProcessFigures:
    """What /proc says about a child process, read while it still runs."""

    cpu_s: float
    peak_rss_mib: float


def proc_figures(pid: int) -> ProcessFigures:
    """CPU seconds (user + system) and peak resident set of a live process, from /proc.

    Raises InvalidInput when the process is gone or /proc cannot be read
    (not Linux).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read /proc/{pid}: {exc.strerror or exc}") from exc
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces; fields from 3
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    peak_kib = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            peak_kib = int(line.split()[1])
    return ProcessFigures(ticks / os.sysconf("SC_CLK_TCK"), peak_kib / 1024)


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: by the process's own pid."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _listening(process: subprocess.Popen[bytes], host: str, port: int, timeout_s: float) -> bool:
    """True once ``port`` accepts connections; False if ``process`` exited first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):  # a pause that ends if it exits
            process.wait(timeout=0.02)
    raise InvalidInput(f"mosquitto did not listen on {host}:{port} within {timeout_s:g} s")


@contextmanager
def running_mosquitto(workdir: Path, accounts: list[Account]) -> Iterator[tuple[int, int]]:
    """mosquitto for ``accounts`` on a free port; yields ``(port, pid)``.

    Raises InvalidInput when mosquitto is not installed or does not start.
    """
    program = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if program is None:
        raise InvalidInput("mosquitto is not installed (apt-get install mosquitto)")
    host = "127.0.0.1"
    run_as = "root" if os.geteuid() == 0 else None  # as root it would drop to 'mosquitto'
    for attempt in range(5):
        port = _free_port(host)
        config = write_mosquitto_config(
            workdir / "mosquitto", accounts=accounts, port=port, host=host, run_as_user=run_as
        )
        log_path = workdir / f"mosquitto-{attempt}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [program, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            if _listening(process, host, port, START_TIMEOUT_S):
                yield port, process.pid
                return
        finally:
            _stop(process)
        output = log_path.read_text(errors="replace")
        if "Address already in use" not in output:
            raise InvalidInput(f"mosquitto did not start on {host}:{port}: {output[-2000:]}")
    raise InvalidInput("mosquitto lost the race for a free port five times")


@contextmanager
def running_orchestrator(
    workdir: Path, data_dir: Path, trust_file: Path, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``shoal serve --external`` as a child process, up once it printed its ready line.

    Its output goes to files (nobody reads a pipe while the bench runs).
    Raises InvalidInput when it exits or stays silent for START_TIMEOUT_S.
    """
    out_path, err_path = workdir / "orchestrator.out", workdir / "orchestrator.err"
    argv = [
        sys.executable, "-m", "shoal.cli", "serve", "--data", str(data_dir),
        "--trust", str(trust_file), "--external", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "\n" not in out_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = err_path.read_text(errors="replace")[-2000:]
                raise InvalidInput(f"shoal serve did not come up: {tail}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)
        yield process
    finally:
        _stop(process)


# --- the orchestrator's data, prepared before it starts -----------------------------------


@dataclass(frozen=True)
class Prepared:
    """What the bench set up in the orchestrator's data folder."""

    secrets: dict[str, str]  #: gateway id -> its secret
    operator_secret: str
    orchestrator_secret: str
    target_hex: str  #: the full artifact to deploy
    old_image: bytes  #: what the nodes run
    old_sequence: int
    delta_bytes: int


def gateway_ids(gateways: int) -> list[str]:
    """``gw-0001``, ``gw-0002``, ...: sorted as numbered."""
    width = max(4, len(str(gateways)))
    return [f"gw-{n:0{width}d}" for n in range(1, gateways + 1)]


def node_ids(nodes_per_gateway: int) -> list[str]:
    width = max(2, len(str(nodes_per_gateway)))
    return [f"n-{n:0{width}d}" for n in range(1, nodes_per_gateway + 1)]


def prepare(data_dir: Path, key: SigningKey, gateways: list[str]) -> Prepared:
    """Gateways added and accepted, the bench operator, a full artifact and a delta to it.

    Raises the InvalidInput family when the orchestrator refuses any of it.
    """
    trusted = TrustedKeys([key.public_key])
    old = firmware_like(IMAGE_BYTES, seed=1)
    new = evolve(old, seed=2)
    common: dict[str, Any] = {
        "name": "bench-fw", "device_types": (DEVICE_TYPE,), "key": key, "created_s": 0,
    }  # fmt: skip
    old_artifact = build_full_artifact(old, version="1.0.0", sequence=1, **common)
    new_artifact = build_full_artifact(new, version="2.0.0", sequence=2, **common)
    delta = build_delta_artifact(
        verify_artifact(old_artifact, trusted), verify_artifact(new_artifact, trusted), key,
        created_s=0,
    )  # fmt: skip
    if not delta.used_delta:
        raise UsageError("the bench's synthetic images did not make a delta")
    with Orchestrator(data_dir, trusted) as orchestrator:
        issued: dict[str, str] = {}
        for gateway in gateways:
            issued[gateway] = orchestrator.add_gateway(gateway)
            orchestrator.accept_gateway(gateway)
        operator_secret = orchestrator.add_operator(OPERATOR, "admin")
        target = orchestrator.upload_artifact(new_artifact)
        orchestrator.upload_artifact(delta.artifact)
        return Prepared(
            issued, operator_secret, orchestrator.orchestrator_secret, target.hex, old, 1,
            len(delta.artifact),
        )  # fmt: skip


# --- simulated gateways -------------------------------------------------------------------


@dataclass
class GatewayCounts:
    """What the simulated gateways did, summed."""

    commands: int = 0  #: deploy and cancel commands received, repeats included
    repeated: int = 0  #: commands with a seq already handled (re-sent by the orchestrator)
    acks: int = 0
    statuses: int = 0  #: status reports published and acknowledged by the broker
    errors: list[str] = field(default_factory=list)  #: down/error messages and failures


class SimGateway:
    """One simulated gateway: the MQTT conversation of ``gateway_proxy`` without serial.

    Each command is handled in its own task (a gateway works on its nodes at
    once): ACK at once, then the status reports once ``release`` is set (the
    whole download and flash of a node, simulated). A failure is recorded in
    ``counts.errors``, never raised, so one gateway cannot stop the run.
    """

    def __init__(
        self,
        gateway: str,
        settings: LiteSettings,
        nodes: list[str],
        inventory: bytes,
        counts: GatewayCounts,
        release: asyncio.Event,
    ) -> None:
        self.gateway = gateway
        self.client = LiteClient(settings)
        self.nodes = nodes
        self.inventory = inventory
        self.counts = counts
        self.release = release
        self.handled_seq = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, subscribe, then online, HELLO and INVENTORY. Raises LinkError."""
        await self.client.__aenter__()
        await self.client.subscribe(f"{t.ROOT}/gw/{self.gateway}/down/#")
        hello = {"agent": "shoal-bench-fanout", "nodes": self.nodes, "handled_seq": 0}
        await self.client.publish(self._up(t.Up.STATE), fleet.encode_map({"online": True}))
        await self.client.publish(self._up(t.Up.HELLO), fleet.encode_map(hello))
        await self.client.publish(self._up(t.Up.INVENTORY), self.inventory)
        self._reader = asyncio.create_task(self._read(), name=f"bench-gateway-{self.gateway}")

    async def stop(self) -> None:
        """Cancel the jobs and disconnect cleanly (the broker drops the will)."""
        for task in [*self._jobs, *([self._reader] if self._reader else [])]:
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.close()

    def _up(self, kind: t.Up) -> str:
        return f"{t.ROOT}/gw/{self.gateway}/up/{kind}"

    async def _read(self) -> None:
        try:
            async for message in self.client.messages():
                self._on_message(message)
        except LinkBroken as exc:  # LinkClosed: stop() closed it
            self.counts.errors.append(f"{self.gateway}: {exc}")
        except LinkError:
            return

    def _on_message(self, message: Message) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        if kind == t.Down.ERROR:
            self.counts.errors.append(f"{self.gateway} was told: {message.payload[:300]!r}")
            return
        if kind != t.Down.COMMAND:
            return
        try:
            command = fleet.decode_map(message.payload, fleet.COMMAND, "command")
        except ShoalError as exc:
            self.counts.errors.append(f"{self.gateway}: bad command: {exc}")
            return
        self.counts.commands += 1
        job = asyncio.create_task(self._job(command), name=f"bench-job-{self.gateway}")
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _job(self, command: dict[str, Any]) -> None:
        seq = command["seq"]
        repeated = seq <= self.handled_seq
        self.handled_seq = max(self.handled_seq, seq)
        try:
            await self.client.publish(self._up(t.Up.ACK), fleet.encode_map({"seq": seq}))
            self.counts.acks += 1
            if repeated:
                self.counts.repeated += 1
                return
            if command["type"] != "deploy":
                return
            total = fleet.ArtifactRef.from_map(command["artifact"], "command.artifact").size
            await self.release.wait()
            for number, state in enumerate(STATUS_STEPS, start=1):
                report = status_report(command["deployment"], command["node"], number, state, total)
                await self.client.publish(self._up(t.Up.STATUS), report)
                self.counts.statuses += 1
        except (LinkError, ShoalError) as exc:
            self.counts.errors.append(f"{self.gateway}: {exc}")


def status_report(deployment: str, node: str, seq: int, state: str, total: int) -> bytes:
    """One STATUS as a gateway sends it: download states carry bytes and total."""
    report: dict[str, Any] = {"deployment": deployment, "node": node, "seq": seq, "state": state}
    if state == "downloading":
        report.update(bytes=0, total=total)
    elif state == "downloaded":
        report.update(bytes=total, total=total)
    return fleet.encode_map(report)


def inventory_of(nodes: list[str], image: bytes, sequence: int) -> bytes:
    """The INVENTORY of a gateway whose nodes all run ``image``."""
    primary = {
        "version": "1.0.0", "sequence": sequence, "digest": hashlib.sha256(image).digest(),
        "size": len(image),
    }  # fmt: skip
    reports = [
        {"node": n, "device_type": DEVICE_TYPE, "boot_state": "confirmed", "primary": primary}
        for n in nodes
    ]
    return fleet.encode_map({"nodes": reports})


# --- the operator ---------------------------------------------------------------------------


class Operator:
    """The bench's operator connection (an admin): one request at a time, CBOR, each on
    its op's request channel (:func:`otaproto.topics.op_request`)."""

    def __init__(self, settings: LiteSettings) -> None:
        self.client = LiteClient(settings)

    async def __aenter__(self) -> Operator:
        """Connect and subscribe to the replies. Raises LinkError, SubscribeRefused."""
        await self.client.__aenter__()
        await self.client.subscribe(t.operator_response(OPERATOR))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()

    async def send(self, op: str, args: dict[str, Any]) -> str:
        """Publish a request; its id. Raises LinkError."""
        request_id = secrets.token_hex(8)
        body = cbor.encode({"id": request_id, "op": op, "args": args})
        await self.client.publish(t.op_request(OPERATOR, op), body)
        return request_id

    async def reply(self, request_id: str, timeout_s: float) -> Any:
        """The result of request ``request_id``. Raises InvalidInput (refused), LinkBroken."""
        try:
            async with asyncio.timeout(timeout_s):
                async for message in self.client.messages():
                    reply = fleet.decode_response(message.payload)
                    if reply.get("id") != request_id:
                        continue
                    if not reply["ok"]:
                        raise InvalidInput(f"the orchestrator refused: {reply.get('error')}")
                    return reply.get("result")
        except TimeoutError as exc:
            raise LinkBroken(f"no reply from the orchestrator within {timeout_s:g} s") from exc
        raise LinkBroken("the operator connection ended before the reply")


def rollout_api(
    targets: list[str], artifact_hex: str, nodes_per_gateway: int, prefer: str | None
) -> tuple[str, dict[str, Any], str]:
    """The request that starts the rollout: ``(op, args, why)``.

    ``rollout.create`` when the operator API has it (one phase of 100%, every
    node at once: ``max_parallel`` all of them, ``max_per_gateway`` all of a
    gateway's), else one ``deploy.create`` for every node. ``prefer``
    ("rollout" or "deploy") picks one; None takes the rollout when there is one.
    Raises UsageError when the rollout is asked for and the API has none.
    """
    rollout = OPS.get("rollout.create")
    takes = set() if rollout is None else set(rollout.args)
    if prefer == "deploy" or (prefer is None and "target" not in takes):
        why = "asked for" if prefer == "deploy" else "the operator API has no rollout.create"
        return "deploy.create", {"artifact": artifact_hex, "nodes": targets}, why
    if "target" not in takes:
        raise UsageError("the operator API has no rollout.create with a target")
    wanted: dict[str, Any] = {
        "artifact": artifact_hex, "target": {"nodes": targets}, "phases": "100%",
        "max_parallel": len(targets), "max_per_gateway": nodes_per_gateway,
    }  # fmt: skip
    args = {key: value for key, value in wanted.items() if key in takes}
    return "rollout.create", args, "one phase of 100%, every node at once"


def deployment_of(result: Any, db_path: Path) -> str:
    """The deployment id behind a create reply (a rollout names its deployment).

    Raises InvalidInput when the reply names none.
    """
    if isinstance(result, dict):
        for key in ("deployment", "id"):
            value = result.get(key)
            if isinstance(value, str) and value.startswith("dep-"):
                return value
        rollout = result.get("id")
        if isinstance(rollout, str):
            with _read_only(db_path) as db:
                row = db.execute("SELECT deployment FROM rollouts WHERE id = ?", [rollout])
                found = row.fetchone()
            if found and found[0]:
                return str(found[0])
    raise InvalidInput(f"cannot tell the deployment from the reply {str(result)[:200]}")


# --- reading the orchestrator's database (read-only; WAL lets it write meanwhile) -------------


@contextmanager
def _read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    """The orchestrator's database, read-only. Raises InvalidInput for any SQLite error."""
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise InvalidInput(f"cannot open {db_path} read-only: {exc}") from exc
    try:
        yield db
    except sqlite3.Error as exc:
        raise InvalidInput(f"cannot read {db_path}: {exc}") from exc
    finally:
        db.close()


def _scalar(db: sqlite3.Connection, sql: str, params: list[Any]) -> int:
    row = db.execute(sql, params).fetchone()
    return int(row[0] or 0)


def state_counts(db_path: Path, deployment: str) -> dict[str, int]:
    """How many nodes of ``deployment`` are in each state, now. Raises InvalidInput."""
    with _read_only(db_path) as db:
        rows = db.execute(
            "SELECT state, count(*) FROM deployment_nodes WHERE deployment = ? GROUP BY state",
            [deployment],
        ).fetchall()
    return {str(state): int(count) for state, count in rows}


def registry_ready(db_path: Path, gateways: int, nodes: int, image_hex: str) -> bool:
    """True once every gateway is online and every node reported the old image. Raises
    InvalidInput."""
    with _read_only(db_path) as db:
        online = _scalar(db, "SELECT count(*) FROM gateways WHERE online = 1", [])
        reported = _scalar(
            db, "SELECT count(*) FROM nodes WHERE present = 1 AND primary_digest = ?", [image_hex]
        )
    return online >= gateways and reported >= nodes


@dataclass(frozen=True)
class EventFigures:
    """The orchestrator's own record of the rollout (its ``events`` rows)."""

    rows: int
    by_state: dict[str, int]
    status_rows: int
    first_pending_at: float
    nodes_offered: int  #: nodes that left ``pending`` (their ACK was handled)
    all_offered_at: float  #: when the last of them left it
    first_status_at: float
    last_status_at: float
    all_succeeded_at: float  #: the last ``succeeded`` (when every node has one)
    kinds: dict[str, int]


def event_figures(db_path: Path, deployment: str) -> EventFigures:
    """Counts and times from ``events`` of ``deployment``. Raises InvalidInput when empty."""
    reported = list(STATUS_STEPS)
    marks = ",".join("?" * len(reported))
    with _read_only(db_path) as db:
        by_state = {
            str(s): int(c)
            for s, c in db.execute(
                "SELECT state, count(*) FROM events WHERE deployment = ? GROUP BY state",
                [deployment],
            )
        }
        if not by_state:
            raise InvalidInput(f"deployment {deployment} has no events")
        first_pending = db.execute(
            "SELECT min(at) FROM events WHERE deployment = ? AND state = 'pending'", [deployment]
        ).fetchone()[0]
        nodes_offered, offered = db.execute(
            "SELECT count(*), max(first) FROM (SELECT min(at) AS first FROM events"
            " WHERE deployment = ? AND state != 'pending' GROUP BY gateway, node)",
            [deployment],
        ).fetchone()
        first_status, last_status = db.execute(
            f"SELECT min(at), max(at) FROM events WHERE deployment = ? AND state IN ({marks})",  # noqa: S608
            [deployment, *reported],
        ).fetchone()
        last_succeeded = db.execute(
            "SELECT max(at) FROM events WHERE deployment = ? AND state = 'succeeded'",
            [deployment],
        ).fetchone()[0]
        kinds: Counter[str] = Counter()
        for (detail,) in db.execute(
            "SELECT detail FROM events WHERE deployment = ? AND state = 'pending'", [deployment]
        ):
            kinds[str(json.loads(detail).get("kind"))] += 1
    nan = float("nan")
    return EventFigures(
        rows=sum(by_state.values()), by_state=by_state,
        status_rows=sum(by_state.get(s, 0) for s in reported),
        first_pending_at=first_pending or nan, nodes_offered=int(nodes_offered or 0),
        all_offered_at=offered or nan,
        first_status_at=first_status or nan, last_status_at=last_status or nan,
        all_succeeded_at=last_succeeded or nan, kinds=dict(kinds),
    )  # fmt: skip


# --- the raw broker run ---------------------------------------------------------------------


async def raw_broker_rate(
    port: int, username: str, password: str, messages: int, payload_bytes: int
) -> float:
    """Messages a second from one QoS 1 publisher through mosquitto to one subscriber.

    Timed from the first publish to the last message received. Raises LinkError.
    """
    common = {"host": "127.0.0.1", "port": port, "username": username, "password": password}
    payload = bytes(payload_bytes)
    subscriber = LiteClient(LiteSettings(client_id="bench-raw-sub", **common))  # type: ignore[arg-type]
    publisher = LiteClient(LiteSettings(client_id="bench-raw-pub", **common))  # type: ignore[arg-type]
    async with subscriber, publisher:
        await subscriber.subscribe(RAW_TOPIC, qos=1)
        window = asyncio.Semaphore(RAW_WINDOW)

        async def one() -> None:
            async with window:
                await publisher.publish(RAW_TOPIC, payload, qos=1)

        async def receive() -> None:
            stream = subscriber.messages()
            for _ in range(messages):
                await anext(stream)

        started = time.perf_counter()
        receiving = asyncio.create_task(receive(), name="bench-raw-receive")
        async with asyncio.timeout(300):
            await asyncio.gather(*(one() for _ in range(messages)))
            await receiving
        return messages / (time.perf_counter() - started)


# --- the run --------------------------------------------------------------------------------


def _progress(as_json: bool, text: str) -> None:
    if not as_json:
        print(f"[fanout] {text}", file=sys.stderr, flush=True)


async def _poll(
    check: Callable[[], bool], timeout_s: float, what: str, dead: Callable[[], str | None]
) -> None:
    """Check ``check`` every POLL_S until true. Raises InvalidInput at the deadline, or when
    ``dead`` names a reason to stop (the orchestrator exited)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        reason = dead()
        if reason is not None:
            raise InvalidInput(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise InvalidInput(f"{what}: not reached within {timeout_s:g} s")
        await asyncio.sleep(POLL_S)


async def _connect_all(sims: list[SimGateway]) -> None:
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

    async def one(sim: SimGateway) -> None:
        async with gate:
            await sim.start()

    await asyncio.gather(*(one(sim) for sim in sims))


async def _rollout(
    *,
    workdir: Path,
    db_path: Path,
    port: int,
    orchestrator: subprocess.Popen[bytes],
    mosquitto_pid: int,
    prepared: Prepared,
    gateways: list[str],
    nodes: list[str],
    raw_messages: int,
    timeout_s: float,
    api: str | None,
    overlap: bool,
    as_json: bool,
) -> dict[str, Any]:
    """Everything that runs on the event loop; the figures as a dict."""
    out: dict[str, Any] = {}
    total = len(gateways) * len(nodes)

    def orchestrator_dead() -> str | None:
        if orchestrator.poll() is None:
            return None
        tail = (workdir / "orchestrator.err").read_text(errors="replace")[-1500:]
        return f"the orchestrator exited ({orchestrator.returncode}): {tail}"

    # The raw broker figure, with the orchestrator connected and idle.
    sample = status_report("dep-" + "0" * 16, nodes[0], 3, "downloading", 10**6)
    out["broker_raw_messages"] = raw_messages
    out["broker_raw_payload_bytes"] = len(sample)
    out["broker_raw_msgs_per_s"] = await raw_broker_rate(
        port, "orchestrator", prepared.orchestrator_secret, raw_messages, len(sample)
    )
    _progress(as_json, f"raw broker: {out['broker_raw_msgs_per_s']:,.0f} msg/s QoS 1")

    counts = GatewayCounts()
    release = asyncio.Event()  # the nodes' downloads and flashes end
    if overlap:
        release.set()
    inventory = inventory_of(nodes, prepared.old_image, prepared.old_sequence)
    sims = [
        SimGateway(gw, _gateway_settings(gw, port, secret), nodes, inventory, counts, release)
        for gw, secret in prepared.secrets.items()
    ]
    operator = Operator(
        LiteSettings(
            "127.0.0.1", port, client_id="bench-operator", username=OPERATOR,
            password=prepared.operator_secret, max_packet_bytes=OPERATOR_REPLY_BYTES,
        )
    )  # fmt: skip
    started = time.perf_counter()
    try:
        await _connect_all(sims)
        out["connect_s"] = time.perf_counter() - started
        _progress(as_json, f"{len(sims)} gateways connected in {out['connect_s']:.1f} s")
        image_hex = hashlib.sha256(prepared.old_image).hexdigest()
        await _poll(
            lambda: registry_ready(db_path, len(gateways), total, image_hex),
            START_TIMEOUT_S + len(gateways) * 0.05, "the orchestrator to record every node",
            orchestrator_dead,
        )  # fmt: skip
        out["registered_s"] = time.perf_counter() - started
        _progress(as_json, f"{total} nodes registered after {out['registered_s']:.1f} s")

        async with operator:
            targets = [f"{gw}/{n}" for gw in gateways for n in nodes]
            op, args, why = rollout_api(targets, prepared.target_hex, len(nodes), api)
            out["api"], out["api_why"] = op, why
            cpu_before = proc_figures(orchestrator.pid).cpu_s
            mosquitto_before = proc_figures(mosquitto_pid).cpu_s
            t0 = time.time()
            request = await operator.send(op, args)
            result = await operator.reply(request, timeout_s)
            out["t0"] = t0
            out["reply_s"] = time.time() - t0
            deployment = deployment_of(result, db_path)
            out["deployment"] = deployment
            _progress(as_json, f"{op} answered in {out['reply_s']:.2f} s: {deployment}")

            complete, released_at = await _watch(
                db_path, deployment, total, timeout_s, release, as_json, orchestrator_dead
            )
            out["complete"] = complete
            out["released_s"] = None if overlap else released_at - t0
            out["watch_s"] = time.time() - t0
            figures = proc_figures(orchestrator.pid)
            out["orchestrator_cpu_s"] = figures.cpu_s - cpu_before
            out["orchestrator_cpu_total_s"] = figures.cpu_s
            out["orchestrator_peak_rss_mib"] = figures.peak_rss_mib
            out["mosquitto_cpu_s"] = proc_figures(mosquitto_pid).cpu_s - mosquitto_before
            if complete:
                checked = time.perf_counter()
                status = await operator.send("deploy.status", {"id": deployment})
                reply = await operator.reply(status, timeout_s)
                out["deploy_status_reply_s"] = time.perf_counter() - checked
                if isinstance(reply, dict):
                    out["deploy_status_counts"] = reply.get("counts")
    finally:
        await asyncio.gather(*(sim.stop() for sim in sims), return_exceptions=True)
    out["states"] = state_counts(db_path, out["deployment"]) if "deployment" in out else {}
    out["gateway_commands"] = counts.commands
    out["gateway_repeated_commands"] = counts.repeated
    out["gateway_acks"] = counts.acks
    out["gateway_statuses"] = counts.statuses
    out["gateway_errors"] = len(counts.errors)
    out["gateway_error_samples"] = counts.errors[:5]
    return out


def _gateway_settings(gateway: str, port: int, secret: str) -> LiteSettings:
    """A simulated gateway's connection: its own account, and its will (offline)."""
    return LiteSettings(
        "127.0.0.1", port, client_id=f"bench-{gateway}", username=gateway, password=secret,
        will_topic=f"{t.ROOT}/gw/{gateway}/up/{t.Up.STATE}",
        will_payload=fleet.encode_map({"online": False}),
    )  # fmt: skip


async def _watch(
    db_path: Path,
    deployment: str,
    total: int,
    timeout_s: float,
    release: asyncio.Event,
    as_json: bool,
    dead: Callable[[], str | None],
) -> tuple[bool, float]:
    """Wait until every node succeeded: ``(complete, when the statuses were released)``.

    Sets ``release`` once the orchestrator recorded every node as offered.
    Not complete when the run stalls (no node moves for STALL_TIMEOUT_S),
    times out or the orchestrator exits.
    """
    deadline = time.monotonic() + timeout_s
    released_at = time.time()
    last, moved_at, shown_at = -1, time.monotonic(), 0.0
    while True:
        counts = state_counts(db_path, deployment)
        moved = sum(v for k, v in counts.items() if k != "pending")
        done = counts.get("succeeded", 0)
        now = time.monotonic()
        if moved + done != last:
            last, moved_at = moved + done, now
        if now - shown_at > 5:
            shown_at = now
            _progress(as_json, f"states: {dict(sorted(counts.items()))}")
        if not release.is_set() and moved >= total:
            released_at = time.time()
            release.set()
            _progress(as_json, "every node offered: the simulated nodes report now")
        if done >= total:
            return True, released_at
        if dead() is not None or now - moved_at > STALL_TIMEOUT_S or now > deadline:
            return False, released_at
        await asyncio.sleep(POLL_S)


def _ratio(value: float, limit: float) -> float:
    return value / limit if limit > 0 else float("nan")


def run(
    *,
    gateways: int,
    nodes_per_gateway: int,
    as_json: bool,
    raw_messages: int = RAW_MESSAGES,
    timeout_s: float = 300.0,
    api: str | None = None,
    overlap: bool = False,
) -> dict[str, Any]:
    """Run the bench and print its figures (a table, or JSON with ``as_json``); return them.

    The rollout gets ``timeout_s`` from its request to complete; one that does
    not (or makes no progress for STALL_TIMEOUT_S, or loses a final status)
    is reported with ``complete`` false and the figures so far, and its logs
    and data folder are kept.

    ``overlap`` lets each node report right after its ACK, while others are
    still being dispatched (the worst burst), instead of once every node is
    offered. ``api`` is "rollout" (``rollout.create``), "deploy" (``deploy.create``)
    or None (the rollout when the operator API has it). Raises UsageError for
    sizes the orchestrator cannot take in one request (over 10,000 targets,
    over 256 nodes per gateway) or an unknown ``api``, InvalidInput when
    mosquitto or the orchestrator does not start or the orchestrator refuses
    the setup, LinkError when the broker cannot be reached.
    """
    if gateways < 1 or not 1 <= nodes_per_gateway <= fleet.MAX_NODES_PER_GATEWAY:
        raise UsageError(f"need 1+ gateways and 1..{fleet.MAX_NODES_PER_GATEWAY} nodes each")
    if gateways * nodes_per_gateway > 10_000:
        raise UsageError("one deployment takes at most 10,000 nodes")
    if api not in (None, "rollout", "deploy"):
        raise UsageError(f"api must be 'rollout' or 'deploy', not {api!r}")
    _raise_open_files(gateways + 200)
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-fanout-"))
    keep = False
    started = time.perf_counter()
    try:
        data_dir = workdir / "data"
        key = SigningKey.from_ed25519_seed(bytes(range(32)))
        trust_file = workdir / "release.pub"
        trust_file.write_bytes(key.public_key.to_pem())
        ids, nodes = gateway_ids(gateways), node_ids(nodes_per_gateway)
        _progress(as_json, f"preparing {gateways} gateways x {nodes_per_gateway} nodes")
        prepared = prepare(data_dir, key, ids)
        accounts = [Account(u, h, r) for u, h, r in Orchestrator.read_accounts(data_dir)]
        setup_s = time.perf_counter() - started
        with (
            running_mosquitto(workdir, accounts) as (port, mosquitto_pid),
            running_orchestrator(workdir, data_dir, trust_file, port) as orchestrator,
        ):
            _progress(as_json, f"mosquitto on {port}, orchestrator pid {orchestrator.pid}")
            rollout = _rollout(
                workdir=workdir, db_path=data_dir / "shoal.db", port=port,
                orchestrator=orchestrator, mosquitto_pid=mosquitto_pid, prepared=prepared,
                gateways=ids, nodes=nodes, raw_messages=raw_messages, timeout_s=timeout_s,
                api=api, overlap=overlap, as_json=as_json,
            )  # fmt: skip
            figures = asyncio.run(rollout)
        log = (workdir / "orchestrator.err").read_text(errors="replace")
        figures["orchestrator_reconnects"] = log.count("reconnecting in")
        figures["orchestrator_warnings"] = log.count(" WARNING ") + log.count("refused ")
        result = _summarise(
            figures, gateways=gateways, nodes_per_gateway=nodes_per_gateway,
            db_path=data_dir / "shoal.db", delta_bytes=prepared.delta_bytes, setup_s=setup_s,
        )  # fmt: skip
        keep = not result["complete"] or not result["every_event_persisted"]
        result["workdir"] = str(workdir) if keep else None
        result["bench_s"] = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["simulator_cpu_s"] = usage.ru_utime + usage.ru_stime
        result = {key: _finite(value) for key, value in result.items()}
    except BaseException:
        keep = True
        _progress(as_json, f"failed; logs kept in {workdir}")
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table(result))
    return result


def _raise_open_files(wanted: int) -> None:
    """One socket per simulated gateway: lift the soft limit of open files toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    if ceiling < wanted:
        raise UsageError(f"{wanted} open files are needed; the hard limit is {hard}")


def _summarise(
    figures: dict[str, Any],
    *,
    gateways: int,
    nodes_per_gateway: int,
    db_path: Path,
    delta_bytes: int,
    setup_s: float,
) -> dict[str, Any]:
    """The figures and ratios, from the run's dict and the orchestrator's events."""
    total = gateways * nodes_per_gateway
    out = {
        "gateways": gateways, "nodes_per_gateway": nodes_per_gateway, "nodes": total,
        "setup_s": setup_s, "delta_bytes": delta_bytes, **figures,
    }  # fmt: skip
    t0 = figures.get("t0", float("nan"))
    events = event_figures(db_path, figures["deployment"]) if "deployment" in figures else None
    nan = float("nan")
    offered_s = (events.all_offered_at - t0) if events else nan
    complete = bool(figures.get("complete"))
    succeeded_s = (events.all_succeeded_at - t0) if events and complete else nan
    ingest_window_s = (events.last_status_at - events.first_status_at) if events else nan
    status_rows = events.status_rows if events else 0
    offered = events.nodes_offered if events else 0
    dispatch = offered / offered_s if offered_s > 0 else nan
    ingest = status_rows / ingest_window_s if ingest_window_s > 0 else nan
    raw = figures.get("broker_raw_msgs_per_s", nan)
    per_min = total / succeeded_s * 60 if succeeded_s > 0 else nan
    out.update(
        created_s=(events.first_pending_at - t0) if events else nan,
        all_offered_s=offered_s,
        nodes_offered=offered,
        fanout_per_s=_ratio(offered, offered_s - figures.get("reply_s", nan)),
        all_succeeded_s=succeeded_s,
        ingest_window_s=ingest_window_s,
        dispatch_per_s=dispatch,
        ingest_per_s=ingest,
        events_persisted=events.rows if events else 0,
        events_by_state=events.by_state if events else {},
        events_expected=total * (2 + len(STATUS_STEPS)),
        status_events_persisted=status_rows,
        status_events_sent=figures.get("gateway_statuses", 0),
        artifact_kinds=events.kinds if events else {},
        target_dispatch_per_s=TARGET_DISPATCH_PER_S,
        target_ingest_per_s=TARGET_INGEST_PER_S,
        dispatch_to_target=_ratio(dispatch, TARGET_DISPATCH_PER_S),
        ingest_to_target=_ratio(ingest, TARGET_INGEST_PER_S),
        ingest_to_broker=_ratio(ingest, raw),
        dispatch_to_broker=_ratio(dispatch, raw),
        rollout_nodes_per_min=per_min,
        aws_iot_jobs_nodes_per_min=AWS_IOT_JOBS_NODES_PER_MIN,
        rollout_to_aws=_ratio(per_min, AWS_IOT_JOBS_NODES_PER_MIN),
    )
    out["complete"] = complete
    out["every_event_persisted"] = (
        out["complete"]
        and status_rows == out["status_events_sent"]
        and out["events_persisted"] == out["events_expected"]
    )
    return out


def table(r: dict[str, Any]) -> str:
    """The figures as the lines a person reads (``n/a``: not measured in this run)."""

    def n(key: str, spec: str) -> str:
        value = r.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return "n/a".rjust(len(format(0.0, spec)))
        return format(value, spec)

    def ok(key: str, target: str) -> str:
        value, limit = r.get(key), r[target]
        if not isinstance(value, int | float) or not math.isfinite(value):
            return "not measured"
        return "meets" if value >= limit else "BELOW"

    partial = "" if r["nodes_offered"] == r["nodes"] else f" ({r['nodes_offered']} offered)"
    lines = [
        f"fanout: {r['gateways']} gateways x {r['nodes_per_gateway']} nodes = {r['nodes']} nodes"
        f" on mosquitto, via {r.get('api')} ({r.get('api_why')})",
        f"  complete: {r['complete']}; node states {r.get('states')}",
        f"  request -> answered         {n('reply_s', '8.2f')} s"
        f"   (deployments created after {n('created_s', '.2f')} s)",
        f"  request -> all offered      {n('all_offered_s', '8.2f')} s"
        f"   dispatch {n('dispatch_per_s', '8.0f')} deployments/s{partial}"
        f" = {n('dispatch_to_target', '.2f')} x target {r['target_dispatch_per_s']:.0f}"
        f" ({ok('dispatch_per_s', 'target_dispatch_per_s')}),"
        f" {n('dispatch_to_broker', '.3f')} x raw broker;"
        f" after the reply {n('fanout_per_s', '.0f')}/s",
        f"  request -> all succeeded    {n('all_succeeded_s', '8.2f')} s"
        f"   rollout  {n('rollout_nodes_per_min', '8.0f')} nodes/min"
        f" = {n('rollout_to_aws', '.1f')} x AWS IoT Jobs'"
        f" {r['aws_iot_jobs_nodes_per_min']:.0f}/min",
        f"  status ingestion            {n('ingest_window_s', '8.2f')} s"
        f"   ingest   {n('ingest_per_s', '8.0f')} events/s"
        f" = {n('ingest_to_target', '.2f')} x target {r['target_ingest_per_s']:.0f}"
        f" ({ok('ingest_per_s', 'target_ingest_per_s')}),"
        f" {n('ingest_to_broker', '.3f')} x raw broker",
        f"  raw broker (1 pub, 1 sub, QoS 1, {r['broker_raw_payload_bytes']} B, same run):"
        f" {n('broker_raw_msgs_per_s', '.0f')} msg/s; a deployment dispatched is 2 messages"
        " through it (command, ack), a status event 1",
        f"  events persisted: {r['status_events_persisted']} status events of"
        f" {r['status_events_sent']} sent; {r['events_persisted']} rows of"
        f" {r['events_expected']} expected -> every event persisted: {r['every_event_persisted']}",
        f"  orchestrator: {n('orchestrator_cpu_s', '.1f')} CPU s during the rollout"
        f" ({n('orchestrator_cpu_total_s', '.1f')} s in all),"
        f" peak RSS {n('orchestrator_peak_rss_mib', '.0f')} MiB,"
        f" {r['orchestrator_reconnects']} broker reconnects;"
        f" mosquitto {n('mosquitto_cpu_s', '.1f')} CPU s;"
        f" this simulator {n('simulator_cpu_s', '.1f')} CPU s",
        f"  gateways: {r['gateway_commands']} commands ({r['gateway_repeated_commands']} repeats),"
        f" {r['gateway_acks']} acks, {r['gateway_statuses']} statuses, {r['gateway_errors']}"
        f" errors; artifact chosen {r['artifact_kinds']}; deploy.status answered in"
        f" {n('deploy_status_reply_s', '.2f')} s",
    ]
    if r.get("workdir"):
        lines.append(f"  logs kept in {r['workdir']}")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":  # pragma: no cover
    run(
        gateways=int(os.environ.get("GATEWAYS", "1000")),
        nodes_per_gateway=int(os.environ.get("NODES", "10")),
        as_json="--json" in sys.argv,
    )
