"""``shoal demo``: the whole system in one command, on the embedded broker.

What runs, all in this process and its threads, on real parts: the
orchestrator with the embedded MQTT broker, two gateway agents, and three
simulated MCU nodes per gateway, each on its own pty paced at the chosen baud
rate by a relay. A release key is made, firmware v1 and v2 are built (real
Cortex-M images when ``arm-none-eabi-gcc`` is here, code-like images
otherwise), signed, with the v1 -> v2 delta. The nodes run v1; the gateways
flashed v1 themselves, so they hold the delta's base. A rollout takes v2 to
every node in two phases, a one-node canary and then the rest; one node's
self-test fails on v2, so it reverts and is reported rolled back.

The command exits 0 only when every node ends where it should: rolled back
for that one node, succeeded for the others. Everything it started is
stopped and every temporary file removed (unless ``--data`` keeps them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.service import run_gateway
from mcu_firmware_stub.flash import FlashTiming
from mcu_firmware_stub.node import NodeConfig, NodeThread, SimulatedNode
from otaio.serial_link import SerialLink
from otaio.wire import PacedWire, WireConfig
from otaproto.artifact import build_delta_artifact, build_full_artifact, verify_artifact
from otaproto.errors import ShoalError
from otaproto.keys import SigningKey, TrustedKeys
from shoal.opsclient import OperatorLogin, call_async
from shoal.serve import ServeOptions, serve
from shoal.synthetic import evolve, firmware_like

DEVICE_TYPE = "nrf52840"
FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "examples" / "firmware"
FINAL = {"succeeded", "failed", "rolled_back", "skipped", "incompatible", "aborted", "timed_out"}
ROLLOUT_FINAL = {"completed", "aborted", "failed"}
POLL_S = 0.25
DEADLINE_S = 110.0


@dataclass(frozen=True)
class DemoOptions:
    """Knobs of the demo (the CLI's options)."""

    gateways: int = 2
    nodes: int = 3
    baud: int = 115200
    image_size: int | None = None
    data: Path | None = None
    flash_timing: bool = False


@dataclass
class NodeResult:
    """One row of the summary."""

    node: str
    from_version: str
    to_version: str
    state: str
    expected: str
    mqtt_bytes: int
    serial_bytes: int
    seconds: float


@dataclass
class DemoReport:
    """What the demo did, for the summary table and ``--json``."""

    ok: bool
    image: str
    image_bytes: int
    full_artifact_bytes: int
    delta_artifact_bytes: int
    baud: int
    rollout: str
    rollout_state: str
    seconds: float
    nodes: list[NodeResult] = field(default_factory=list)

    @property
    def mqtt_bytes(self) -> int:
        return sum(n.mqtt_bytes for n in self.nodes)

    @property
    def mqtt_bytes_saved(self) -> int:
        fetched = sum(1 for n in self.nodes if n.mqtt_bytes)
        return fetched * self.full_artifact_bytes - self.mqtt_bytes

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["mqtt_bytes"] = self.mqtt_bytes
        body["mqtt_bytes_saved_by_delta"] = self.mqtt_bytes_saved
        body["serial_bytes"] = sum(n.serial_bytes for n in self.nodes)
        return body


def build_images(workdir: Path, image_size: int | None) -> tuple[bytes, bytes, str]:
    """Firmware v1 and v2: real Cortex-M images when the toolchain is here."""
    if image_size is None and shutil.which("arm-none-eabi-gcc"):
        out = workdir / "firmware"
        built = subprocess.run(
            ["bash", str(FIRMWARE_DIR / "build.sh"), str(out)], capture_output=True, text=True
        )
        if built.returncode == 0:
            v1, v2 = (out / "fw-v1.bin").read_bytes(), (out / "fw-v2.bin").read_bytes()
            return v1, v2, "Cortex-M4 firmware built by arm-none-eabi-gcc (examples/firmware)"
    size = image_size or 64 * 1024
    v1 = firmware_like(size, seed=1)
    return v1, evolve(v1, seed=2, insert_bytes=512)[:size], f"{size // 1024} KiB code-like image"


class _NodeRunner(NodeThread):
    """A simulated node on the far end of a paced pty pair."""

    def __init__(self, config: NodeConfig, initial: Any, baud: int) -> None:
        self.wire = PacedWire(WireConfig(baud=baud))
        self.wire.start()
        link = SerialLink(self.wire.b_path, baud=baud)
        super().__init__(SimulatedNode(config, initial=initial), link, name="demo-node")

    def close(self) -> None:
        self.stop()
        self.wire.close()


async def run_demo(
    options: DemoOptions, show: Callable[[dict[str, Any], dict[str, Any]], None]
) -> DemoReport:
    """Run the demo; ``show(rollout, deployment)`` is called as progress comes in."""
    started = time.monotonic()
    keep = options.data is not None
    workdir = options.data or Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runners: list[_NodeRunner] = []
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        key = SigningKey.generate()
        keys = workdir / "keys"
        keys.mkdir(exist_ok=True)
        (keys / "release.pub").write_bytes(key.public_key.to_pem())
        trusted = TrustedKeys([key.public_key])
        v1, v2, image_kind = build_images(workdir, options.image_size)
        common = {"name": "demo-app", "device_types": (DEVICE_TYPE,), "key": key, "created_s": 0}
        full1 = build_full_artifact(v1, version="1.0.0", sequence=1, **common)  # type: ignore[arg-type]
        full2 = build_full_artifact(v2, version="2.0.0", sequence=2, **common)  # type: ignore[arg-type]
        art1, art2 = verify_artifact(full1, trusted), verify_artifact(full2, trusted)
        delta = build_delta_artifact(art1, art2, key, created_s=0).artifact

        # The orchestrator with the embedded broker, on a free port.
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        serve_stop = asyncio.Event()
        stops.append(serve_stop)
        options_serve = ServeOptions(data_dir=workdir / "orchestrator", trusted=trusted, port=0)
        (workdir / "orchestrator").mkdir(exist_ok=True)
        tasks.append(asyncio.create_task(
            serve(options_serve, serve_stop, lambda port: ready.set_result(port)), name="demo-serve"
        ))  # fmt: skip
        port = await asyncio.wait_for(ready, 20)
        secret = (workdir / "orchestrator" / "admin.secret").read_text().strip()
        admin = OperatorLogin("127.0.0.1", port, "admin", secret)

        async def ops(op: str, **args: Any) -> Any:
            return await call_async(admin, op, args, timeout_s=15)

        for data in (full1, full2, delta):
            await ops("artifact.upload", data=data)

        # Gateways and their nodes; the last node of the last gateway fails its self-test on v2.
        failing = f"gw-{options.gateways}/node-{options.nodes}"
        targets: list[str] = []
        for g in range(1, options.gateways + 1):
            gateway = f"gw-{g}"
            added = await ops("devices.add", id=gateway)
            await ops("devices.accept", id=gateway)
            ports = []
            for n in range(1, options.nodes + 1):
                name = f"node-{n}"
                target = f"{gateway}/{name}"
                targets.append(target)
                config = NodeConfig(
                    state_dir=workdir / "nodes" / gateway / name, device_type=DEVICE_TYPE,
                    trusted=trusted, slot_bytes=max(64 * 1024, _round_up(len(v2) + 8192, 4096)),
                    timing=FlashTiming() if options.flash_timing else FlashTiming.off(),
                    fail_self_test=frozenset({"2.0.0"}) if target == failing else frozenset(),
                )  # fmt: skip
                runner = await asyncio.to_thread(_NodeRunner, config, art1, options.baud)
                runners.append(runner)
                ports.append(NodePort(name, runner.wire.a_path, options.baud))
            gw_config = GatewayConfig(
                gateway_id=gateway, data_dir=workdir / "gateways" / gateway, trust=(),
                mqtt_host="127.0.0.1", mqtt_port=port, password=added["secret"], nodes=tuple(ports),
            )  # fmt: skip
            agent = GatewayAgent(gw_config, trusted)
            # This gateway flashed v1 itself: it holds the delta's base.
            (gw_config.data_dir / "images" / f"{art1.manifest.image_digest.hex()}.bin").write_bytes(
                v1
            )
            stop = asyncio.Event()
            stops.append(stop)
            tasks.append(asyncio.create_task(run_gateway(agent, stop), name=f"demo-{gateway}"))

        # Every node reported in, then the rollout: a one-node canary, then the rest.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = [
                await ops("devices.show", id=f"gw-{g}") for g in range(1, options.gateways + 1)
            ]
            if all(n.get("primary") for s in shown for n in s["nodes"]) and sum(
                len(s["nodes"]) for s in shown
            ) == len(targets):
                break
            await asyncio.sleep(POLL_S)
        else:
            raise ShoalError("the nodes did not all report in within 30 s")
        # The failing node goes last, so the canary is a healthy one.
        ordered = [t for t in targets if t != failing] + [failing]
        created = await ops(
            "rollout.create", artifact=art2.manifest.image_digest.hex(),
            target={"nodes": ordered}, phases="1,100%", success_threshold=50,
            failure_threshold={"percent": 50, "min_count": 2}, on_failure="pause",
        )  # fmt: skip
        rollout_id = created["id"] if isinstance(created, dict) else str(created)
        rollout: dict[str, Any] = {}
        deployment: dict[str, Any] = {}
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            rollout = await ops("rollout.show", id=rollout_id, nodes=1000)
            if rollout.get("deployment"):
                deployment = await ops("deploy.status", id=rollout["deployment"])
            show(rollout, deployment)
            nodes = deployment.get("nodes", [])
            if (
                rollout.get("state") in ROLLOUT_FINAL
                and nodes
                and all(n["state"] in FINAL for n in nodes)
            ):
                break
            if rollout.get("state") == "paused":
                break
            await asyncio.sleep(POLL_S)

        results = []
        for n in deployment.get("nodes", []):
            expected = "rolled_back" if n["target"] == failing else "succeeded"
            events = n.get("events") or []
            first = events[0]["at"] if events else 0.0
            last = events[-1]["at"] if events else first
            results.append(NodeResult(
                node=n["target"], from_version="1.0.0",
                to_version="2.0.0" if n["state"] == "succeeded" else "1.0.0", state=n["state"],
                expected=expected, mqtt_bytes=n["mqtt_bytes"] or 0,
                serial_bytes=n["serial_bytes"] or 0, seconds=max(0.0, float(last) - float(first)),
            ))  # fmt: skip
        ok = (
            len(results) == len(targets)
            and all(r.state == r.expected for r in results)
            and rollout.get("state") == "completed"
        )
        return DemoReport(
            ok=ok, image=image_kind, image_bytes=len(v2), full_artifact_bytes=len(full2),
            delta_artifact_bytes=len(delta), baud=options.baud, rollout=rollout_id,
            rollout_state=str(rollout.get("state")), seconds=time.monotonic() - started,
            nodes=results,
        )  # fmt: skip
    finally:
        for stop in stops[1:]:
            stop.set()
        for task in tasks[1:]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        if stops:
            stops[0].set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tasks[0], 20)
        for runner in runners:
            await asyncio.to_thread(runner.close)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def summary_json(report: DemoReport) -> str:
    """The summary as JSON (``--json``)."""
    return json.dumps(report.to_json(), indent=2, default=str)
