"""The gateway agent's core: commands in, blocks fetched, nodes flashed, status out.

Rules (spec: ``docs/topics.md`` §Gateway):

* No MQTT here: :meth:`GatewayAgent.handle` takes one message (topic, bytes)
  and returns the messages to publish; :meth:`GatewayAgent.tick` does the same
  for timers and for news from the flashing threads. The service in
  :mod:`gateway_proxy.service` only moves them.
* Commands are handled at most once: the highest command ``seq`` handled is
  persisted with the jobs, every command is acknowledged (again, if repeated),
  and HELLO tells the orchestrator that number on every (re)connect.
* STATUS has no acknowledgement, and one can be lost between the broker and
  an orchestrator that crashes, or in a batch whose connection dropped. A lost
  progress report is overtaken by the next one, but a lost final report would
  leave the node's deployment running forever; so the newest final reports
  are kept (on disk) and repeated after every (re)connect. The orchestrator
  ignores a status number it has already seen.
* Everything a restart needs is on disk (``data_dir``): the jobs and their
  status sequence numbers (``agent.cbor``, written atomically), the downloads
  with their block bitmaps (:mod:`gateway_proxy.downloads`), and the images
  flashed to nodes (``images/<sha256>.bin``), which are the bases of deltas.
* A delta is rebuilt from the image the gateway last flashed with that digest;
  without it the job switches to the full artifact the command also names.
* The artifact is verified (signature, digest, device type) before anything is
  rebuilt or flashed; the node verifies again itself.
* One job per node at a time; nodes on different ports flash in parallel
  threads, and one node's failure never stops another's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway_proxy.config import GatewayConfig, NodePort
from gateway_proxy.downloads import Download
from gateway_proxy.serial_driver import FlashReport, Progress, config_for_baud, flash_node
from otaio.files import write_atomic
from otaio.serial_link import SerialLink
from otaproto import cbor, fleet
from otaproto import nodelink as nl
from otaproto import topics as t
from otaproto.artifact import VerifiedArtifact, verify_artifact
from otaproto.errors import InvalidInput, LinkError, ShoalError
from otaproto.keys import TrustedKeys
from otaproto.node_sender import UpdateState

log = logging.getLogger("shoal.gateway")

AGENT_VERSION = "shoal-gateway 0.1"
FETCH_RETRY_S = 5.0
#: While a node is being flashed, how often its progress is reported.
PROGRESS_REPORT_S = 1.0
STATE_FILE = "agent.cbor"
#: Final reports repeated after each (re)connect: the newest this many.
RESENT_FINAL_REPORTS = 32
MAX_STATE_BYTES = 4 * 1024 * 1024

#: How a finished node update is reported as a deployment state.
FINAL_STATES = {
    UpdateState.SUCCEEDED: "succeeded",
    UpdateState.ROLLED_BACK: "rolled_back",
    UpdateState.ALREADY_INSTALLED: "already_installed",
    UpdateState.REJECTED: "rejected",
    UpdateState.FAILED: "failed",
    UpdateState.VERIFIED: "succeeded",
}
#: How a running node update is reported while it runs.
RUNNING_STATES = {
    UpdateState.HELLO: "flashing",
    UpdateState.BEGIN: "flashing",
    UpdateState.SENDING: "flashing",
    UpdateState.PROBING: "flashing",
    UpdateState.FINISHING: "verifying",
    UpdateState.TEST_BOOT: "rebooting",
    UpdateState.REBOOTING: "rebooting",
}

Outgoing = tuple[str, bytes]
FlashFn = Callable[[NodePort, VerifiedArtifact, bytes, Callable[[Progress], None]], FlashReport]
InfoFn = Callable[[NodePort], nl.Info]


def serial_flash(
    node: NodePort, artifact: VerifiedArtifact, image: bytes, progress: Callable[[Progress], None]
) -> FlashReport:
    """Flash one node with Shoal's serial protocol (the ``shoal-serial`` driver)."""
    return flash_node(
        lambda: SerialLink(node.port, baud=node.baud),
        artifact,
        image,
        config=config_for_baud(node.baud),
        progress=progress,
    )


def serial_info(node: NodePort) -> nl.Info:
    """Ask one node for its INFO over its serial port."""
    from gateway_proxy.serial_driver import query_info

    return query_info(lambda: SerialLink(node.port, baud=node.baud))


@dataclass
class Job:
    """One node's part of one deployment, as this gateway runs it."""

    deployment: str
    node: str
    artifact: fleet.ArtifactRef
    full: fleet.ArtifactRef | None
    state: str = "downloading"
    status_seq: int = 0
    reason: str = ""
    mqtt_bytes: int = 0
    last_fetch_s: float = 0.0
    flashing: bool = field(default=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.deployment}/{self.node}"

    def to_map(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment, "node": self.node, "artifact": self.artifact.to_map(),
            "full": self.full.to_map() if self.full else None, "state": self.state,
            "status_seq": self.status_seq, "reason": self.reason, "mqtt_bytes": self.mqtt_bytes,
        }  # fmt: skip

    @classmethod
    def from_map(cls, raw: dict[str, Any]) -> Job:
        return cls(
            raw["deployment"], raw["node"], fleet.ArtifactRef.from_map(raw["artifact"], "artifact"),
            fleet.ArtifactRef.from_map(raw["full"], "full") if raw.get("full") else None,
            raw["state"], raw["status_seq"], raw.get("reason", ""), raw.get("mqtt_bytes", 0),
        )  # fmt: skip


class GatewayAgent:
    """The gateway's decisions; see the module rules."""

    def __init__(
        self,
        config: GatewayConfig,
        trusted: TrustedKeys,
        *,
        flash: FlashFn = serial_flash,
        info: InfoFn = serial_info,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.trusted = trusted
        self._flash = flash
        self._info = info
        self._clock = clock
        self._nodes = {n.name: n for n in config.nodes}
        self._device_types: dict[str, str] = {}
        self._data = config.data_dir
        self._data.mkdir(parents=True, exist_ok=True)
        (self._data / "images").mkdir(exist_ok=True)
        self._downloads: dict[bytes, Download] = {}
        self._news: queue.Queue[Outgoing] = queue.Queue()
        self._lock = threading.Lock()
        self.handled_seq = 0
        self.jobs: dict[str, Job] = {}
        self._finals: list[bytes] = []  #: STATUS payloads, oldest first
        self._load()

    # -- topics --------------------------------------------------------------

    def _up(self, kind: t.Up) -> str:
        return t.gateway_up(self.config.gateway_id, kind)

    @property
    def subscription(self) -> str:
        return f"{t.ROOT}/gw/{self.config.gateway_id}/down/#"

    @property
    def will(self) -> Outgoing:
        return self._up(t.Up.STATE), fleet.encode_map({"online": False})

    # -- connection ------------------------------------------------------------

    def connected(self) -> list[Outgoing]:
        """What to say after every (re)connect: online, and HELLO (which asks for pending work)."""
        hello = {
            "agent": AGENT_VERSION,
            "nodes": sorted(self._nodes),
            "handled_seq": self.handled_seq,
        }
        with self._lock:
            finals = [(self._up(t.Up.STATUS), payload) for payload in self._finals]
        return [
            (self._up(t.Up.STATE), fleet.encode_map({"online": True})),
            (self._up(t.Up.HELLO), fleet.encode_map(hello)),
            *finals,
        ]

    def inventory(self, only: str | None = None) -> Outgoing:
        """Ask each node (or one) for its INFO and report them all. Blocks on serial I/O."""
        reports: list[dict[str, Any]] = []
        for name, node in sorted(self._nodes.items()):
            if only is not None and name != only:
                continue
            with self._lock:
                busy = any(j.flashing for j in self.jobs.values() if j.node == name)
            if busy:
                continue
            try:
                info = self._info(node)
            except (ShoalError, OSError) as exc:
                reports.append({"node": name, "error": str(exc)[:4000]})
                continue
            self._device_types[name] = info.device_type
            primary = info.primary
            reports.append({
                "node": name, "device_type": info.device_type, "boot_state": info.boot_state,
                "primary": None if primary is None else {
                    "version": primary.version, "sequence": primary.sequence,
                    "digest": primary.image_digest, "size": primary.image_size,
                },
            })  # fmt: skip
        return self._up(t.Up.INVENTORY), fleet.encode_map({"nodes": reports})

    # -- messages --------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """One message from the orchestrator. Never raises for bad input (logs it)."""
        parsed = t.parse(topic)
        if parsed is None or parsed.owner != self.config.gateway_id or parsed.direction != "down":
            log.warning("ignoring message on %s", topic)
            return []
        try:
            if parsed.kind == t.Down.COMMAND:
                return self._command(payload)
            if parsed.kind == t.Down.BLOCK:
                return self._block(payload)
            if parsed.kind == t.Down.ERROR:
                error = fleet.decode_map(payload, fleet.ERROR, "error")
                log.warning("orchestrator refused %s: %s", error["topic"], error["reason"])
        except InvalidInput as exc:
            log.warning("bad %s message: %s", parsed.kind, exc)
        return []

    def _command(self, payload: bytes) -> list[Outgoing]:
        cmd = fleet.decode_map(payload, fleet.COMMAND, "command")
        seq = cmd["seq"]
        ack = (self._up(t.Up.ACK), fleet.encode_map({"seq": seq}))
        if seq <= self.handled_seq:
            return [ack]  # a repeat: acknowledged again, not done again
        out: list[Outgoing] = []
        with self._lock:
            key = f"{cmd['deployment']}/{cmd['node']}"
            if cmd["type"] == "deploy":
                if cmd["artifact"] is None:
                    raise InvalidInput("deploy command without an artifact")
                full = cmd["full"]
                job = Job(
                    cmd["deployment"], cmd["node"],
                    fleet.ArtifactRef.from_map(cmd["artifact"], "command.artifact"),
                    fleet.ArtifactRef.from_map(full, "command.full") if full else None,
                )  # fmt: skip
                if key not in self.jobs:
                    self.jobs[key] = job
                    if job.node not in self._nodes:
                        out.append(
                            self._final(job, "failed", f"no node {job.node} on this gateway")
                        )
                    else:
                        out.append(self._status(job, "downloading"))
            elif cmd["type"] == "cancel":
                job_or_none = self.jobs.get(key)
                if job_or_none is not None and not job_or_none.flashing:
                    out.append(self._final(job_or_none, "aborted", "cancelled"))
            else:
                raise InvalidInput(f"unknown command type {cmd['type']!r}")
            self.handled_seq = seq
            self._save()
        return [ack, *out]

    def _block(self, payload: bytes) -> list[Outgoing]:
        if len(payload) > fleet.MAX_BLOCK_BYTES + 1024:
            raise InvalidInput(f"block message of {len(payload)} bytes is too large")
        block = fleet.decode_map(payload, fleet.BLOCK, "block", limit=fleet.MAX_BLOCK_BYTES + 1024)
        download = self._downloads.get(block["artifact"])
        if download is None:
            return []  # a late block of a finished download
        if download.put(block["index"], block["data"]):
            for job in self._jobs_fetching(download.ref.digest):
                job.mqtt_bytes += len(block["data"])
        out: list[Outgoing] = []
        if download.complete:
            out.extend(self._download_done(download))
        else:
            out.extend(self._fetch(download, force=False))
        return out

    # -- downloads ---------------------------------------------------------------

    def _wanted(self, job: Job) -> fleet.ArtifactRef:
        """The artifact this job needs now: the delta when its base is here, else the full one."""
        ref = job.artifact
        if (
            ref.kind == "bsdiff4"
            and ref.base_digest is not None
            and job.full is not None
            and not self._image_path(ref.base_digest).exists()
        ):
            return job.full
        return ref

    def _jobs_fetching(self, digest: bytes) -> list[Job]:
        return [
            j for j in self.jobs.values()
            if j.state == "downloading" and self._wanted(j).digest == digest
        ]  # fmt: skip

    def _fetch(self, download: Download, *, force: bool) -> list[Outgoing]:
        now = self._clock()
        jobs = self._jobs_fetching(download.ref.digest)
        if not jobs:
            return []
        # A sliding window: blocks asked for and not yet here are not asked for
        # again until FETCH_RETRY_S has passed (or ``force``: nothing came for
        # that long); the window is refilled once half of it has arrived.
        window = min(self.config.fetch_window_blocks, fleet.MAX_BLOCKS_PER_FETCH)
        asked = download.asked
        for index, at in list(asked.items()):
            if force or now - at >= FETCH_RETRY_S:
                del asked[index]
        if len(asked) > window // 2:
            return []
        fresh = [i for i in download.missing(window + len(asked)) if i not in asked]
        missing = fresh[: window - len(asked)]
        if not missing:
            return []
        for index in missing:
            asked[index] = now
        for job in jobs:
            job.last_fetch_s = now
        request = {"artifact": download.ref.digest, "blocks": missing}
        return [(self._up(t.Up.FETCH), fleet.encode_map(request))]

    def _download_done(self, download: Download) -> list[Outgoing]:
        out: list[Outgoing] = []
        try:
            data = download.finish()
        except InvalidInput as exc:
            log.warning("%s", exc)
            return self._fetch(download, force=True)
        for job in self._jobs_fetching(download.ref.digest):
            out.extend(self._start_flash(job, data))
        # The files stay until no job needs them: a restart mid-flash flashes again
        # from them (the node resumes at its own offset) instead of fetching again.
        self._downloads.pop(download.ref.digest, None)
        download.close()
        return out

    # -- flashing ----------------------------------------------------------------

    def _start_flash(self, job: Job, artifact_bytes: bytes) -> list[Outgoing]:
        node = self._nodes[job.node]
        try:
            verified = verify_artifact(
                artifact_bytes, self.trusted, device_type=self._device_types.get(job.node)
            )
            base = None
            if verified.manifest.is_delta and verified.manifest.base_digest is not None:
                base = self._image_path(verified.manifest.base_digest).read_bytes()
            image = verified.rebuild_image(base)
        except (InvalidInput, OSError) as exc:
            reason = f"artifact refused by the gateway: {exc}"
            return [self._final(job, "failed", reason)]
        self._image_path(verified.manifest.image_digest).write_bytes(image)
        job.flashing = True
        out = [self._status(job, "downloaded")]
        threading.Thread(
            target=self._flash_thread, args=(job, node, verified, image),
            name=f"flash-{job.node}", daemon=True,
        ).start()  # fmt: skip
        return out

    def _flash_thread(
        self, job: Job, node: NodePort, verified: VerifiedArtifact, image: bytes
    ) -> None:
        last: dict[str, Any] = {"state": "", "at": 0.0}

        def progress(p: Progress) -> None:
            # A report on every change of state, and while flashing one a second
            # with the bytes the node has taken (for progress bars).
            state = RUNNING_STATES.get(p.state)
            if state is None:
                return
            now = self._clock()
            if state == last["state"] and now - last["at"] < PROGRESS_REPORT_S:
                return
            last["state"], last["at"] = state, now
            with self._lock:
                self._news.put(self._status(job, state, bytes_done=p.acked_bytes, total=len(image)))

        try:
            report = self._flash(node, verified, image, progress)
            final, reason = FINAL_STATES.get(report.state, "failed"), report.reason
            serial_bytes = report.data_bytes_sent
        except (LinkError, ShoalError, OSError) as exc:
            final, reason, serial_bytes = "failed", f"flashing failed: {exc}", 0
        with self._lock:
            job.flashing = False
            self._news.put(self._final(job, final, reason, serial_bytes=serial_bytes))
        with contextlib.suppress(Exception):
            self._news.put(self.inventory(only=job.node))

    # -- timers ----------------------------------------------------------------

    def tick(self) -> list[Outgoing]:
        """News from flashing threads, downloads to start or re-request, jobs to resume."""
        out: list[Outgoing] = []
        while True:
            try:
                out.append(self._news.get_nowait())
            except queue.Empty:
                break
        now = self._clock()
        with self._lock:
            for job in list(self.jobs.values()):
                if job.state != "downloading" or job.flashing:
                    continue
                if any(j.flashing for j in self.jobs.values() if j.node == job.node):
                    continue
                ref = self._wanted(job)
                download = self._downloads.get(ref.digest)
                if download is None:
                    download = self._downloads[ref.digest] = Download(self._data / "downloads", ref)
                    # Blocks already on disk came over MQTT before a restart, for these jobs.
                    for fetching in self._jobs_fetching(ref.digest):
                        fetching.mqtt_bytes = max(fetching.mqtt_bytes, download.bytes_have)
                    if download.complete:
                        out.extend(self._download_done(download))
                        continue
                    out.extend(self._fetch(download, force=True))
                elif now - job.last_fetch_s >= FETCH_RETRY_S:
                    out.extend(self._fetch(download, force=True))
        return out

    # -- status ----------------------------------------------------------------

    def _status(
        self,
        job: Job,
        state: str,
        *,
        bytes_done: int | None = None,
        total: int | None = None,
        serial_bytes: int | None = None,
    ) -> Outgoing:
        """Record and report a state of ``job`` (the caller holds the lock)."""
        job.status_seq += 1
        job.state = state
        self._save()
        body = {
            "deployment": job.deployment, "node": job.node, "seq": job.status_seq, "state": state,
            "bytes": bytes_done, "total": total, "reason": job.reason or None,
            "mqtt_bytes": job.mqtt_bytes, "serial_bytes": serial_bytes,
        }  # fmt: skip
        return self._up(t.Up.STATUS), fleet.encode_map(body)

    def _final(
        self, job: Job, state: str, reason: str, *, serial_bytes: int | None = None
    ) -> Outgoing:
        job.reason = reason
        message = self._status(job, state, serial_bytes=serial_bytes)
        self._finals = [*self._finals, message[1]][-RESENT_FINAL_REPORTS:]
        self.jobs.pop(job.key, None)
        self._save()
        needed = {self._wanted(j).digest for j in self.jobs.values()}
        for ref in (job.artifact, job.full):
            if ref is not None and ref.digest not in needed:
                stale = self._downloads.pop(ref.digest, None)
                if stale is not None:
                    stale.close()
                for suffix in (".part", ".map"):
                    (self._data / "downloads" / f"{ref.digest.hex()}{suffix}").unlink(
                        missing_ok=True
                    )
        return message

    # -- persistence -------------------------------------------------------------

    def _image_path(self, digest: bytes) -> Path:
        return self._data / "images" / f"{digest.hex()}.bin"

    def _save(self) -> None:
        state = {
            "handled_seq": self.handled_seq,
            "jobs": [j.to_map() for j in self.jobs.values()],
            "finals": self._finals,
        }
        write_atomic(self._data / STATE_FILE, cbor.encode(state), mode=0o600)

    def _load(self) -> None:
        path = self._data / STATE_FILE
        if not path.exists():
            return
        try:
            raw = cbor.decode(path.read_bytes()[:MAX_STATE_BYTES], "agent state")
            self.handled_seq = int(raw["handled_seq"])
            self._finals = [bytes(p) for p in raw.get("finals", [])][-RESENT_FINAL_REPORTS:]
            for item in raw["jobs"]:
                job = Job.from_map(item)
                if job.state not in ("downloading",):
                    job.state = (
                        "downloading"  # interrupted while flashing: fetch (resumes) and flash again
                    )
                self.jobs[job.key] = job
        except (InvalidInput, KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{path} is damaged: {exc}") from exc

    def seen_images(self) -> set[str]:
        """Hex digests of the images this gateway can use as delta bases."""
        return {p.stem for p in (self._data / "images").glob("*.bin")}

    def image_digest_ok(self, digest: bytes) -> bool:
        path = self._image_path(digest)
        return path.exists() and hashlib.sha256(path.read_bytes()).digest() == digest
